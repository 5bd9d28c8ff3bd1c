"""Per-op selective activation checkpointing (recompute "op", torchtitan's SelectiveAC):
what the simulator says it keeps and redoes, checked by hand on a small layer, and what the
executor's policy really recomputes, counted on the matmuls torch dispatches."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meshplan.executor.loss import eager_cross_entropy as loss_fn
from meshplan.executor.measure import ActivationMeter, parameter_storages
from meshplan.executor.model import build_model
from meshplan.executor.parallelize import apply_recompute
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.cost import forward_s, op_times
from meshplan.simulator.memory import layer_activation_bytes
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import GEMM, Shard, layer_kind_ops, layer_ops, op_sac
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate

# 2 layers, h 64, 4 heads of 16 (MHA), gated MLP of width 128; TP 2 gives per device
# wq, wk, wv 32 wide, wo 64, w1, w3 64, w2 64: seven matmuls, 8 tokens, bf16
GATED = ModelSpec("d", 2, 64, 4, 4, 128, 100, 64)
SHARD = Shard(1, 8, tp=2)


def test_seven_matmuls_alternate_and_the_larger_set_is_kept():
    ops = {op.name: op for op in layer_ops(GATED, SHARD)}
    # an odd count runs on into the next call: each matmul is redone every other call
    for name in ("qkv_proj", "out_proj", "mlp_up", "mlp_down"):
        assert ops[name].sac_redo == 0.5
    assert ops["attn_scores"].sac_redo == ops["attn_values"].sac_redo == 0.0  # SDPA kept
    for name in ("input_norm", "rope", "mlp_act", "residual_add"):
        assert ops[name].sac_redo == 1.0
    kept_odd = 32 + 32 + 64 + 64     # wq, wv, w1, w2 (positions 1, 3, 5, 7)
    assert kept_odd > 32 + 64 + 64   # wk, wo, w3
    layer_input, attention_out, lse = 2 * 8 * 64, 2 * 8 * 2 * 16, 4 * 1 * 2 * 8
    assert layer_activation_bytes(GATED, SHARD, "op") == layer_input + 2 * 8 * kept_odd + attention_out + lse


def test_six_matmuls_redo_the_even_ones():
    plain = replace(GATED, gated_mlp=False)
    ops = {op.name: op for op in layer_ops(plain, SHARD)}
    # wq wk wv wo w1 w2: wk (a third of the QKV projection), wo and w2 are redone
    assert ops["qkv_proj"].sac_redo == pytest.approx(1 / 3)
    assert (ops["out_proj"].sac_redo, ops["mlp_up"].sac_redo, ops["mlp_down"].sac_redo) == (1.0, 0.0, 1.0)
    kept = 32 + 32 + 64              # wq, wv, w1
    assert layer_activation_bytes(plain, SHARD, "op") == 2 * 8 * (64 + kept + 32) + 4 * 2 * 8


def test_ulysses_keeps_its_all_to_alls_outputs():
    """Under cp 2 by Ulysses' all-to-all the policy also keeps the exchange's outputs: Q, K
    and V in head shards before the kernel and its output back in sequence shards, each as
    large as on this rank before it: at tp 2, 2 query heads, 1 key and 1 value head and the
    output's 2, of 16, for the 4 tokens of the rank's half of 8, bf16; the ring's exchange
    runs inside the kernel, whose output the policy keeps whole."""
    gqa = replace(GATED, num_kv_heads=2)
    ring, ulysses = (replace(SHARD, cp=2, cp_comm=comm) for comm in ("p2p", "a2a"))
    assert layer_activation_bytes(gqa, ulysses, "op") - layer_activation_bytes(gqa, ring, "op") == (
        2 * 4 * (2 + 1 + 1 + 2) * 16)


def test_torchs_ring_merge_is_kept_with_the_attention():
    """torch's ring (cp_comm alltoall) joins its blocks in eager ops inside the SDPA operator
    the policy keeps: the merge is not redone, the matmuls' halves and the rest are."""
    shard = replace(SHARD, cp=2, cp_comm="alltoall")
    ops = list(layer_ops(GATED, shard))
    shares = dict(zip((op.name for op in ops), op_sac(GATED, shard, ops)[0]))
    assert shares["cp_merge"] == 0.0 and shares["input_norm"] == 1.0


def test_sequence_parallel_keeps_the_reduce_scatter_outputs():
    sp = replace(SHARD, sp=True)
    # the layer input and the two reduce-scatter outputs are SP-sharded: 4 tokens of 64
    assert layer_activation_bytes(GATED, sp, "op") - layer_activation_bytes(GATED, SHARD, "op") == (
        2 * 4 * 64 - 2 * 8 * 64 + 2 * 2 * 4 * 64)


def test_redone_time_is_the_marked_forward_and_between_selective_and_full():
    hw = load_profile("h100-80gb")
    ops = list(layer_ops(GATED, Shard(2, 4096, tp=2)))
    times = forward_s(ops, hw, "bf16")
    by_hand = sum(t * (0.5 if op.kind == GEMM and op.weight else 0.0 if op.attention_core else 1.0)
                  for t, op in zip(times, ops))
    assert op_times([tuple(ops)], hw, "bf16").sac_redo_s[0] == pytest.approx(by_hand)
    cluster = Cluster(8, 8)
    step = {rc: simulate(GATED, Plan(global_batch=16, seq_len=4096, dp=8, micro_batch=2, recompute=rc,
                                     zero=3), cluster, hw) for rc in ("none", "op", "full")}
    assert step["none"].step_time_s < step["op"].step_time_s < step["full"].step_time_s
    assert step["full"].peak_memory_bytes < step["op"].peak_memory_bytes < step["none"].peak_memory_bytes


