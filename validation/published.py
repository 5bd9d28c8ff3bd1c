"""Published training runs against the prediction: each row of
benchmarks/published/training.csv (a measured run with its layout, cited) is read into a
model, a cluster and a plan, its published metric is turned into a step time, and
`simulate` predicts it.

Knobs a source does not publish (micro-batch, recompute, schedule, ...) are left open and
filled by the planner's best legal choice with the published ones held: the prediction is
then meshplan's for that layout as a tuned run would set it. Rows are split into a fit half
and a held-out half by a hash of their id (stable, independent of the numbers), so that any
calibration sees at most half of them.

Metrics become step times by the source's own FLOP definition (benchmarks/published/
README.md): tokens/s/GPU -> global batch x sequence / (rate x GPUs); model TFLOP/s per GPU
and MFU -> FLOPs per step / (rate x GPUs), with Narayanan et al. 2021's count (which includes
the recompute forward) for that paper and model FLOPs (Chowdhery et al. 2022 appendix B, as
Megatron-LM, Korthikanti et al. 2022, MegaScale and the Llama 3 report count them) for the
others.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pandas as pd
from scipy.optimize import minimize_scalar

from meshplan.core.errors import MeshplanError
from meshplan.hw_profiles.profile import HardwareProfile, Stragglers, Sustained, available_profiles, load_profile
from meshplan.hw_profiles.variants import base_of
from meshplan.planner import exports
from meshplan.planner.search import search
from meshplan.simulator.memory import FRAGMENTATION_SHARE
from meshplan.simulator.model_spec import ModelSpec, load_model
from meshplan.simulator.ops import model_flops_per_step
from meshplan.simulator.partition import parse_partition
from meshplan.simulator.plan import DTYPES, Cluster, Plan, complete_fields
from meshplan.simulator.train import SimulationResult, simulate

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "published"
# the pipeline schedules an unpublished one is taken from (predict)
UNNAMED_SCHEDULES = ("1f1b", "interleaved")
# CSV column -> plan field, for the knobs a row may publish.
KNOBS = {"tp": "tp", "pp": "pp", "dp": "dp", "cp": "cp", "ep": "ep", "etp": "etp", "zero": "zero",
         "recompute": "recompute",
         "micro_batch": "micro_batch", "schedule": "schedule", "virtual_stages": "virtual_stages",
         "sp": "sp", "tp_overlap": "tp_overlap", "tp_overlap_scope": "tp_overlap_scope", "fsdp_reshard_after_forward": "reshard_after_forward",
         "moe_dispatcher": "moe_dispatcher", "moe_routing": "moe_routing", "moe_a2a_overlap": "moe_a2a_overlap",
         "grad_reduce_dtype": "grad_reduce_dtype", "master_weights": "master_weights",
         "moments_dtype": "moments_dtype", "grad_sync": "grad_sync", "fsdp_layout": "fsdp_layout",
         "cross_entropy": "cross_entropy", "fp8_saved_dtype": "fp8_saved_dtype", "fp8_recipe": "fp8_recipe",
         "attention": "attention", "cp_comm": "cp_comm", "kv_repeat": "kv_repeat"}
# each knob's Plan default: its type says how a CSV cell reads (flag, choice, or count)
PLAN_DEFAULTS = {f.name: f.default for f in fields(Plan)}


@dataclass(frozen=True)
class PublishedRun:
    """One row: what was run, what was measured (as a step time), and what meshplan
    cannot model of it yet (empty when it can)."""

    id: str
    source_id: str
    model: ModelSpec | None
    hardware: str
    cluster: Cluster | None
    fixed: dict
    measured_step_time_s: float | None
    measured_memory_bytes: float | None
    not_modelled: str
    framework: str = ""  # the export target whose rules its runs follow (sources.csv), "" for none

    @property
    def fit_half(self) -> bool:
        """In the fit half: the first bit of sha1(id), independent of every number."""
        return hashlib.sha1(self.id.encode()).digest()[0] % 2 == 0


def _value(row, key, cast=float):
    value = row[key]
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return cast(value)


def _fixed(row) -> dict:
    """The plan fields the row publishes."""
    fixed = {"global_batch": _value(row, "global_batch", int), "seq_len": _value(row, "seq_len", int),
             "dtype": row["dtype"] if row["dtype"] in DTYPES else "bf16"}
    for column, key in KNOBS.items():
        value = _value(row, column, str)
        if value is None:
            continue
        if isinstance(PLAN_DEFAULTS[key], bool):
            fixed[key] = value.lower() == "true"
        elif isinstance(PLAN_DEFAULTS[key], str):  # a choice knob: recompute, schedule, dtypes, ...
            fixed[key] = value
        else:
            fixed[key] = int(float(value))
    # a blank cp_comm is the p2p ring (its README), not a choice left to the search
    fixed.setdefault("cp_comm", PLAN_DEFAULTS["cp_comm"])
    # every framework of the table orders its ranks TP innermost, then CP, DP and PP (Megatron-
    # LM's default tp-cp-ep-dp-pp, torchtitan's device mesh, DeepSpeed's
    # PipeModelDataParallelTopology axes pipe, data, model): not a choice left to the search
    fixed["placement"] = PLAN_DEFAULTS["placement"]
    split = _value(row, "layer_partition", str)
    if split is not None:
        fixed["layer_partition"] = parse_partition(split)
    # torch.compile fuses the elementwise ops, the gated activation among them
    compiled = _value(row, "torch_compile", str)
    if compiled is not None:
        fixed["elementwise"] = fixed["mlp_kernel"] = "fused" if compiled.lower() == "true" else "eager"
    if fixed.get("zero") != 3:
        fixed.pop("reshard_after_forward", None)
    if fixed.get("pp", 1) == 1:
        fixed.pop("schedule", None)
        fixed.pop("virtual_stages", None)
    return {k: v for k, v in fixed.items() if v is not None}


def _narayanan_flops(model: ModelSpec, batch: int, seq: int) -> float:
    """Narayanan et al. 2021 eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh), the recompute forward
    included."""
    h, layers, vocab = model.hidden_size, model.num_layers, model.vocab_size
    return 96 * batch * seq * layers * h * h * (1 + seq / (6 * h) + vocab / (16 * layers * h))


def measured_step_time_s(row, model: ModelSpec, profile: HardwareProfile) -> float | None:
    """The row's published metric as a step time."""
    metric, value = row["measured_metric"], float(row["measured_value"])
    gpus, batch, seq = _value(row, "gpus", int), _value(row, "global_batch", int), _value(row, "seq_len", int)
    if metric == "step_time_s":
        return value
    if None in (gpus, batch, seq):
        return None
    if metric == "tokens_per_s_per_gpu":
        return batch * seq / (value * gpus)
    flops = (_narayanan_flops(model, batch, seq) if row["source_id"] == "narayanan21"
             else model_flops_per_step(model, batch, seq))
    rate = value * 1e12 if metric == "model_tflops_per_gpu" else value * profile.peak_flops[
        row["dtype"] if row["dtype"] in profile.peak_flops else "bf16"]
    return flops / (rate * gpus)


