"""torchtitan: the recipe of the model's flavor (llama3, or qwen3 for its MoE) with the plan's
parallelism.

0.3 (pytorch/torchtitan v0.3.0): no config files; `python -m torchtitan.train --module llama3
--config llama3_70b` picks a recipe in models/<module>/config_registry.py and flags override its
fields (config/configs.py: TrainingConfig, ParallelismConfig, CompileConfig); activation
checkpointing is a subcommand (activation-checkpoint:full|selective|none) and async TP moved
to --compile. Float8 and the MoE communication backend live in the recipe's model spec, which
no flag reaches (rules.FRAMEWORKS refuses what the recipe does not set). 0.2 (v0.2.2): a TOML
job file (config/job_config.py: [model] name/flavor/converters, [training], [parallelism],
[activation_checkpoint], [compile], [quantize.linear.float8]) given by --job.config_file.
The pipeline split is given stage by stage (module_fqns_per_model_part), so any partition the
planner chose runs as simulated.
"""
from __future__ import annotations

import json

from meshplan.planner.exports import Export, TrainJob
from meshplan.simulator import rules
from meshplan.simulator.rules import TORCH_SCHEDULES

# The last stage's output projection: torchtitan 0.3 calls it lm_head, 0.2 output.
HEAD = {"0.3": "lm_head", "0.2": "output"}
USER_PATHS = (("HF_ASSETS_PATH", "folder of the model's Hugging Face tokenizer and config.json"),
              ("DATA_PATH", "the training dataset (a local copy of the dataset the recipe names)"))


def stage_modules(partition: tuple[int, ...], head: str) -> list[list[str]]:
    """Module names of each (virtual) stage in pipeline order: embeddings on the first,
    final norm and output projection on the last."""
    stages, start = [], 0
    for i, n in enumerate(partition):
        names = [f"layers.{k}" for k in range(start, start + n)]
        start += n
        stages.append((["tok_embeddings"] if i == 0 else []) + names
                      + (["norm", head] if i == len(partition) - 1 else []))
    return stages


def _reshard(p) -> str:
    """FSDP2 reshard_after_forward: ZeRO-2 keeps the gathered weights from forward to backward
    (reshard_after_forward=False), as does ZeRO-3 planned without resharding; planned ZeRO-3
    reshards always (without a pipeline: rules refuse it under one)."""
    if p.zero == 2 or (p.zero == 3 and not p.reshard_after_forward):
        return "never"
    return "always" if p.zero == 3 else "default"


def _parallelism(job: TrainJob, version: str) -> dict:
    p = job.plan
    keys = {"data_parallel_replicate_degree": p.dp if p.zero == 0 else 1,
            "data_parallel_shard_degree": 1 if p.zero == 0 else p.dp,
            "fsdp_reshard_after_forward": _reshard(p),
            "tensor_parallel_degree": p.tp, "context_parallel_degree": p.cp,
            "pipeline_parallel_degree": p.pp}
    if p.pp > 1:
        keys.update(pipeline_parallel_schedule=TORCH_SCHEDULES[p.schedule],
                    pipeline_parallel_microbatch_size=p.micro_batch)
    if p.cp > 1 and version == "0.2":  # 0.3 takes torch's default rotation (rules: allgather)
        keys["context_parallel_rotate_method"] = p.cp_comm
    if job.model.num_experts:
        keys["expert_parallel_degree"] = p.ep
        if version == "0.2":  # 0.3 derives it: 1 under EP, TP's without
            keys["expert_tensor_parallel_degree"] = p.etp
            keys["expert_parallel_comm_backend"] = "deepep" if p.moe_dispatcher == "deepep" else "standard"
    return keys


def _training(job: TrainJob) -> dict:
    p = job.plan
    # local_batch_size is one data-parallel rank's batch per accumulation step; with PP
    # torchtitan splits it into the micro-batches itself (no accumulation).
    local = p.micro_batch * (p.num_microbatches if p.pp > 1 else 1)
    return {"local_batch_size": local, "global_batch_size": p.global_batch, "seq_len": p.seq_len,
            # bf16 weights, gradients and optimizer states, no fp32 copy (plan.master_weights off)
            **({} if p.master_weights else {"dtype": "bfloat16"}),
            "mixed_precision_param": "float32" if p.dtype == "fp32" else "bfloat16",
            "mixed_precision_reduce": "float32"}


