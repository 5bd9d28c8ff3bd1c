"""Megatron-Core's expert-parallel all-to-all overlap (--overlap-moe-expert-parallel-comm)
against hand computations: its legality, the combined 1F1B op order, the four-phase
exposure of one F, B pair, the unpaired warm-up and cool-down ops left whole, and the
planner, explain and executor seeing the knob."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.closed_forms import evaluate
from meshplan.planner.neighbours import knob_changes
from meshplan.planner.space import candidate_table, row_plan
from meshplan.reports.timeline import comm_segments
from meshplan.simulator import rules
from meshplan.simulator.cost import (ExpertMesh, OpTimes, ShardTimes, ep_comm_s, ep_counts_s,
                                     layer_times)
from meshplan.simulator.model_spec import ZOO, load_model
from meshplan.simulator.pipeline_sim import simulate_pipeline
from meshplan.simulator.plan import RECOMPUTE, Cluster, Plan
from meshplan.simulator.schedule import SCHEDULES, in_flight, loss_in_flight, stage_op_tuples, warmup_ops
from meshplan.simulator.train import plan_rows, simulate

H100 = load_profile("h100-80gb")
# the exchange's arithmetic alone, without the GPU's wait for the host in an MoE block
NO_GAP = replace(H100, overhead=replace(H100.overhead, moe_host_gap_s=0.0))
MIXTRAL = load_model(str(Path(__file__).parent / "data" / "hf_configs" / "mixtral-8x7b.json"))
SLOWDOWN = H100.contention.compute_slowdown


def plan(**kw) -> Plan:
    return Plan(**{"global_batch": 64, "seq_len": 1024, "moe_a2a_overlap": True, **kw})


@pytest.mark.parametrize("kw,why", [
    (dict(dp=8), "expert parallelism"),                                   # ep 1: nothing to overlap
    (dict(dp=4, pp=2, ep=4), "interleaved 1F1B"),                         # 1F1B with pp > 1
    (dict(dp=8, ep=8, recompute="full"), "full recompute"),
    (dict(dp=8, ep=8, dtype="fp32"), "bf16 or fp16"),
])
def test_refused_where_megatron_refuses_it(kw, why):
    with pytest.raises(PlanError, match=why) as err:
        plan(**kw)
    assert {f for f, _, _ in err.value.issues} == {"plan.moe_a2a_overlap"}


def test_refused_for_a_dense_model_and_legal_where_megatron_runs_it():
    with pytest.raises(PlanError, match="no experts"):
        plan(dp=8, ep=2).validate(ZOO["llama-2-7b"], Cluster(8, 8))
    plan(dp=8, ep=8).validate(MIXTRAL, Cluster(8, 8))                            # pp 1
    plan(dp=4, pp=2, ep=4, schedule="interleaved", virtual_stages=2).validate(MIXTRAL, Cluster(8, 8))


def test_combined_1f1b_order_runs_one_more_warmup_forward():
    # without pipelining: the first forward alone, then (F i+1, B i) pairs, the last backward alone
    ops = [f"{k}{mb}" for k, mb, _ in stage_op_tuples("1f1b", 1, 3, a2a_overlap=True)[0]]
    assert ops == ["F0", "F1", "B0", "F2", "B1", "B2"]
    # interleaved: Megatron's 2(p-s-1) + (v-1)p warm-up forwards, plus one
    assert [warmup_ops("interleaved", 2, s, 4, 2, True) for s in (0, 1)] == [5, 3]
    with pytest.raises(ValueError, match="a2a_overlap"):
        stage_op_tuples("1f1b", 2, 4, a2a_overlap=True)


def test_pairs_run_as_one_op_and_the_rest_alone():
    # one stage, 3 micro-batches: F0 alone (1), two pairs of 0.5 + 1.5, B2 alone (2)
    res = simulate_pipeline("1f1b", 3, [1.0], [2.0], paired_s=([0.5], [1.5]))
    assert res.step_time_s == pytest.approx(1 + 2 * (0.5 + 1.5) + 2)
    # interleaved: each rank runs w unpaired F and B ops (schedule.warmup_ops) and m*v - w pairs
    p, v, m = 4, 2, 8
    res = simulate_pipeline("interleaved", m, np.ones((p, v)), 2 * np.ones((p, v)), p2p_s=0.1,
                            paired_s=(0.25 * np.ones((p, v)), 1.5 * np.ones((p, v))))
    for s in range(p):
        w = 2 * (p - s - 1) + (v - 1) * p + 1
        assert res.stage_busy_s[s] == pytest.approx(w * (1 + 2) + (m * v - w) * (0.25 + 1.5))
    held = in_flight(SCHEDULES.index("interleaved"), p, v, m, np.arange(p), True)
    assert res.max_in_flight.tolist() == held.tolist()


@pytest.mark.parametrize("schedule,p,m,v", [("1f1b", 1, 4, 1), ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3)])
def test_loss_in_flight_replays_the_combined_order(schedule, p, m, v):
    held = most = 0
    for kind, _, chunk in stage_op_tuples(schedule, p, m, v, a2a_overlap=True)[p - 1]:
        if chunk == v - 1:
            held += 1 if kind == "F" else -1
            most = max(most, held)
    assert loss_in_flight(SCHEDULES.index(schedule), p, m, True) == most == 2


def _shard(fwd, bwd_in, bwd_w, routed_f, routed_b) -> ShardTimes:
    """One layer's times by hand (no embedding, head or TP splitting)."""
    def times(*values):
        return OpTimes(*(np.array([x], dtype=float) for x in values))
    zero = times(*[0.0] * 13)
    return ShardTimes(times(fwd, bwd_in, bwd_w, 0, 0, 0, 0, routed_f, routed_b, 0, 0, 0, 0), zero, zero,
                      np.zeros(1), np.zeros(1))


