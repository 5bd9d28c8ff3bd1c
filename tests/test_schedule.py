"""Pipeline schedules and their simulation against closed forms and a replay of the op DAG."""
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.simulator.pipeline_sim import SharedCores, last_ends_s, simulate_pipeline
from meshplan.simulator.schedule import SCHEDULES, in_flight, loss_in_flight, stage_op_tuples

F_S, B_S = 1.3, 2.1   # one micro-batch through one whole stage


def _uniform(schedule, p, m, v=1, f=F_S, b=B_S, w=None, **kwargs):
    shape = (p, v)
    wgrad = np.full(shape, w) if w is not None else None
    return simulate_pipeline(schedule, m, np.full(shape, f / v), np.full(shape, b / v),
                             wgrad_s=wgrad, **kwargs)


@pytest.mark.parametrize("schedule,p,m,v", [
    ("gpipe", 3, 5, 1), ("1f1b", 4, 2, 1), ("1f1b", 4, 9, 1), ("zb-h1", 4, 3, 1),
    ("zb-h1", 5, 11, 1), ("interleaved", 4, 8, 2), ("interleaved", 3, 3, 4),
    ("interleaved", 1, 2, 3), ("zb-v", 4, 2, 2), ("zb-v", 4, 13, 2), ("zb-v", 1, 3, 2)])
def test_each_op_runs_once_per_stage(schedule, p, m, v):
    kinds = ("F", "B", "W") if schedule in ("zb-h1", "zb-v") else ("F", "B")
    want = Counter((k, mb, c) for k in kinds for mb in range(m) for c in range(v))
    orders = stage_op_tuples(schedule, p, m, v)
    assert len(orders) == p
    for ops in orders:
        assert Counter(ops) == want


def test_1f1b_order_is_warmup_steady_cooldown():
    # Narayanan et al. 2021 Fig. 4 (p=4): rank 1 runs 2 warm-up forwards, then 1F1B.
    got = [f"{kind}{mb}" for kind, mb, _ in stage_op_tuples("1f1b", 4, 5)[1]]
    assert got == ["F0", "F1", "F2", "B0", "F3", "B1", "F4", "B2", "B3", "B4"]


@pytest.mark.parametrize("args,field", [
    (("pipedream", 4, 8), "schedule"), (("1f1b", 0, 8), "num_stages"),
    (("1f1b", 4, 0), "num_microbatches"), (("interleaved", 4, 6, 2), "num_microbatches"),
    (("interleaved", 4, 8, 1), "num_chunks"), (("1f1b", 4, 8, 2), "num_chunks"),
    (("gpipe", 2.0, 8), "num_stages")])
def test_bad_schedule_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        stage_op_tuples(*args)


def test_bad_simulation_args_name_the_field():
    ones = np.ones(4)
    with pytest.raises(ValueError, match="wgrad_s"):
        simulate_pipeline("zb-h1", 8, ones, ones)
    with pytest.raises(ValueError, match="wgrad_s"):
        simulate_pipeline("1f1b", 8, ones, ones, wgrad_s=ones)
    with pytest.raises(ValueError, match="bwd_s"):
        simulate_pipeline("1f1b", 8, ones, np.ones(3))
    with pytest.raises(ValueError, match="fwd_s"):
        simulate_pipeline("1f1b", 8, -ones, ones)
    with pytest.raises(ValueError, match="p2p_s"):
        simulate_pipeline("1f1b", 8, ones, ones, p2p_s=np.ones(4))
    with pytest.raises(ValueError, match="tail_s"):
        simulate_pipeline("1f1b", 8, ones, ones, tail_s=np.ones(2))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (1, 6), (2, 1), (4, 1), (4, 3), (4, 4), (4, 8), (8, 3),
                                 (8, 64)])
