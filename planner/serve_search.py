"""Serving plan search: every legal (tp, pp, replicas) layout of the GPUs, each weight
quantization the device runs (none, int8, int4 weight-only, fp8 where the profile has FP8),
for a mixture-of-experts model its experts sharded over the tp x replicas ranks or whole on
them (expert_parallel, vLLM's --enable-expert-parallel), batches in powers of two up to the
largest that fits (and that largest itself), simulated with simulator.serve; candidates
over a TTFT or TPOT SLO are cut; the rest are ranked by generated tokens per second per GPU
("throughput") or by request latency ("latency").
Also: the explanation of the ranking (planner/exports/vllm.py writes a plan's `vllm serve`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd

from meshplan.core.units import GIB, MIB, rate_text
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.core.errors import MeshplanError, PlanError
from meshplan.simulator.quantize import QUANTIZATIONS
from meshplan.simulator.serve import InferencePlan, InferenceResult, simulate_inference
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster

OBJECTIVES = ("throughput", "latency")
FIXABLE = ("tp", "pp", "replicas", "batch", "dtype", "kv_dtype", "quantization", "quant_group_size",
           "expert_parallel")
# What sets a candidate's layout apart, beside its batch.
LAYOUT = ("tp", "pp", "replicas", "quantization", "expert_parallel")
CUT_REASONS = {"memory": "do not fit in memory", "ttft_slo": "miss the TTFT SLO",
               "tpot_slo": "miss the TPOT SLO"}


@dataclass(frozen=True)
class InferenceSearch:
    """Ranked (plan, result) pairs, best first, and the table of every simulated candidate
    with its status ("ok" or the CUT_REASONS key that removed it). Iterates like the ranked
    list."""

    ranked: tuple
    table: pd.DataFrame
    objective: str
    layouts_without_room: int

    def __iter__(self):
        return iter(self.ranked)

    def __len__(self) -> int:
        return len(self.ranked)

    def __getitem__(self, i):
        return self.ranked[i]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _batches(max_batch: int) -> list[int]:
    powers = [2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch]
    return sorted(set(powers + [max_batch]))


def _check_args(prompt_len, gen_len, slo_ttft_s, slo_tpot_s, objective, fixed) -> None:
    """One PlanError naming every argument the search cannot take."""
    issues = []
    if objective not in OBJECTIVES:
        issues.append(("search.objective", f"unknown {objective!r}", f"use one of {', '.join(OBJECTIVES)}"))
    for field, slo in (("search.slo_ttft_ms", slo_ttft_s), ("search.slo_tpot_ms", slo_tpot_s)):
        if slo is not None and not (isinstance(slo, (int, float)) and slo > 0):
            issues.append((field, f"must be a positive time, got {slo!r}", "give a positive time, or leave it out"))
    if slo_tpot_s is not None and gen_len == 1:
        issues.append(("search.slo_tpot_ms", "one generated token has no time per output token after it",
                       "drop the TPOT SLO, or generate more than one token"))
    issues += [(f"plan.{name}", "cannot be fixed in a serving search", f"fix only {', '.join(FIXABLE)}")
               for name in sorted(set(fixed) - set(FIXABLE))]
    try:  # the plan's constructor checks the lengths, batch and dtypes
        InferencePlan(batch=fixed.get("batch", 1), prompt_len=prompt_len, gen_len=gen_len,
                      dtype=fixed.get("dtype", "fp16"), kv_dtype=fixed.get("kv_dtype"),
                      quantization=fixed.get("quantization", "none"),
                      quant_group_size=fixed.get("quant_group_size", 128),
                      expert_parallel=fixed.get("expert_parallel", False))
    except PlanError as exc:
        issues += exc.issues
    if issues:
        raise PlanError.of(issues)


def _layouts(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, fixed: dict) -> list[dict]:
    """The LAYOUT knobs of every candidate layout: tp x pp x replicas = GPUs, each
    quantization, expert parallelism off and (for a mixture-of-experts model) on, legal for
    the model on this hardware; a fixed knob that makes every layout illegal raises the
    PlanError of the first one tried."""
    n = cluster.num_gpus
    grid = itertools.product(((tp, pp, n // (tp * pp)) for tp in _divisors(n) for pp in _divisors(n // tp)),
                             QUANTIZATIONS, (False, True) if model.num_experts else (False,))
    layouts = [dict(zip(LAYOUT, (*sizes, q, ep))) for sizes, q, ep in grid]
    legal, first_error = [], None
    for layout in layouts:
        if any(fixed.get(k, v) != v for k, v in layout.items()):
            continue
        error = _layout_error(model, cluster, hw, fixed, layout)
        if error is None:
            legal.append(layout)
        first_error = first_error or error
    if not legal:
        raise first_error or _why_no_layout(model, cluster, hw, fixed)
    return legal


def _layout_error(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, fixed: dict,
                  layout: dict) -> MeshplanError | None:
    """The rules the serving plan of `layout` (LAYOUT knobs) breaks on this hardware, or None."""
    try:
        InferencePlan(1, 1, 1, quant_group_size=fixed.get("quant_group_size", 128),
                      **layout).validate(model, cluster, hw)
    except MeshplanError as exc:
        return exc
    return None


def _why_no_layout(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, fixed: dict) -> PlanError:
    """Why no layout has the fixed knobs: the rules the plan they make breaks (a TP degree
    that divides neither the GPUs nor the heads, experts on a dense model, ...)."""
    tp, pp = fixed.get("tp", 1), fixed.get("pp", 1)  # a degree below 1 is the plan's to refuse
    replicas = fixed.get("replicas", max(1, cluster.num_gpus // (tp * pp)) if tp * pp > 0 else 1)
    layout = {**{k: fixed[k] for k in LAYOUT if k in fixed}, "tp": tp, "pp": pp, "replicas": replicas}
    return _layout_error(model, cluster, hw, fixed, layout) or PlanError(
        "cluster.num_gpus", f"no tp x pp x replicas layout of {cluster.num_gpus} GPUs matches the fixed knobs",
        "relax --tp, --pp or --replicas")


def search_inference(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, prompt_len: int,
                     gen_len: int, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
                     objective: str = "throughput", fixed: dict | None = None) -> InferenceSearch:
    """Serving plans for `prompt_len`-token prompts generating `gen_len` tokens, ranked by
    `objective`; raises PlanError naming the limit when no candidate survives."""
    fixed = dict(fixed or {})
    _check_args(prompt_len, gen_len, slo_ttft_s, slo_tpot_s, objective, fixed)
    dtype, kv_dtype = fixed.get("dtype", "fp16"), fixed.get("kv_dtype")
    results: list[InferenceResult] = []
    without_room = 0
    group = fixed.get("quant_group_size", 128)
    for layout in _layouts(model, cluster, hw, fixed):
        def run(batch: int) -> InferenceResult:
            return simulate_inference(model, InferencePlan(batch, prompt_len, gen_len, dtype=dtype,
                                                           kv_dtype=kv_dtype, quant_group_size=group,
                                                           **layout), cluster, hw)
        if "batch" in fixed:
            results.append(run(fixed["batch"]))
            continue
        probe = run(1)
        if probe.max_batch == 0:
            without_room += 1
        else:
            results += [probe if b == 1 else run(b) for b in _batches(probe.max_batch)]
    table = pd.DataFrame([{
        "tp": r.plan.tp, "pp": r.plan.pp, "replicas": r.plan.replicas, "batch": r.plan.batch,
        "quantization": r.plan.quantization, "expert_parallel": r.plan.expert_parallel,
        "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "latency_s": r.latency_s,
        "throughput_tokens_per_s": r.throughput_tokens_per_s,
        "throughput_per_gpu": r.throughput_tokens_per_s / r.plan.num_gpus,
        "peak_memory_bytes": r.peak_memory_bytes, "fits": r.fits, "max_batch": r.max_batch} for r in results],
        columns=["tp", "pp", "replicas", "batch", "quantization", "expert_parallel", "ttft_s", "tpot_s", "latency_s",
                 "throughput_tokens_per_s", "throughput_per_gpu", "peak_memory_bytes", "fits", "max_batch"])
    table["status"] = "ok"
    # Later cuts overwrite earlier ones: memory is the hardest limit, so it is reported last.
    if slo_tpot_s is not None:
        table.loc[table.tpot_s > slo_tpot_s, "status"] = "tpot_slo"
    if slo_ttft_s is not None:
        table.loc[table.ttft_s > slo_ttft_s, "status"] = "ttft_slo"
    table.loc[~table.fits.astype(bool), "status"] = "memory"
    keys, ascending = ((["throughput_per_gpu", "latency_s"], [False, True]) if objective == "throughput"
                       else (["latency_s", "throughput_per_gpu"], [True, False]))
    order = table[table.status == "ok"].sort_values(keys, ascending=ascending, kind="stable").index
    if len(order) == 0:
        raise _nothing_left(table, model, cluster, slo_ttft_s, slo_tpot_s)
    return InferenceSearch(ranked=tuple((results[i].plan, results[i]) for i in order),
                           table=table, objective=objective, layouts_without_room=without_room)


def _nothing_left(table: pd.DataFrame, model: ModelSpec, cluster: Cluster, slo_ttft_s,
                  slo_tpot_s) -> PlanError:
    fitting = table[table.fits.astype(bool)]
    if fitting.empty and len(table) and table.max_batch.max() > 0:  # a fixed batch over every layout's room
        best = table.loc[table.max_batch.idxmax()]
        return PlanError("plan.batch", f"{int(table.batch.iloc[0])} sequences fit no layout of "
                         f"{cluster.num_gpus} GPUs (the most: {int(best.max_batch)}, at tp {best.tp} pp "
                         f"{best.pp})", f"use --batch {int(best.max_batch)} or fewer, or add GPUs")
    if fitting.empty:
        return PlanError("cluster.num_gpus", f"{model.name} does not fit on {cluster.num_gpus} GPUs in any "
                         "layout at this context", "add GPUs, shorten the context or use --kv-dtype fp8")
    if slo_ttft_s is not None and (fitting.ttft_s > slo_ttft_s).all():
        best = fitting.ttft_s.min()
        return PlanError("search.slo_ttft_ms", f"no plan reaches TTFT <= {slo_ttft_s:g} s (best {best:.3g} s)",
                         "relax the TTFT SLO, shorten prompts or add GPUs")
    best = fitting[fitting.ttft_s <= (slo_ttft_s or float("inf"))].tpot_s.min()
    within = " within the TTFT SLO" if slo_ttft_s is not None else ""
    return PlanError("search.slo_tpot_ms", f"no plan{within} reaches TPOT <= {slo_tpot_s:g} s "
                     f"(best {best:.3g} s)", "relax the SLOs or add GPUs")


def _describe(plan: InferencePlan, result: InferenceResult) -> str:
    rate = result.throughput_tokens_per_s
    weights = "" if plan.quantization == "none" else f" {plan.quantization}"
    experts = " expert-parallel" if plan.expert_parallel else ""
    return (f"tp {plan.tp} pp {plan.pp} replicas {plan.replicas} batch {plan.batch}{weights}{experts}: "
            f"{rate_text(rate)} tok/s ({rate_text(rate / plan.num_gpus)}/GPU), TTFT {result.ttft_s * 1e3:,.1f} ms, "
            f"TPOT {result.tpot_s * 1e3:.2f} ms, "
            f"{result.peak_memory_bytes / GIB:.1f} of {result.memory_limit_bytes / GIB:.1f} GiB")


def _shares(parts: dict, total: float) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.2f} ms ({v / total:.0%})"
                     for k, v in parts.items() if v > 0)


def _gap(objective: str, best: InferenceResult, other: InferenceResult) -> str:
    if objective == "throughput":
        return f"{1 - other.throughput_tokens_per_s / best.throughput_tokens_per_s:.1%} lower throughput"
    return f"{other.latency_s / best.latency_s - 1:.1%} higher latency"


def _layout(plan: InferencePlan) -> tuple:
    return tuple(getattr(plan, k) for k in LAYOUT)


def _weights_line(search: InferenceSearch) -> str | None:
    """Where the search quantized the winner's weights (the quantization not held): that it
    did, what it trades, and the best plan keeping 16-bit weights."""
    plan, result = search[0]
    if plan.quantization == "none" or search.table.quantization.nunique() < 2:
        return None
    line = (f"  weights {plan.quantization}: the search's choice, trading accuracy for speed and memory; "
            f"--quantization none holds {plan.dtype} weights")
    keeping = next((c for c in search.ranked if c[0].quantization == "none"), None)
    if keeping is None:
        return line + f" (no {plan.dtype} plan is kept)"
    return line + f" (the best: {_describe(*keeping)}, {_gap(search.objective, result, keeping[1])})"


def _experts_line(search: InferenceSearch) -> str:
    """How the winner places the experts, and the best kept plan placing them the other way."""
    plan, result = search[0]
    ranks = plan.tp * plan.replicas
    per_rank = result.model.num_experts // ranks
    chosen = (f"{per_rank} whole expert{'s' if per_rank > 1 else ''} per rank (expert parallel over {ranks})"
              if plan.expert_parallel else f"every expert sharded over the {ranks} tp x replicas ranks")
    other = next((c for c in search.ranked if c[0].expert_parallel != plan.expert_parallel), None)
    if other is None:
        return f"experts: {chosen}; no kept plan places them the other way"
    way = "sharded" if plan.expert_parallel else "expert parallel"
    return (f"experts: {chosen}; best {way}: {_describe(*other)} "
            f"({_gap(search.objective, result, other[1])})")


def explain_inference(search: InferenceSearch) -> str:
    """Why the winner won: its time breakdown, the runner-up and how far behind it is, and
    what cut the other candidates."""
    plan, result = search[0]
    lines = [f"winner ({search.objective}): {_describe(plan, result)}",
             f"  decode step: {_shares(result.breakdown['decode_step_s'], result.tpot_s)}",
             f"  prefill: {_shares(result.breakdown['prefill_s'], result.ttft_s)}"]
    weights = _weights_line(search)
    if weights:
        lines.append(weights)
    if result.decode_cached:
        lines.append(f"  decode GEMMs priced as this profile measured weights read back within a "
                     f"{result.decode_working_set_bytes / MIB:,.1f} MiB working set, the step's")
    runner_up = search.ranked[1] if len(search) > 1 else None
    other = next((c for c in search.ranked[1:] if _layout(c[0]) != _layout(plan)), None)
    for label, pick in (("runner-up", runner_up), ("best other layout", other)):
        if pick is not None and (label == "runner-up" or pick is not runner_up):
            lines.append(f"{label}: {_describe(*pick)} ({_gap(search.objective, result, pick[1])})")
    if result.model.num_experts:
        lines.append(_experts_line(search))
    counts = search.table.status.value_counts()
    cuts = [f"{counts[k]} {CUT_REASONS[k]}" for k in CUT_REASONS if k in counts]
    if search.layouts_without_room:
        n = search.layouts_without_room
        cuts.append(f"{n} layout{'s' if n > 1 else ''} with no room for even one sequence")
    lines.append(f"candidates: {len(search.table)} simulated, {len(search)} kept"
                 + (f"; cut: {'; '.join(cuts)}" if cuts else ""))
    return "\n".join(lines)