def test_four_phase_exposure_by_hand():
    """Each half of one direction's exchange (dispatch with the counts, combine) hides
    behind the other direction's compute beside it: max(0, half - compute) exposed, the
    hidden part slowing that compute by the profile's contention."""
    tokens, ep = 4096.0, 8
    x = float(ep_comm_s(MIXTRAL, tokens, 2, 1.0, H100, ep, 8, 1, 1)[()])   # per direction
    counts = float(ep_counts_s(MIXTRAL, H100, ep, 8)[()])
    # F: attention etc. 10x, routed experts 0.2x; B: routed experts 2x, the rest 0.1x
    st = _shard(10.2 * x, 1.1 * x, 1.0 * x, 0.2 * x, 2.0 * x)
    em = ExpertMesh(np.array([ep]), np.array([1]), np.array([8]), np.array([1]), 1.0, np.array([tokens]))

    def layer(overlap, hw=NO_GAP, recompute=0):
        return layer_times(MIXTRAL, hw, st, np.array([tokens]), 2, np.array([1]), np.array([False]),
                           np.array([1]), np.array([recompute]), np.array([1]), np.array([1]), True,
                           np.array([False]), em, a2a_overlap=np.array([overlap]))
    on, off = layer(True), layer(False)
    dispatch_f, half = x / 2 + counts, x / 2
    # forward: dispatch beside B's routed experts (2x: hidden), combine beside B's rest (0.1x)
    assert on.ep_pair_fwd_s[0] == pytest.approx(max(0, dispatch_f - 2 * x) + (half - 0.1 * x))
    # backward: combine beside F's rest (10x: hidden), dispatch beside F's routed experts (0.2x)
    assert on.ep_pair_bwd_s[0] == pytest.approx(max(0, half - 10 * x) + (half - 0.2 * x))
    assert on.contention_pair_fwd_s[0] == pytest.approx(SLOWDOWN * (dispatch_f + 0.1 * x))
    assert on.contention_pair_bwd_s[0] == pytest.approx(SLOWDOWN * (half + 0.2 * x))
    # alone, or without the overlap, the exchange is whole
    assert on.ep_fwd_s[0] == pytest.approx(x + counts) and on.ep_bwd_s[0] == pytest.approx(x)
    assert (off.ep_pair_fwd_s[0], off.ep_pair_bwd_s[0]) == (off.ep_fwd_s[0], off.ep_bwd_s[0])
    assert off.fwd_pair_s[0] == off.fwd_s[0] and off.bwd_pair_s[0] == off.bwd_s[0]
    # the GPU's wait for the host: whole in every forward, paired or not (nothing runs in
    # it for the exchange to hide behind), and again in a forward that full recompute redoes
    gap = H100.overhead.moe_host_gap_s
    assert gap > 0
    for overlap, plain in ((True, on), (False, off)):
        gapped = layer(overlap, H100)
        assert (gapped.host_gap_fwd_s[0], gapped.host_gap_bwd_s[0]) == (gap, 0.0)
        assert gapped.fwd_pair_s[0] == pytest.approx(plain.fwd_pair_s[0] + gap)
        assert gapped.fwd_s[0] == pytest.approx(plain.fwd_s[0] + gap)
        assert gapped.bwd_s[0] == pytest.approx(plain.bwd_s[0])
        assert (gapped.ep_pair_fwd_s[0], gapped.contention_pair_fwd_s[0]) == (plain.ep_pair_fwd_s[0],
                                                                              plain.contention_pair_fwd_s[0])
    full = RECOMPUTE.index("full")
    assert layer(False, H100, full).bwd_s[0] == pytest.approx(layer(False, NO_GAP, full).bwd_s[0] + gap)