def test_gpipe_1f1b_bubble_is_p_minus_1_over_m(schedule, p, m):
    # Narayanan et al. 2021 eq. 1: step = (m + p - 1)(f + b), bubble fraction (p - 1) / m.
    res = _uniform(schedule, p, m)
    assert res.step_time_s == pytest.approx((m + p - 1) * (F_S + B_S))
    ideal = m * (F_S + B_S)
    assert (res.step_time_s - ideal) / ideal == pytest.approx((p - 1) / m)
    assert res.stage_busy_s == pytest.approx(np.full(p, ideal))


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (4, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 3),
                                   (8, 8, 2), (1, 3, 2)])
def test_interleaved_bubble_is_p_minus_1_over_vm(p, m, v):
    # Narayanan et al. 2021 eq. 2: per-chunk times f/v, b/v give bubble fraction (p - 1) / (v m).
    res = _uniform("interleaved", p, m, v)
    ideal = m * (F_S + B_S)
    assert (res.step_time_s - ideal) / ideal == pytest.approx((p - 1) / (v * m))


@pytest.mark.parametrize("p,m", [(1, 3), (4, 2), (4, 4), (4, 10), (8, 64)])
def test_in_flight_1f1b_gpipe_zb(p, m):
    # 1F1B holds p - s micro-batches on rank s (Narayanan et al. 2021 sec 2.2), capped at m;
    # GPipe holds all m; ZB-H1 keeps 1F1B's F..B window (Qi et al. 2023 sec 2.1).
    want = [min(p - s, m) for s in range(p)]
    assert _uniform("1f1b", p, m).max_in_flight.tolist() == want
    assert _uniform("zb-h1", p, m, w=0.7).max_in_flight.tolist() == want
    assert _uniform("gpipe", p, m).max_in_flight.tolist() == [m] * p
    s = np.arange(p)
    for name, w in (("1f1b", None), ("zb-h1", 0.7), ("gpipe", None)):
        # the closed form the simulator and planner size activations with
        closed = in_flight(SCHEDULES.index(name), p, 1, m, s)
        assert closed.tolist() == _uniform(name, p, m, w=w).max_in_flight.tolist()


@pytest.mark.parametrize("schedule,p,m,v", [
    ("gpipe", 3, 5, 1), ("1f1b", 4, 9, 1), ("1f1b", 2, 2, 1), ("zb-h1", 4, 6, 1),
    ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 2), ("interleaved", 3, 6, 3)])
def test_loss_in_flight_replays_the_last_chunk(schedule, p, m, v):
    # the most micro-batches on the last rank whose last chunk (the one ending in the loss)
    # ran forward and not yet backward, replayed from the op order
    held = most = 0
    for kind, _, chunk in stage_op_tuples(schedule, p, m, v)[p - 1]:
        if chunk == v - 1 and kind in ("F", "B"):
            held += 1 if kind == "F" else -1
            most = max(most, held)
    assert loss_in_flight(SCHEDULES.index(schedule), p, m) == most


@pytest.mark.parametrize("p,m,v", [(4, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 3), (2, 2, 2)])
def test_in_flight_interleaved_matches_megatron_warmup(p, m, v):
    # Megatron-LM schedules.py (get_pp_rank_microbatches): rank s runs 2(p-s-1) + (v-1)p warm-up
    # forwards, capped at m*v; the first steady step adds one more forward before a backward.
    want = [min(2 * (p - s - 1) + (v - 1) * p + 1, m * v) for s in range(p)]
    res = _uniform("interleaved", p, m, v)
    assert res.max_in_flight.tolist() == want
    assert in_flight(SCHEDULES.index("interleaved"), p, v, m, np.arange(p)).tolist() == want
    assert want[0] == min(2 * (p - 1) + (v - 1) * p + 1, m * v)


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (8, 8), (8, 24), (8, 64)])
def test_zb_h1_bubble_is_a_third_of_1f1b_with_equal_f_b_w(p, m):
    # Qi et al. 2023 Table 2: 1F1B bubble (p-1)(T_F+T_B+T_W), ZB-H1 (p-1)(T_F+T_B-T_W); with
    # T_F = T_B = T_W = t that is 3(p-1)t vs (p-1)t.
    t = 0.9
    zb = _uniform("zb-h1", p, m, f=t, b=t, w=t)
    one_f_one_b = _uniform("1f1b", p, m, f=t, b=2 * t)   # full backward = B + W
    assert zb.step_time_s - 3 * m * t == pytest.approx((p - 1) * t)
    assert one_f_one_b.step_time_s - 3 * m * t == pytest.approx(3 * (p - 1) * t)


