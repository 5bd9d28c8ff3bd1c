"""Emit a plan for the framework that will run it, after checking the framework can.

    job = train_job(model, result, hw, checkpoint_of(args.model, model))
    artifact = export("megatron", job)          # -> Export: env, files, program, args

Targets (each in its own module, each checked by tests/test_export_conformance.py with the
framework's own validation):
- torchtitan (0.3, default; 0.2 on request): torchtitan.train arguments (0.3: --module/--config
  and CLI flags; 0.2: a TOML job file), exporters/torchtitan.py.
- megatron: Megatron-LM pretrain_gpt.py arguments and environment, exports/megatron.py.
- deepspeed: Megatron-DeepSpeed pretrain_gpt.py arguments and its ds_config, exports/deepspeed.py.
- vllm (serving): `vllm serve` arguments, exports/vllm.py.
- plan: the plan JSON that `meshplan simulate --plan` and `meshplan run --plan` read.

Each target's rules are in simulator/rules.py FRAMEWORKS, written over attributes that are
either one plan's values or the candidate table's columns, so the same rules refuse an export
and restrict a search. The model weights, data and tokenizer are the only things an export
leaves open: each is a "${VARIABLE}" in the arguments, listed in Export.user_paths.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd

from meshplan.core.errors import PlanError
from meshplan.core.units import GIB
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.planner.exports.checkpoint import Checkpoint
from meshplan.planner.launch_scripts import Launch
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import PLAN_WIDE, Plan
from meshplan.simulator.train import SimulationResult, pipeline_partition

TARGETS = tuple(name for name in rules.FRAMEWORKS if " " not in name)
# The versions each target can be exported for, newest (the default) first.
VERSIONS = {"torchtitan": tuple(rules.TORCHTITAN_VERSIONS)}


@dataclass(frozen=True)
class Export:
    """A plan in a target's terms: `env` the environment variables it needs, `files` the
    files to write beside the launch (name, text), `program` how torchrun (or the shell, for
    vllm) starts it, `args` its arguments, in which "${NAME}" is a path the user supplies
    (`user_paths`: NAME, what it is); `notes` say what the target does differently."""

    target: str
    header: str
    env: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]
    program: tuple[str, ...]
    args: tuple[str, ...]
    user_paths: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainJob:
    """What a training export reads: the model, the simulated plan, the layers of each
    (virtual) pipeline stage in pipeline order (the split `simulate` priced), the
    checkpoint's facts and the target version (None: the newest)."""

    model: ModelSpec
    result: SimulationResult
    partition: tuple[int, ...]
    checkpoint: Checkpoint
    version: str | None = None

    @property
    def plan(self) -> Plan:
        return self.result.plan

    @property
    def header(self) -> str:
        r = self.result
        return (f"meshplan plan: {self.model.name} on {r.cluster.num_gpus} x {r.hardware}, predicted "
                f"{r.step_time_s:.3f} s/step, {r.peak_memory_bytes / GIB:.1f} GiB peak per device")


def train_job(model: ModelSpec, result: SimulationResult, hw: HardwareProfile,
              checkpoint: Checkpoint, version: str | None = None) -> TrainJob:
    plan = result.plan
    partition = (plan.layer_partition or pipeline_partition(model, plan, result.cluster, hw)
                 if plan.pp > 1 else (model.num_layers,))
    return TrainJob(model, result, tuple(partition), checkpoint, version)


# dictated fields that are a target's default, not its only choice: a search prices the
# default first and may take another the target's rules allow (planner.search's `free`)
DEFAULTS_SEARCHED = ("cp_comm",)


def dictated(target: str, fixed: dict, hw: HardwareProfile | None = None) -> dict:
    """What `target` runs whatever the plan says, or by default, given the user's fixed fields
    and the profile: a search for it prices that unless the user fixed the field too (then
    the target's rules refuse what it cannot run). torchtitan compiles its loss with the
    model, so an uncompiled (elementwise eager) plan's loss is eager; its async TP overlaps
    the forward only; its context parallelism rotates K,V by torch's default all-gather
    (0.2 can rotate by all-to-all too: DEFAULTS_SEARCHED).
    Megatron-LM's default attention backend (auto) lets Transformer
    Engine choose, which takes cuDNN's kernel on Hopper: where the profile prices that
    kernel (its cudnn_attention), so does the search."""
    if target == "megatron" and hw is not None and hw.cudnn_attention is not None:
        return {"attention": "cudnn"}
    if target == "deepspeed":
        return {"mlp_kernel": "eager"}
    if target == "torchtitan":
        return {"fp8_saved_dtype": "bf16", "tp_overlap_scope": "forward", "cp_comm": "allgather",
                "cross_entropy": "eager" if fixed.get("elementwise") == "eager" else "compiled"}
    return {}


