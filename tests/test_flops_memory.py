"""FLOPs against Narayanan et al. 2021 eq. 3; activations against Korthikanti et al. 2022
Table 2; model states against the ZeRO paper's 16 bytes/param; mixture-of-experts, latent
and sliding-window attention against hand counts and published parameter counts."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from meshplan.core.errors import PlanError
from meshplan.executor.model import build_model
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.memory import (adam_step_bytes_per_param, layer_activation_bytes, logits_bytes,
                                       model_state_bytes, optimizer_bytes_per_param, stage_params)
from meshplan.simulator.model_spec import ZOO, ModelSpec, load_model
from meshplan.simulator.ops import (GEMM, Shard, head_ops, layer_ops, masked_attention_flops_per_step,
                                   model_flops_per_step, total_flops)
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate

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


def test_causal_model_flops_count_the_kept_pairs():
    # the attention term s/(6h) times the causal mask's kept share (s+1)/(2s): (s+1)/(12h)
    model, batch, s = GPT, 8, 2048
    l, h, V = model.num_layers, model.hidden_size, model.vocab_size
    expected = 72 * batch * s * l * h * h * (1 + (s + 1) / (12 * h) + V / (12 * l * h))
    causal = model_flops_per_step(model, batch, s) - masked_attention_flops_per_step(model, batch, s)
    assert causal == pytest.approx(expected, rel=1e-12)
    # a sliding window of w keys keeps 1 - (w-1)/(2s) of each local layer's s x w pairs
    w = 256
    windowed = replace(model, sliding_window=w, local_layers=tuple(range(l)))
    attention = 3 * 4 * batch * s * h * (l * w * (1 - (w - 1) / (2 * s)))
    causal = model_flops_per_step(windowed, batch, s) - masked_attention_flops_per_step(windowed, batch, s)
    assert causal == pytest.approx(
        72 * batch * s * l * h * h * (1 + V / (12 * l * h)) + attention, rel=1e-12)


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


def test_without_master_weights_8_bytes_per_param():
    # bf16 weights updated in place, bf16 gradients and torch.optim.Adam's two bf16 moments:
    # 2 + 2 + 4 bytes, against mixed precision's 2 + 2 + 12 (ZeRO's K = 12); ZeRO-2 keeps
    # the optimizer's bf16 shard beside the whole weights
    psi, nd = 7.5e9, 64
    totals = [sum(model_state_bytes(psi, "bf16", 2, zero, nd, master_weights=False, moment_bytes=2)) / 1e9
              for zero in range(4)]
    assert totals == pytest.approx([60.0, 7.5 * (4 + 4 / 64), 7.5 * (2 + 8 / 64), 7.5 * 8 / 64], rel=1e-9)


def test_zero2_keeps_the_shard_beside_the_whole_weights():
    # FSDP2 without resharding after forward: the fp32 shard the optimizer updates stays, and
    # the all-gathered weights beside it for the step; with mixed precision that shard is
    # the master copy already counted in the optimizer's 12 bytes
    psi, nd = 1e9, 8
    assert model_state_bytes(psi, "fp32", 4, 2, nd)[0] == pytest.approx(psi * (4 + 4 / nd))
    assert model_state_bytes(psi, "fp32", 4, 1, nd)[0] == model_state_bytes(psi, "fp32", 4, 0, nd)[0] == psi * 4
    assert model_state_bytes(psi, "fp32", 4, 3, nd)[0] == psi * 4 / nd
    assert model_state_bytes(psi, "bf16", 2, 2, nd)[0] == psi * 2


def test_fsdp2_replicate_holds_a_second_copy_of_the_weights():
    """ZeRO 0/1 beside TP or PP through FSDP2's replicate (the executor's) keeps the gathered
    weights beside the replicated ones: a rank's weights twice; DDP, or one data-parallel
    rank, or without TP and PP, once. (Measured on this VM's ranks, tiny-llama at tp 2 dp 2:
    52.6 MiB against 44.9 predicted before, 52.4 with the copy.)"""
    model, cluster, hw = ZOO["llama-2-7b"], Cluster(8, 8), load_profile("a100-80gb")
    def weights(**kw):
        plan = Plan(global_batch=8, seq_len=512, recompute="full", **kw)
        return simulate(model, plan, cluster, hw).stages[0].memory.weights_bytes
    for kw in (dict(dp=4, tp=2), dict(dp=4, tp=2, zero=1), dict(dp=4, pp=2, micro_batch=1)):
        assert weights(**kw, ddp_impl="replicate") == pytest.approx(2 * weights(**kw, ddp_impl="ddp"), rel=1e-12)
    for kw in (dict(dp=8), dict(dp=1, tp=8), dict(dp=4, tp=2, zero=2)):
        assert weights(**kw, ddp_impl="replicate") == weights(**kw, ddp_impl="ddp")


@pytest.mark.parametrize("master,moment_bytes,state,step", [
    (True, 4, 12, 28),   # fp32 master + m + v; grad 2, master/m/v read and written 24, weight written 2
    (True, 2, 8, 20),    # Megatron-LM's precision-aware optimizer: 4 + 2 + 2; 2 + 8 + 8 + 2
    (False, 4, 8, 22),   # Transformer Engine FusedAdam's defaults: m + v; grad 2, weight 2 + 2, m/v 16
    (False, 2, 4, 14),   # torch.optim.Adam over bf16 weights: 2 + 2; 2 + 4 + 8
])
def test_adam_state_and_step_bytes_by_precision(master, moment_bytes, state, step):
    assert optimizer_bytes_per_param("bf16", master, moment_bytes) == state
    assert adam_step_bytes_per_param("bf16", 2, master, moment_bytes) == step
    # fp32 training keeps no separate master copy: the two moments alone, in either dtype
    assert optimizer_bytes_per_param("fp32", True, moment_bytes) == 2 * moment_bytes


def test_simulated_states_by_optimizer_precision():
    """Llama-2-7B under FSDP over 8 GPUs, one micro-batch. With master weights the shard
    keeps bf16 weights, fp32 reduced gradients and 12 bytes of Adam state per parameter (8
    with bf16 moments); without, bf16 gradients (FSDP2 casts the reduced shard to the
    parameter's dtype) and the two moments alone. The optimizer step moves 28, 20, 22 and 14
    bytes a parameter."""
    model, hw = ZOO["llama-2-7b"], load_profile("h100-80gb")
    base = Plan(global_batch=8, seq_len=4096, dp=8, zero=3, micro_batch=1)
    shard = model.num_params() / 8
    cases = {(True, "fp32"): ((2, 4, 12), 28), (True, "bf16"): ((2, 4, 8), 20),
             (False, "fp32"): ((2, 2, 8), 22), (False, "bf16"): ((2, 2, 4), 14)}
    results = {key: simulate(model, replace(base, master_weights=key[0], moments_dtype=key[1]), Cluster(8, 8), hw)
               for key in cases}
    mixed = results[True, "fp32"]
    for key, (per_param, step_bytes) in cases.items():
        memory = results[key].stages[0].memory
        got = (memory.weights_bytes, memory.gradients_bytes, memory.optimizer_bytes)
        assert got == pytest.approx(tuple(b * shard for b in per_param), rel=1e-9)
        assert results[key].peak_memory_bytes == pytest.approx(
            mixed.peak_memory_bytes - (18 - sum(per_param)) * shard, rel=1e-9)
        assert results[key].breakdown_s["optimizer"] == pytest.approx(
            mixed.breakdown_s["optimizer"] * step_bytes / 28, rel=0.05)
    # fp32 weights are their own master copy, and FP8 training keeps one behind its casts
    for dtype in ("fp32", "fp8"):
        with pytest.raises(PlanError) as err:
            replace(base, dtype=dtype, master_weights=False)
        assert err.value.field == "plan.master_weights"


CONFIGS = Path(__file__).parent / "data" / "hf_configs"
MIXTRAL = load_model(str(CONFIGS / "mixtral-8x7b.json"))
DEEPSEEK = load_model(str(CONFIGS / "deepseek-v3.json"))


def _core_flops(model: ModelSpec, shard: Shard) -> float:
    return sum(op.flops * op.count for op in layer_ops(model, shard) if op.attention_core and op.kind == GEMM)


@pytest.mark.parametrize("flash,keys", [(True, 4096), (False, 8192)])
def test_sliding_window_attends_over_the_window(flash, keys):
    # Mistral-7B, every layer local with a 4096-key window: QK^T and AV each cost
    # 2 b H s keys hd; a fused kernel skips the blocks outside the window, an unfused one
    # computes the whole s x s matrix and masks it
    model = load_model(str(CONFIGS / "mistral-7b-v0.1.json"))
    assert _core_flops(model, Shard(1, 8192, flash=flash)) == 2 * 2 * 32 * 8192 * keys * 128


def test_alternating_local_and_global_layers_average():
    # Gemma 2 9B: 21 local layers (4096 keys) and 21 global (8192 keys); 16 heads of 256
    model = load_model(str(CONFIGS / "gemma2-9b.json"))
    mean = (21 * 4096 + 21 * 8192) / 42
    assert _core_flops(model, Shard(1, 8192)) == pytest.approx(2 * 2 * 16 * 8192 * mean * 256, rel=1e-12)


@pytest.mark.parametrize("model,matrix_free", [
    # parameters that are no matrix: RMSNorm weights (2 per layer and the final one) ...
    (MIXTRAL, (2 * 32 + 1) * 4096),
    # ... and MLA's two latent norms (q_lora_rank 1536, kv_lora_rank 512)
    (DEEPSEEK, (2 * 61 + 1) * 7168 + 61 * (1536 + 512)),
])
def test_moe_forward_flops_are_twice_the_active_parameters(model, matrix_free):
    # Kaplan et al. 2020 sec 2.1: forward ~ 2 N per token with N the weights a token
    # multiplies by; for an MoE model N is the active parameters without the embedding
    tokens, shard = 4096, Shard(1, 4096)
    non_core = model.num_layers * (total_flops(layer_ops(model, shard)) - _core_flops(model, shard))
    weights = model.num_params(active=True) - model.vocab_size * model.hidden_size - matrix_free
    assert non_core + total_flops(head_ops(model, shard)) == pytest.approx(2 * tokens * weights, rel=1e-12)


def test_tp_shards_experts_not_the_router():
    # Mixtral layer: router 2 T E h FLOPs on every TP rank, the rest split over TP
    router = 2 * 4096 * 8 * 4096
    full = total_flops(layer_ops(MIXTRAL, Shard(1, 4096)))
    assert total_flops(layer_ops(MIXTRAL, Shard(1, 4096, tp=8))) == pytest.approx((full - router) / 8 + router)


def test_expert_weights_on_every_device_at_one_expert_parallel_rank():
    # pp 1: all 46,702,792,704 parameters (transformers' count) on each device at tp 1; at
    # tp 8 all but the replicated ones (per layer 2 RMSNorms of 4096 and the 8 x 4096 router,
    # plus the final norm) are split 8 ways
    assert stage_params(MIXTRAL, 1, 1, 32, True, True) == 46_702_792_704
    replicated = 32 * (2 * 4096 + 8 * 4096) + 4096
    assert stage_params(MIXTRAL, 8, 1, 32, True, True) == pytest.approx(
        (46_702_792_704 - replicated) / 8 + replicated, rel=1e-12)


def test_moe_layer_activations_by_hand():
    # 2 layers, h 64, 4 heads of 16 (MHA), 4 experts of width 32, 2 per token; 8 tokens, bf16
    model = ModelSpec("m", 2, 64, 4, 4, 128, 100, 64, num_experts=4, experts_per_token=2,
                      moe_ffn_hidden_size=32)
    shard = Shard(1, 8)
    norms_qkv_mlp_inputs = 2 * 4 * 8 * 64          # 2 norm inputs, QKV input, MLP input
    router_scores = 2 * 8 * 4
    attention = 2 * 8 * (8 * 16 + 4 * 16 + 4 * 16)  # Q and K, V, attention output
    # per routed row: copy in, out; gate and up outputs, the activation's output (eager
    # only), down input
    experts = 2 * 8 * 2 * (2 * 64 + 4 * 32)
    lse = 4 * 1 * 4 * 8                             # fp32 log-sum-exp per query row and head
    assert layer_activation_bytes(model, replace(shard, fused_mlp=False), "none") == (
        norms_qkv_mlp_inputs + router_scores + attention + experts + lse)
    assert layer_activation_bytes(model, shard, "none") == (
        norms_qkv_mlp_inputs + router_scores + attention + experts - 2 * 8 * 2 * 32 + lse)
    assert layer_activation_bytes(model, shard, "full") == 2 * 8 * 64


def test_dense_layer_activations_by_hand():
    # 2 layers, h 64, 4 heads of 16 (MHA), gated MLP of width 128 (TP 2: 64 per device);
    # 8 tokens, bf16
    gated = ModelSpec("d", 2, 64, 4, 4, 128, 100, 64)
    shard = Shard(1, 8, tp=2)
    norms_qkv_mlp_inputs = 2 * 4 * 8 * 64           # replicated over TP without SP
    attention = 2 * 8 * (4 * 16 + 2 * 16 + 2 * 16)  # Q and K, V, attention output: 2 heads
    lse = 4 * 1 * 2 * 8
    # eager act(x W1) * (x W3): W1's output (the activation's input), the activation's output
    # and W3's output (the product's operands), the product (W2's input); a fused kernel
    # keeps its two inputs and recomputes the activation
    swiglu = 2 * 8 * 4 * 64
    fused_swiglu = 2 * 8 * 3 * 64
    plain_mlp = 2 * 8 * 2 * 64                      # the activation's input, W2's input
    common = norms_qkv_mlp_inputs + attention + lse
    assert layer_activation_bytes(gated, replace(shard, fused_mlp=False), "none") == common + swiglu
    assert layer_activation_bytes(gated, shard, "none") == common + fused_swiglu
    assert layer_activation_bytes(replace(gated, gated_mlp=False), shard, "none") == common + plain_mlp


def test_repeated_keys_and_values_are_kept_as_wide_as_the_queries():
    """plan.kv_repeat: the attention kernel saves the repeated K and V for its backward, as
    wide as the queries, in place of the grouped ones; full recompute keeps the layer input
    alone either way, and a model without grouped heads repeats nothing."""
    # 4 query heads of 16 over 1 kv head (TP 1), 8 tokens, bf16
    grouped = ModelSpec("g", 2, 64, 4, 1, 128, 100, 64)
    shard = Shard(1, 8)
    extra = 2 * 8 * 2 * (4 - 1) * 16  # K and V: 3 more heads each, 8 tokens, 2 bytes
    for rc in ("none", "selective"):
        assert (layer_activation_bytes(grouped, replace(shard, kv_repeat=True), rc)
                == layer_activation_bytes(grouped, shard, rc) + extra)
    assert (layer_activation_bytes(grouped, replace(shard, kv_repeat=True), "full")
            == layer_activation_bytes(grouped, shard, "full"))
    mha = ModelSpec("m", 2, 64, 4, 4, 128, 100, 64)
    assert (layer_activation_bytes(mha, replace(shard, kv_repeat=True), "none")
            == layer_activation_bytes(mha, shard, "none"))
    # the copy: K and V read grouped and written wide, the gradients summed back in backward
    copy = [op for op in layer_ops(grouped, replace(shard, kv_repeat=True)) if op.name == "kv_repeat"]
    assert len(copy) == 1 and copy[0].bytes_moved == copy[0].bwd_bytes == 2 * 8 * (4 + 1) * 16 * 2
    assert not [op for op in layer_ops(mha, replace(shard, kv_repeat=True)) if op.name == "kv_repeat"]


def test_fp8_linears_keeping_fp8_inputs_by_hand():
    # the dense layer above in FP8: Transformer Engine keeps the QKV and MLP inputs (8 tokens
    # of 64) and the down projection's input (64 wide per device) at 1 byte instead of 2, and
    # the out projection an FP8 copy of the attention output (2 heads of 16) beside flash's
    gated = ModelSpec("d", 2, 64, 4, 4, 128, 100, 64)
    bf16 = Shard(1, 8, tp=2, fp8="tensorwise", fp8_saved=False)
    te = replace(bf16, fp8_saved=True)
    assert layer_activation_bytes(gated, bf16, "none") == layer_activation_bytes(gated, Shard(1, 8, tp=2), "none")
    assert layer_activation_bytes(gated, bf16, "none") - layer_activation_bytes(gated, te, "none") == (
        2 * 8 * 64 + 8 * 64 - 8 * 2 * 16)
    assert layer_activation_bytes(gated, te, "full") == layer_activation_bytes(gated, bf16, "full")


def test_megatron_keeps_fp8_inputs_and_torchtitan_bf16():
    from meshplan.simulator import rules
    llama = ZOO["llama-3-8b"]
    fp8 = Plan(global_batch=8, seq_len=4096, dp=8, zero=3, dtype="fp8")
    torchao = replace(fp8, fp8_saved_dtype="bf16")
    assert not rules.violations(rules.FRAMEWORKS["megatron"], fp8.fields(), llama)
    assert [i[0] for i in rules.violations(rules.FRAMEWORKS["megatron"], torchao.fields(), llama)] == [
        "plan.fp8_saved_dtype"]
    assert "plan.fp8_saved_dtype" in [i[0] for i in rules.violations(rules.FRAMEWORKS["torchtitan 0.2"],
                                                                       fp8.fields(), llama)]
    hw, cluster = load_profile("h100-80gb"), Cluster(8, 8)
    assert simulate(llama, fp8, cluster, hw).peak_memory_bytes < simulate(llama, torchao, cluster, hw).peak_memory_bytes


def test_sandwich_norms_keep_two_more_inputs():
    gemma = load_model(str(CONFIGS / "gemma2-9b.json"))
    plain = replace(gemma, sandwich_norm=False)
    shard = Shard(1, 512, tp=2, sp=True)
    extra = layer_activation_bytes(gemma, shard, "none") - layer_activation_bytes(plain, shard, "none")
    assert extra == 2 * 2 * (512 // 2) * 3584


def test_loss_keeps_sharded_log_probabilities_per_micro_batch_in_flight():
    # fp32, 8 tokens x 1000 / TP 2 vocabulary columns
    assert logits_bytes(8, 1000, 2) == 4 * 8 * 500
    # GPipe's last stage keeps the log-probabilities of all 4 micro-batches (2 x 16 tokens),
    # 1F1B's of one; and the logits' gradient of one
    model = ModelSpec("t", 4, 64, 4, 4, 128, 1000, 64)
    logits = 4 * 2 * 16 * 1000 / 2
    for schedule, copies in (("gpipe", 4 + 1), ("1f1b", 1 + 1)):
        plan = Plan(global_batch=8, seq_len=16, micro_batch=2, tp=2, pp=2, schedule=schedule)
        last = simulate(model, plan, Cluster(4, 4), load_profile("local")).stages[-1].memory
        assert last.buffers_bytes == copies * logits


def test_loss_is_freed_before_the_layers_backward_gathers_and_rebuilds():
    # ZeRO-3 over 2 ranks, bf16, 2 x 16 tokens: the loss (log-probabilities and gradient of
    # the fp32 logits) or, later, two gathered layers, whichever is larger
    model = ModelSpec("t", 4, 64, 4, 4, 128, 1000, 64)
    layer_params = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # Q, K, V, O; gated MLP; two norms
    loss = 2 * 4 * 2 * 16 * 1000
    for vocab in (4000, 20):  # the loss larger, then the gathered layers
        sized = replace(model, vocab_size=vocab)
        plan = Plan(global_batch=8, seq_len=16, micro_batch=2, dp=2, zero=3, dtype="bf16")
        memory = simulate(sized, plan, Cluster(2, 2), load_profile("local")).stages[0].memory
        assert memory.buffers_bytes == max(loss * vocab / 1000, 2 * layer_params * 2)


def test_eager_rms_norms_keep_the_normalised_tensor():
    """plan.elementwise eager: each RMSNorm keeps its normalised tensor for the weight's
    gradient, 4 bytes an element: two norms of 8 tokens x 64 (QK-norms: 4 + 4 heads of 16
    more), none under full recompute, and recompute norm_act frees the two it rebuilds;
    LayerNorm runs as one kernel. The executor's own layer keeps what the eager count says
    (its saved tensors, counted by storage, recompute none) within 2%: the norms' fp32
    statistics and RoPE's table, a float or two a token, are not counted (without the
    normalised tensors the count is 12% short)."""
    dense = ModelSpec("d", 2, 64, 4, 4, 128, 100, 64)
    fused, eager = Shard(1, 8), Shard(1, 8, eager=True)
    norms = 4 * 2 * 8 * 64
    for rc in ("none", "selective"):
        assert layer_activation_bytes(dense, eager, rc) - layer_activation_bytes(dense, fused, rc) == norms
    assert layer_activation_bytes(dense, eager, "full") == layer_activation_bytes(dense, fused, "full")
    assert layer_activation_bytes(dense, eager, "norm_act") == layer_activation_bytes(dense, fused, "norm_act")
    qk = replace(dense, qk_norm=True)
    assert (layer_activation_bytes(qk, eager, "none") - layer_activation_bytes(qk, fused, "none")
            == norms + 4 * 8 * (4 + 4) * 16)
    layer = replace(dense, norm="layernorm")
    assert layer_activation_bytes(layer, eager, "none") == layer_activation_bytes(layer, fused, "none")

    def kept(spec: ModelSpec, layers: int) -> int:
        net = build_model(replace(spec, num_layers=layers), 0)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randint(0, spec.vocab_size, (1, 64)))
        weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
        return sum(n for k, n in storages.items() if k not in weights)
    spec = ModelSpec("e", 2, 64, 4, 2, 128, 100, 64)
    per_layer = kept(spec, 2) - kept(spec, 1)  # fp32, mb 1 x 64 tokens, eager MLP as the executor runs it
    model = layer_activation_bytes(spec, Shard(1, 64, dtype_bytes=4, fused_mlp=False, eager=True), "none")
    assert abs(per_layer - model) <= 0.02 * model