@pytest.mark.parametrize("f,b,w", [(1.0, 1.5, 0.5), (2.0, 1.0, 1.0), (1.3, 1.1, 0.9)])
@pytest.mark.parametrize("p,m", [(4, 4), (4, 9), (8, 16)])
def test_zb_h1_bubble_formula(f, b, w, p, m):
    # Qi et al. 2023 Table 2: ZB-H1 bubble (p-1)(T_F+T_B-T_W), for m >= p and T_W <= T_F, T_B
    # (the paper's setting: the delayed W passes fit in the cool-down gaps).
    res = _uniform("zb-h1", p, m, f=f, b=b, w=w)
    assert res.step_time_s - m * (f + b + w) == pytest.approx((p - 1) * (f + b - w))


@pytest.mark.parametrize("d", [0.05, 0.4, 3.0])
@pytest.mark.parametrize("p,m", [(1, 4), (2, 1), (2, 7), (4, 1), (4, 2), (4, 4), (4, 9), (8, 8),
                                 (8, 64)])
def test_p2p_delay(d, p, m):
    # Critical path = longest path of the op DAG, with d on every cross-rank edge. GPipe: the
    # forward chain down and the backward chain up cross p-1 boundaries each:
    # (m + p - 1)(f + b) + 2(p - 1)d.
    gpipe = _uniform("gpipe", p, m, p2p_s=d)
    assert gpipe.step_time_s == pytest.approx((m + p - 1) * (F_S + B_S) + 2 * (p - 1) * d)
    # 1F1B also exposes the round trips of its steady state: rank s runs B(i) right before
    # F(i + p - s), so a path may go up to rank s on B(i) and back down on F(i + p - s), covering
    # a = p - s micro-batches with the same compute as the last rank's F/B of them and
    # 2(a - 1) more crossings. Packing the m - 1 micro-batches after the first into
    # ceil((m - 1) / p) such zigzags gives (m + p - 1)(f + b) + 2d(p - 1 + m - 1 - ceil((m - 1)/p)),
    # which is (m + p - 1)(f + b) + 2(p - 1)d for m <= 2.
    crossings = 2 * (p - 1) + 2 * (m - 1 - math.ceil((m - 1) / p))
    one_f_one_b = _uniform("1f1b", p, m, p2p_s=d)
    assert one_f_one_b.step_time_s == pytest.approx((m + p - 1) * (F_S + B_S) + crossings * d)
    if m <= 2:
        assert one_f_one_b.step_time_s == pytest.approx((m + p - 1) * (F_S + B_S) + 2 * (p - 1) * d)


def test_tail_extends_the_last_finishing_stage():
    # Uniform 1F1B, no p2p: rank 0 ends last at T = (m+p-1)(f+b); rank s's final B(m-1) ends
    # s backward steps earlier, at T - s*b.
    p, m = 4, 8
    end_s = (m + p - 1) * (F_S + B_S)
    assert _uniform("1f1b", p, m, tail_s=[0.5, 0, 0, 0]).step_time_s == pytest.approx(end_s + 0.5)
    small = [0, 0, 0, 0.5 * (p - 1) * B_S]      # fits in the last rank's slack
    assert _uniform("1f1b", p, m, tail_s=small).step_time_s == pytest.approx(end_s)
    large = [0, 0, 0, 10.0]
    assert _uniform("1f1b", p, m, tail_s=large).step_time_s == pytest.approx(
        end_s - (p - 1) * B_S + 10.0)
    res = _uniform("1f1b", p, m, tail_s=large)
    sync = [e for e in res.events if e.kind == "SYNC"]
    assert [(e.stage, e.end_s - e.start_s) for e in sync] == [(3, pytest.approx(10.0))]


