"""Trace and Gantt writers for a simulated pipeline."""
import json

import numpy as np
import pytest

from meshplan.simulator.pipeline_sim import simulate_pipeline
from meshplan.reports.timeline import (chrome_trace, timeline_figure, write_chrome_trace,
                                write_timeline_html)


def _two_stage():
    # p=2, m=1, f=1 ms, b=2 ms, no p2p: F0 on rank 0 [0,1], rank 1 [1,2]; B0 on rank 1 [2,4],
    # rank 0 [4,6] (ms).
    return simulate_pipeline("1f1b", 1, [1e-3, 1e-3], [2e-3, 2e-3])


def test_chrome_trace_times_in_microseconds():
    trace = json.loads(json.dumps(chrome_trace(_two_stage(), label="toy")))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    got = sorted((e["tid"], e["name"], e["ts"], e["dur"]) for e in spans)
    want = [(0, "B mb0 c0", 4000.0, 2000.0), (0, "F mb0 c0", 0.0, 1000.0),
            (1, "B mb0 c0", 2000.0, 2000.0), (1, "F mb0 c0", 1000.0, 1000.0)]
    assert [(t, n) for t, n, _, _ in got] == [(t, n) for t, n, _, _ in want]
    for (_, _, ts, dur), (_, _, want_ts, want_dur) in zip(got, want):
        assert ts == pytest.approx(want_ts) and dur == pytest.approx(want_dur)
    assert spans[0]["args"] == {"kind": "F", "microbatch": 0, "chunk": 0}
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[0] == "stage 0" and names[1] == "stage 1"


def test_chrome_trace_one_span_per_compute_op(tmp_path):
    p, m, v = 4, 8, 2
    res = simulate_pipeline("interleaved", m, np.ones((p, v)), 2 * np.ones((p, v)), p2p_s=0.1,
                            tail_s=np.full(p, 0.5))
    path = tmp_path / "sub" / "trace.json"
    write_chrome_trace(res, path, label="interleaved")
    trace = json.loads(path.read_text())
    kinds = [e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"]
    assert kinds.count("F") == kinds.count("B") == p * m * v
    # every F but the last virtual stage's and every B but the first's sends once
    assert kinds.count("SEND") == 2 * (p * v - 1) * m
    assert kinds.count("SYNC") == p
    assert [f.name for f in path.parent.iterdir()] == ["trace.json"]   # no temp file left


def test_figure_one_trace_per_kind_and_html(tmp_path):
    p, m = 3, 6
    res = simulate_pipeline("zb-h1", m, np.ones(p), np.ones(p), p2p_s=0.05, wgrad_s=np.ones(p),
                            tail_s=np.full(p, 0.2))
    fig = timeline_figure(res, title="zb")
    assert sorted(t.name for t in fig.data) == ["B", "F", "SEND", "SYNC", "W"]
    f_trace = next(t for t in fig.data if t.name == "F")
    assert len(f_trace.x) == p * m
    assert np.asarray(f_trace.x) == pytest.approx(np.full(p * m, 1e3))   # 1 s in ms
    path = tmp_path / "timeline.html"
    write_timeline_html(res, path, title="zb")
    html = path.read_text()
    assert "plotly" in html and "<script src=" not in html   # plotly.js is inlined


def test_exposed_tp_and_cp_are_drawn_at_the_end_of_their_ops():
    from meshplan.reports.timeline import comm_segments
    res = _two_stage()   # F 1 ms, B 2 ms on each rank
    op_comm = {"F": {"TP": 0.25, "CP": 0.0}, "B": {"TP": 0.1, "CP": 0.2}}
    segs = comm_segments(res, op_comm)
    f0 = next(s for s in segs if s.kind == "TP" and s.stage == 0 and s.start_s < 1e-3)
    assert f0.end_s == pytest.approx(1e-3) and f0.end_s - f0.start_s == pytest.approx(0.25e-3)
    b0 = [s for s in segs if s.stage == 0 and s.start_s >= 4e-3]   # rank 0's backward [4, 6] ms
    assert {s.kind for s in b0} == {"TP", "CP"}
    assert sum(s.end_s - s.start_s for s in b0) == pytest.approx(0.3 * 2e-3)
    trace = chrome_trace(res, "toy", op_comm)
    cats = [e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"]
    assert cats.count("TP") == 4 and cats.count("CP") == 2
    fig = timeline_figure(res, "plan title", op_comm)
    assert {"TP", "CP"} <= {t.name for t in fig.data} and fig.layout.title.text == "plan title"


def test_simulated_expert_parallel_all_to_all_gets_an_ep_track():
    """A MoE plan with ep 2 (Mixtral-style top-2 of 8): the simulator's exposed all-to-all
    share of each op becomes EP spans on the communication track, none without experts."""
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.reports.timeline import comm_segments
    from meshplan.simulator.model_spec import ModelSpec
    from meshplan.simulator.plan import Cluster, Plan
    from meshplan.simulator.train import simulate
    moe = ModelSpec("moe", num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=8,
                    ffn_hidden_size=2048, vocab_size=32000, max_seq_len=2048, num_experts=8,
                    experts_per_token=2, moe_ffn_hidden_size=2048)
    hw, cluster = load_profile("a100-80gb"), Cluster(16, 8)
    for ep, expected in ((4, True), (1, False)):
        plan = Plan(global_batch=32, seq_len=1024, dp=8, pp=2, ep=ep, micro_batch=2)
        result = simulate(moe, plan, cluster, hw)
        segs = [s for s in comm_segments(result.pipeline, result.op_comm) if s.kind == "EP"]
        assert bool(segs) == expected
        trace = chrome_trace(result.pipeline, "moe", result.op_comm)
        assert ("EP" in {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}) == expected