def target_fields(target: str, fixed: dict, hw: HardwareProfile | None = None) -> tuple[dict, tuple[str, ...]]:
    """A search for `target` (planner.search's `fixed` and `free`): the user's fields over
    what the target dictates, and those dictated ones that are its defaults rather than its
    only choice (DEFAULTS_SEARCHED), where the user did not fix them."""
    defaults = dictated(target, fixed, hw)
    return {**defaults, **fixed}, tuple(k for k in DEFAULTS_SEARCHED if k in defaults and k not in fixed)


def rule_set(target: str, version: str | None = None) -> str:
    """The FRAMEWORKS key of `target` at `version` (None: the newest)."""
    if target not in TARGETS and target != "vllm":
        raise PlanError("emit", f"unknown target {target!r}", f"use one of {', '.join(TARGETS)}, vllm")
    known = VERSIONS.get(target, ())
    if version is None or (known and version == known[0]):
        return target
    if version not in known:
        raise PlanError(f"emit.{target}", f"version {version} is not an export target",
                        f"use one of {', '.join(known)}" if known else "drop --target-version")
    return f"{target} {version}"


def _fields(table: pd.DataFrame) -> SimpleNamespace:
    """The candidate table's columns as rules read them."""
    cols = {c: table[c].to_numpy() for c in table.columns}
    cols.update(schedule=table["schedule"].astype(str).to_numpy(),
                placement=table["placement"].map(",".join).to_numpy(),
                **{k: table.attrs[k] for k in PLAN_WIDE + ("layer_partition", "global_batch")})
    return SimpleNamespace(**cols)


def _ruleset(target: str, version: str | None, reading: frozenset | None) -> tuple:
    """`target`'s rules at `version`; with `reading`, those that read plan fields among these
    and no others (what it runs of a layout, whatever its kernels, dtypes and models)."""
    ruleset = rules.FRAMEWORKS[rule_set(target, version)]
    if reading is None:
        return ruleset
    return tuple(rule for rule in ruleset if rule.needs and set(rule.needs) <= reading)


def supported(target: str, model: ModelSpec, table: pd.DataFrame, version: str | None = None,
              reading: frozenset | None = None) -> np.ndarray:
    """Which candidate-table rows `target` can run (a search restriction), by its rules or,
    with `reading`, those of them that read only these fields (_ruleset)."""
    return np.broadcast_to(rules.holds(_ruleset(target, version, reading), _fields(table), model), len(table))


def check(target: str, model: ModelSpec, plan: Plan, version: str | None = None,
          reading: frozenset | None = None) -> None:
    """One PlanError naming every knob of `plan` that `target` cannot run (by its rules or,
    with `reading`, those of them that read only these fields: _ruleset)."""
    issues = rules.violations(_ruleset(target, version, reading), plan.fields(), model)
    if issues:
        raise PlanError.of([(f"emit.{target}", f"{field.removeprefix('plan.')}: {problem}", fix)
                            for field, problem, fix in issues])


def runs(target: str, model: ModelSpec, plan: Plan, version: str | None = None,
         reading: frozenset | None = None) -> bool:
    """Whether `target` can run `plan` (check's verdict, without its error)."""
    return not rules.violations(_ruleset(target, version, reading), plan.fields(), model)


def export(target: str, job: TrainJob) -> Export:
    """The plan of `job` in `target`'s terms, checked first with its pipeline split filled in;
    a framework is refused a checkpoint whose RoPE scaling none of them carries but Llama
    3.1's (the plan JSON and vLLM read no RoPE)."""
    import importlib

    plan = dataclasses.replace(job.plan, layer_partition=job.partition if job.plan.pp > 1 else None)
    check(target, job.model, plan, job.version)
    if target == "plan":
        return Export("plan", job.header, (), (("plan.json", json.dumps(job.plan.to_dict(), indent=2) + "\n"),),
                      (), (), ())
    scaling = job.checkpoint.rope_scaling
    if scaling is not None and scaling.rope_type != "llama3":
        raise PlanError("model.rope_scaling", f"RoPE scaling {scaling.rope_type} (factor {scaling.factor:g}) "
                        f"has no {target} export", "use a model without rope_scaling or with Llama 3.1's "
                        "(rope_type llama3), or --emit plan")
    return importlib.import_module(f"meshplan.planner.exports.{target}").export(job)


def launch(artifact: Export, nnodes: int, gpus_per_node: int) -> Launch:
    """The launch of an export on `nnodes` nodes of `gpus_per_node` devices."""
    return Launch(name=f"meshplan-{artifact.target}", header=artifact.header, nnodes=nnodes,
                  gpus_per_node=gpus_per_node,
                  rendezvous="vllm" if artifact.target == "vllm" else "torchrun",
                  program=artifact.program, args=artifact.args, env=artifact.env,
                  files=artifact.files, user_paths=artifact.user_paths)