@st.composite
def _cases(draw):
    schedule = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 5))
    v = draw(st.integers(2, 3)) if schedule == "interleaved" else 2 if schedule == "zb-v" else 1
    m = p * draw(st.integers(1, 3)) if schedule == "interleaved" else draw(st.integers(1, 9))

    def times():
        values = draw(st.lists(st.floats(0.01, 5.0), min_size=p * v, max_size=p * v))
        return np.array(values).reshape(p, v)

    fwd, bwd = times(), times()
    wgrad = times() if schedule in ("zb-h1", "zb-v") else None
    p2p = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=p - 1, max_size=p - 1)))
    tail = np.array(draw(st.lists(st.floats(0.0, 2.0), min_size=p, max_size=p)))
    return schedule, p, m, v, fwd, bwd, wgrad, p2p, tail


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_events_replay_the_op_dag(case):
    """Each op starts exactly when its rank is free and its inputs have arrived, in the
    schedule's order; busy, idle and in-flight agree with the events."""
    schedule, p, m, v, fwd, bwd, wgrad, p2p, tail = case
    res = simulate_pipeline(schedule, m, fwd, bwd, p2p, wgrad_s=wgrad, tail_s=tail)
    wrap = float(p2p.mean()) if p > 1 else 0.0
    vee = schedule == "zb-v"

    def stage(s, c):  # Megatron-LM's interleaving; zb-v's V: down the ranks, then back up
        return (2 * p - 1 - s if c else s) if vee else c * p + s

    def hop(j):   # virtual stage j -> j + 1
        if p == 1 or (vee and j == p - 1):  # the V's turn stays on rank p - 1
            return 0.0
        if vee and j >= p:
            return p2p[2 * p - 2 - j]
        return p2p[j % p] if j % p < p - 1 else wrap

    dur = {"F": fwd, "B": bwd, "W": wgrad}
    compute = [e for e in res.events if e.kind in "FBW"]
    end = {(e.kind, e.microbatch, stage(e.stage, e.chunk)): e.end_s for e in compute}
    last = p * v - 1
    for s, ops in enumerate(stage_op_tuples(schedule, p, m, v)):
        mine = sorted((e for e in compute if e.stage == s), key=lambda e: e.start_s)
        assert [(e.kind, e.microbatch, e.chunk) for e in mine] == ops
        free, in_flight, peak = 0.0, 0, 0
        for e in mine:
            j = stage(s, e.chunk)
            if e.kind == "F":
                ready = end[("F", e.microbatch, j - 1)] + hop(j - 1) if j else 0.0
                in_flight += 1
            elif e.kind == "B":
                ready = (end[("F", e.microbatch, j)] if j == last
                         else end[("B", e.microbatch, j + 1)] + hop(j))
                in_flight -= 1
            else:
                ready = end[("B", e.microbatch, j)]
            peak = max(peak, in_flight)
            assert e.start_s == pytest.approx(max(free, ready), abs=1e-9)
            assert e.end_s - e.start_s == pytest.approx(dur[e.kind][s, e.chunk])
            free = e.end_s
        busy = sum(e.end_s - e.start_s for e in mine)
        assert res.stage_busy_s[s] == pytest.approx(busy)
        assert res.stage_idle_s[s] == pytest.approx(free - busy, abs=1e-9)
        assert res.max_in_flight[s] == peak
    assert res.step_time_s == pytest.approx(
        max(res.stage_busy_s[s] + res.stage_idle_s[s] + tail[s] for s in range(p)))


def test_record_events_false_gives_the_same_numbers():
    fwd = np.array([1.0, 1.2, 0.8, 1.1])
    with_events = simulate_pipeline("1f1b", 16, fwd, 2 * fwd, 0.1, tail_s=np.full(4, 0.3))
    without = simulate_pipeline("1f1b", 16, fwd, 2 * fwd, 0.1, tail_s=np.full(4, 0.3),
                                record_events=False)
    assert without.events == ()
    assert without.step_time_s == with_events.step_time_s
    assert np.array_equal(without.stage_idle_s, with_events.stage_idle_s)
    assert np.array_equal(without.max_in_flight, with_events.max_in_flight)


