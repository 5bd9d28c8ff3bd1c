"""Framework overhead: measured per layer by the executor's probe, stored in the profile,
added by the cost model per layer, stretched when ranks share cores."""
import json
from dataclasses import replace

import pytest

from meshplan.hw_profiles.profile import FrameworkOverhead, HardwareProfile, load_profile
from meshplan.core.errors import ProfileError
from meshplan.simulator.cost import FULL, layer_times, per_rank_profile, shard_times
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.ops import Shard
from meshplan.simulator.plan import Cluster

A100 = load_profile("a100-80gb")
OVERHEAD = FrameworkOverhead(layer_forward_s=1e-3, layer_backward_s=2e-3, tp_layer_forward_s=4e-3,
                             tp_layer_backward_s=5e-3, sp_layer_forward_s=6e-3,
                             sp_layer_backward_s=7e-3, prefill_layer_s=1.5e-3,
                             decode_layer_s=0.5e-3, moe_forward_s=3e-3, moe_backward_s=8e-3,
                             source="test")


def test_probe_measures_positive_overhead_and_dtensor_costs_more():
    from meshplan.calibration.overhead import measure_overhead
    measured = measure_overhead(repeats=8, warmup=2)
    assert 0 < measured.layer_forward_s < 0.05 and 0 < measured.decode_layer_s < 0.05
    # DTensor's sharding propagation runs on every op of a TP layer
    assert measured.tp_layer_forward_s > measured.layer_forward_s
    # routing, permutation and the grouped GEMMs' calls: more host work than one MLP
    assert 0 < measured.moe_forward_s < 0.05 and 0 <= measured.moe_backward_s < 0.05


def test_profile_round_trip_and_corrupt_field(tmp_path):
    hw = replace(A100, overhead=OVERHEAD)
    path = tmp_path / "p.json"
    hw.save(path)
    assert HardwareProfile.from_dict(json.loads(path.read_text())).overhead == OVERHEAD
    data = json.loads(path.read_text())
    data["overhead"]["decode_layer_s"] = "fast"
    with pytest.raises(ProfileError, match="overhead.decode_layer_s"):
        HardwareProfile.from_dict(data)
    del data["overhead"]  # profiles from before the field: zero overhead
    assert HardwareProfile.from_dict(data).overhead == FrameworkOverhead()


@pytest.mark.parametrize("tp,sp,expected", [(1, False, (1e-3, 2e-3)), (2, False, (4e-3, 5e-3)),
                                            (2, True, (6e-3, 7e-3))])
def test_cost_model_adds_overhead_per_layer(tp, sp, expected):
    model = ZOO["llama-2-7b"]
    shard = Shard(1, 512, tp=tp, sp=sp)
    def costs(hw):
        return layer_times(model, hw, shard_times(model, hw, [shard], "bf16"), shard.tokens, 2,
                           tp, sp, 1, FULL, tp, 1, flash=True, tp_overlap=False)
    base, more = costs(A100), costs(replace(A100, overhead=OVERHEAD))
    assert more.fwd_compute_s - base.fwd_compute_s == pytest.approx(expected[0])
    assert more.bwd_input_s - base.bwd_input_s == pytest.approx(expected[1])
    assert more.recompute_s - base.recompute_s == pytest.approx(expected[0])  # full recompute redoes it


def test_moe_layers_add_the_moe_block_overhead():
    # DeepSeek-V3-style: the first 3 of 6 layers dense, so half the layers carry the MoE
    # block's surcharge (1.5 ms forward, 4 ms backward per average layer)
    moe = replace(ZOO["llama-2-7b"], name="half-moe", num_layers=6, num_experts=8,
                  experts_per_token=2, moe_ffn_hidden_size=1024, dense_layers=(0, 1, 2))
    shard = Shard(1, 512)
    def costs(hw):
        return layer_times(moe, hw, shard_times(moe, hw, [shard], "bf16"), shard.tokens, 2,
                           1, False, 1, FULL, 1, 1, flash=True, tp_overlap=False)
    base, more = costs(A100), costs(replace(A100, overhead=OVERHEAD))
    assert more.fwd_compute_s - base.fwd_compute_s == pytest.approx(1e-3 + 0.5 * 3e-3)
    assert more.bwd_input_s - base.bwd_input_s == pytest.approx(2e-3 + 0.5 * 8e-3)


def test_decode_step_adds_decode_overhead_per_layer():
    model = ZOO["llama-2-7b"]
    plan = InferencePlan(batch=1, prompt_len=128, gen_len=8)
    base = simulate_inference(model, plan, Cluster(1, 1), A100)
    more = simulate_inference(model, plan, Cluster(1, 1), replace(A100, overhead=OVERHEAD))
    assert more.tpot_s - base.tpot_s == pytest.approx(model.num_layers * 0.5e-3, rel=1e-6)
    assert more.ttft_s - base.ttft_s == pytest.approx(model.num_layers * 1.5e-3, rel=1e-6)
    # MoE layers add the MoE block's forward surcharge (3 ms) to both
    moe = replace(model, name="all-moe", num_experts=8, experts_per_token=2, moe_ffn_hidden_size=5504)
    base = simulate_inference(moe, plan, Cluster(1, 1), A100)
    more = simulate_inference(moe, plan, Cluster(1, 1), replace(A100, overhead=OVERHEAD))
    assert more.tpot_s - base.tpot_s == pytest.approx(moe.num_layers * 3.5e-3, rel=1e-6)
    assert more.ttft_s - base.ttft_s == pytest.approx(moe.num_layers * 4.5e-3, rel=1e-6)


def test_ranks_beyond_cores_stretch_overhead_and_small_group_collectives():
    cpu = replace(A100, overhead=OVERHEAD, extra={**A100.extra, "cores_per_node": 2})
    shared = per_rank_profile(cpu, Cluster(4, 4).ranks_per_node)
    assert shared.overhead.layer_forward_s == pytest.approx(2e-3)
    # a 2-rank group was measured with a core per rank; among 4 ranks it gets half a core
    assert shared.collective_time_s("all_reduce", 2 ** 20, 2, 2) == pytest.approx(
        2 * cpu.collective_time_s("all_reduce", 2 ** 20, 2, 2), rel=1e-6)
    # a 4-rank group was measured with the same sharing: unchanged
    assert shared.collective_time_s("all_reduce", 2 ** 20, 4, 4) == pytest.approx(
        cpu.collective_time_s("all_reduce", 2 ** 20, 4, 4), rel=1e-6)
