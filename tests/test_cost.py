"""Cost-model pieces against hand computations."""
from dataclasses import replace

import numpy as np
import pytest

from meshplan.hw_profiles.profile import load_profile
from meshplan.core.mesh import Group
from meshplan.hw_profiles.profile import Contention
from meshplan.simulator.cost import (FULL, NONE, collective_s, layer_times, overlap_split,
                                     per_rank_profile, shard_times, tp_comm_s, _op_arrays)
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.ops import Shard, layer_ops
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate, simulate_many

A100 = load_profile("a100-80gb")


def test_placement_tp_innermost_stays_in_node():
    mesh = Plan(global_batch=1536, seq_len=2048, tp=8, pp=8, dp=16).mesh(8)
    assert mesh.group(("tp",)) == Group(8, 8)
    assert mesh.group(("dp",)) == Group(16, 1)   # stride 8: one rank per node
    assert mesh.group(("pp",)) == Group(8, 1)
    assert mesh.neighbour_pair("pp") == Group(2, 1)  # stride 128: stages on different nodes
    assert list(mesh.ranks(("dp",), origin=9)) == [1 + 8 * i for i in range(16)]


def test_placement_dp_innermost_pushes_tp_across_nodes():
    mesh = Plan(global_batch=64, seq_len=2048, tp=8, dp=4, placement=("dp", "tp", "cp", "pp")).mesh(8)
    assert mesh.group(("dp",)) == Group(4, 4)
    assert mesh.group(("tp",)) == Group(8, 2)    # stride 4: two ranks per node


def test_tp_comm_is_two_all_reduces_or_rs_ag_pairs():
    model = ZOO["llama-2-70b"]
    message = 4096 * 8192 * 2
    expected = 2 * A100.collective_time_s("all_reduce", message, 8, 8)
    assert tp_comm_s(model, 4096, False, 2, A100, 8, 8) == pytest.approx(expected)
    expected_sp = 2 * (A100.collective_time_s("reduce_scatter", message, 8, 8)
                       + A100.collective_time_s("all_gather", message, 8, 8))
    assert tp_comm_s(model, 4096, True, 2, A100, 8, 8) == pytest.approx(expected_sp)
    assert tp_comm_s(model, 4096, False, 2, A100, 1, 1) == 0.0


def test_tp_edges_add_the_embedding_head_and_loss_collectives_to_tp_comm():
    # Llama-2-7B, TP 8 with SP, one micro-batch of 4096 tokens, no pipeline: beyond its 32
    # layers' 2 x (RS + AG) each way, the embedding's RS (backward AG), the head's AG
    # (backward RS) and the vocab-parallel loss's 3 all-reduces of one fp32 per token
    model = ZOO["llama-2-7b"]
    plan = Plan(global_batch=1, seq_len=4096, micro_batch=1, tp=8, sp=True, dtype="bf16")
    message = 4096 * 4096 * 2
    rs, ag = (A100.collective_time_s(k, message, 8, 8) for k in ("reduce_scatter", "all_gather"))
    loss = 3 * A100.collective_time_s("all_reduce", 4096 * 4, 8, 8)
    sim = simulate(model, plan, Cluster(8, 8), A100)
    expected = 32 * 2 * 2 * (rs + ag) + 2 * (rs + ag) + loss
    assert sim.breakdown_s["tp_comm"] == pytest.approx(expected, rel=1e-6)
    assert sim.communication["tp"]["total_s"] == pytest.approx(expected, rel=1e-6)
    no_sp = simulate(model, replace(plan, sp=False), Cluster(8, 8), A100)
    ar = A100.collective_time_s("all_reduce", message, 8, 8)
    assert no_sp.breakdown_s["tp_comm"] == pytest.approx(32 * 2 * 2 * ar + 2 * ar + loss, rel=1e-6)


def test_overlap_split_hides_what_compute_covers_and_charges_contention():
    hw = replace(A100, contention=Contention(0.2, "test"))
    # comm faster than compute: nothing exposed; the compute beside it slows by 20% of it
    assert overlap_split(1.0, 2.0, hw) == (0.0, pytest.approx(0.2))
    # comm slower: the excess is exposed; contention only over the overlapped second
    exposed, slowed = overlap_split(3.0, 2.0, hw)
    assert exposed == 1.0 and slowed == pytest.approx(0.2 * 2.0)
    # a floor on the exposed part (TP overlap keeps one of tp pieces exposed)
    assert overlap_split(1.0, 2.0, hw, 0.25) == (0.25, pytest.approx(0.2 * 0.75))
    # gloo on CPU ranks computes on the same cores: nothing hides, no contention term
    gloo = replace(hw, extra={**hw.extra, "measurement": {"collective_backend": "gloo"}})
    assert overlap_split(1.0, 2.0, gloo) == (1.0, 0.0)


