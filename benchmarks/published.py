"""Predicted against measured for the published training runs in benchmarks/published/.

    python benchmarks/published.py [--json out.json] [--write] [--fit-sustained] [--fit-stragglers]
                                   [--fit-moe-gap] [--planner]

Prints one line per row (measured and predicted step time, the error, memory where the
source publishes it, and which half the row is in), then the median and max |error| of the
fit half and of the held-out half separately, of the held-out rows by family (mixture of
experts; dense with and without context parallelism: what explanations quote for a plan of
that family), and over the mixture-of-experts rows and the dense FP8 rows. Rows meshplan
cannot model yet are listed with the reason; a row it refuses for memory alone (the run was
published, so meshplan's memory model is over for it) is also priced on the same device
without the memory limit, and listed apart with the memory it needs, outside the figures.
With --planner, each row's published layout is set against the planner's own winner for its
model, cluster, batch and implementation (validation.published.planner_best), both
predicted: what meshplan claims it would gain over the layout the run's authors chose, by
source, and any fitting layout the search missed (its winner slower).
Figures, not assertions."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import date

import numpy as np

from meshplan.core.errors import MeshplanError
from meshplan.core.io import write_json
from meshplan.core.units import GIB
from meshplan.hw_profiles.accuracy import END_TO_END, KINDS, plan_kind
from meshplan.simulator.memory import usable_bytes
from meshplan.hw_profiles.variants import base_of
from meshplan.validation.published import (fit_moe_host_gap, fit_straggler_spread, fit_sustained_loss,
                                             load_runs, planner_best, predict, reserved_bytes, scaling_pairs,
                                             stock_profile)


def _figures(label: str, rows: list[dict]) -> dict | None:
    """Print the rows' count, median and max |error| under `label` and return them (None for
    no rows)."""
    errors = np.abs([r["error"] for r in rows])
    if not errors.size:
        return None
    print(f"{label}: {errors.size} rows, median |error| {np.median(errors):.1%}, max {errors.max():.1%}")
    return {"rows": int(errors.size), "median": float(np.median(errors)), "max": float(errors.max())}


def _unbounded(run, hw):
    """The run's prediction on `hw` with no memory limit (four times the device's memory),
    its result priced against the real limit; None where it is refused for more than memory."""
    try:
        result = predict(run, dataclasses.replace(hw, memory_bytes=4 * hw.memory_bytes))
    except MeshplanError:
        return None
    limit = usable_bytes(float(hw.memory_bytes))
    return None if result.peak_memory_bytes <= limit else dataclasses.replace(
        result, memory_limit_bytes=limit, fits=False)


def against_planner(runs) -> int:
    """Print, per row meshplan prices, its published layout's predicted step time and the
    planner's winner's among the plans of the row's framework (planner_best), the gain the
    planner claims, and then per source the median and max claimed gain. A published layout
    over the device's memory as meshplan counts it is marked so: the search does not offer
    it. A row whose winner is more than 1% slower than a published layout that fits is a
    search miss. Returns the misses' count."""
    print(f"{'row':46s} {'framework':10s} {'published s':>11s} {'planner s':>10s} {'gain':>7s}  planner's winner")
    gains: dict[str, list[float]] = {}
    misses, skipped = 0, []
    for run in runs:
        if run.not_modelled:
            continue
        hw = stock_profile(run.hardware)
        try:
            published = predict(run, hw)
        except MeshplanError:  # refused, for memory mostly: the main table lists why
            continue
        try:
            best = planner_best(run, hw)
        except MeshplanError as exc:
            skipped.append((run.id, str(exc)))
            continue
        gain = 1 - best.step_time_s / published.step_time_s
        missed = published.fits and gain < -0.01
        misses += missed
        gains.setdefault(f"{run.source_id}, {'MoE' if run.model.num_experts else 'dense'}", []).append(gain)
        note = "" if published.fits else "  (the published layout is over memory as meshplan counts it)"
        print(f"{run.id:46s} {run.framework or '-':10s} {published.step_time_s:11.3f} {best.step_time_s:10.3f} "
              f"{gain:+7.1%}  {best.plan.summary()}{'  SEARCH MISS' if missed else note}")
    print("the gain the planner claims over the published layouts, by source and kind (median, max):")
    for source, values in gains.items():
        print(f"  {source:33s} {len(values):3d} rows  median {np.median(values):+6.1%}  max {max(values):+6.1%}")
    for name, why in skipped:
        print(f"  {name}: no winner: {why}")
    print(f"search misses (the winner more than 1% slower than a published layout that fits): {misses}")
    return misses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the per-row results here")
    parser.add_argument("--write", action="store_true",
                        help="record the fit and held-out figures in hw_profiles/data/end_to_end.json, "
                             "which explanations print beside the error band")
    parser.add_argument("--fit-sustained", action="store_true",
                        help="fit the GEMM rate lost under sustained load of each stock profile (calibration/"
                             "build_stock.py SUSTAINED) on the fit half's dense rows, print it and stop")
    parser.add_argument("--fit-stragglers", action="store_true",
                        help="fit the straggler spread of the stock profiles (calibration/build_stock.py "
                             "STRAGGLERS) on the fit half's weak-scaling pairs, print it and stop")
    parser.add_argument("--fit-moe-gap", action="store_true",
                        help="fit the GPU's wait for the host per MoE block of the stock profiles (calibration/"
                             "build_stock.py MOE_OVERHEAD) on the fit half's MoE rows, print it and stop")
    parser.add_argument("--planner", action="store_true",
                        help="set each row's published layout against the planner's winner for the same run "
                             "(what meshplan would have advised), print the gains it claims and stop")
    args = parser.parse_args(argv)
    if args.planner:
        return 1 if against_planner(load_runs()) else 0
    if args.fit_sustained:
        runs = load_runs()
        for base in sorted({base_of(run.hardware) for run in runs if not run.not_modelled}):
            loss, terms = fit_sustained_loss(runs, base)
            for run_id, error, sensitivity in terms:
                print(f"{run_id:46s} log(measured / predicted without it) {error:+.3f}, sensitivity {sensitivity:.2f}")
            print(f"{base}: the GEMMs lose {loss:.1%} of the fitted rate under sustained load (least |log "
                  f"error| over {len(terms)} dense fit-half rows)")
        return 0
    if args.fit_moe_gap:
        gap_s, terms = fit_moe_host_gap(load_runs())
        for run_id, error, sensitivity in terms:
            print(f"{run_id:46s} log(measured / predicted without it) {error:+.3f}, "
                  f"sensitivity {sensitivity:.1f} per s")
        print(f"MoE host gap: {gap_s * 1e3:.2f} ms per MoE block forward (least |log error| "
              f"over {len(terms)} fit-half rows)")
        return 0
    if args.fit_stragglers:
        spread, pairs = fit_straggler_spread(scaling_pairs(load_runs()))
        for small, large, error, sensitivity in pairs:
            print(f"{small:34s} -> {large:34s} log-error difference {error:+.4f}, sensitivity difference "
                  f"{sensitivity:+.3f}")
        print(f"straggler spread: {spread:.4f} (least squares over {len(pairs)} fit-half pairs)")
        return 0
    rows, skipped, over_memory = [], [], []
    for run in load_runs():
        if run.not_modelled:
            skipped.append((run.id, run.not_modelled))
            continue
        hw = stock_profile(run.hardware)
        try:
            result = predict(run, hw)
        except MeshplanError as exc:
            skipped.append((run.id, f"meshplan refuses it: {exc}"))
            unbounded = _unbounded(run, hw)
            if unbounded is not None:
                over_memory.append((run, unbounded))
            continue
        error = result.step_time_s / run.measured_step_time_s - 1
        memory_error = (reserved_bytes(result, hw) / run.measured_memory_bytes - 1
                        if run.measured_memory_bytes else None)
        rows.append({"id": run.id, "source": run.source_id, "half": "fit" if run.fit_half else "held-out",
                     "measured_s": run.measured_step_time_s, "predicted_s": result.step_time_s,
                     "error": error, "memory_error": memory_error,
                     "kind": plan_kind(run.model.num_experts, result.plan.cp), "plan": result.plan.to_dict()})
    print(f"{'row':46s} {'half':8s} {'measured s':>11s} {'predicted s':>11s} {'error':>8s} {'memory':>8s}")
    for r in rows:
        mem = f"{r['memory_error']:+.1%}" if r["memory_error"] is not None else "-"
        print(f"{r['id']:46s} {r['half']:8s} {r['measured_s']:11.3f} {r['predicted_s']:11.3f} "
              f"{r['error']:+8.1%} {mem:>8s}")
    summary = {}
    for half in ("fit", "held-out"):
        figures = _figures(half, [r for r in rows if r["half"] == half])
        if figures:
            summary[half.replace("-", "_")] = figures
    summary["held_out_kinds"] = {}
    for kind, label in KINDS.items():
        figures = _figures(f"held-out, {label}", [r for r in rows if r["half"] == "held-out" and r["kind"] == kind])
        if figures:
            summary["held_out_kinds"][kind] = figures
    _figures("mixture-of-experts (ep > 1)", [r for r in rows if r["plan"]["ep"] > 1])
    _figures("fp8 training, dense", [r for r in rows if r["plan"]["dtype"] == "fp8" and r["plan"]["ep"] == 1])
    print("by source (both halves; bias: the median signed error, + where meshplan predicts slower):")
    for source in dict.fromkeys(r["source"] for r in rows):
        errors = np.array([r["error"] for r in rows if r["source"] == source])
        print(f"  {source:24s} {errors.size:3d} rows, median |error| {np.median(np.abs(errors)):5.1%}, "
              f"max {np.abs(errors).max():5.1%}, bias {np.median(errors):+6.1%}")
    if args.write:
        write_json(END_TO_END, {**summary, "date": date.today().isoformat(),
                                "source": "benchmarks/published.py over benchmarks/published/training.csv"})
    print(f"not modelled ({len(skipped)}):")
    for name, why in skipped:
        print(f"  {name}: {why}")
    if over_memory:
        print("refused for memory alone, priced without the memory limit (not in the figures above):")
        for run, result in over_memory:
            print(f"  {run.id:44s} {'fit' if run.fit_half else 'held-out':8s} measured {run.measured_step_time_s:.3f} s, "
                  f"predicted {result.step_time_s:.3f} s ({result.step_time_s / run.measured_step_time_s - 1:+.1%}) "
                  f"as {result.plan.summary()}, needing {result.peak_memory_bytes / GIB:.1f} GiB of the "
                  f"{result.memory_limit_bytes / GIB:.1f} usable")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "skipped": skipped, "over_memory": [
                {"id": run.id, "half": "fit" if run.fit_half else "held-out", "measured_s": run.measured_step_time_s,
                 "predicted_s": result.step_time_s, "peak_memory_bytes": result.peak_memory_bytes,
                 "memory_limit_bytes": result.memory_limit_bytes, "plan": result.plan.to_dict()}
                for run, result in over_memory]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
