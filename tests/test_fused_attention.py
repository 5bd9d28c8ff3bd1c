"""The fused attention kernel's price: the causal share its tiles compute (against a count of
the tiles by brute force), the line its fit draws through measured shapes, and the cost
model's use of both."""
from dataclasses import replace

import numpy as np
import pytest

from meshplan.calibration.measure.attention import _line
from meshplan.core.errors import ProfileError
from meshplan.hw_profiles.gemm_model import causal_tile_share
from meshplan.hw_profiles.profile import FusedAttention, HardwareProfile, load_profile
from meshplan.planner.explain import communication_lines
from meshplan.simulator.cost import forward_s, op_times
from meshplan.simulator.model_spec import ZOO, ModelSpec
from meshplan.simulator.ops import Shard, layer_ops
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate


def _brute_share(seq: int, keys: int, q_block: int, k_block: int) -> float:
    """Pairs in every q_block x k_block tile that holds a pair query i needs (keys
    i-keys+1 .. i), over seq x keys."""
    need = np.zeros((seq, seq), dtype=bool)
    for i in range(seq):
        need[i, max(0, i - keys + 1):i + 1] = True
    computed = 0
    for q0 in range(0, seq, q_block):
        for k0 in range(0, seq, k_block):
            if need[q0:q0 + q_block, k0:k0 + k_block].any():
                computed += need[q0:q0 + q_block, k0:k0 + k_block].size
    return computed / (seq * keys)


@pytest.mark.parametrize("seq,keys,q_block,k_block", [
    (64, 64, 1, 1), (64, 16, 1, 1), (96, 96, 16, 32), (100, 100, 16, 32), (128, 40, 16, 8),
    (128, 128, 256, 512), (200, 200, 32, 64), (96, 30, 8, 16)])
def test_tile_share_counts_the_tiles_a_kernel_computes(seq, keys, q_block, k_block):
    assert causal_tile_share(seq, keys, q_block, k_block) == pytest.approx(
        _brute_share(seq, keys, q_block, k_block), rel=1e-12)


def test_tiles_as_wide_as_the_sequence_compute_the_full_square():
    # torch's CPU kernel (512-key blocks) computes causal attention over 512 tokens whole
    assert causal_tile_share(512, 512, 256, 512) == 1.0
    # and three quarters of it over 1024: query blocks of 256 reach 512 or 1024 keys
    assert causal_tile_share(1024, 1024, 256, 512) == pytest.approx((2 * 512 + 2 * 1024) / (4 * 1024))


def test_line_recovers_scale_and_fixed_cost():
    priced = [1e-4, 5e-4, 2e-3, 6e-3]
    assert _line(priced, [1.3 * p + 2e-4 for p in priced]) == pytest.approx((1.3, 2e-4))
    # a negative fixed cost is no cost: the line goes through the origin
    scale, fixed = _line(priced, [2.0 * p - 5e-5 for p in priced])
    assert fixed == 0.0 and 1.5 < scale < 2.0
    # nor is a negative scale (the backward once read -0.07 here): the ratio through the origin
    measured = [8e-4, 7.5e-4, 9e-4, 7e-4]
    ratios = [p / m for p, m in zip(priced, measured)]
    assert _line(priced, measured) == pytest.approx(
        (sum(ratios) / sum(r * r for r in ratios), 0.0))


def _core_forward_s(hw: HardwareProfile, seq: int) -> float:
    model = ModelSpec(name="tiny", num_layers=1, hidden_size=256, num_heads=8, num_kv_heads=8,
                      ffn_hidden_size=256, vocab_size=128, max_seq_len=seq)
    core = [op for op in layer_ops(model, Shard(2, seq, dtype_bytes=4, flash=True)) if op.attention_core]
    assert len(core) == 2
    return float(forward_s(core, hw, "fp32").sum())


def test_cost_prices_the_kernel_at_its_tiles_scale_and_fixed_cost():
    hw = load_profile("local")
    plain = replace(hw, attention=FusedAttention())
    exact = _core_forward_s(plain, 256)
    tiled = replace(hw, attention=FusedAttention(query_block=256, key_block=512))
    # 256 tokens in one 512-key tile: the whole square, not (S+1)/(2S) of it
    assert _core_forward_s(tiled, 256) == pytest.approx(exact / causal_tile_share(256, 256), rel=1e-9)
    timed = replace(hw, attention=FusedAttention(1.5, 1.0, "test", 3e-4, 0.0, 256, 512))
    assert _core_forward_s(timed, 256) == pytest.approx(1.5 * _core_forward_s(tiled, 256) + 3e-4, rel=1e-9)


# FlashAttention-3 (Shah et al. 2024), Fig. 5/6: FlashAttention-2 on H100 SXM, causal, head
# size 128, sequences 4K-16K, bf16: forward 319-335 TFLOPS, backward 310-322 TFLOPS (its FLOPs
# counted as 2.5x the forward's: five matmuls against two)
FA2_H100_FORWARD_TFLOPS, FA2_H100_BACKWARD_TFLOPS = (319, 335), (310, 322)