def test_shared_cores_run_a_rank_faster_while_the_other_waits():
    """1F1B, two stages of two devices each on one node of two cores; F = 2, B = 4 with all
    four devices busy (each at half a core), so 1 and 2 with a core each. By hand: the
    warm-up F, stage 1's first B, its last B and stage 0's last B run alone at twice the
    pace, every other op beside one of the other stage's: 24, against (m + p - 1)(F + B)
    = 30 at the shared pace throughout. With a core per device, or each stage on a node of
    its own, nothing is shared: 30."""
    args = ("1f1b", 4, [2.0, 2.0], [4.0, 4.0])
    assert simulate_pipeline(*args).step_time_s == 30
    shared = simulate_pipeline(*args, shared=SharedCores(((2, 2),), 2.0))
    assert shared.step_time_s == pytest.approx(24)
    # stage 0 waits 3-5 and 21-22, stage 1 0-1 and ends at 22
    assert shared.stage_busy_s.tolist() == pytest.approx([21, 21])
    assert shared.stage_idle_s.tolist() == pytest.approx([3, 1])
    assert simulate_pipeline(*args, shared=SharedCores(((1, 1),), 2.0)).step_time_s == pytest.approx(30)
    assert simulate_pipeline(*args, shared=SharedCores(((2, 0), (0, 2)), 1.0)).step_time_s == pytest.approx(30)


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 4), (4, 7), (4, 9), (8, 3), (8, 20)])
def test_zb_v_order_is_torchs(p, m):
    """zb-v runs each rank's ops in the order torch's ScheduleZBVZeroBubble computes for it
    (the executor runs that class): its stage s on rank s is chunk 0, stage 2p-1-s chunk 1,
    its I (input gradient) our B."""
    from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble
    torch_self = SimpleNamespace(pp_group_size=p, num_stages=2 * p, _n_microbatches=m)
    kind = {"F": "F", "I": "B", "W": "W"}
    for s, ours in enumerate(stage_op_tuples("zb-v", p, m, 2)):
        actions = ScheduleZBVZeroBubble._calculate_single_rank_operations(torch_self, s)
        theirs = [(kind[a.computation_type.value], a.microbatch_index, int(a.stage_index != s))
                  for a in actions if a is not None]
        assert ours == theirs


def test_zb_v_in_flight_replays_its_order():
    # activations held from a chunk's forward to its weight-gradient pass, replayed
    for p in range(1, 9):
        for m in range(1, 3 * p + 2):
            for s, ops in enumerate(stage_op_tuples("zb-v", p, m, 2)):
                held = peak = 0
                for kind, _, _ in ops:
                    held += (kind == "F") - (kind == "W")
                    peak = max(peak, held)
                assert in_flight(SCHEDULES.index("zb-v"), p, 2, m, s) == peak, (p, m, s)
    assert loss_in_flight(SCHEDULES.index("zb-v"), 4, 8) == 1


@pytest.mark.parametrize("schedule,p,m,v", [("1f1b", 4, 9, 1), ("gpipe", 3, 5, 1), ("zb-h1", 4, 6, 1),
                                            ("interleaved", 4, 8, 2), ("zb-v", 4, 7, 2), ("zb-v", 3, 2, 2)])
def test_last_ends_are_the_simulation_in_bulk(schedule, p, m, v):
    rng = np.random.default_rng(7)
    f, b, w = rng.uniform(0.1, 3.0, (3, 12, p, v))
    hop = rng.uniform(0.0, 0.7, 12)
    split = schedule in ("zb-h1", "zb-v")
    w = w if split else np.zeros_like(w)
    got = last_ends_s(schedule, m, f, b, w, hop)
    for i in range(12):
        want = simulate_pipeline(schedule, m, f[i], b[i], hop[i], wgrad_s=w[i] if split else None)
        assert got[i] == pytest.approx(want.stage_busy_s + want.stage_idle_s, rel=1e-12)
        assert got[i].max() == pytest.approx(want.step_time_s, rel=1e-12)
