"""Emit a plan for a training framework, after checking the framework can run it.

Targets and the key names they document:
- torchtitan: TOML job config, sections [training], [parallelism], [activation_checkpoint]
  (pytorch/torchtitan torchtitan/config/job_config.py, the TOML JobConfig: Training,
  Parallelism, ActivationCheckpoint dataclasses; schedule names from
  torch.distributed.pipelining.schedules.get_schedule_class).
- megatron: Megatron-LM pretrain_gpt.py flags (megatron/training/arguments.py).
- deepspeed: ds_config JSON (deepspeed.ai/docs/config-json: train_batch_size,
  train_micro_batch_size_per_gpu, gradient_accumulation_steps, zero_optimization, bf16/fp16);
  TP and PP are not ds_config keys (Megatron-DeepSpeed flags / PipelineModule set them).
- plan: the plan JSON that `meshplan simulate --plan` and `meshplan run --plan` read.

Each target's rules are written once, over attributes that are either one plan's values or
the candidate table's columns, so the same rules refuse an export and restrict a search.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd

from meshplan.core.units import GIB
from meshplan.core.errors import PlanError
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator import rules
from meshplan.simulator.plan import Plan
from meshplan.simulator.rules import TORCH_SCHEDULES
from meshplan.simulator.train import SimulationResult

TARGETS = tuple(rules.FRAMEWORKS)


def _fields(table: pd.DataFrame) -> SimpleNamespace:
    """The candidate table's columns as rules read them."""
    cols = {c: table[c].to_numpy() for c in table.columns}
    cols.update(schedule=table["schedule"].astype(str).to_numpy(),
                placement=table["placement"].map(",".join).to_numpy(),
                attention=table.attrs["attention"], dtype=table.attrs["dtype"],
                layer_partition=table.attrs["layer_partition"])
    return SimpleNamespace(**cols)


def supported(target: str, model: ModelSpec, table: pd.DataFrame) -> np.ndarray:
    """Which candidate-table rows `target` can run (a search restriction)."""
    return np.broadcast_to(rules.holds(rules.FRAMEWORKS[target], _fields(table), model), len(table))


def check(target: str, model: ModelSpec, plan: Plan) -> None:
    """One PlanError naming every knob of `plan` that `target` cannot run."""
    if target not in TARGETS:
        raise PlanError("emit", f"unknown target {target!r}", f"use one of {', '.join(TARGETS)}")
    issues = rules.violations(rules.FRAMEWORKS[target], plan.fields(), model)
    if issues:
        raise PlanError.of([(f"emit.{target}", f"{field.removeprefix('plan.')}: {problem}", fix)
                            for field, problem, fix in issues])


def export(target: str, model: ModelSpec, result: SimulationResult) -> str:
    """The plan of `result` in `target`'s format (checked first)."""
    check(target, model, result.plan)
    return {"torchtitan": _torchtitan, "megatron": _megatron, "deepspeed": _deepspeed,
            "plan": _plan}[target](model, result)


