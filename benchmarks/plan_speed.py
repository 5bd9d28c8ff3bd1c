"""How long `meshplan plan` takes to search the full space: GPT-3 175B on 1024 A100s
(target <= 2 s) and the 1T-parameter Megatron GPT on 3072 A100s (target <= 5 s).

Prints, per case, the best of a few runs: wall and CPU seconds of the search (candidate
table, closed-form evaluation, discrete-event re-rank of the best) and of the explanation
(one simulation per single-knob change of the winner). Usage: python benchmarks/plan_speed.py
"""
from __future__ import annotations

import time

from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.closed_forms import evaluate
from meshplan.planner.explain import explain
from meshplan.planner.search import search
from meshplan.planner.space import candidate_table
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster

CASES = (("gpt3-175b", 1024, 1536, 2.0), ("megatron-gpt-1t", 3072, 3072, 5.0))
REPEATS = 3


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    hw = load_profile("a100-80gb")
    print(f"{'case':<34}{'candidates':>11}{'fit':>9}{'closed':>8}{'DES':>5}"
          f"{'table s':>9}{'eval s':>8}{'search wall':>12}{'search cpu':>11}{'explain':>9}  target")
    for name, gpus, batch, target_s in CASES:
        model, cluster, fixed = ZOO[name], Cluster(gpus, 8), {"global_batch": batch, "seq_len": 2048}
        runs = []
        for _ in range(REPEATS):
            table, t_table, _ = timed(lambda: candidate_table(model, cluster, fixed, hw.fabric, hw.nics_per_node))
            _, t_eval, _ = timed(lambda: evaluate(table, model, hw, cluster.ranks_per_node, keep=24))
            found, wall, cpu = timed(lambda: search(model, cluster, hw, fixed))
            _, t_explain, _ = timed(lambda: explain(model, cluster, hw, found.ranked, fixed))
            runs.append((wall, cpu, t_table, t_eval, t_explain, found))
        wall, cpu, t_table, t_eval, t_explain, found = min(runs, key=lambda r: r[0])
        verdict = "ok" if wall <= target_s else f"over ({cpu:.2f} s CPU)"
        print(f"{name + f' on {gpus} A100':<34}{found.candidates:>11,}{found.feasible:>9,}"
              f"{found.evaluated:>8,}{found.simulated:>5}{t_table:>9.2f}{t_eval:>8.2f}"
              f"{wall:>12.2f}{cpu:>11.2f}{t_explain:>9.2f}  <= {target_s:.0f} s {verdict}")


if __name__ == "__main__":
    main()