def test_step_exposes_pairs_partly_and_unpaired_ops_whole():
    """Without pipelining, m micro-batches run m - 1 pairs and one forward and one backward
    alone: the exposed exchange and the step time by that count."""
    cluster, kw = Cluster(8, 8), dict(dp=8, ep=8, global_batch=32, seq_len=1024)
    on, off = simulate(MIXTRAL, plan(**kw), cluster, H100), simulate(MIXTRAL, plan(**kw, moe_a2a_overlap=False),
                                                                      cluster, H100)
    m, n = 4, MIXTRAL.num_layers
    r = plan_rows(MIXTRAL, plan(**kw), cluster, H100)
    ef, eb, pf, pb = (float(r[k][0]) for k in ("l_ep_fwd", "l_ep_bwd", "l_ep_pair_fwd", "l_ep_pair_bwd"))
    cf, cb = float(r["l_contention_pair_fwd"][0]), float(r["l_contention_pair_bwd"][0])
    assert pf < ef and pb < eb
    whole = m * n * (ef + eb)
    assert on.communication["ep"]["total_s"] == pytest.approx(whole)
    assert off.breakdown_s["ep_comm"] == pytest.approx(whole)
    assert on.breakdown_s["ep_comm"] == pytest.approx(n * (ef + eb) + (m - 1) * n * (pf + pb))
    saved = (m - 1) * n * ((ef - pf - cf) + (eb - pb - cb))
    assert on.step_time_s == pytest.approx(off.step_time_s - saved)
    # the timeline's EP track draws what is exposed: pairs' part, the unpaired ops' whole (to
    # the embedding and head, which its per-layer shares spread over)
    for result in (on, off):
        track = sum(e.end_s - e.start_s for e in comm_segments(result.pipeline, result.op_comm) if e.kind == "EP")
        assert track == pytest.approx(result.breakdown_s["ep_comm"], rel=0.02)
    assert sum(e.paired for e in on.pipeline.events) == 2 * (m - 1)


def test_planner_searches_it_where_legal_and_prices_it_as_simulate():
    cluster = Cluster(8, 8)
    fixed = {"global_batch": 32, "seq_len": 1024}
    table = candidate_table(MIXTRAL, cluster, fixed, H100.fabric, H100.nics_per_node)
    on = table[table["moe_a2a_overlap"]]
    assert len(on) and len(table) > len(on)
    assert (on["ep"] > 1).all() and (on["recompute"] != "full").all()
    assert ((on["pp"] == 1) | (on["schedule"] == "interleaved")).all()
    dense = candidate_table(ZOO["llama-2-7b"], cluster, fixed, H100.fabric, H100.nics_per_node)
    assert not dense["moe_a2a_overlap"].any()
    assert not candidate_table(MIXTRAL, cluster, {**fixed, "dtype": "fp32"})["moe_a2a_overlap"].any()
    # without pipelining the closed form is the discrete-event simulation's
    cluster = Cluster(64, 8)
    one = candidate_table(MIXTRAL, cluster, {"global_batch": 256, "seq_len": 1024, "ep": 8, "pp": 1, "tp": 1,
                                             "zero": 1, "recompute": "none", "micro_batch": 1,
                                             "placement": ("tp", "cp", "dp", "pp")})
    ev = evaluate(one, MIXTRAL, H100, cluster.ranks_per_node)
    assert one["moe_a2a_overlap"][ev.fits].any()
    for i in np.flatnonzero(ev.fits):
        assert ev.step_time_s[i] == pytest.approx(simulate(MIXTRAL, row_plan(one, i), cluster, H100).step_time_s)


def test_interleaved_closed_form_stays_near_the_simulation():
    """With a pipeline the closed form prices the pairs after rank 0's warm-up and the
    unpaired ops around them; memory (one more warm-up forward in flight) is the same."""
    cluster = Cluster(64, 8)
    table = candidate_table(MIXTRAL, cluster, {"global_batch": 256, "seq_len": 1024, "ep": 8, "pp": 2, "tp": 1,
                                               "schedule": "interleaved", "zero": 1, "micro_batch": 1,
                                               "recompute": "none", "placement": ("tp", "cp", "dp", "pp")})
    ev = evaluate(table, MIXTRAL, H100, cluster.ranks_per_node)
    rows = np.flatnonzero(ev.fits & table["moe_a2a_overlap"].to_numpy())
    assert rows.size
    for i in rows[:6]:
        sim = simulate(MIXTRAL, row_plan(table, int(i)), cluster, H100)
        assert ev.peak_memory_bytes[i] == pytest.approx(sim.peak_memory_bytes, rel=1e-9)
        assert ev.step_time_s[i] == pytest.approx(sim.step_time_s, rel=0.04)


def test_explain_toggles_it_and_the_executor_refuses_it():
    changes = {label: fields for label, _, fields in knob_changes(plan(dp=8, ep=8), experts=True)}
    assert changes["all-to-all overlap off"] == {"moe_a2a_overlap": False}
    assert not any("all-to-all" in label for label, _, _ in knob_changes(plan(dp=8, ep=8, moe_a2a_overlap=False)))
    issues = rules.violations(rules.EXECUTOR_TRAINING, plan(dp=8, ep=8).fields(), MIXTRAL)
    assert [f for f, _, _ in issues] == ["plan.moe_a2a_overlap"]
