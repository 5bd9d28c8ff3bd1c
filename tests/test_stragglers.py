"""The ZeRO-3 group's wait for its slowest rank (HardwareProfile.stragglers) against hand
computations, and the spread's fit from weak-scaling pairs against a known answer; how often
a pipeline's ZeRO-3 gathers (and so their waits) come."""
import math
from dataclasses import replace

import numpy as np
import pytest

from meshplan.core.errors import ProfileError
from meshplan.hw_profiles.profile import HardwareProfile, Stragglers, load_profile
from meshplan.planner.closed_forms import evaluate
from meshplan.planner.space import candidate_table, row_plan
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator import step
from meshplan.simulator.train import plan_rows, simulate
from meshplan.validation.published import PublishedRun, fit_straggler_spread, predict

A100 = load_profile("a100-80gb")
SPREAD = 0.05
SLOW = replace(A100, stragglers=Stragglers(SPREAD, "test"))
STEADY = replace(A100, stragglers=Stragglers())
MODEL, CLUSTER = ZOO["llama-2-7b"], Cluster(16, 8)


@pytest.mark.parametrize("ranks, expected", [(8, 1.4236), (100, 2.5076), (1000, 3.2414)])
def test_wait_is_the_expected_maximum_of_normal_ranks(ranks, expected):
    # expected largest of n standard normals, tabulated by Harter (1961) Table 1
    assert Stragglers(SPREAD).wait_share(ranks) == pytest.approx(SPREAD * expected, rel=0.01)
    assert Stragglers(SPREAD).wait_share(1) == 0.0


def _plan(**kw):
    return Plan(global_batch=32, seq_len=4096, dp=16, micro_batch=1, **kw)


def test_each_zero3_layer_waits_for_the_groups_slowest_rank():
    """Without pipelining every layer of each micro-batch waits spread x E[max of 16] of its
    forward, and of its backward where the weights are gathered again."""
    m, layers, z16 = 2, MODEL.num_layers, 1.7660  # Harter (1961): E[max of 16 normals]
    for reshard in (True, False):
        plan = _plan(zero=3, reshard_after_forward=reshard)
        r = plan_rows(MODEL, plan, CLUSTER, STEADY)
        fwd, bwd = float(r["l_fwd"][0]), float(r["l_bwd"][0])
        wait = m * layers * SPREAD * z16 * (fwd + (bwd if reshard else 0.0))
        slow, steady = simulate(MODEL, plan, CLUSTER, SLOW), simulate(MODEL, plan, CLUSTER, STEADY)
        assert slow.breakdown_s["stragglers"] == pytest.approx(wait, rel=0.01)
        assert slow.step_time_s - steady.step_time_s == pytest.approx(wait, rel=0.01)
        assert slow.breakdown_s["dp_comm"] == pytest.approx(steady.breakdown_s["dp_comm"])