@functools.cache
def stock_profile(name: str) -> HardwareProfile:
    """The profile a row names (its `hardware`), read once per process: every row of one
    hardware shares it, and the fits simulate each row many times."""
    return load_profile(name)


def load_runs(path: Path = DATA / "training.csv") -> list[PublishedRun]:
    rows = pd.read_csv(path)
    frameworks = pd.read_csv(path.parent / "sources.csv", keep_default_na=False).set_index("source_id")["framework"]
    runs = []
    stock = set(available_profiles())
    for row in rows.to_dict("records"):
        reasons = []
        model = None
        if row["hardware"] not in stock:
            reasons.append(f"hardware {row['hardware']}")
        if isinstance(row.get("schedule"), str) and row["schedule"] not in ("1f1b", "interleaved", "gpipe", "zb-h1"):
            reasons.append(f"schedule {row['schedule']}")
        if row["measured_metric"] == "model_tflops_per_gpu" and row["source_id"] == "opt22":
            reasons.append("an 'up to' peak, not a step average")
        try:
            model = load_model(row["model"] if not row["model"].endswith(".json")
                               else str(path.parent / row["model"]))
        except MeshplanError as exc:
            reasons.append(f"model: {exc.problem}")
        gpus, per_node = _value(row, "gpus", int), _value(row, "gpus_per_node", int) or 8
        cluster = Cluster(gpus, min(per_node, gpus)) if gpus else None
        if cluster is None:
            reasons.append("GPU count not published")
        fixed = _fixed(row)
        if fixed.get("global_batch") is None:
            reasons.append("global batch not published")
        measured = None
        if model is not None and not reasons:
            measured = measured_step_time_s(row, model, stock_profile(row["hardware"]))
        memory = _value(row, "measured_memory_gib")
        runs.append(PublishedRun(row["id"], row["source_id"], model, row["hardware"], cluster, fixed,
                                 measured, memory * 2 ** 30 if memory else None, "; ".join(reasons),
                                 frameworks.get(row["source_id"], "")))
    return runs


