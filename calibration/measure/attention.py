"""The fused attention kernel against the GEMM fits (hw_profiles.profile.FusedAttention).

torch's scaled_dot_product_attention, causal, is timed forward and forward + backward at a
few shapes the executor runs, and divided by what the fitted profile prices for the same
attention core at the share of it the kernel's tiles compute: the cost model's own ops
(ops.layer_ops of a one-layer model of that shape, its attention-core matmuls) through its
own pricing (cost.op_times). The backward is priced beyond the scores matmul the kernel
redoes (Op.kernel_redo; cost.layer_times adds that redo at the forward's price). A line
through the shapes, measured = scale x priced + a fixed cost per call, is the profile's
fit: on CPU the fused kernel runs below the batched matmuls the GEMM fits measured and
costs a fraction of a millisecond per call, which nothing else would see.

Decode attention (one query per sequence over its cached keys and values, grouped query
heads sharing a KV head, as the executor's decode calls it) is timed at a few batches and
cache lengths and fitted as a fixed cost plus the cache's bytes at a rate: at one query per
sequence the kernel streams the cache, and on CPU it does so far below the memory-bound
operators' rate.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from meshplan.calibration.measure.compute import DTYPES, last_level_cache_bytes, time_call_s, torch_threads
from meshplan.core.errors import ProfileError
from meshplan.hw_profiles.profile import ATTENTION_SCALE, FusedAttention, HardwareProfile
from meshplan.simulator.cost import op_times
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import Shard, layer_ops
from meshplan.simulator.plan import DTYPE_BYTES

# (micro-batch, sequence, heads, head size): the executor's CPU models (head size 32-64,
# a few hundred tokens); on a GPU, Llama-sized heads at the sequences training runs.
CPU_SHAPES = ((2, 128, 8, 32), (1, 512, 8, 32), (2, 256, 4, 64), (1, 1024, 4, 64))
CUDA_SHAPES = ((1, 2048, 32, 128), (1, 4096, 32, 128), (1, 8192, 16, 128))
# The kernels' tiles (queries x keys) for the causal share they compute: torch's CPU flash
# kernel splits keys into blocks of 512 and queries into blocks of up to 256 (aten/src/ATen/
# native/cpu/FlashAttentionKernel.cpp; causal costs what full attention does up to 512
# tokens, measured here); FlashAttention-2's forward runs 128 x 64 tiles at head size 128 on
# A100/H100 (csrc/flash_attn/src/flash_fwd_launch_template.h, run_mha_fwd_hdim128).
CPU_TILES, CUDA_TILES = (256, 512), (128, 64)
# Decode: (sequences, cached tokens, query heads, KV heads, head size).
CPU_DECODE_SHAPES = ((1, 256, 8, 4, 32), (8, 256, 8, 4, 32), (1, 1024, 8, 4, 32), (4, 1024, 8, 2, 64))
CUDA_DECODE_SHAPES = ((1, 4096, 32, 8, 128), (16, 4096, 32, 8, 128), (64, 2048, 32, 8, 128))


def _priced_s(hw: HardwareProfile, shape: tuple[int, int, int, int], dtype: str) -> tuple[float, float, float]:
    """(forward, the forward the backward redoes, backward beyond it) of the attention core
    as the cost model prices it on `hw` (fit_attention gives it the kernel's tiles, no
    scales, no fixed cost)."""
    batch, seq, heads, head_dim = shape
    model = ModelSpec(name="attention-probe", num_layers=1, hidden_size=heads * head_dim, num_heads=heads,
                      num_kv_heads=heads, ffn_hidden_size=heads * head_dim, vocab_size=128, max_seq_len=seq)
    core = [op for op in layer_ops(model, Shard(batch, seq, dtype_bytes=DTYPE_BYTES[dtype], flash=True))
            if op.attention_core]
    t = op_times([tuple(core)], hw, dtype)
    return float(t.fwd_s[0]), float(t.kernel_redo_s[0]), float(t.bwd_input_s[0] + t.bwd_weight_s[0])


def _measured_s(shape: tuple[int, int, int, int], dtype: str, device: torch.device, repeats: int,
                warmup: int, budget_s: float) -> tuple[float, float]:
    """(forward, backward) seconds of causal scaled_dot_product_attention at `shape`."""
    batch, seq, heads, head_dim = shape
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=DTYPES[dtype], device=device,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim, dtype=DTYPES[dtype], device=device)

    def forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    forward_s = time_call_s(forward, device, repeats, warmup, budget_s)[0]
    return forward_s, time_call_s(step, device, repeats, warmup, budget_s)[0] - forward_s


def _decode_measured(shape: tuple[int, int, int, int, int], dtype: str, device: torch.device,
                     repeats: int, warmup: int, budget_s: float) -> tuple[float, float]:
    """(seconds, cache bytes read) of one decode attention call at `shape`. A decode step
    reads a layer's cache after the other layers' weights have passed through the device's
    private caches, so the calls take turns over distinct caches that together fill an
    eighth of the last-level cache: past the private caches, inside the shared one."""
    batch, keys, heads, kv_heads, head_dim = shape
    q = torch.randn(batch, heads, 1, head_dim, dtype=DTYPES[dtype], device=device)
    pair_bytes = 2 * batch * kv_heads * keys * head_dim * DTYPE_BYTES[dtype]
    caches = [[torch.randn(batch, kv_heads, keys, head_dim, dtype=DTYPES[dtype], device=device) for _ in range(2)]
              for _ in range(max(1, last_level_cache_bytes(device) // 8 // pair_bytes))]
    turn = itertools.cycle(caches)

    def decode():
        k, v = next(turn)
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads)
    return time_call_s(decode, device, repeats, warmup, budget_s)[0], float(pair_bytes)


def fit_attention(hw: HardwareProfile, device: str, dtype: str, repeats: int = 10, warmup: int = 2,
                  budget_s: float = 0.5) -> FusedAttention:
    """Measure the fused kernel on `device` (CPU: one thread, as a rank runs) in `dtype`
    and fit its scales against `hw`'s GEMM fits."""
    where = torch.device(device)
    shapes, tiles = (CUDA_SHAPES, CUDA_TILES) if where.type == "cuda" else (CPU_SHAPES, CPU_TILES)
    hw = replace(hw, attention=FusedAttention(query_block=tiles[0], key_block=tiles[1]))
    forward, backward = [], []
    with torch_threads(1 if where.type == "cpu" else torch.get_num_threads()):
        for shape in shapes:
            fwd_s, bwd_s = _measured_s(shape, dtype, where, repeats, warmup, budget_s)
            priced_fwd_s, _, priced_bwd_s = _priced_s(hw, shape, dtype)
            forward.append((fwd_s, priced_fwd_s))
            backward.append((bwd_s, priced_bwd_s))
        decode = [_decode_measured(shape, dtype, where, repeats, warmup, budget_s)
                  for shape in (CUDA_DECODE_SHAPES if where.type == "cuda" else CPU_DECODE_SHAPES)]
    seconds_per_byte, decode_latency_s = _line([b for _, b in decode], [t for t, _ in decode])
    forward_scale, forward_latency_s = _line([p for _, p in forward], [m for m, _ in forward])
    # the redone scores matmul as the cost model prices it with the fitted forward
    fitted = replace(hw, attention=replace(hw.attention, forward_scale=forward_scale,
                                           forward_latency_s=forward_latency_s))
    redo = [_priced_s(fitted, shape, dtype)[1] for shape in shapes]
    backward_scale, backward_latency_s = _line([p for _, p in backward],
                                               [m - r for (m, _), r in zip(backward, redo)])
    low, high = ATTENTION_SCALE
    if not (low <= forward_scale <= high and low <= backward_scale <= high):
        raise ProfileError("attention", f"the fused attention kernel measured {forward_scale:.3g}x "
                           f"(forward) and {backward_scale:.3g}x (backward) the GEMM fits' price, "
                           f"outside {low:g}-{high:g}x: a disturbed measurement",
                           "measure the profile again on a quiet machine")
    sizes = ", ".join(f"{b}x{s} tokens, {h} heads of {d}" for b, s, h, d in shapes)
    return FusedAttention(forward_scale, backward_scale,
                          f"calibration/measure/attention.py: causal scaled_dot_product_attention, {dtype}, "
                          f"torch {torch.__version__} on {device}, fitted over {sizes}; "
                          f"{tiles[0]} x {tiles[1]} tiles; decode over cached keys fitted as a fixed cost "
                          f"plus the cache's bytes", forward_latency_s, backward_latency_s, *tiles,
                          decode_latency_s, 1.0 / seconds_per_byte)


def _line(priced_s: list[float], measured_s: list[float]) -> tuple[float, float]:
    """(scale, fixed cost) of measured = scale x priced + fixed, least squares in relative
    error (the shapes span a decade of times); through the origin if the fixed cost or the
    scale would be negative (a time that falls as the work grows is noise, not a slope)."""
    priced, measured = np.asarray(priced_s), np.asarray(measured_s)
    (scale, fixed), *_ = np.linalg.lstsq(np.stack([priced / measured, 1 / measured], axis=1),
                                         np.ones_like(measured), rcond=None)
    if fixed >= 0 and scale > 0:
        return float(scale), float(fixed)
    return float(np.sum(priced / measured) / np.sum((priced / measured) ** 2)), 0.0
