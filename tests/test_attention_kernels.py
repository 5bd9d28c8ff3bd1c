"""The executor's attention kernels (plan.attention): the unfused core gives the fused
kernel's results, keeps the one queries x keys tensor the memory model counts for naive
attention, and is what a naive plan dispatches; its eager mask pass is priced by hand. A
sliding window runs in bands: no kernel call sees more than 1.5 windows of keys, and the
core keeps what the whole kernel keeps."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meshplan.executor.model import CausalCore, build_model
from meshplan.executor.parallelize import parallelize
from meshplan.simulator.memory import layer_activation_bytes
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import Shard, layer_ops
from meshplan.simulator import rules
from meshplan.simulator.plan import Cluster, Plan

LLAMA = ModelSpec("tiny-llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=128, vocab_size=256, max_seq_len=64)


def _qkv(seq, keys, heads=8, kv_heads=2, dim=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, n, h, dim, generator=gen, dtype=dtype).requires_grad_()
            for n, h in ((seq, heads), (keys, kv_heads), (keys, kv_heads))]


@pytest.mark.parametrize("seq, keys, window", [
    (12, 12, None),   # causal
    (12, 12, 8),      # sliding window
    (40, 40, 10),     # ... in bands of half a window, the last one short
    (12, 17, None),   # queries after 5 cached positions
    (12, 17, 6),      # both
    (1, 17, None),    # one decode step over the cache
])
def test_unfused_core_matches_the_fused_kernel(seq, keys, window):
    q, k, v = _qkv(seq, keys)
    results = []
    for kernel in ("flash", "naive"):
        out = CausalCore(window, kernel)(q, k, v)
        results.append((out, torch.autograd.grad((out ** 2).sum(), (q, k, v))))
    (fused, fused_grads), (unfused, unfused_grads) = results
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-6)
    for a, b in zip(unfused_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_soft_capped_scores_are_capped_before_the_mask():
    """Gemma 2's soft-capping in the unfused core: softmax(cap tanh(q k^T / (sqrt(d) cap)))
    under the causal mask, by hand."""
    q, k, v = _qkv(6, 6, heads=2, kv_heads=2)
    cap = 0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = (torch.tanh(scores / cap) * cap).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(CausalCore(None, "naive", softcap=cap)(q, k, v), expected)
    # under CP the executor caps them in every exchange's core (the unfused ring's blocks:
    # tests/test_ring_attention.py), and only there: a fused kernel takes no cap
    gemma = ModelSpec("tiny-gemma", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      vocab_size=64, max_seq_len=64, attn_softcap=cap, sliding_window=8, local_layers=(0,))
    refused = {(comm, kernel): [f for f, *_ in rules.violations(rules.EXECUTOR_TRAINING, Plan(
        global_batch=4, seq_len=32, cp=2, cp_comm=comm, attention=kernel).fields(), gemma, Cluster(2, 2))]
        for comm in ("a2a", "allgather", "p2p", "alltoall") for kernel in ("naive", "flash")}
    assert refused == {(comm, kernel): [] if kernel == "naive" else ["plan.attention"]
                       for comm, kernel in refused}


@pytest.mark.parametrize("seq, keys, window", [(12, 12, None), (12, 12, 8), (40, 40, 10), (12, 17, 6), (1, 17, None)])
def test_sinks_by_the_fused_kernel_match_the_unfused_softmax(seq, keys, window):
    """gpt-oss's sink logits: CPU flash attention's output rescaled by its log-sum-exp, and
    the kernel's backward under the log-sum-exp with the sink, against the sink as one more
    softmax column under autograd; outputs and the gradients of Q, K, V and the sinks."""
    q, k, v = _qkv(seq, keys)
    sinks = torch.randn(q.shape[2], generator=torch.Generator().manual_seed(1)).requires_grad_()
    results = []
    for kernel in ("flash", "naive"):
        out = CausalCore(window, kernel)(q, k, v, sinks)
        results.append((out, torch.autograd.grad((out ** 2).sum(), (q, k, v, sinks))))
    (fused, fused_grads), (unfused, unfused_grads) = results
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    plain = CausalCore(window, "flash")(q, k, v)
    assert (plain - fused).abs().max() > 1e-3  # the sinks took a share


class _KernelKeys(TorchDispatchMode):
    """The key count of every CPU flash attention call."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default):
            self.keys.append(args[1 if "backward" not in str(func) else 2].shape[-2])
        return func(*args, **(kwargs or {}))