def predict(run: PublishedRun, hw: HardwareProfile) -> SimulationResult:
    """simulate() of the run's published layout; knobs it leaves open take the planner's
    best legal value with the published ones held. A pipeline schedule left unpublished is
    one that every framework of the table runs, 1F1B or interleaved 1F1B (the rows that
    leave it open are Megatron-LM's and MegaScale's, which run no other), not a
    zero-bubble or V schedule, which a run would have named."""
    fixed = dict(run.fixed)
    open_knobs = {"micro_batch", "recompute", "zero"} - set(fixed) or fixed.get("pp", 1) > 1 and (
        {"schedule", "virtual_stages"} - set(fixed))
    if not open_knobs:
        return simulate(run.model, Plan(**complete_fields(fixed, run.cluster.num_gpus)), run.cluster, hw)
    unnamed = "schedule" not in fixed and fixed.get("pp", 1) > 1
    allowed = (lambda table: table["schedule"].isin(UNNAMED_SCHEDULES).to_numpy()) if unnamed else None
    admits = (lambda plan: plan.schedule in UNNAMED_SCHEDULES) if unnamed else None
    return search(run.model, run.cluster, hw, fixed, des=4, allowed=allowed, admits=admits).ranked[0]


# the knobs a planner chooses for a run (degrees, sharding, recompute, batching, pipeline
# schedule and split, rank placement, overlap); a row's others (dtype, kernels, CP's
# exchange, the MoE dispatcher and routing, the optimizer's precision) are how its
# framework runs, and stay
LAYOUT_KNOBS = frozenset({"tp", "pp", "dp", "cp", "ep", "etp", "sp", "zero", "reshard_after_forward", "grad_sync",
                          "recompute", "micro_batch", "schedule", "virtual_stages", "layer_partition",
                          "placement", "tp_overlap", "tp_overlap_scope", "moe_a2a_overlap"})
# what a layout is chosen for, held with the implementation
BATCH = frozenset({"global_batch", "seq_len"})


def planner_best(run: PublishedRun, hw: HardwareProfile) -> SimulationResult:
    """The planner's winner for the run's model, cluster, batch and implementation (its
    LAYOUT_KNOBS left to the search), among the layouts its framework runs where meshplan
    exports to that framework (the export's rules on layout fields alone: Megatron-LM runs
    no zero-bubble schedule, torchtitan no ZeRO-1, ...; its rules on kernels, dtypes and
    models describe meshplan's export, not the framework the run had): what meshplan would
    have advised where the run's authors chose its published layout."""
    allowed = admits = None
    if run.framework:
        allowed = lambda table: exports.supported(run.framework, run.model, table,  # noqa: E731
                                                  reading=LAYOUT_KNOBS | BATCH)
        admits = lambda plan: exports.runs(run.framework, run.model, plan,  # noqa: E731
                                           reading=LAYOUT_KNOBS | BATCH)
    return search(run.model, run.cluster, hw, {k: v for k, v in run.fixed.items() if k not in LAYOUT_KNOBS},
                  des=4, allowed=allowed, admits=admits).ranked[0]


def reserved_bytes(result: SimulationResult, hw: HardwareProfile) -> float:
    """The caching allocator's peak reserved memory, what published runs log (torchtitan's
    memory figure is torch.cuda.max_memory_reserved): the simulated (allocated) peak plus
    the fragmentation meshplan holds back on the device (memory.FRAGMENTATION_SHARE)."""
    return result.peak_memory_bytes + FRAGMENTATION_SHARE * hw.memory_bytes


def _error_and_sensitivity(run: PublishedRun, at, probe: float) -> tuple[float, float]:
    """log(measured / T0) of a run, T0 its step time with a profile figure at 0, and g, its
    step time's growth per unit of the figure relative to T0 (T = T0 (1 + x g), simulated at
    `probe`); `at(hw, x)` is the run's profile with the figure at x."""
    hw = stock_profile(run.hardware)
    t0, t1 = (predict(run, at(hw, x)).step_time_s for x in (0.0, probe))
    return math.log(run.measured_step_time_s / t0), (t1 / t0 - 1) / probe


