"""FLOPs against Narayanan et al. 2021 eq. 3; activations against Korthikanti et al. 2022
Table 2; model states against the ZeRO paper's 16 bytes/param."""
import pytest

from meshplan.simulator.memory import layer_activation_bytes, model_state_bytes
from meshplan.simulator.model_spec import ZOO, ModelSpec
from meshplan.simulator.ops import Shard, head_ops, layer_ops, model_flops_per_step, total_flops

GPT = ZOO["gpt3-175b"]


def narayanan_eq3(model: ModelSpec, batch: int, s: int) -> float:
    """F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)): one iteration with full recompute."""
    l, h, V = model.num_layers, model.hidden_size, model.vocab_size
    return 96 * batch * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


@pytest.mark.parametrize("name", ["gpt3-175b", "megatron-gpt-1t", "megatron-gpt-18b"])
def test_flops_with_full_recompute_match_eq3(name):
    model, batch, s = ZOO[name], 1536, 2048
    shard = Shard(batch, s)
    layer = total_flops(layer_ops(model, shard))
    head = total_flops(head_ops(model, shard))
    # full recompute: 4 forward passes of each layer (fwd, recomputed fwd, 2x in backward),
    # 3 of the LM head (not recomputed)
    assert 4 * model.num_layers * layer + 3 * head == pytest.approx(narayanan_eq3(model, batch, s), rel=1e-12)


def test_model_flops_is_6N_plus_attention():
    # Without recompute: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) (Narayanan eq. 3 with 3 passes)
    model, batch, s = GPT, 8, 2048
    l, h, V = model.num_layers, model.hidden_size, model.vocab_size
    expected = 72 * batch * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
    assert model_flops_per_step(model, batch, s) == pytest.approx(expected, rel=1e-12)


def test_tp_shards_layer_flops_evenly():
    model = ZOO["llama-2-70b"]
    full = total_flops(layer_ops(model, Shard(2, 4096)))
    assert total_flops(layer_ops(model, Shard(2, 4096, tp=8))) == pytest.approx(full / 8)


# Korthikanti et al. 2022 Table 2, activations per layer (bytes) with a = heads, t = TP.
def _table2(s, b, h, a, t):
    return {
        ("none", False, 1): s * b * h * (34 + 5 * a * s / h),
        ("none", False, t): s * b * h * (10 + 24 / t + 5 * a * s / (h * t)),
        ("none", True, t): s * b * h / t * (34 + 5 * a * s / h),
        ("selective", False, t): s * b * h * (10 + 24 / t),
        ("selective", True, t): s * b * h * 34 / t,
        ("full", False, t): 2 * s * b * h,
        ("full", True, t): 2 * s * b * h / t,
    }


@pytest.mark.parametrize("tp", [2, 8])
def test_activations_match_korthikanti_table2(tp):
    model, s, b = GPT, 2048, 1
    rows = _table2(s, b, model.hidden_size, model.num_heads, tp)
    for (recompute, sp, t), expected in rows.items():
        shard = Shard(b, s, tp=t, sp=sp, flash=False)
        got = layer_activation_bytes(model, shard, recompute)
        assert got == pytest.approx(expected, rel=1e-12), (recompute, sp, t)


def test_flash_attention_drops_the_s_squared_terms():
    shard_naive = Shard(1, 2048, tp=8, sp=True, flash=False)
    shard_flash = Shard(1, 2048, tp=8, sp=True, flash=True)
    naive = layer_activation_bytes(GPT, shard_naive, "none")
    flash = layer_activation_bytes(GPT, shard_flash, "none")
    selective = layer_activation_bytes(GPT, shard_naive, "selective")
    lse = 4 * GPT.num_heads // 8 * 2048  # fp32 log-sum-exp per query row
    assert flash == pytest.approx(selective + lse)
    assert naive > flash


def test_zero_stages_16_bytes_per_param():
    # Rajbhandari et al. 2020 Fig. 1: Psi = 7.5B, Nd = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    psi, nd = 7.5e9, 64
    totals = [sum(model_state_bytes(psi, "bf16", 2, zero, nd)) / 1e9 for zero in range(4)]
    assert totals == pytest.approx([120.0, 31.4, 16.6, 1.875], rel=0.01)
