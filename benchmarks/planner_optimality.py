"""Is the planner's winner the fastest plan? For each case (dense and mixture-of-experts), every legal plan that fits is
priced (those with context parallelism under each CP exchange), and every plan that could beat the winner by more than 1% is run through the
discrete-event simulation; the winner must be the optimum within 1%, and no single-knob
change of it may be predicted faster. A case for an export target searches as `meshplan plan
--emit` does, against the plans that target runs.

    python benchmarks/planner_optimality.py [--cases N] [--json out.json]

A plan is left out of the simulation only when a rigorous lower bound on its simulated step
(its busiest pipeline rank's work, every op of which runs one after another, plus that
rank's tail: closed_forms.Evaluation.busy_bound_s, made of the same per-op times as
simulate) is already above the winner's step / 1.01, so the simulated set dominates the
rest. Figures, not assertions: it prints a line per case and the number of misses."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from meshplan.hw_profiles.profile import load_profile
from meshplan.planner import exports
from meshplan.planner.closed_forms import evaluate
from meshplan.planner.explain import explain
from meshplan.planner.search import search
from meshplan.planner.space import candidate_table, cp_comm_variants, kept_rows, row_plan
from meshplan.simulator.model_spec import ZOO, read_model
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate

TOLERANCE = 0.01
QWEN3_MOE = Path(__file__).resolve().parents[1] / "tests/data/hf_configs/qwen3-30b-a3b.json"
# (model, GPUs, global batch, sequence, hardware, knobs held as a user would hold them),
# and where the search is for an export target (--emit), that target and its version
CASES = (
    ("llama-3-8b", 8, 64, 8192, "h100-80gb", {}),
    ("llama-2-7b", 16, 128, 4096, "a100-80gb", {}),
    ("llama-2-13b", 64, 128, 4096, "a100-80gb", {}),
    ("llama-3-8b", 128, 512, 8192, "h100-80gb", {}),
    ("llama-2-70b", 256, 512, 4096, "h100-80gb", {}),
    ("llama-3-8b", 16, 4, 131072, "h100-80gb", {}),
    ("llama-2-7b", 64, 64, 65536, "h100-80gb", {}),
    (str(QWEN3_MOE), 16, 256, 4096, "h100-80gb", {}),
    ("megatron-gpt-39b", 512, 1536, 2048, "a100-80gb", {}),
    ("gpt3-175b", 1024, 1536, 2048, "a100-80gb", {}),
    ("llama-3-70b", 2048, 1024, 8192, "h100-80gb", {}),
    ("megatron-gpt-530b", 2520, 2520, 2048, "a100-80gb", {"tp": 8}),
    ("llama-3-405b", 8192, 2048, 8192, "h100-80gb", {"tp": 8}),
    ("llama-3-405b", 16384, 2048, 8192, "h100-80gb", {"tp": 8, "pp": 16}),
    ("llama-3-70b", 256, 512, 8192, "h100-80gb", {"dtype": "fp8"}, "megatron", None),
    ("llama-3-8b", 32, 16, 65536, "h100-80gb", {}, "torchtitan", "0.2"),
    ("llama-2-13b", 64, 128, 4096, "a100-80gb", {}, "deepspeed", None),
)


def check(name, gpus, batch, seq, hw_name, held, target=None, version=None) -> dict:
    model, hw = ZOO[name] if name in ZOO else read_model(name).spec, load_profile(hw_name)
    cluster = Cluster(gpus, 8)
    fixed = {"global_batch": batch, "seq_len": seq, **held}
    runs = lambda table: np.ones(len(table), bool)  # noqa: E731
    free: tuple[str, ...] = ()
    if target is not None:  # as meshplan plan --emit searches
        fixed, free = exports.target_fields(target, fixed, hw)
        runs = lambda table: exports.supported(target, model, table, version)  # noqa: E731
    start = time.perf_counter()
    found = search(model, cluster, hw, fixed, allowed=None if target is None else runs, free=free,
                   admits=None if target is None else lambda plan: exports.runs(target, model, plan, version))
    search_s = time.perf_counter() - start
    winner = found.ranked[0]
    table = candidate_table(model, cluster, fixed, hw.fabric, hw.nics_per_node, prune_dominated=False)
    legal = fit = simulated = 0
    best, best_plan = winner.step_time_s, winner.plan
    # the CP exchange is plan-wide: the rows with cp > 1 again under each other one
    held_fixed = {k: v for k, v in fixed.items() if k not in free}
    for part in [table] + cp_comm_variants(table, model, cluster, held_fixed, prune_dominated=False):
        part = kept_rows(part, runs(part))
        if part.empty:
            continue
        ev = evaluate(part, model, hw, cluster.ranks_per_node)
        rows = np.flatnonzero(ev.fits & (ev.busy_bound_s < winner.step_time_s / (1 + TOLERANCE)))
        legal, fit, simulated = legal + len(part), fit + int(ev.fits.sum()), simulated + int(rows.size)
        for i in rows:
            result = simulate(model, row_plan(part, int(i)), cluster, hw)
            if result.fits and result.step_time_s < best:
                best, best_plan = result.step_time_s, result.plan
    why = explain(model, cluster, hw, found.ranked, held_fixed, found.tried)
    # a change of a knob the case holds is the user's constraint, not a miss of the search;
    # nor is one the target cannot run
    faster = [c.label for c in why.changes if c.slower_rel is not None and c.slower_rel < 0
              and c.limit is None and not c.held and (target is None or exports.runs(target, model, Plan(**{**c.plan, "layer_partition": None}), version))]
    return {"case": f"{model.name} on {gpus}x {hw_name}" + (f" {held}" if held else "")
            + (f" --emit {target}" + (f" {version}" if version else "") if target else ""),
            "legal": legal, "fit": fit, "simulated": simulated,
            "winner_s": winner.step_time_s, "optimum_s": best, "gap": winner.step_time_s / best - 1,
            "miss": winner.step_time_s > best * (1 + TOLERANCE) or bool(faster),
            "faster_single_knob_changes": faster, "search_s": search_s,
            "winner": winner.plan.to_dict(), "optimum": best_plan.to_dict()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = []
    print(f"{'case':58s} {'legal':>9s} {'fit':>8s} {'DES':>6s} {'winner s':>9s} {'optimum s':>9s} "
          f"{'gap':>7s} {'search s':>8s}")
    for case in CASES[:args.cases]:
        r = check(*case)
        results.append(r)
        print(f"{r['case']:58s} {r['legal']:9,d} {r['fit']:8,d} {r['simulated']:6,d} {r['winner_s']:9.3f} "
              f"{r['optimum_s']:9.3f} {r['gap']:+7.2%} {r['search_s']:8.2f}"
              + ("  MISS" if r["miss"] else "") + (f" faster knob changes: {r['faster_single_knob_changes']}"
                                                   if r["faster_single_knob_changes"] else ""), flush=True)
    print(f"misses: {sum(r['miss'] for r in results)} of {len(results)} cases")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
