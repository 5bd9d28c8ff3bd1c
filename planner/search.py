"""The planner's search: build the candidate table, evaluate it with the closed forms
(planner/closed_forms.py), then re-rank the best few with the exact discrete-event simulator.

    table = every legal plan (planner/space.py)
    -> memory of each, step time of the fitting ones that can still make the top
    -> simulate() the best `des` of them and rank by its step time
    -> while a single-knob change of the winner (planner/neighbours.py) that fits is faster,
       take it: no plan one knob away from the winner is predicted faster.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pandas as pd

from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.core.errors import PlanError
from meshplan.planner.closed_forms import evaluate, states_fit
from meshplan.planner.neighbours import knob_changes, try_plan
from meshplan.planner.space import (candidate_table, cp_comm_variants, kept_rows, row_plan, searched,
                                    selective_twins)
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan, field_issues
from meshplan.simulator.schedule import SPLIT_BACKWARD
from meshplan.simulator.train import SimulationResult, check_hardware, simulate_many
from meshplan.core.units import GIB

# Plans re-ranked by the discrete-event simulation: the best by the closed forms, up to
# DES_CANDIDATES, stopping once their pipeline ops pass DES_OPS_BUDGET (the simulation
# costs ~6.5 us of CPU per op here, so ~1.6 s) but never below DES_MIN. The closed forms
# misrank pipeline plans by a few percent (Llama 3 8B on 2048 H100s behind a 2:1 fat tree:
# the best of 24 took 0.3155 s, a plan beyond them 0.3103 s), which 40 of them take in.
DES_CANDIDATES, DES_MIN, DES_OPS_BUDGET = 40, 16, 250_000
# Rounds of taking the winner's fastest single-knob change (_climb) before stopping anyway.
CLIMB_ROUNDS = 8


@dataclass(frozen=True)
class SearchResult:
    ranked: tuple[SimulationResult, ...]  # fitting plans, fastest first (simulated)
    candidates: int                       # legal plans in the table
    feasible: int                         # legal plans that fit in memory
    evaluated: int                        # plans whose step time the closed forms computed
    simulated: int                        # plans run through simulate()
    search_time_s: float
    # rows of degrees, micro-batch, schedule and ZeRO stage left out before the other knobs
    # joined them: their weights, gradients and optimizer states alone are over memory
    over_memory: int = 0
    # the climb's single-knob changes by their fields (neighbours.try_plan), for the explanation
    tried: dict = dataclasses.field(default_factory=dict, repr=False)


def search(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, fixed: dict,
           des: int = DES_CANDIDATES,
           allowed: Callable[[pd.DataFrame], np.ndarray] | None = None,
           free: tuple[str, ...] = (), admits: Callable[[Plan], bool] | None = None) -> SearchResult:
    """Rank the legal plans for `model` on `cluster`. `fixed`: the plan fields the user
    gave (held); `allowed`: which candidate rows to keep (a target framework's support,
    export.supported), and `admits` the same of one plan (exports.runs); `free`: fields of
    `fixed` that are a target's defaults rather than the user's, priced first but not held
    (cp_comm: exports.dictated)."""
    start = time.perf_counter()
    issues = field_issues(fixed)
    if issues:
        raise PlanError.of(issues)
    check_hardware(SimpleNamespace(dtype=fixed.get("dtype", "bf16")), model, hw)
    table = candidate_table(model, cluster, fixed, hw.fabric, hw.nics_per_node,
                            prune_dominated=allowed is None,
                            states_fit=lambda rows: states_fit(rows, model, hw))
    held = {k: v for k, v in fixed.items() if k not in free}
    if _asks_for_cp(held):
        table = kept_rows(table, table["cp"].to_numpy() > 1)
        if table.empty:
            raise PlanError("plan.cp_comm", "holds a context-parallel exchange, and no plan with cp > 1 is legal "
                            "here", "drop --cp-comm, or allow context parallelism (more GPUs, a longer sequence)")
    if allowed is not None:
        table = kept_rows(table, allowed(table))
        if table.empty:
            raise PlanError("emit", "no legal plan is one the target framework can run",
                            "drop --emit, or fix fewer knobs")
    ev = evaluate(table, model, hw, cluster.ranks_per_node, keep=des)
    parts = [(table, ev)]
    # the plans pruned as dominated that fit where their dominator does not (a table of
    # their own: joining a few rows onto a large table would copy it)
    twins = selective_twins(table, ev.peak_memory_bytes, ev.memory_limit_bytes, model, cluster, fixed,
                            prune_dominated=allowed is None)
    if not twins.empty:
        parts.append((twins, evaluate(twins, model, hw, cluster.ranks_per_node)))
    if not any(e.fits.any() for _, e in parts):
        raise _memory_error(ev, hw, fixed)
    picked = _des_rows(parts, des)
    tables = [kept_rows(t, rows) for (t, _), rows in zip(parts, picked) if rows]
    # the CP exchange is plan-wide, one per table: the table priced the held or default one,
    # and the plans re-ranked here are tried with each other one the rules allow, simulated
    # where the closed forms put them inside the re-ranked set (as a row of the table would be)
    cut = max(float(np.max(e.step_time_s[rows])) for (_, e), rows in zip(parts, picked) if rows)
    best = tables[0] if len(tables) == 1 else pd.concat(tables, ignore_index=True)
    best.attrs.update(table.attrs)
    for t in cp_comm_variants(best, model, cluster, held,
                              prune_dominated=allowed is None):
        t = t if allowed is None else kept_rows(t, allowed(t))
        if not t.empty:
            tev = evaluate(t, model, hw, cluster.ranks_per_node)
            tables.append(kept_rows(t, tev.fits & (tev.step_time_s <= cut)))
    results = simulate_many(model, [row_plan(t, i) for t in tables for i in range(len(t))], cluster, hw)
    ranked = sorted((r for r in results if r.fits), key=_rank)
    if not ranked:
        raise _memory_error(ev, hw, fixed)
    tried: dict = {}
    ranked, climbed = _climb(model, cluster, hw, ranked, held, admits, tried)
    return SearchResult(tuple(ranked), sum(len(t) for t, _ in parts), sum(int(e.fits.sum()) for _, e in parts),
                        sum(int(np.isfinite(e.step_time_s).sum()) for _, e in parts), len(results) + climbed,
                        time.perf_counter() - start, table.attrs["over_memory"], tried)


def _asks_for_cp(held: dict) -> bool:
    """A CP exchange the user held asks for context parallelism (a plan without it exchanges
    nothing), unless the CP degree is held too."""
    return "cp_comm" in held and "cp" not in held


def _rank(result: SimulationResult) -> tuple[float, float]:
    return result.step_time_s, result.peak_memory_bytes


def _climb(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, ranked: list[SimulationResult],
           held: dict, admits: Callable[[Plan], bool] | None, tried: dict) -> tuple[list[SimulationResult], int]:
    """The ranking with the winner's single-knob changes (knob_changes) simulated and ranked
    in, those that change a `held` field, leave the search's space or that `admits` refuses
    left out, repeated from each new winner (at most CLIMB_ROUNDS times) until none of its
    changes is faster; and how many plans that simulated (each kept in `tried`)."""
    seen = {dataclasses.astuple(r.plan) for r in ranked}
    simulated = 0
    for _ in range(CLIMB_ROUNDS):
        winner = ranked[0]
        for _, _, change in knob_changes(winner.plan, model.num_experts > 0, model.num_layers):
            if (isinstance(change, str) or any(k in held and held[k] != v for k, v in change.items())
                    or not searched(model, change, held)):
                continue
            fields = {**winner.plan.to_dict(), **change, "layer_partition": held.get("layer_partition")}
            try:  # a plan already ranked is not simulated again
                if dataclasses.astuple(Plan(**fields)) in seen:
                    continue
            except PlanError:
                continue
            other = try_plan(model, cluster, hw, fields, tried)
            if isinstance(other, PlanError) or (_asks_for_cp(held) and other.plan.cp == 1):
                continue
            seen.add(dataclasses.astuple(other.plan))
            simulated += 1
            if other.fits and (admits is None or admits(other.plan)):
                ranked.append(other)
        ranked.sort(key=_rank)
        if ranked[0] is winner:
            break
    return ranked, simulated


def distinct(ranked, top: int) -> list[tuple[SimulationResult, tuple[SimulationResult, ...]]]:
    """The table's rows: the first `top` plans of `ranked` (fastest first) that differ from
    every faster one in more than their virtual stages, each with the slower plans of the
    ranking that differ from it in virtual stages alone (a deeper or shallower interleave of
    the same layout, usually within a fraction of a percent)."""
    rows: dict[tuple, tuple[SimulationResult, list[SimulationResult]]] = {}
    for result in ranked:
        key = tuple(getattr(result.plan, f.name) for f in dataclasses.fields(result.plan)
                    if f.name != "virtual_stages")
        if key in rows:
            rows[key][1].append(result)
        elif len(rows) < top:
            rows[key] = (result, [])
    return [(best, tuple(variants)) for best, variants in rows.values()]


def _des_rows(parts, des: int) -> list[list[int]]:
    """Rows to simulate, per (table, evaluation) of `parts`: fastest first by the closed
    forms over all of them, skipping a row whose pipeline and predicted time equal an
    earlier one's (e.g. ZeRO-1 vs 2: same time, the earlier has less memory), within the
    ops budget."""
    found = []  # (step s, peak bytes, part, row, pipeline shape, split backward, schedule code)
    for k, (table, ev) in enumerate(parts):
        timed = np.flatnonzero(ev.fits & np.isfinite(ev.step_time_s))
        order = timed[np.lexsort((ev.peak_memory_bytes[timed], ev.step_time_s[timed]))][:50 * des]
        best = table.iloc[order]
        shape = best[["pp", "virtual_stages", "num_microbatches"]].to_numpy()
        zb = best["schedule"].isin(SPLIT_BACKWARD).to_numpy()
        sched = best["schedule"].cat.codes.to_numpy()
        found += [(ev.step_time_s[i], ev.peak_memory_bytes[i], k, int(i), tuple(pvm), z, c)
                  for i, pvm, z, c in zip(order, shape, zb, sched)]
    rows: list[list[int]] = [[] for _ in parts]
    seen, spent, count = set(), 0, 0
    for step_s, _, k, i, (p, v, m), z, code in sorted(found, key=lambda f: f[:2]):
        if count >= des or (spent > DES_OPS_BUDGET and count >= DES_MIN):
            break
        sig = (step_s, p, v, m, code)
        if sig not in seen:
            seen.add(sig)
            rows[k].append(i)
            count += 1
            spent += int(m * p * v * (3 if z else 2))
    return rows


def _memory_error(ev, hw: HardwareProfile, fixed: dict) -> PlanError:
    """Every legal plan is over the memory limit: say by how much and what would help."""
    held = [f"--{k.replace('_', '-')} {fixed[k]}" for k in ("recompute", "zero", "micro_batch",
                                                            "tp", "pp", "cp") if k in fixed]
    helps = ["add GPUs"] + [h for k, h in (("recompute", "allow recompute"), ("zero", "allow ZeRO"),
                                         ("micro_batch", "allow smaller micro-batches"))
                           if k in fixed]
    return PlanError("cluster.num_gpus", f"every legal plan needs more than the {ev.memory_limit_bytes / GIB:.1f} "
                     f"GiB usable of {hw.memory_bytes / GIB:.0f} GiB per device (the smallest needs at least "
                     f"{np.min(ev.peak_memory_bytes) / GIB:.1f} GiB)"
                     + (f" with {', '.join(held)} held" if held else ""),
                     " or ".join(helps) + (", or use a device with more memory" if not held else ""))
