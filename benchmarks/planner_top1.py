"""Does the planner pick the plan that is really fastest on this machine?

For each world size of the validation suite (validation/suite.py), the planner searches
the same space `meshplan plan` does (same model, global batch, sequence length, dtype),
kept to the suite's plans (the candidates the executor runs here), and ranks them; every
candidate is run on real ranks, and the planner's top choice is compared with the measured
fastest (target: the same plan, or within 3% of it), with the Spearman rank correlation
between the predicted and the measured order.

Usage: python benchmarks/planner_top1.py [--hardware local] [--steps 12 --warmup 4]
       python benchmarks/planner_top1.py --from-validate out/validate.json
(the second reuses the measured runs of `meshplan validate --json > out/validate.json`).
"""
from __future__ import annotations

import argparse
import json

from scipy.stats import spearmanr

from meshplan.validation.suite import SEQ_LEN, SUITE, VALIDATION_MODEL
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.search import search
from meshplan.planner.space import row_plan
from meshplan.simulator.plan import Cluster

TARGET_GAP = 0.03


def measured_times(args) -> dict[str, float]:
    """Measured median step time (s) of each suite plan, by name."""
    if args.from_validate:
        runs = json.loads(open(args.from_validate).read())["runs"]
        return {r["name"]: r["measured_step_time_s"] for r in runs}
    from meshplan.executor.options import RunOptions
    from meshplan.validation.suite import run_suite
    options = RunOptions(steps=args.steps, warmup=args.warmup, profile=args.hardware, progress=False)
    return {r.name: r.record.measured_step_time_s for r in run_suite(options)}


def planner_ranking(world: int, hw) -> list[tuple[str, float]]:
    """(suite name, predicted step time) of the suite's plans of this world size, in the
    planner's order."""
    names = {plan: name for name, plan in SUITE if plan.world_size == world}
    batch = {plan.global_batch for plan in names}.pop()
    dtype = {plan.dtype for plan in names}.pop()
    fixed = {"global_batch": batch, "seq_len": SEQ_LEN, "dtype": dtype}

    def allowed(table):
        return [row_plan(table, i) in names for i in range(len(table))]
    found = search(VALIDATION_MODEL, Cluster(world, world), hw, fixed, des=len(names), allowed=allowed,
                   admits=lambda plan: plan in names)
    return [(names[r.plan], r.step_time_s) for r in found.ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", default="local", help="profile the planner uses")
    parser.add_argument("--from-validate", help="JSON of `meshplan validate --json` to reuse")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    hw = load_profile(args.hardware)
    measured = measured_times(args)
    for world in sorted({plan.world_size for _, plan in SUITE}):
        ranking = [(n, p) for n, p in planner_ranking(world, hw) if n in measured]
        if len(ranking) < 2:
            continue
        fastest = min(measured[n] for n, _ in ranking)
        by_measured = sorted(ranking, key=lambda item: measured[item[0]])
        tied = sorted(n for n, p in SUITE if p.world_size == world and n in measured
                      and n not in dict(ranking))
        print(f"\nworld size {world}: {len(ranking)} candidates, profile {hw.name}"
              + (f" (left out by the planner as tied in prediction with a ranked plan that needs "
                 f"less memory: {', '.join(tied)})" if tied else ""))
        print(f"{'planner rank':>12}  {'plan':<24}{'predicted ms':>13}{'measured ms':>12}{'measured rank':>14}")
        for rank, (name, predicted) in enumerate(ranking, 1):
            print(f"{rank:>12}  {name:<24}{predicted * 1e3:>13.1f}{measured[name] * 1e3:>12.1f}"
                  f"{by_measured.index((name, predicted)) + 1:>14}")
        top = ranking[0][0]
        gap = measured[top] / fastest - 1.0
        rho = spearmanr([p for _, p in ranking], [measured[n] for n, _ in ranking]).statistic
        verdict = "meets" if gap <= TARGET_GAP else "misses"
        print(f"planner's top choice {top!r}: measured {gap:+.1%} vs the measured fastest "
              f"{by_measured[0][0]!r} ({verdict} the {TARGET_GAP:.0%} target); Spearman {rho:.2f}")


if __name__ == "__main__":
    main()
