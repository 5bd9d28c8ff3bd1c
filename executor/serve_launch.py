"""Run serving plans on real processes: refuse what cannot run before anything starts, start
one rank per device through torchrun (launch.run_ranks, entry point meshplan.executor.ranks.serve) and turn
what the ranks wrote into serving records with the serving simulator's prediction beside
the measurement.

    from meshplan.executor.serve_launch import ServeOptions, launch_inference
    record = launch_inference(model, plan, cluster, ServeOptions())   # -> ServeRecord
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshplan.executor.launch import prediction_or_why, run_in_ranks, run_ranks
from meshplan.executor.serve_records import ServeRecord
from meshplan.core.errors import PlanError
from meshplan.simulator.serve import InferencePlan
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster


@dataclass(frozen=True)
class ServeOptions:
    """How to run: `warmup` untimed generations, then `repeats` timed ones. `run_dir`:
    folder for the run's files, kept (default: a temporary folder, removed). `progress`:
    one stderr line per plan as it finishes."""

    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    profile: str = "local"
    timeout_s: float = 60.0
    run_dir: str | None = None
    progress: bool = False


def check_executable(model: ModelSpec, plan: InferencePlan, cluster: Cluster,
                     options: ServeOptions) -> None:
    """PlanError for a plan that is illegal (InferencePlan.validate) or that this executor
    cannot run."""
    plan.validate(model, cluster)
    if model.num_kv_heads % plan.tp:
        raise PlanError("--tp", f"{plan.tp} does not divide the {model.num_kv_heads} KV heads "
                        "(the executor shards KV heads, it does not replicate them)",
                        "use a TP degree that divides num_key_value_heads")
    if model.tied_embeddings and plan.pp > 1:
        raise PlanError("--pp", "tied embeddings would sit on the first and last pipeline stages",
                        "use --pp 1 for a model with tie_word_embeddings")
    if plan.gen_len < 2:
        raise PlanError("--gen-len", "one generated token leaves no decode step to time",
                        "use --gen-len 2 or more")
    if options.warmup < 0:
        raise PlanError("--warmup", f"{options.warmup} warm-up generations", "use --warmup >= 0")
    if options.repeats < 1:
        raise PlanError("--repeats", f"{options.repeats} timed generations leave nothing timed",
                        "use --repeats 1 or more")


def launch_inference(model: ModelSpec, plan: InferencePlan, cluster: Cluster,
                     options: ServeOptions = ServeOptions()) -> ServeRecord:
    """Run one serving plan; see launch_inference_many."""
    return launch_inference_many([(model, plan)], cluster, options)[0]


def launch_inference_many(jobs: list[tuple[ModelSpec, InferencePlan]], cluster: Cluster,
                          options: ServeOptions = ServeOptions()) -> list[ServeRecord]:
    """Run several (model, plan) jobs of the same world size one after the other in one
    torchrun launch on this machine, and return one record per job. Every job is checked
    before anything starts."""
    for model, plan in jobs:
        check_executable(model, plan, cluster, options)
    result = run_in_ranks(
        jobs, {"seed": options.seed, "warmup": options.warmup, "repeats": options.repeats,
               "timeout_s": options.timeout_s, "progress": options.progress},
        options.run_dir, lambda run_file: run_ranks("meshplan.executor.ranks.serve", run_file, cluster.num_gpus))
    return [_record(m, p, cluster, options, r, result["world_size"])
            for (m, p), r in zip(jobs, result["results"])]


def _record(model: ModelSpec, plan: InferencePlan, cluster: Cluster, options: ServeOptions,
            result: dict, world_size: int) -> ServeRecord:
    ran = dataclasses.replace(plan, dtype=result["dtype"], kv_dtype=result["dtype"])
    prediction, note = predict_inference(model, ran, cluster, options.profile)
    return ServeRecord(model=model, plan=ran, dtype_requested=plan.dtype,
                       kv_dtype_requested=plan.kv_dtype, device=result["device"],
                       world_size=world_size, profile=options.profile, prediction=prediction,
                       prediction_note=note, ttft_s=tuple(result["ttft_s"]),
                       decode_s=tuple(result["decode_s"]), warmup=options.warmup,
                       memory_by_rank=tuple(result["memory_by_rank"]),
                       tokens=tuple(tuple(row) for row in result["tokens"]), seed=options.seed)


def predict_inference(model: ModelSpec, plan: InferencePlan, cluster: Cluster,
                      profile: str) -> tuple[dict | None, str]:
    """simulate_inference(...).to_json() for the plan as run, or None and why."""
    def simulated() -> dict:
        from meshplan.hw_profiles.profile import load_profile
        from meshplan.simulator.serve import simulate_inference
        return simulate_inference(model, plan, cluster, load_profile(profile)).to_json()
    return prediction_or_why(simulated)
