"""Cost-model pieces against hand computations."""
import pytest

from hw_profiles.profile import load_profile
from simulator.cost import Group, layer_costs, overlapped_exposed_s, tp_comm_s
from simulator.model_spec import ZOO
from simulator.ops import Shard
from simulator.plan import Cluster, Plan
from simulator.placement import group_of

A100 = load_profile("a100-80gb")


def test_placement_tp_innermost_stays_in_node():
    plan = Plan(global_batch=1536, seq_len=2048, tp=8, pp=8, dp=16)
    cluster = Cluster(1024, 8)
    assert group_of(plan, cluster, ("tp",)) == Group(8, 8)
    assert group_of(plan, cluster, ("dp",)) == Group(16, 1)   # stride 8: one rank per node
    assert group_of(plan, cluster, ("pp",)) == Group(8, 1)


def test_placement_dp_innermost_pushes_tp_across_nodes():
    plan = Plan(global_batch=64, seq_len=2048, tp=8, dp=4, placement=("dp", "tp", "cp", "pp"))
    cluster = Cluster(32, 8)
    assert group_of(plan, cluster, ("dp",)) == Group(4, 4)
    assert group_of(plan, cluster, ("tp",)) == Group(8, 2)    # stride 4: two ranks per node


def test_tp_comm_is_two_all_reduces_or_rs_ag_pairs():
    model = ZOO["llama-2-70b"]
    shard = Shard(1, 4096, tp=8)
    message = 4096 * 8192 * 2
    expected = 2 * A100.collective_time_s("all_reduce", message, 8, 8)
    assert tp_comm_s(model, shard, A100, Group(8, 8)) == pytest.approx(expected)
    sp = Shard(1, 4096, tp=8, sp=True)
    expected_sp = 2 * (A100.collective_time_s("reduce_scatter", message, 8, 8)
                       + A100.collective_time_s("all_gather", message, 8, 8))
    assert tp_comm_s(model, sp, A100, Group(8, 8)) == pytest.approx(expected_sp)
    assert tp_comm_s(model, shard, A100, Group(1, 1)) == 0.0


def test_overlap_closed_form():
    # comm faster than compute: only the last bucket is exposed
    assert overlapped_exposed_s(1.0, 2.0, 10) == 1.0
    # comm slower: the stream falls 1 s further behind per bucket
    assert overlapped_exposed_s(3.0, 2.0, 10) == 3.0 + 9 * 1.0
    assert overlapped_exposed_s(0.0, 2.0, 10) == 0.0
    # gloo on CPU ranks computes on the same cores: nothing hides
    assert overlapped_exposed_s(1.0, 2.0, 10, overlaps=False) == 10.0


def test_cpu_profile_exposes_data_parallel_communication():
    from dataclasses import replace

    from simulator.simulate import simulate
    model = ZOO["llama-2-7b"]
    plan = Plan(dp=8, global_batch=64, micro_batch=1, seq_len=2048, zero=1, dtype="bf16")
    cluster = Cluster(8, 8)
    gloo = replace(A100, extra={**A100.extra, "measurement": {"collective_backend": "gloo"}})
    assert A100.comm_overlaps_compute and not gloo.comm_overlaps_compute
    layers = model.num_layers
    grad_bytes = model.num_params() * 2  # bf16 gradients of the whole model, one bucket per layer
    overlapped = simulate(model, plan, cluster, A100).breakdown_s["dp_comm"]
    exposed = simulate(model, plan, cluster, gloo).breakdown_s["dp_comm"]
    bucket = A100.collective_time_s("reduce_scatter", grad_bytes / layers, 8, 8)
    assert exposed > overlapped
    gather = A100.collective_time_s("all_gather", grad_bytes, 8, 8)  # ZeRO-1 weight all-gather
    assert exposed == pytest.approx(layers * bucket + gather, rel=1e-6)


def test_backward_is_about_twice_forward_and_recompute_adds_forward():
    model = ZOO["gpt3-175b"]
    shard = Shard(1, 2048, tp=8, flash=False)
    none = layer_costs(model, shard, A100, "bf16", "none", Group(8, 8), Group(1, 1))
    full = layer_costs(model, shard, A100, "bf16", "full", Group(8, 8), Group(1, 1))
    assert 1.6 < (none.bwd_input_s + none.bwd_weight_s) / none.fwd_compute_s < 2.4
    assert full.recompute_s == pytest.approx(none.fwd_compute_s)
    assert full.tp_comm_bwd_s == pytest.approx(2 * none.tp_comm_bwd_s)


def test_gemm_flops_rate_is_plausible_for_a100():
    model = ZOO["gpt3-175b"]
    shard = Shard(1, 2048, tp=8, flash=False)
    costs = layer_costs(model, shard, A100, "bf16", "none", Group(8, 8), Group(1, 1))
    rate = costs.fwd_flops / costs.fwd_compute_s
    assert 150e12 < rate < 280e12  # dense bf16 GEMMs on A100 (312 peak) reach 60-85%


def test_ranks_beyond_cores_share_compute():
    from dataclasses import replace

    from simulator.simulate import compute_share
    cpu = replace(A100, extra={**A100.extra, "cores_per_node": 2})
    assert compute_share(cpu, Cluster(2, 4)) is cpu
    shared = compute_share(cpu, Cluster(4, 4))
    # 4 ranks on 2 cores: each GEMM takes twice as long; collectives unchanged
    assert shared.gemm_time_s(4096, 4096, 4096, "bf16") == pytest.approx(
        2 * cpu.gemm_time_s(4096, 4096, 4096, "bf16"), rel=0.05)
    assert shared.collective_time_s("all_reduce", 2 ** 20, 4, 4) == cpu.collective_time_s("all_reduce", 2 ** 20, 4, 4)