@pytest.mark.parametrize("seq", [4096, 8192, 16384])
def test_stock_h100_prices_the_kernel_at_flashattention2s_published_rates(seq):
    """The fits' price (no sustained loss) of the fused kernel's forward and of its backward,
    which redoes Q K^T only (Dao 2023, Algorithm 2), within 5% of the published rates."""
    hw = load_profile("h100-80gb")
    hw = replace(hw, sustained=replace(hw.sustained, gemm_loss=0.0))
    batch, heads, head_dim = 16384 // seq, 16, 128
    model = ModelSpec(name="fa", num_layers=1, hidden_size=heads * head_dim, num_heads=heads,
                      num_kv_heads=heads, ffn_hidden_size=heads * head_dim, vocab_size=128, max_seq_len=seq)
    core = tuple(op for op in layer_ops(model, Shard(batch, seq, dtype_bytes=2, flash=True)) if op.attention_core)
    assert [op.kernel_redo for op in core] == [True, False]
    t = op_times([core], hw, "bf16")
    forward_flops = 4 * batch * heads * seq * seq * head_dim / 2
    backward_s = t.bwd_input_s[0] + t.bwd_weight_s[0] + t.kernel_redo_s[0]
    assert t.kernel_redo_s[0] == pytest.approx(forward_s(core[:1], hw, "bf16").sum(), rel=1e-12)
    low, high = FA2_H100_FORWARD_TFLOPS
    assert 0.95 * low <= forward_flops / t.fwd_s[0] / 1e12 <= 1.05 * high
    low, high = FA2_H100_BACKWARD_TFLOPS
    assert 0.95 * low <= 2.5 * forward_flops / backward_s / 1e12 <= 1.05 * high


@pytest.mark.parametrize("tile", [0, 2 ** 16 + 1, 10 ** 30])
def test_a_tile_no_kernel_runs_is_a_profile_error(tile):
    data = load_profile("local").to_dict()
    data["attention"] = {**data["attention"], "key_block": tile}
    with pytest.raises(ProfileError) as err:
        HardwareProfile.from_dict(data)
    assert err.value.field == "attention.key_block"


# the same figures, cuDNN's bars: forward 518-539 TFLOPS, backward 499-518 TFLOPS
CUDNN_H100_FORWARD_TFLOPS, CUDNN_H100_BACKWARD_TFLOPS = (518, 539), (499, 518)


@pytest.mark.parametrize("seq", [4096, 8192, 16384])
def test_stock_h100_prices_cudnn_attention_at_its_published_rates(seq):
    """A plan's attention cudnn takes the profile's cuDNN kernel figures: within 5% of the
    rates the same paper measured for cuDNN."""
    hw = load_profile("h100-80gb")
    hw = replace(hw, sustained=replace(hw.sustained, gemm_loss=0.0)).attention_kernel("cudnn")
    batch, heads, head_dim = 16384 // seq, 16, 128
    model = ModelSpec(name="fa", num_layers=1, hidden_size=heads * head_dim, num_heads=heads,
                      num_kv_heads=heads, ffn_hidden_size=heads * head_dim, vocab_size=128, max_seq_len=seq)
    core = tuple(op for op in layer_ops(model, Shard(batch, seq, dtype_bytes=2, flash=True)) if op.attention_core)
    t = op_times([core], hw, "bf16")
    forward_flops = 4 * batch * heads * seq * seq * head_dim / 2
    backward_s = t.bwd_input_s[0] + t.bwd_weight_s[0] + t.kernel_redo_s[0]
    low, high = CUDNN_H100_FORWARD_TFLOPS
    assert 0.95 * low <= forward_flops / t.fwd_s[0] / 1e12 <= 1.05 * high
    low, high = CUDNN_H100_BACKWARD_TFLOPS
    assert 0.95 * low <= 2.5 * forward_flops / backward_s / 1e12 <= 1.05 * high


def test_cudnn_attention_needs_the_profiles_figures():
    """The stock H100 profile keeps its cuDNN figures through a save; a profile without them
    (this machine's, the A100's) refuses a plan with attention cudnn, naming the field."""
    hw = load_profile("h100-80gb")
    assert HardwareProfile.from_dict(hw.to_dict()).cudnn_attention == hw.cudnn_attention is not None
    assert hw.attention_kernel("flash") is hw
    for name in ("local", "a100-80gb"):
        with pytest.raises(ProfileError) as err:
            load_profile(name).attention_kernel("cudnn")
        assert err.value.field == "cudnn_attention"


def test_a_plans_attention_kernel_reaches_the_step():
    """simulate() prices a plan's attention cudnn with the profile's cuDNN figures and nothing
    else: the same figures as the flash kernel's give the same step, the stock H100's faster
    ones a faster step by less than the attention's whole time, and a profile without them
    refuses the plan."""
    model, cluster = ZOO["llama-3-8b"], Cluster(8, 8)
    hw = load_profile("h100-80gb")
    flash = simulate(model, Plan(global_batch=8, seq_len=16384, dp=8, zero=3), cluster, hw)
    plan = Plan(global_batch=8, seq_len=16384, dp=8, zero=3, attention="cudnn")
    same = simulate(model, plan, cluster, replace(hw, cudnn_attention=hw.attention))
    assert same.step_time_s == pytest.approx(flash.step_time_s, rel=1e-12)
    assert same.peak_memory_bytes == flash.peak_memory_bytes
    fast = simulate(model, plan, cluster, hw)
    assert 0.7 * flash.step_time_s < fast.step_time_s < 0.97 * flash.step_time_s
    # the explanation names the kernel and its figures' source
    (line,) = communication_lines(fast.communication)
    assert "attention on cuDNN's kernel, 0.62x / 0.62x" in line and "FlashAttention-3" in line
    assert "cuDNN" not in communication_lines(flash.communication)[0]
    with pytest.raises(ProfileError) as err:
        simulate(model, plan, cluster, replace(hw, cudnn_attention=None))
    assert err.value.field == "cudnn_attention"