def test_a_pipeline_keeps_unresharded_weights_gathered_for_the_whole_step():
    """pp 2 with one gradient sync a step (torch.distributed.pipelining under FSDP2): weights
    not resharded after forward are gathered once a step, so the data-parallel traffic and
    the straggler waits are those of one micro-batch however many there are; resharding
    after forward, or no pipeline, gathers them in every micro-batch."""
    cluster, z8 = Cluster(16, 8), 1.4236  # Harter (1961): E[max of 8 normals]

    def run(m, reshard=False, pp=2):
        plan = Plan(global_batch=8 * m * (2 // pp), seq_len=4096, dp=8 * (2 // pp), pp=pp, micro_batch=1,
                    zero=3, reshard_after_forward=reshard, schedule="1f1b")
        return simulate(MODEL, plan, cluster, SLOW), plan_rows(MODEL, plan, cluster, SLOW)

    (one, _), (four, r), (eight, _) = run(1), run(4), run(8)
    assert one.communication["dp"]["total_s"] == pytest.approx(four.communication["dp"]["total_s"], rel=1e-9)
    assert eight.communication["dp"]["total_s"] == pytest.approx(four.communication["dp"]["total_s"], rel=1e-9)
    layers = MODEL.num_layers // 2  # the critical stage's
    assert eight.breakdown_s["stragglers"] == pytest.approx(layers * SPREAD * z8 * float(r["l_fwd"][0]),
                                                            rel=0.01)
    assert eight.stages[0].memory == four.stages[0].memory
    for other in ({"reshard": True}, {"pp": 1}):
        (four, _), (eight, _) = run(4, **other), run(8, **other)
        assert eight.communication["dp"]["total_s"] > 1.5 * four.communication["dp"]["total_s"]
        assert eight.breakdown_s["stragglers"] == pytest.approx(2 * four.breakdown_s["stragglers"], rel=1e-6)


def test_a_pipeline_reduces_zero3_gradients_after_the_last_backward():
    """pp 2 syncing once a step: the gradients' reduce-scatter runs after each chunk's last
    backward (torch.distributed.pipelining's perform_reduce_grad), so with one chunk a rank
    all of it is exposed, with two chunks the last chunk's half and the first's behind the
    backward still to run; without a pipeline all but one layer's bucket hide in backward."""
    cluster = Cluster(16, 8)

    def tail(pp, v=1):
        plan = Plan(global_batch=64, seq_len=4096, dp=16 // pp, pp=pp, micro_batch=1, zero=3,
                    reshard_after_forward=False, schedule="interleaved" if v > 1 else "1f1b",
                    virtual_stages=v)
        r = plan_rows(MODEL, plan, cluster, A100)
        s, n = np.arange(pp)[None, :], np.full((1, pp), MODEL.num_layers // pp)
        t = step.rank_tail_s(r, MODEL, A100, s, n, step.rank_params(r, MODEL, s, n))
        return float(t.dp_exposed_s[0, 0]), float(t.dp_total_s[0, 0]), float(t.contention_s[0, 0])

    exposed, total, contention = tail(2)
    assert exposed == pytest.approx(total) and contention == 0.0
    exposed, total, contention = tail(2, 2)
    assert total / 2 * (1 - 1e-9) <= exposed < total and contention > 0.0
    exposed, total, _ = tail(1)
    assert exposed < total / 4


def test_ranks_that_meet_once_a_step_do_not_wait_per_layer():
    for zero in (0, 1, 2):
        plan = _plan(zero=zero)
        assert simulate(MODEL, plan, CLUSTER, SLOW).step_time_s == simulate(MODEL, plan, CLUSTER, STEADY).step_time_s


def test_planner_prices_the_wait_as_simulate_does():
    table = candidate_table(MODEL, CLUSTER, {"global_batch": 32, "seq_len": 4096, "zero": 3, "pp": 1})
    ev = evaluate(table, MODEL, SLOW, CLUSTER.ranks_per_node)
    for i in range(0, len(table), max(1, len(table) // 5)):
        if ev.fits[i]:
            plan = row_plan(table, i)
            assert ev.step_time_s[i] == pytest.approx(simulate(MODEL, plan, CLUSTER, SLOW).step_time_s, rel=1e-6)


def _run(gpus: int, measured_s: float) -> PublishedRun:
    fixed = {"global_batch": 2 * gpus, "seq_len": 4096, "dp": gpus, "tp": 1, "pp": 1, "cp": 1, "zero": 3,
             "micro_batch": 1, "recompute": "full", "dtype": "bf16"}
    return PublishedRun(f"synthetic-{gpus}", "synthetic", MODEL, "a100-80gb", Cluster(gpus, 8), fixed,
                        measured_s, None, "")


def test_the_fit_recovers_a_known_spread_whatever_the_level():
    """Runs measured 20% slower than meshplan predicts at spread 0 (a level the fit must not
    read) and slower still by a 3% spread's wait: the fit finds the 3%."""
    truth, level, pairs = 0.03, 1.2, []
    for small, large in ((8, 64), (16, 256)):
        runs = []
        for gpus in (small, large):
            at_truth = replace(A100, stragglers=Stragglers(truth))
            runs.append(_run(gpus, level * predict(_run(gpus, 1.0), at_truth).step_time_s))
        pairs.append(tuple(runs))
    spread, rows = fit_straggler_spread(pairs)
    assert len(rows) == 2 and all(g > 0 for *_, g in rows)
    assert spread == pytest.approx(truth, rel=0.05)
    assert math.isclose(fit_straggler_spread([])[0], 0.0)


def test_profile_json_round_trips_the_stragglers_and_refuses_bad_ones():
    assert HardwareProfile.from_dict(SLOW.to_dict()).stragglers == SLOW.stragglers
    assert A100.stragglers.spread > 0  # stock profiles carry the fitted spread
    for bad, field in (({"spread": 1.5}, "stragglers.spread"), ({"spread": 0.1, "why": "x"}, "stragglers.why")):
        with pytest.raises(ProfileError) as err:
            HardwareProfile.from_dict({**A100.to_dict(), "stragglers": bad})
        assert err.value.field == field
