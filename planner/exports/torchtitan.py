"""torchtitan: the llama3 recipe of the model's flavor with the plan's parallelism.

0.3 (pytorch/torchtitan v0.3.0): no config files; `python -m torchtitan.train --module llama3
--config llama3_70b` picks a recipe in models/llama3/config_registry.py and flags override its
fields (config/configs.py: TrainingConfig, ParallelismConfig, CompileConfig); activation
checkpointing is a subcommand (activation-checkpoint:full|selective|none) and async TP moved
to --compile. 0.2 (v0.2.2): a TOML job file (config/job_config.py: [model] name/flavor,
[training], [parallelism], [activation_checkpoint]) given by --job.config_file.
The pipeline split is given stage by stage (module_fqns_per_model_part), so any partition the
planner chose runs as simulated.
"""
from __future__ import annotations

import json

from meshplan.planner.exports import Export, TrainJob
from meshplan.simulator import rules
from meshplan.simulator.rules import TORCH_SCHEDULES

RECIPES_0_3 = {"8B": "llama3_8b", "70B": "llama3_70b"}
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


def _parallelism(job: TrainJob) -> dict:
    p = job.plan
    keys = {"data_parallel_replicate_degree": p.dp if p.zero == 0 else 1,
            "data_parallel_shard_degree": 1 if p.zero == 0 else p.dp,
            # ZeRO-2 ~ FSDP keeping the gathered weights from forward to backward
            # (PyTorch fully_shard reshard_after_forward=False)
            "fsdp_reshard_after_forward": "never" if p.zero == 2 else "default",
            "tensor_parallel_degree": p.tp, "context_parallel_degree": p.cp,
            "pipeline_parallel_degree": p.pp}
    if p.pp > 1:
        keys.update(pipeline_parallel_schedule=TORCH_SCHEDULES[p.schedule],
                    pipeline_parallel_microbatch_size=p.micro_batch)
    return keys


def _training(job: TrainJob) -> dict:
    p = job.plan
    # local_batch_size is one data-parallel rank's batch per accumulation step; with PP
    # torchtitan splits it into the micro-batches itself (no accumulation).
    local = p.micro_batch * (p.num_microbatches if p.pp > 1 else 1)
    return {"local_batch_size": local, "global_batch_size": p.global_batch, "seq_len": p.seq_len,
            "mixed_precision_param": "float32" if p.dtype == "fp32" else "bfloat16"}


def export(job: TrainJob) -> Export:
    version = job.version or rules.TORCHTITAN_VERSIONS[0]
    flavor = rules.torchtitan_flavor(job.model, version)
    stages = stage_modules(job.partition, HEAD[version]) if job.plan.pp > 1 else None
    notes = (f"torchtitan's llama3 {flavor} recipe sets the optimizer, learning-rate schedule and "
             "step count; change them with its flags",)
    if version == "0.2":
        return _export_0_2(job, flavor, stages, notes)
    flags = [("--module", "llama3"), ("--config", RECIPES_0_3[flavor]),
             ("--hf-assets-path", "${HF_ASSETS_PATH}"), ("--dataloader.dataset-path", "${DATA_PATH}")]
    flags += [(f"--training.{k.replace('_', '-')}", v) for k, v in _training(job).items()]
    if job.plan.pp > 1:  # torchtitan 0.3 captures CUDA graphs only without pipelining
        flags.append(("--training.disable-cuda-graphs", None))
    flags += [(f"--parallelism.{k.replace('_', '-')}", v) for k, v in _parallelism(job).items()]
    if stages:
        flags.append(("--parallelism.module-fqns-per-model-part", [",".join(s) for s in stages]))
    flags.append(("--compile.no-enable-async-tensor-parallel", None))
    args = []
    for flag, value in flags:
        args.append(flag)
        args += [] if value is None else value if isinstance(value, list) else [str(value)]
    args.append(f"activation-checkpoint:{job.plan.recompute}")
    return Export("torchtitan", job.header, (), (), ("-m", "torchtitan.train"), tuple(args),
                  USER_PATHS, notes)


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def _export_0_2(job: TrainJob, flavor: str, stages, notes) -> Export:
    parallelism = {**_parallelism(job), "enable_async_tensor_parallel": False}
    if stages:
        parallelism["module_fqns_per_model_part"] = stages
    checkpoint = {"mode": job.plan.recompute}
    if job.plan.recompute == "selective":  # per-op SAC: torchtitan's closest to Korthikanti's selective
        checkpoint["selective_ac_option"] = "op"
    sections = {"job": {"description": job.header}, "model": {"name": "llama3", "flavor": flavor},
                "training": {**_training(job), "dataset": "c4"}, "parallelism": parallelism,
                "activation_checkpoint": checkpoint}
    lines = [f"# {job.header}"]
    for name, keys in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in keys.items()]
    args = ("--job.config-file", "torchtitan-job.toml", "--model.hf-assets-path", "${HF_ASSETS_PATH}",
            "--training.dataset-path", "${DATA_PATH}")
    return Export("torchtitan", job.header, (), (("torchtitan-job.toml", "\n".join(lines) + "\n"),),
                  ("-m", "torchtitan.train"), args, USER_PATHS, notes)