def test_a_sliding_window_runs_in_bands_keeping_what_the_whole_kernel_keeps():
    """Window 32 over 256 queries: forward and backward see at most 32 + 16 - 1 keys a call
    (the mask would take all 256); the core keeps Q, K, V, the output and the log-sum-exp,
    the bytes of the causal kernel over the whole sequence (no mask or band copies)."""
    q, k, v = _qkv(256, 256)
    kept = {}
    for window in (None, 32):
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with _KernelKeys() as calls, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = CausalCore(window, "flash")(q, k, v)
            out.sum().backward()
        kept[window] = sum(saved.values())
    assert kept[32] == kept[None]
    assert calls.keys and max(calls.keys) == 32 + 16 - 1


def _saved_square_bytes(kernel: str, dtype: torch.dtype, seq: int = 64) -> int:
    """Bytes of the tensors of at least seq x seq elements per (sequence, head) that the core
    keeps for backward."""
    q, k, v = _qkv(seq, seq, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        CausalCore(None, kernel)(q, k, v)
    big = {t.data_ptr(): t for t in saved if t.numel() >= 2 * 8 * seq * seq}
    return sum(t.numel() * t.element_size() for t in big.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_core_keeps_the_probabilities_only(dtype):
    """Korthikanti et al. 2022 sec 4 without dropout: softmax's output, b a s^2 elements of the
    activations' dtype (bf16 too: autocast would have kept fp32 probabilities and a bf16
    copy); the fused kernel keeps no s^2 tensor."""
    batch, heads, seq = 2, 8, 64
    assert _saved_square_bytes("naive", dtype, seq) == batch * heads * seq * seq * dtype.itemsize
    assert _saved_square_bytes("flash", dtype, seq) == 0


def test_memory_model_counts_that_tensor():
    shard = dict(micro_batch=2, seq_len=64, dtype_bytes=2)
    naive = layer_activation_bytes(LLAMA, Shard(**shard, flash=False), "none")
    flash = layer_activation_bytes(LLAMA, Shard(**shard), "none")
    lse = 4 * 2 * LLAMA.num_heads * 64  # the fused kernel's fp32 log-sum-exp per query row
    assert naive - flash == 2 * LLAMA.num_heads * 64 * 64 * 2 - lse


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel, runs, not_runs", [
    ("naive", {"baddbmm", "masked_fill_", "_softmax", "bmm"}, {"_scaled_dot_product_flash_attention_for_cpu"}),
    ("flash", {"_scaled_dot_product_flash_attention_for_cpu"}, {"baddbmm", "_softmax"}),
])
def test_a_plans_kernel_is_what_the_model_dispatches(kernel, runs, not_runs):
    plan = Plan(global_batch=2, seq_len=32, dtype="fp32", attention=kernel)
    model = parallelize(build_model(LLAMA, 0), plan, mesh=None, dp_mesh=None)
    assert {layer.attention.core.kernel for layer in model.layers.values()} == {kernel}
    with _Ops() as ops:
        model(torch.randint(0, LLAMA.vocab_size, (2, 32)))
    assert runs <= ops.names and not (not_runs & ops.names)


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_eager_unfused_attention_prices_its_mask_pass(dtype_bytes):
    """Eager PyTorch's mask: masked_fill_ reads and writes the scores and reads the boolean
    mask, forward, and zeroes the masked gradients alike in backward; Megatron-LM's fused
    scale-mask-softmax (elementwise fused) and fused kernels have no such pass."""
    def ops(**fields):
        return {op.name: op for op in layer_ops(LLAMA, Shard(2, 64, dtype_bytes=dtype_bytes, **fields))}
    scores = 2 * LLAMA.num_heads * 64 * 64
    mask = ops(flash=False, eager=True)["attn_mask"]
    assert mask.bytes_moved == mask.bwd_bytes == scores * (2 * dtype_bytes + 1)
    assert mask.attention_core  # redone with the core under selective recompute
    assert "attn_mask" not in ops(flash=False) and "attn_mask" not in ops(eager=True)