def _header(model: ModelSpec, r: SimulationResult) -> str:
    return (f"meshplan plan: {model.name} on {r.cluster.num_gpus} x {r.hardware}, predicted "
            f"{r.step_time_s:.3f} s/step, {r.peak_memory_bytes / GIB:.1f} GiB peak per device")


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _torchtitan(model: ModelSpec, r: SimulationResult) -> str:
    p = r.plan
    stages = p.pp * p.virtual_stages
    sections = {
        "training": {"local_batch_size": p.micro_batch * (p.num_microbatches if p.pp > 1 else 1),
                     "global_batch_size": p.global_batch, "seq_len": p.seq_len,
                     "mixed_precision_param": "float32" if p.dtype == "fp32" else "bfloat16"},
        "parallelism": {
            "data_parallel_replicate_degree": p.dp if p.zero == 0 else 1,
            "data_parallel_shard_degree": 1 if p.zero == 0 else p.dp,
            # ZeRO-2 ~ FSDP keeping the gathered weights from forward to backward
            # (PyTorch fully_shard reshard_after_forward=False)
            "fsdp_reshard_after_forward": "never" if p.zero == 2 else "default",
            "tensor_parallel_degree": p.tp, "enable_async_tensor_parallel": False,
            "context_parallel_degree": p.cp, "pipeline_parallel_degree": p.pp,
            "pipeline_parallel_schedule": TORCH_SCHEDULES.get(p.schedule if p.pp > 1 else "1f1b"),
            "pipeline_parallel_microbatch_size": p.micro_batch},
        "activation_checkpoint": {"mode": p.recompute},
    }
    if p.pp > 1 and model.num_layers % stages == 0:
        sections["parallelism"].update(pipeline_parallel_layers_per_stage=model.num_layers // stages,
                                       pipeline_parallel_first_stage_less_layers=0,
                                       pipeline_parallel_last_stage_less_layers=0)
    if p.recompute == "selective":  # per-op SAC: torchtitan's closest to Korthikanti's selective
        sections["activation_checkpoint"]["selective_ac_option"] = "op"
    lines = [f"# {_header(model, r)}"]
    for name, keys in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def _megatron(model: ModelSpec, r: SimulationResult) -> str:
    p = r.plan
    flags = [("--tensor-model-parallel-size", p.tp), ("--pipeline-model-parallel-size", p.pp),
             ("--context-parallel-size", p.cp), ("--micro-batch-size", p.micro_batch),
             ("--global-batch-size", p.global_batch), ("--seq-length", p.seq_len),
             ("--num-layers", model.num_layers), ("--hidden-size", model.hidden_size),
             ("--ffn-hidden-size", model.ffn_hidden_size),
             ("--num-attention-heads", model.num_heads),
             ("--max-position-embeddings", max(model.max_seq_len, p.seq_len))]
    if model.num_kv_heads != model.num_heads:
        flags += [("--group-query-attention", None), ("--num-query-groups", model.num_kv_heads)]
    flags += [(flag, value) for cond, flag, value in (
        (model.gated_mlp and model.activation == "silu", "--swiglu", None),
        (model.norm == "rmsnorm", "--normalization", "RMSNorm"),
        (model.position_embedding == "rope", "--position-embedding-type", "rope"),
        (not model.tied_embeddings, "--untie-embeddings-and-output-weights", None),
        (not model.bias, "--disable-bias-linear", None)) if cond]
    if p.sp:
        flags.append(("--sequence-parallel", None))
    if p.virtual_stages > 1:
        flags.append(("--num-layers-per-virtual-pipeline-stage",
                      model.num_layers // (p.pp * p.virtual_stages)))
    layers = [s.layers for s in r.stages]
    if p.pp > 2 and p.virtual_stages == 1 and len(set(layers[1:-1])) == 1 and len(set(layers)) > 1:
        flags += [("--decoder-first-pipeline-num-layers", layers[0]),
                  ("--decoder-last-pipeline-num-layers", layers[-1])]
    if p.recompute == "full":
        flags += [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                  ("--recompute-num-layers", 1)]
    elif p.recompute == "selective":
        flags.append(("--recompute-granularity", "selective"))
    flags += {1: [("--use-distributed-optimizer", None)], 3: [("--use-torch-fsdp2", None)]}.get(p.zero, [])
    if ",".join(p.placement) == "tp,cp,pp,dp":
        flags.append(("--use-tp-pp-dp-mapping", None))
    if p.attention == "flash":
        flags.append(("--use-flash-attn", None))
    flags += {"bf16": [("--bf16", None)], "fp16": [("--fp16", None)]}.get(p.dtype, [])
    body = " \\\n".join(f"  {k}" + ("" if v is None else f" {v}") for k, v in flags)
    note = "" if p.virtual_stages > 1 or len(set(layers[1:-1])) <= 1 else (
        f"# simulated with layers per stage {layers}; Megatron-LM splits them evenly\n")
    return f"# {_header(model, r)}\n{note}{body}\n"


def _deepspeed(model: ModelSpec, r: SimulationResult) -> str:
    p = r.plan
    config = {"train_batch_size": p.global_batch, "train_micro_batch_size_per_gpu": p.micro_batch,
              "gradient_accumulation_steps": p.num_microbatches,
              "zero_optimization": {"stage": p.zero}}
    if p.dtype in ("bf16", "fp16"):
        config[p.dtype] = {"enabled": True}
    return json.dumps(config, indent=2) + "\n"


def deepspeed_note(plan: Plan) -> str:
    """What ds_config cannot say: the model-parallel degrees and recompute."""
    return (f"ds_config has no tensor/pipeline keys: run with tp {plan.tp} (Megatron-DeepSpeed "
            f"--tensor-model-parallel-size), pp {plan.pp} (PipelineModule(num_stages={plan.pp})), "
            f"recompute {plan.recompute} (deepspeed.checkpointing), "
            f"data-parallel size {plan.dp} = GPUs / (tp x pp)")


def _plan(model: ModelSpec, r: SimulationResult) -> str:
    return json.dumps(r.plan.to_dict(), indent=2) + "\n"