def scaling_pairs(runs: list[PublishedRun]) -> list[tuple[PublishedRun, PublishedRun]]:
    """Pairs of modelled fit-half rows of one source that differ only in their GPU count
    (and so in DP degree and global batch): weak-scaling measurements of one setup."""
    groups: dict[tuple, list[PublishedRun]] = {}
    for run in runs:
        if run.fit_half and not run.not_modelled:
            same = {k: v for k, v in run.fixed.items() if k not in ("dp", "global_batch")}
            key = (run.source_id, run.model, run.hardware, tuple(sorted(same.items())))
            groups.setdefault(key, []).append(run)
    return [(a, b) for group in groups.values()
            for a, b in itertools.combinations(sorted(group, key=lambda x: x.cluster.num_gpus), 2)
            if a.cluster.num_gpus < b.cluster.num_gpus]


def fit_straggler_spread(pairs: list[tuple[PublishedRun, PublishedRun]], probe: float = 0.01) -> tuple[float, list]:
    """Least-squares HardwareProfile.stragglers.spread from weak-scaling pairs. A row's step
    time at spread x is T0 (1 + x g) (the wait is linear in the spread; g simulated at
    `probe`), so the larger run's log error log(measured / T0) less the smaller one's is
    log((1 + x g_large) / (1 + x g_small)): fitted over the pairs, an error common to both
    runs of a pair (the level of a source's runs) does not enter. Returns the spread and per
    pair (smaller id, larger id, error difference, g difference)."""
    seen: dict[str, tuple[float, float]] = {}

    def error_and_sensitivity(run: PublishedRun) -> tuple[float, float]:
        """_error_and_sensitivity of a run, simulated once whatever pairs it is in."""
        if run.id not in seen:
            seen[run.id] = _error_and_sensitivity(run, lambda hw, x: replace(hw, stragglers=Stragglers(x)), probe)
        return seen[run.id]

    rows, terms = [], []
    for pair in pairs:
        try:
            errors, sensitivity = zip(*(error_and_sensitivity(run) for run in pair))
        except MeshplanError:  # a row meshplan refuses (benchmarks/published.py lists why)
            continue
        rows.append((pair[0].id, pair[1].id, errors[1] - errors[0], sensitivity[1] - sensitivity[0]))
        terms.append((errors[1] - errors[0], *sensitivity))
    if not terms:
        return 0.0, rows

    def loss(x: float) -> float:
        return sum((e - math.log((1 + x * large) / (1 + x * small))) ** 2 for e, small, large in terms)
    return float(minimize_scalar(loss, bounds=(0.0, 0.5), method="bounded").x), rows


def _fit_robust(runs: list[PublishedRun], keep, at, probe: float, bound: float) -> tuple[float, list]:
    """A profile figure x in [0, bound] from the fit-half rows `keep(run)` accepts: a row's
    step time at x is T0 (1 + x g) (`at(hw, x)` the row's profile with the figure at x, g
    simulated at `probe`); x minimises the summed |log(measured / (T0 (1 + x g)))|, robust to
    the rows a setting the source leaves unsaid puts far off. Returns x and per row (id,
    log(measured / T0), g)."""
    terms = []
    for run in runs:
        if not run.fit_half or run.not_modelled or not keep(run):
            continue
        try:
            terms.append((run.id, *_error_and_sensitivity(run, at, probe)))
        except MeshplanError:  # a row meshplan refuses (benchmarks/published.py lists why)
            continue
    if not terms:
        return 0.0, terms

    def loss(x: float) -> float:
        return sum(abs(error - math.log1p(x * g)) for _, error, g in terms)
    return float(minimize_scalar(loss, bounds=(0.0, bound), method="bounded").x), terms


def fit_moe_host_gap(runs: list[PublishedRun], probe_s: float = 1e-3) -> tuple[float, list]:
    """FrameworkOverhead.moe_host_gap_s from the fit half's mixture-of-experts rows
    (_fit_robust)."""
    return _fit_robust(runs, lambda run: run.model.num_experts,
                       lambda hw, x: replace(hw, overhead=replace(hw.overhead, moe_host_gap_s=x)), probe_s, 0.05)


def fit_sustained_loss(runs: list[PublishedRun], base: str, probe: float = 0.05) -> tuple[float, list]:
    """Sustained.gemm_loss of stock profile `base` from the fit half's dense rows on it and
    the variants derived from it (_fit_robust). The GEMMs' time grows by y = loss / (1 - loss),
    and the step time nearly linearly in y, so y is the figure fitted. Returns the loss and
    per row (id, log(measured / T0), g per unit of y)."""
    y, terms = _fit_robust(runs, lambda run: not run.model.num_experts and base_of(run.hardware) == base,
                           lambda hw, x: replace(hw, sustained=Sustained(x / (1 + x))), probe, 0.5)
    return y / (1 + y), terms