def test_cpu_profile_exposes_data_parallel_communication():
    from dataclasses import replace

    from meshplan.simulator.train import simulate, simulate_many
    model = ZOO["llama-2-7b"]
    plan = Plan(dp=8, global_batch=64, micro_batch=1, seq_len=2048, zero=1, dtype="bf16")
    cluster = Cluster(8, 8)
    gloo = replace(A100, extra={**A100.extra, "measurement": {"collective_backend": "gloo"}})
    assert A100.comm_overlaps_compute and not gloo.comm_overlaps_compute
    layers = model.num_layers
    grad_bytes = model.num_params() * 4  # fp32 gradients (the default reduce dtype), a bucket per layer
    overlapped = simulate(model, plan, cluster, A100).breakdown_s["dp_comm"]
    exposed = simulate(model, plan, cluster, gloo).breakdown_s["dp_comm"]
    bucket = A100.collective_time_s("reduce_scatter", grad_bytes / layers, 8, 8)
    assert exposed > overlapped
    # ZeRO-1 gathers the updated bf16 weights in per-layer buckets (behind the next forward
    # on a GPU; all exposed here)
    gather = layers * A100.collective_time_s("all_gather", grad_bytes / 2 / layers, 8, 8)
    assert exposed == pytest.approx(layers * bucket + gather, rel=1e-6)
    overlapped_gather = gather / layers + (layers - 1) * max(
        0.0, gather / layers - simulate(model, plan, cluster, A100).breakdown_s["compute"])
    assert overlapped < exposed and overlapped >= overlapped_gather


def _layer(model, shard, recompute):
    st = shard_times(model, A100, [shard], "bf16")
    return layer_times(model, A100, st, shard.tokens, 2, shard.tp, shard.sp, shard.cp, recompute,
                       8, 1, flash=shard.flash, tp_overlap=False)


def test_backward_is_about_twice_forward_and_recompute_adds_forward():
    model = ZOO["gpt3-175b"]
    shard = Shard(1, 2048, tp=8, flash=False)
    none, full = _layer(model, shard, NONE), _layer(model, shard, FULL)
    assert 1.6 < (none.bwd_input_s + none.bwd_weight_s) / none.fwd_compute_s < 2.4
    assert full.recompute_s == pytest.approx(none.fwd_compute_s)
    assert full.tp_bwd_s == pytest.approx(2 * none.tp_bwd_s)


def test_gemm_flops_rate_is_plausible_for_a100():
    model = ZOO["gpt3-175b"]
    layer = shard_times(model, A100, [Shard(1, 2048, tp=8, flash=False)], "bf16").layer
    rate = layer.fwd_flops[0] / layer.fwd_s[0]
    assert 150e12 < rate < 280e12  # dense bf16 GEMMs on A100 (312 peak) reach 60-85%


def test_ranks_beyond_cores_share_compute():
    from dataclasses import replace

    cpu = replace(A100, extra={**A100.extra, "cores_per_node": 2})
    assert per_rank_profile(cpu, Cluster(2, 4).ranks_per_node) is cpu
    shared = per_rank_profile(cpu, Cluster(4, 4).ranks_per_node)
    # 4 ranks on 2 cores: each GEMM takes twice as long; collectives unchanged
    assert shared.gemm_time_s(4096, 4096, 4096, "bf16") == pytest.approx(
        2 * cpu.gemm_time_s(4096, 4096, 4096, "bf16"), rel=0.05)
    assert shared.collective_time_s("all_reduce", 2 ** 20, 4, 4) == cpu.collective_time_s("all_reduce", 2 ** 20, 4, 4)