def export(job: TrainJob) -> Export:
    version = job.version or rules.TORCHTITAN_VERSIONS[0]
    flavor = rules.torchtitan_flavor(job.model, version)
    head = HEAD[version]
    stages = stage_modules(job.partition, head) if job.plan.pp > 1 else None
    notes = (f"torchtitan's {flavor.module} {flavor.name} recipe sets the optimizer, learning-rate "
             "schedule and step count; change them with its flags",)
    if version == "0.2":
        return _export_0_2(job, flavor, stages, notes)
    flags = [("--module", flavor.module), ("--config", flavor.recipe),
             ("--hf-assets-path", "${HF_ASSETS_PATH}"), ("--dataloader.dataset-path", "${DATA_PATH}")]
    flags += [(f"--training.{k.replace('_', '-')}", v) for k, v in _training(job).items()]
    # torchtitan 0.3 captures CUDA graphs only without pipelining, and without the all-to-all
    # token dispatch of EP, which synchronizes with the host (Trainer._validate_cuda_graphs)
    if job.plan.pp > 1 or (job.model.num_experts and job.plan.ep > 1):
        flags.append(("--training.disable-cuda-graphs", None))
    flags += [(f"--parallelism.{k.replace('_', '-')}", v) for k, v in _parallelism(job, version).items()]
    if job.plan.moments_dtype == "bf16" and job.plan.master_weights:  # fused AdamW over the fp32 shards,
        flags.append(("--optimizer.implementation", "fused_opt_states_bf16"))  # its moments in bf16
    if stages:
        flags.append(("--parallelism.module-fqns-per-model-part", [",".join(s) for s in stages]))
    # async TP needs the model compiled (CompileConfig.__post_init__); compiling fuses the
    # elementwise ops (plan.elementwise fused), the gated MLP's activation with them
    flags += [("--compile.enable", None)] if _compiled(job) else []
    flags += ([("--compile.enable-async-tensor-parallel", None)]
              if job.plan.tp_overlap else [("--compile.no-enable-async-tensor-parallel", None)])
    args = []
    for flag, value in flags:
        args.append(flag)
        args += [] if value is None else value if isinstance(value, list) else [str(value)]
    args.append(f"activation-checkpoint:{CHECKPOINT_MODES[job.plan.recompute]}")
    return Export("torchtitan", job.header, (), (), ("-m", "torchtitan.train"), tuple(args),
                  USER_PATHS, notes)


# plan.recompute -> torchtitan's activation checkpointing mode (its selective is per-op)
CHECKPOINT_MODES = {"none": "none", "full": "full", "op": "selective"}


def _compiled(job: TrainJob) -> bool:
    return job.plan.elementwise == "fused"


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def _export_0_2(job: TrainJob, flavor, stages, notes) -> Export:
    p = job.plan
    parallelism = {**_parallelism(job, "0.2"), "enable_async_tensor_parallel": p.tp_overlap}
    if stages:
        parallelism["module_fqns_per_model_part"] = stages
    checkpoint = {"mode": CHECKPOINT_MODES[p.recompute]}
    if p.recompute == "op":
        checkpoint["selective_ac_option"] = "op"
    model = {"name": flavor.module, "flavor": flavor.name}
    sections = {"job": {"description": job.header}, "model": model,
                "training": {**_training(job), "dataset": "c4"}, "parallelism": parallelism,
                "activation_checkpoint": checkpoint}
    if _compiled(job):  # async TP takes effect only in a compiled model
        sections["compile"] = {"enable": True, "components": ["model", "loss"]}
    if p.dtype == "fp8":  # the decoder layers' linears; the output head stays in bf16
        model["converters"] = ["quantize.linear.float8"]
        sections["quantize.linear.float8"] = {"recipe_name": p.fp8_recipe, "filter_fqns": [HEAD["0.2"]]}
    lines = [f"# {job.header}"]
    for name, keys in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in keys.items()]
    args = ("--job.config-file", "torchtitan-job.toml", "--model.hf-assets-path", "${HF_ASSETS_PATH}",
            "--training.dataset-path", "${DATA_PATH}")
    return Export("torchtitan", job.header, (), (("torchtitan-job.toml", "\n".join(lines) + "\n"),),
                  ("-m", "torchtitan.train"), args, USER_PATHS, notes)
