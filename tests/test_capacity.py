"""How many GPUs, how long, how much: the capacity search against a brute-force loop over
GPU counts, the arithmetic of time and cost, and the CLI."""
import json
import math
import subprocess
import sys

import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.capacity import capacity_search, gpu_counts, training
from meshplan.planner.search import search
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster

H100 = load_profile("h100-80gb")
FIXED = {"global_batch": 256, "seq_len": 4096}
TOKENS = 2e11


def test_gpu_counts_lists_and_doubling_ranges():
    assert gpu_counts("256,512,1024", 8) == [256, 512, 1024]
    assert gpu_counts("8-128", 8) == [8, 16, 32, 64, 128]
    assert gpu_counts("4,8-16", 8) == [4, 8, 16]
    with pytest.raises(PlanError) as err:
        gpu_counts("12", 8)                       # not whole nodes
    assert err.value.field == "cluster.num_gpus"
    with pytest.raises(PlanError) as err:
        gpu_counts("x,64-8", 8)                   # both wrong, both named
    assert len(err.value.issues) == 2


def test_training_time_and_cost_by_hand():
    # 1e9 tokens in batches of 4 x 1000 = 250,000 steps of 0.864 s = 216,000 s = 2.5 days;
    # 64 GPUs x 60 h x 3 per GPU-hour = 11,520. A part-batch is a whole step.
    t = training(1e9, 4, 1000, 0.864, 64, 3.0)
    assert (t.steps, t.days, t.cost) == (250_000, pytest.approx(2.5), pytest.approx(11_520))
    assert training(1e9 + 1, 4, 1000, 0.864, 64).steps == 250_001
    assert training(1e9, 4, 1000, 0.864, 64).cost is None


def test_smallest_count_meeting_the_deadline_is_the_brute_force_answer():
    model, counts = ZOO["llama-2-7b"], [8, 16, 32, 64, 128]
    brute = []
    for n in counts:
        best = search(model, Cluster(n, 8), H100, FIXED).ranked[0]
        steps = math.ceil(TOKENS / (FIXED["global_batch"] * FIXED["seq_len"]))
        brute.append((n, steps * best.step_time_s / 86400, best.plan))
    deadline = sorted(days for _, days, _ in brute)[2] * 1.001   # met by the three largest counts
    want = next((n, days, plan) for n, days, plan in brute if days <= deadline)
    found = capacity_search(model, H100, counts, 8, FIXED, TOKENS, deadline, price=2.0)
    assert found.answer.gpus == want[0]
    assert found.answer.days == pytest.approx(want[1], rel=1e-12)
    assert found.answer.result.plan == want[2]
    assert found.answer.cost == pytest.approx(want[0] * want[1] * 24 * 2.0, rel=1e-12)
    assert [o.gpus for o in found.options] == [n for n in counts if n <= want[0]]  # stops there
    fastest = capacity_search(model, H100, counts, 8, FIXED, TOKENS)
    assert fastest.answer.gpus == min(brute, key=lambda b: b[1])[0]


def test_counts_without_a_plan_are_reported_not_fatal():
    found = capacity_search(ZOO["llama-2-70b"], H100, [1, 8, 64], 8, FIXED, TOKENS)
    first = found.options[0]
    assert first.result is None and "memory" in first.why_not    # 70B does not fit one GPU
    assert found.answer is not None and found.answer.gpus in (8, 64)


def test_cli_answers_with_the_cluster_and_its_cost():
    out = subprocess.run([sys.executable, "-m", "meshplan.cli", "plan", "--model", "llama-2-7b",
                          "--hardware", "h100-80gb", "--tokens", "2e11", "--days", "30", "--gpus",
                          "8-64", "--global-batch", "256", "--seq-len", "4096", "--gpu-hour-price", "2",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["answer"]["days"] <= 30 and data["answer"]["gpus"] in (8, 16, 32, 64)
    bad = subprocess.run([sys.executable, "-m", "meshplan.cli", "plan", "--model", "llama-2-7b",
                          "--hardware", "h100-80gb", "--tokens", "2e13", "--days", "1", "--gpus", "8-16",
                          "--global-batch", "256", "--seq-len", "4096"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--days" in bad.stderr