def test_ring_exchange_hides_behind_the_attention_it_runs_beside():
    """CP's exchange per chunk hides behind the attention of the chunk in hand: in forward
    the core's two matmuls, in backward its gradients with the scores the fused kernel
    redoes (five matmuls against two); a slow link leaves the rest exposed."""
    model, cp = ZOO["llama-3-8b"], 4
    shard = Shard(1, 32768 // cp, cp=cp, flash=True)
    st = shard_times(model, A100, [shard], "bf16")
    core = [op for op in layer_ops(model, shard) if op.attention_core]
    fwd, bwd_in, bwd_w, _ = _op_arrays(core, A100, "bf16")
    redo = sum(f for op, f in zip(core, fwd) if op.kernel_redo)
    assert st.layer.core_bwd_s[0] == pytest.approx(bwd_in.sum() + bwd_w.sum())
    slow = replace(A100, contention=replace(A100.contention, compute_slowdown=0.0))
    slow = slow.scaled(inter_node_bw=0.01)  # an exchange longer than the attention
    lt = layer_times(model, slow, shard_times(model, slow, [shard], "bf16"), shard.tokens, 2, 1, False, cp,
                     NONE, 8, 1, flash=True, tp_overlap=False)
    hidden_f = (cp - 1) / cp * fwd.sum()
    hidden_b = (cp - 1) / cp * (bwd_in.sum() + bwd_w.sum() + redo)
    fwd_exposed, fwd_raw, bwd_exposed, bwd_raw = (float(np.ravel(x)[0]) for x in (
        lt.cp_fwd_s, lt.cp_raw_fwd_s, lt.cp_bwd_s, lt.cp_raw_bwd_s))
    assert fwd_raw > hidden_f and bwd_raw > hidden_b
    assert fwd_exposed == pytest.approx(fwd_raw - hidden_f, rel=1e-9)
    assert bwd_exposed == pytest.approx(bwd_raw - hidden_b, rel=1e-9)
    assert 2.3 < hidden_b / hidden_f < 2.7  # five matmuls against two, at the kernel's scales


def test_full_recompute_redoes_the_ring_exchange_of_the_forward():
    """Full recompute runs the layer's forward again in backward, its ring exchange too:
    the backward's exchange, exposed part and contention each gain the forward's, as the
    TP collectives do."""
    model, cp = ZOO["llama-3-8b"], 4
    shard = Shard(1, 32768 // cp, cp=cp, flash=True)
    slow = A100.scaled(inter_node_bw=0.01)  # an exchange longer than the attention
    st = shard_times(model, slow, [shard], "bf16")
    none, full = (layer_times(model, slow, st, shard.tokens, 2, 1, False, cp, rc, 8, 1, flash=True,
                              tp_overlap=False) for rc in (NONE, FULL))
    v = {k: float(np.ravel(getattr(none, k))[0]) for k in ("cp_fwd_s", "cp_bwd_s", "cp_raw_fwd_s",
                                                             "cp_raw_bwd_s", "contention_fwd_s", "fwd_compute_s")}
    assert v["cp_fwd_s"] > 0  # the forward's exchange is partly exposed
    assert float(np.ravel(full.cp_bwd_s)[0]) == pytest.approx(v["cp_bwd_s"] + v["cp_fwd_s"])
    assert float(np.ravel(full.cp_raw_bwd_s)[0]) == pytest.approx(v["cp_raw_bwd_s"] + v["cp_raw_fwd_s"])
    assert float(np.ravel(full.recompute_s)[0]) == pytest.approx(v["fwd_compute_s"] + v["contention_fwd_s"])


def _cp_layer(model, hw, shard, cp, method, kv_repeat=False, eager=False):
    st = shard_times(model, hw, [shard], "bf16")
    lt = layer_times(model, hw, st, shard.tokens, 2, 1, False, cp, NONE, 8, 1, flash=True, tp_overlap=False,
                     cp_comm=method, kv_repeat=kv_repeat, eager=eager)
    return {k: float(np.ravel(getattr(lt, k))[0])
            for k in ("cp_fwd_s", "cp_raw_fwd_s", "cp_bwd_s", "cp_raw_bwd_s")}


def test_torch_context_parallel_exchanges_as_its_ring_attention_runs():
    """torch's context_parallel (plan.cp_comm alltoall, allgather), by hand on a link slow
    enough to leave some exposed: the forward K,V pass as the p2p ring's, or gathered at
    once beside the local block alone (1/cp of the attention); in backward the K,V again,
    and their gradients in fp32 after each of the cp blocks, beside the next block, the last
    pass exposed; so does the executor's eager p2p ring, where Transformer Engine's sends
    the K,V gradients in their dtype once per later block."""
    model, cp = ZOO["llama-3-8b"], 4
    shard = Shard(1, 32768 // cp, cp=cp, flash=True)
    hw = replace(A100, contention=replace(A100.contention, compute_slowdown=0.0)).scaled(inter_node_bw=0.05)
    core = [op for op in layer_ops(model, shard) if op.attention_core]
    fwd, bwd_in, bwd_w, _ = _op_arrays(core, hw, "bf16")
    core_f = fwd.sum()
    core_b = bwd_in.sum() + bwd_w.sum() + sum(f for op, f in zip(core, fwd) if op.kernel_redo)
    kv = 2 * shard.tokens * model.num_kv_heads * model.head_dim * 2
    hop, hop32 = (float(hw.collective_time_s("send_recv", b, cp, 1)) for b in (kv, 2 * kv))
    gather = float(hw.collective_time_s("all_gather", cp * kv, cp, 1))
    exposed = lambda comm, beside: max(comm - beside, 0.0)
    p2p, a2a, ag = (_cp_layer(model, hw, shard, cp, m) for m in ("p2p", "alltoall", "allgather"))
    assert a2a["cp_raw_fwd_s"] == pytest.approx(p2p["cp_raw_fwd_s"]) == pytest.approx(3 * hop)
    assert a2a["cp_fwd_s"] == pytest.approx(p2p["cp_fwd_s"])
    assert ag["cp_raw_fwd_s"] == pytest.approx(gather)
    assert ag["cp_fwd_s"] == pytest.approx(exposed(gather, core_f / cp))
    assert ag["cp_fwd_s"] > 0  # the gather outlasts the local block
    assert a2a["cp_raw_bwd_s"] == pytest.approx(3 * hop + 4 * hop32)
    # the ring's K,V and gradient passes share the later blocks; the last pass follows the last
    assert a2a["cp_bwd_s"] == pytest.approx(exposed(3 * hop + 3 * hop32, 0.75 * core_b) + hop32)
    assert ag["cp_bwd_s"] == pytest.approx(exposed(gather, core_b / cp) + exposed(3 * hop32, 0.75 * core_b)
                                           + hop32)
    assert p2p["cp_raw_bwd_s"] == pytest.approx(3 * hop32)  # K,V and their bf16 gradients: 2 kv a pass
    assert _cp_layer(model, hw, shard, cp, "p2p", eager=True) == pytest.approx(a2a)
    # keys and values repeated to the 32 query heads before the kernel: 4x the 8 kv heads' bytes
    wide = _cp_layer(model, hw, shard, cp, "allgather", kv_repeat=True)
    assert wide["cp_raw_fwd_s"] == pytest.approx(
        float(hw.collective_time_s("all_gather", 4 * cp * kv, cp, 1)))


def test_ulysses_all_to_all_is_exposed_whole():
    """plan.cp_comm a2a (DeepSpeed-Ulysses; Transformer Engine's AttnFuncWithCPAndQKVOA2A), by
    hand: forward Q,K,V to head shards in one all-to-all and the output back in another,
    backward the output with its gradient in and the Q,K,V gradients back, nothing beside
    them; no merges (one kernel over the whole sequence)."""
    model, cp = ZOO["llama-3-8b"], 4
    shard = Shard(1, 32768 // cp, cp=cp, flash=True)
    tokens = shard.tokens
    q, kv, out = (tokens * heads * 128 * 2 for heads in (32, 2 * 8, 32))
    a2a = lambda b: float(A100.collective_time_s("all_to_all", b, cp, 1))  # noqa: E731
    got = _cp_layer(model, A100, shard, cp, "a2a")
    assert got["cp_fwd_s"] == pytest.approx(got["cp_raw_fwd_s"]) == pytest.approx(a2a(q + kv) + a2a(out))
    assert got["cp_bwd_s"] == pytest.approx(got["cp_raw_bwd_s"]) == pytest.approx(a2a(2 * out) + a2a(q + kv))
    assert not [op for op in layer_ops(model, replace(shard, cp_comm="a2a")) if op.name == "cp_merge"]


def test_torch_ring_attention_merges_its_blocks_in_fp32():
    """torch's context_parallel joins the cp blocks of attention in eager fp32 ops (plan.cp_comm
    alltoall/allgather; Transformer Engine's p2p ring corrects its output in its kernels):
    counted by hand on Llama 3 8B's layer, 8K local tokens, cp 4, K,V grouped or repeated."""
    model, cp = ZOO["llama-3-8b"], 4
    out = 8192 * 32 * 128  # the local query rows' output: 32 heads of 128
    for repeat, kv in ((False, 8192 * 8 * 128), (True, out)):
        shard = Shard(1, 8192 * cp, cp=cp, cp_comm="allgather", kv_repeat=repeat)
        merges = [op for op in layer_ops(model, shard) if op.name == "cp_merge"]
        # forward: casts 6 + 6, three merges of 32 after a cast of 6; backward: query 10 per
        # block + 10, K,V 20 + 26 per later block + 16 per block + 12 + 8 zeroing
        assert len(merges) == 1 and merges[0].bytes_moved == (12 + 3 * 38) * out
        assert merges[0].bwd_bytes == 50 * out + (20 + 3 * 26 + 4 * 16 + 12 + 8) * kv
    for method, shard_cp in (("p2p", cp), ("allgather", 1)):
        assert not [op for op in layer_ops(model, Shard(1, 8192 * shard_cp, cp=shard_cp, cp_comm=method))
                    if op.name == "cp_merge"]


def test_collective_over_one_group_shape_is_each_message_priced_alone():
    messages = np.array([[1e3, 1e6], [3e7, 2e9]])
    one = collective_s(A100, "all_reduce", messages, 16, 8, 0.5)
    alone = [[float(A100.collective_time_s("all_reduce", m, 16, 8, 0.5)) for m in row] for row in messages]
    assert one.shape == messages.shape
    np.testing.assert_allclose(one, alone, rtol=1e-12)
    # mixed shapes group by shape and price each the same; a group of one rank costs nothing
    mixed = collective_s(A100, "all_reduce", messages.ravel(), [16, 16, 8, 1], [8, 8, 8, 1], [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(mixed[:2], one[0], rtol=1e-12)
    assert mixed[2] == pytest.approx(float(A100.collective_time_s("all_reduce", 3e7, 8, 8, 1.0)), rel=1e-12)
    assert mixed[3] == 0.0


def test_simulate_many_is_simulate_of_each_plan_in_order():
    model, cluster = ZOO["llama-2-13b"], Cluster(64, 8)
    base = dict(global_batch=128, seq_len=4096, dp=4, tp=4, pp=4, micro_batch=1)
    plans = [Plan(**base, schedule="interleaved", virtual_stages=2, sp=True),
             Plan(**base, dtype="fp8"),  # another plan-wide field: built in its own pass
             Plan(**{**base, "dp": 8, "pp": 2}, zero=3, recompute="full"),
             Plan(**base, schedule="zb-h1")]
    many = simulate_many(model, plans, cluster, load_profile("h100-80gb"))
    assert [r.plan for r in many] == plans
    for plan, result in zip(plans, many):
        assert result.to_json() == simulate(model, plan, cluster, load_profile("h100-80gb")).to_json()


def test_forward_scoped_tp_overlap_leaves_the_backward_as_without_overlap():
    # torchtitan's async TP (tp_overlap_scope "forward"): the forward as under Megatron-LM's
    # overlap, the backward's TP collectives exposed whole and its GEMMs unsplit, as without
    model = ZOO["llama-2-70b"]
    shard = Shard(1, 4096, tp=8, sp=True)
    st = shard_times(model, A100, [shard], "bf16")

    def lt(overlap, bwd=True, recompute=NONE):
        return layer_times(model, A100, st, shard.tokens, 2, np.array([8]), np.array([True]), 1, recompute,
                           8, 1, flash=True, tp_overlap=np.array([overlap]), tp_overlap_bwd=bwd)
    none, both, forward = lt(False), lt(True), lt(True, bwd=False)
    assert both.tp_bwd_s < none.tp_bwd_s  # the overlap hides some backward communication
    for field in ("tp_fwd_s", "fwd_compute_s", "contention_fwd_s"):
        assert getattr(forward, field) == pytest.approx(getattr(both, field))
    for field in ("tp_bwd_s", "bwd_input_s", "bwd_weight_s", "contention_bwd_s"):
        assert getattr(forward, field) == pytest.approx(getattr(none, field))
    # full recompute redoes the forward, overlapped as the forward is
    full_both, full_forward = lt(True, recompute=FULL), lt(True, bwd=False, recompute=FULL)
    assert full_forward.recompute_s == pytest.approx(full_both.recompute_s)
    assert full_forward.tp_bwd_s == pytest.approx(none.tp_bwd_s + both.tp_fwd_s)


def test_forward_scoped_tp_overlap_prices_between_none_and_both():
    plan = Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, zero=3, tp_overlap=True)
    model, cluster = ZOO["llama-2-70b"], Cluster(64, 8)
    times = [simulate(model, p, cluster, A100).step_time_s
             for p in (replace(plan, tp_overlap=False), replace(plan, tp_overlap_scope="forward"), plan)]
    assert times[0] > times[1] > times[2]
