"""Plan and Cluster: one validated, frozen description of how a training step is parallelised.

Axis names follow torchtitan's ParallelDims (dp, tp, cp, pp); `placement` lists the axes
innermost-first, i.e. the order in which consecutive ranks vary (tp innermost by default,
as Megatron-LM and torchtitan place it, so a TP group stays inside a node).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from meshplan.core.errors import PlanError
from meshplan.core.mesh import Mesh
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.schedule import SCHEDULES

RECOMPUTE = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")
# flash: fused attention, no s^2 tensors kept (Dao 2022); naive: explicit scores and softmax
# as in Korthikanti et al. 2022 Table 2.
ATTENTION = ("flash", "naive")
AXES = ("tp", "cp", "dp", "pp")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Cluster:
    """How many devices, and how many sit in one node (share the intra-node fabric)."""

    num_gpus: int
    gpus_per_node: int

    def __post_init__(self):
        for field in ("num_gpus", "gpus_per_node"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"--{field.replace('_', '-')}", f"must be a positive integer, got "
                                f"{value!r}", f"pass --{field.replace('_', '-')} N with N >= 1")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise PlanError("--gpus", f"{self.num_gpus} GPUs do not fill whole nodes of "
                            f"{self.gpus_per_node}", "use a multiple of --gpus-per-node")

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        """Ranks that share one node (all of them on a cluster smaller than a node)."""
        return min(self.num_gpus, self.gpus_per_node)


@dataclass(frozen=True)
class Plan:
    """A training plan. `layer_partition` gives the layers of each virtual pipeline stage in
    pipeline order (pp * virtual_stages entries); None means balanced (see partition.py)."""

    global_batch: int
    seq_len: int
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    zero: int = 0
    recompute: str = "none"
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    layer_partition: tuple[int, ...] | None = None
    dtype: str = "bf16"
    attention: str = "flash"
    placement: tuple[str, ...] = AXES

    def __post_init__(self):
        ints = ("global_batch", "seq_len", "dp", "tp", "pp", "cp", "micro_batch", "virtual_stages")
        for field in ints:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"plan.{field}", f"must be a positive integer, got {value!r}",
                                f"set {field} to an integer >= 1")
        checks = (
            (self.zero in (0, 1, 2, 3), "zero", f"unknown ZeRO stage {self.zero!r}", "use 0, 1, 2 or 3"),
            (self.recompute in RECOMPUTE, "recompute", f"unknown {self.recompute!r}",
             f"use one of {', '.join(RECOMPUTE)}"),
            (self.schedule in SCHEDULES, "schedule", f"unknown {self.schedule!r}",
             f"use one of {', '.join(SCHEDULES)}"),
            (self.dtype in DTYPES, "dtype", f"unknown {self.dtype!r}", f"use one of {', '.join(DTYPES)}"),
            (self.attention in ATTENTION, "attention", f"unknown {self.attention!r}",
             f"use one of {', '.join(ATTENTION)}"),
            (sorted(self.placement) == sorted(AXES), "placement", f"{self.placement!r} is not an "
             "order of tp, cp, dp, pp", "list each of tp, cp, dp, pp once, innermost first"),
            (not self.sp or self.tp > 1, "sp", "sequence parallel needs tensor parallel",
             "set tp > 1 or drop sp"),
            ((self.virtual_stages > 1) == (self.schedule == "interleaved" and self.pp > 1)
             or (self.virtual_stages == 1 and self.pp == 1),
             "virtual_stages", f"{self.virtual_stages} virtual stages with schedule {self.schedule} "
             f"and pp {self.pp}", "use --schedule interleaved with --pp >= 2 and --virtual-stages "
             ">= 2, or 1 virtual stage otherwise"),
            (self.global_batch % (self.micro_batch * self.dp) == 0, "global_batch",
             f"{self.global_batch} is not divisible by micro_batch*dp = {self.micro_batch * self.dp}",
             "make global batch a multiple of micro-batch x dp"),
        )
        for ok, field, problem, fix in checks:
            if not ok:
                raise PlanError(f"plan.{field}", problem, fix)
        if self.layer_partition is not None:
            object.__setattr__(self, "layer_partition", tuple(self.layer_partition))
        object.__setattr__(self, "placement", tuple(self.placement))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def num_virtual(self) -> int:
        """Virtual pipeline stages in total (pp * chunks per rank)."""
        return self.pp * self.virtual_stages

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def mesh(self, gpus_per_node: int) -> Mesh:
        """The ranks of this plan on nodes of `gpus_per_node`, placed innermost-first by
        `placement`."""
        return Mesh.of({"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp},
                       self.placement, gpus_per_node)

    def validate(self, model: ModelSpec, cluster: Cluster) -> None:
        """Legality of this plan for this model on this cluster; raises PlanError."""
        fail = _first_violation(self, model, cluster)
        if fail:
            raise PlanError(*fail)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layer_partition"] = list(self.layer_partition) if self.layer_partition else None
        data["placement"] = list(self.placement)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"plan.{unknown[0]}", "unknown plan key", f"use only {', '.join(sorted(known))}")
        missing = sorted({"global_batch", "seq_len"} - set(data))
        if missing:
            raise PlanError(f"plan.{missing[0]}", "missing", f"add \"{missing[0]}\" to the plan")
        return cls(**data)


def _first_violation(plan: Plan, model: ModelSpec, cluster: Cluster):
    """The first broken rule as (field, problem, fix), or None."""
    if plan.world_size != cluster.num_gpus:
        return ("--gpus", f"dp*tp*pp*cp = {plan.dp}*{plan.tp}*{plan.pp}*{plan.cp} = "
                f"{plan.world_size} but the cluster has {cluster.num_gpus} GPUs",
                "choose dp, tp, pp, cp whose product is the GPU count")
    if model.num_heads % plan.tp:
        return ("--tp", f"{plan.tp} does not divide the {model.num_heads} attention heads",
                "use a TP degree that divides num_heads")
    if model.num_kv_heads % plan.tp:
        return ("--tp", f"{plan.tp} does not divide the {model.num_kv_heads} KV heads",
                "use a TP degree that divides num_key_value_heads")
    if model.ffn_hidden_size % plan.tp:
        return ("--tp", f"{plan.tp} does not divide ffn size {model.ffn_hidden_size}",
                "use a TP degree that divides the MLP width")
    if plan.seq_len > model.max_seq_len and model.position_embedding == "learned":
        return ("--seq-len", f"{plan.seq_len} exceeds the model's {model.max_seq_len} positions",
                f"use --seq-len <= {model.max_seq_len}")
    if plan.seq_len % (2 * plan.cp if plan.cp > 1 else 1):
        return ("--cp", f"seq_len {plan.seq_len} is not divisible by 2*cp = {2 * plan.cp}",
                "load-balanced causal context parallel splits the sequence in 2*cp chunks")
    if plan.sp and (plan.seq_len // plan.cp) % plan.tp:
        return ("--sp", f"sequence {plan.seq_len // plan.cp} per CP rank not divisible by tp {plan.tp}",
                "choose seq_len divisible by tp*cp, or drop --sp")
    if model.num_layers < plan.num_virtual:
        return ("--pp", f"{model.num_layers} layers cannot fill {plan.num_virtual} (virtual) stages",
                "use fewer pipeline stages or virtual stages")
    if plan.schedule == "interleaved" and plan.pp > 1 and plan.num_microbatches % plan.pp:
        return ("--global-batch", f"interleaved 1F1B needs micro-batches ({plan.num_microbatches}) "
                f"divisible by pp ({plan.pp})", "adjust global batch or micro-batch")
    if plan.layer_partition is not None:
        parts = plan.layer_partition
        if len(parts) != plan.num_virtual or min(parts) < 1 or sum(parts) != model.num_layers:
            return ("plan.layer_partition", f"{list(parts)} is not {plan.num_virtual} positive "
                    f"counts summing to {model.num_layers} layers",
                    "give one layer count per (virtual) stage, or omit it for a balanced split")
    return None


def load_plan(path: str) -> Plan:
    """A plan JSON file as written by `simulate --json` (its "plan" key) or `plan --emit plan`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError("--plan", f"cannot read {path} ({exc})", "pass a plan JSON file")
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise PlanError("--plan", f"{path} does not hold a JSON object", "pass a plan JSON file")
    return Plan.from_dict(data)
