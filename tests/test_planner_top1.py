"""The top-1 benchmark ranks exactly the suite's candidates, in the planner's order."""
import sys
from pathlib import Path

from meshplan.validation.suite import SUITE
from meshplan.hw_profiles.profile import load_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from planner_top1 import planner_ranking  # noqa: E402


def test_ranking_is_the_suite_plans_fastest_first():
    ranking = planner_ranking(4, load_profile("local"))
    names = [n for n, _ in ranking]
    assert set(names) <= {n for n, p in SUITE if p.world_size == 4} and len(names) >= 3
    times = [t for _, t in ranking]
    assert times == sorted(times)
