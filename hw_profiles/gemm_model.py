"""Kernel cost models: GEMMs (roofline with a shape-dependent efficiency), memory-bound
operators (latency + bytes / achieved bandwidth) and the share of a causal attention core a
tiled fused kernel computes. Pure, vectorised with numpy broadcasting."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
# Dtypes a profile may lack (a device without FP8 tensor cores), with their element bytes.
OPTIONAL_DTYPE_BYTES = {"fp8": 1}
ELEMENT_BYTES = {**DTYPE_BYTES, **OPTIONAL_DTYPE_BYTES}
# Rows of one tensor-core MMA tile (PTX mma.m16n8k16, the shape Marlin's kernels issue).
MMA_ROWS = 16


@dataclass(frozen=True)
class GemmFit:
    """Fitted GEMM parameters of one dtype: launch latency, the efficiency of large GEMMs,
    the size of each dimension at which it halves, and the achieved fraction of nominal HBM
    bandwidth when the GEMM is memory-bound."""

    latency_s: float
    eff_max: float
    m_half: float
    n_half: float
    k_half: float
    hbm_eff: float


@dataclass(frozen=True)
class MemoryBoundFit:
    """Fitted memory-bound operator cost: launch latency and achieved fraction of nominal
    HBM bandwidth, overall and per operator class (OP_CLASSES) where measured: on a CPU
    core the transcendental activations and softmax run at a fifth of an add's rate."""

    latency_s: float
    hbm_eff: float
    op_eff: dict = field(default_factory=dict)   # operator class -> fraction of nominal


# Measured operator names (ours and Vidur's) -> the class whose efficiency they share.
OP_CLASSES = {"add": "add", "layer_norm": "norm", "rms_norm": "norm", "input_layernorm": "norm",
              "post_attention_layernorm": "norm", "gelu": "activation", "silu": "activation",
              "mlp_act": "activation", "softmax": "softmax", "attn_rope": "rope",
              "adam": "optimizer"}


def gemm_efficiency(fit: GemmFit, m, n, k):
    """Fraction of peak FLOP/s reached by one [m,k]@[k,n]: eff_max x prod x/(x + x_half), each
    factor the tile-occupancy / pipeline-fill loss of a small dimension (our saturating form,
    chosen over sum-of-overheads and power-law variants by equal-or-lower residuals on Vidur's
    A100/H100 GEMMs; a smooth stand-in for Calculon's efficiency-by-size tables)."""
    return _nk_efficiency(fit, n, k) * (m / (m + fit.m_half))


def _nk_efficiency(fit: GemmFit, n, k):
    """gemm_efficiency without its loss to a small m: eff_max x the n and k factors."""
    return fit.eff_max * (n / (n + fit.n_half)) * (k / (k + fit.k_half))


def gemm_time_s(fit: GemmFit, m, n, k, batch, peak_flops: float, memory_bytes_per_s: float,
                dtype_bytes: int, weight_bytes=None, dequant_s=0.0):
    """Time (s) of batch x ([m,k] @ [k,n]): latency + max(compute, memory) (roofline,
    Williams et al. 2009), compute = 2mnk / (peak x eff), memory = A, B and C each moved once.
    With `weight_bytes` the weight is stored narrower (weight-only quantized) and the GEMM is a
    mixed-input kernel that dequantizes it in registers (vLLM's Marlin kernels for GPTQ/AWQ
    weights): B moves at weight_bytes per element; the tensor cores run whole 16-row tiles
    (mma m16n8k16) without cuBLAS's small-m loss, and the dequantisation (`dequant_s`, on the
    CUDA cores) overlaps the loads and the MMAs, so the kernel stays on the memory roof up to
    batch 16-32 at close to the 4x of 4-bit weights (Frantar et al. 2024, MARLIN: abstract and
    its GEMM benchmarks)."""
    m, n, k, batch = (np.asarray(x, dtype=float) for x in (m, n, k, batch))
    b_bytes = dtype_bytes if weight_bytes is None else weight_bytes
    moved_bytes = (dtype_bytes * (m * k + m * n) + b_bytes * k * n) * batch
    memory_s = moved_bytes / (memory_bytes_per_s * fit.hbm_eff)
    if weight_bytes is None:
        compute_s = 2.0 * m * n * k * batch / (peak_flops * gemm_efficiency(fit, m, n, k))
        return fit.latency_s + np.maximum(compute_s, memory_s)
    tile_rows = MMA_ROWS * np.ceil(m / MMA_ROWS)
    compute_s = 2.0 * tile_rows * n * k * batch / (peak_flops * _nk_efficiency(fit, n, k))
    return fit.latency_s + np.maximum(np.maximum(compute_s, memory_s), dequant_s)


def memory_bound_time_s(fit: MemoryBoundFit, num_bytes, memory_bytes_per_s: float,
                        op_class: str | None = None):
    """Time (s) of an operator streaming num_bytes (read + write): latency + bytes / achieved
    bandwidth (the roofline's memory term, Williams et al. 2009), at its class's efficiency
    when the profile measured that class."""
    eff = fit.op_eff.get(op_class, fit.hbm_eff)
    return fit.latency_s + np.asarray(num_bytes, dtype=float) / (memory_bytes_per_s * eff)


@lru_cache(maxsize=4096)
def causal_tile_share(seq_len: int, keys: int, query_block: int = 1, key_block: int = 1) -> float:
    """Share of the seq_len x keys query-key pairs a fused causal kernel computes when each
    query attends its last `keys` positions (keys = seq_len: full causal attention; fewer:
    a sliding window). A kernel tiled into query_block x key_block tiles computes every tile
    that holds a needed pair, whole (FlashAttention-2, Dao 2023 sec 3.1.1: the tiles above
    the diagonal skipped, the diagonal's computed and masked). With 1 x 1 tiles this is the
    exact share, (1/S) sum_i min(i+1, w)/w = 1 - (w-1)/(2S) for S >= w."""
    s, w = seq_len, min(keys, seq_len)
    if query_block == 1 and key_block == 1:
        return 1.0 - (w - 1) / (2.0 * s)
    first = np.arange(0, s, query_block)
    rows = np.minimum(first + query_block, s) - first
    lo = np.maximum(first - w + 1, 0) // key_block * key_block
    hi = np.minimum(-(-np.minimum(first + query_block, s) // key_block) * key_block, s)
    return float((rows * (hi - lo)).sum() / (s * w))