class _Matmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _backward_matmuls(spec: ModelSpec, calls: int = 2) -> list[int]:
    """The matmuls each of `calls` backward passes runs under the per-op policy."""
    model = build_model(spec, seed=0)
    apply_recompute(model, "op")
    tokens = torch.randint(0, 64, (2, 16))
    counts = []
    for _ in range(calls):
        logits = model(tokens)
        with _Matmuls() as counter:
            logits.sum().backward()
        counts.append(counter.count)
    return counts


def test_executor_policy_redoes_every_other_matmul_alternating_between_calls():
    spec = ModelSpec("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=64, vocab_size=64, max_seq_len=16)
    # backward: 2 gradient matmuls per linear (7 per layer; the head's 2) and the redone ones
    redone = [count - 2 * (7 * 2 + 1) for count in _backward_matmuls(spec)]
    # seven matmuls a layer: wk, wo, w3 redone in one call, wq, wv, w1, w2 in the next
    assert redone == [3 * 2, 4 * 2]


def test_executor_policy_redoes_the_router_always_and_counts_the_shared_experts():
    """An MoE layer under the per-op policy: the router's matmul is redone in every
    backward and left out of the count (torchtitan force-recomputes it; ops.op_sac leaves it
    out); attention's four matmuls, the shared experts' three and their gate's are counted,
    so with eight the even ones are redone each call; the routed experts' grouped GEMMs are
    no matmuls. The dense first layer's seven alternate as before."""
    spec = ModelSpec("tiny-moe", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=64, vocab_size=64, max_seq_len=16, num_experts=4, experts_per_token=2,
                     moe_ffn_hidden_size=16, num_shared_experts=1, shared_expert_ffn_size=16,
                     shared_expert_gate=True, dense_layers=(0,))
    # backward: 2 gradient matmuls per linear: the dense layer's 7, the MoE layer's
    # attention (4), router, shared experts and gate (5), the head
    redone = [count - 2 * (7 + 4 + 5 + 1) for count in _backward_matmuls(spec)]
    assert redone == [3 + 4 + 1, 4 + 4 + 1]
    # the simulator redoes the same: wk (16 of Q/K/V's 64 columns), wo, w3, the gate, the router
    # and the routed experts
    kind = next(k for k, _ in spec.layer_kinds() if k.moe)
    redo = {op.name: op.sac_redo for op in layer_kind_ops(spec, Shard(2, 16), kind) if op.kind == GEMM}
    assert redo == {"qkv_proj": 0.25, "attn_scores": 0.0, "attn_values": 0.0, "out_proj": 1.0, "router": 1.0, "expert_up": 1.0, "expert_down": 1.0,
                    "shared_up": 0.5, "shared_down": 0.0, "shared_gate": 1.0}


def test_executor_policy_counts_latent_attentions_matmuls_as_the_simulator():
    """Latent attention under the per-op policy: wq_a, wq_b, wkv_a, wkv_b and wo, then the
    MLP's three, eight matmuls a layer, the even ones redone each call (wq_b, wkv_b, w3, w2),
    as ops.op_sac marks the same layer (q_up, kv_up, half of mlp_up, mlp_down)."""
    spec = ModelSpec("tiny-mla", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, ffn_hidden_size=128,
                     vocab_size=64, max_seq_len=16, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=12)
    redone = [count - 2 * (8 * 2 + 1) for count in _backward_matmuls(spec)]
    assert redone == [4 * 2, 4 * 2]
    kind = spec.layer_kinds()[0][0]
    redo = {op.name: op.sac_redo for op in layer_kind_ops(spec, Shard(2, 16), kind) if op.kind == GEMM and op.weight}
    assert redo == {"q_down": 0.0, "q_up": 1.0, "kv_down": 0.0, "kv_up": 1.0, "out_proj": 0.0, "mlp_up": 0.5,
                    "mlp_down": 1.0}


def test_activation_meter_counts_the_outputs_the_policy_keeps():
    """The per-op policy keeps its outputs outside autograd's saved tensors; the executor's
    meter counts them as they are kept: over the forward, against full recompute (the same
    layer inputs and head), two layers' first call keeps wq's, wv's, w1's and w2's outputs
    (the odd matmuls) and the attention kernel's output and log-sum-exp, fp32, counted by
    hand."""
    spec = ModelSpec("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=64, vocab_size=64, max_seq_len=16)
    batch, seq = 2, 16
    gen = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, 64, (batch, seq), generator=gen) for _ in range(2))
    peak = {}
    for mode in ("full", "op"):
        model = build_model(spec, seed=0)
        apply_recompute(model, mode)
        with ActivationMeter(parameter_storages(model.parameters())) as meter:
            loss_fn(model(tokens), targets)
        peak[mode] = meter.peak_bytes
    rows = batch * seq
    kept = rows * (32 + 16 + 64 + 32) + rows * 32 + batch * 4 * seq  # matmuls; attention out, lse
    assert peak["op"] - peak["full"] == 2 * 4 * kept


def test_activation_meter_counts_what_a_recompute_keeps_until_it_is_freed():
    """A recompute in backward keeps some of the tensors it makes for the backward after it
    (outside autograd's saved tensors): the meter counts those still alive when it ends,
    not those it made and freed, and stops counting them once they are freed."""
    with ActivationMeter(set()) as meter:
        with meter.recomputed_outputs():
            kept = torch.ones(1000)          # 4000 bytes, alive at the end
            (torch.ones(5000) * 2).sum()     # freed before the end
        assert meter.peak_bytes == 4000
        del kept
        small = torch.ones(10)
        meter.keep(small)
        assert meter.peak_bytes == 4000 and sum(b for _, b in meter.kept.values()) == small.nbytes
