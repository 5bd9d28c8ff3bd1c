"""Time one transformer layer's GEMMs and memory-bound operators with torch on one device,
into the `gemm` and `memory_bound` tables of calibration.samples.

Operators are called the way the executor calls them (functional torch ops that allocate
their output), one call per timing. CUDA calls are timed with CUDA events and a final
synchronize; CPU calls with time.perf_counter. GEMMs are timed cold: the last-level cache
is swept before each timed call, as a step finds a layer's weights. Each configuration gets
`warmup` untimed calls, then up to `repeats` timed calls (fewer when they would exceed
`budget_s`, never fewer than MIN_REPEATS); a row stores the median, the standard deviation
and the calls timed.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F

from meshplan.hw_profiles.gemm_model import DTYPE_BYTES
from meshplan.calibration.samples import GEMM_COLUMNS, MEMORY_BOUND_COLUMNS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_REPEATS = 3
MEMORY_BOUND_OPS = ("layer_norm", "rms_norm", "gelu", "silu", "softmax", "add", "adam")
# Memory-bound operators run on [elements / NORM_HIDDEN, NORM_HIDDEN] activations.
NORM_HIDDEN = 1024
SIZE_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}  # sysfs cache sizes ("2048K")


@dataclass(frozen=True)
class GemmShape:
    """batch x ([m, k] @ [k, n]), named after the layer operator it stands for."""

    op: str
    m: int
    n: int
    k: int
    batch: int = 1


def transformer_gemm_shapes(hidden: int, heads: int, ffn_hidden: int,
                            token_counts: list[int], seq_lens: list[int]) -> list[GemmShape]:
    """The GEMMs of one transformer layer (Vaswani et al. 2017; Megatron-LM layout, Shoeybi et al.
    2019 sec. 3) and of the LM head: projections per token count, the head over a vocabulary
    16x the hidden size (between GPT-3's 4x and Llama 3's 31x), attention matmuls per
    sequence length with batch = heads (one sequence)."""
    head_dim = hidden // heads
    shapes = []
    for t in token_counts:
        shapes += [GemmShape("qkv_proj", t, 3 * hidden, hidden),
                   GemmShape("attn_out_proj", t, hidden, hidden),
                   GemmShape("mlp_up_proj", t, 4 * hidden, hidden),
                   GemmShape("mlp_down_proj", t, hidden, 4 * hidden),
                   GemmShape("gated_mlp_up_proj", t, 2 * ffn_hidden, hidden),
                   GemmShape("lm_head", t, 16 * hidden, hidden)]
    for s in seq_lens:
        shapes += [GemmShape("attn_score", s, s, head_dim, heads),   # Q K^T
                   GemmShape("attn_value", s, head_dim, s, heads)]   # softmax(Q K^T) V
    return shapes


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch using n intra-op threads (the executor gives each rank one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def last_level_cache_bytes(device: torch.device) -> int:
    """The device's last-level cache: a GPU's L2 (torch's device properties), a CPU's
    largest cache level (Linux sysfs; 0 where neither tells)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        sizes.append(int(text[:-1]) * SIZE_UNITS[text[-1]] if text[-1] in SIZE_UNITS else int(text))
    return max(sizes, default=0)


def cache_flush(device: torch.device) -> Callable[[], object] | None:
    """A call that sweeps a buffer the size of the device's last-level cache out of it, so
    that the next timed call reads its operands from memory as in a training step, where a
    layer's weights were last touched a step before (Triton's do_bench zeroes a 256 MB buffer
    before every timed call for the same reason, triton/testing.py); None where the cache
    size is unknown."""
    buffer = _sweep_buffer(device)
    return None if buffer is None else buffer.zero_


@cache
def _sweep_buffer(device: torch.device) -> torch.Tensor | None:
    """cache_flush's buffer, made once per device and kept. With freed host memory kept in
    the heap (core/host_memory.py), a buffer made per GEMM shape left the freed one split by
    the small allocations between, and the heap grew by the cache's size at every shape: on a
    VM whose L3 reads 480 MiB, `meshplan profile` was killed for memory at 24 GiB."""
    size = last_level_cache_bytes(device)
    return torch.empty(size // 4, dtype=torch.float32, device=device) if size > 0 else None


def time_call_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
                budget_s: float | None, before: Callable[[], object] | None = None) -> tuple[float, float, int]:
    """(median s, std s, calls timed) of fn() on device: `repeats` calls, fewer where they
    would overrun `budget_s` (never fewer than MIN_REPEATS; None: no budget, all of them);
    `before` (untimed) runs before each timed call."""
    for _ in range(max(warmup, 1)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n = repeats if budget_s is None else max(MIN_REPEATS, min(repeats, int(budget_s / max(
        time.perf_counter() - start, 1e-9))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for begin, end in events:
            if before is not None:
                before()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) * 1e-3 for begin, end in events]  # elapsed_time is ms
    else:
        times = []
        for _ in range(n):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.pstdev(times), n


def measure_gemms(shapes: list[GemmShape], dtypes: list[str], device: str | torch.device,
                  repeats: int = 10, warmup: int = 2, budget_s: float = 1.0) -> pd.DataFrame:
    """One GEMM_COLUMNS row per (shape, dtype): torch.matmul of random operands, timed with
    the last-level cache swept before each call (cache_flush)."""
    device = torch.device(device)
    rows, flush = [], cache_flush(device)
    for dtype in dtypes:
        for s in shapes:
            lead = (s.batch,) if s.batch > 1 else ()
            a = torch.randn(*lead, s.m, s.k, dtype=DTYPES[dtype], device=device)
            b = torch.randn(*lead, s.k, s.n, dtype=DTYPES[dtype], device=device)
            median_s, std_s, n = time_call_s(lambda: torch.matmul(a, b), device, repeats, warmup,
                                             budget_s, flush)
            rows.append((s.op, s.m, s.n, s.k, s.batch, dtype, median_s, std_s, n))
    return pd.DataFrame(rows, columns=list(GEMM_COLUMNS))


def _memory_bound_call(op: str, elements: int, dtype: str,
                       device: torch.device) -> tuple[Callable[[], object], int]:
    """(call, bytes read + written by one call). Each tensor is counted once, at the minimum
    traffic of a fused kernel, as in vidur_import._memory_bound_bytes."""
    t = DTYPES[dtype]
    rows = elements // NORM_HIDDEN
    n = rows * NORM_HIDDEN
    x = torch.randn(rows, NORM_HIDDEN, dtype=t, device=device)
    w = torch.ones(NORM_HIDDEN, dtype=t, device=device)
    b = torch.zeros(NORM_HIDDEN, dtype=t, device=device)
    elt = DTYPE_BYTES[dtype]
    if op == "layer_norm":  # read x, weight, bias; write y
        return (lambda: F.layer_norm(x, (NORM_HIDDEN,), w, b)), (2 * n + 2 * NORM_HIDDEN) * elt
    if op == "rms_norm":  # read x, weight; write y
        return (lambda: F.rms_norm(x, (NORM_HIDDEN,), w)), (2 * n + NORM_HIDDEN) * elt
    if op == "gelu":  # read x, write y
        return (lambda: F.gelu(x)), 2 * n * elt
    if op == "silu":
        return (lambda: F.silu(x)), 2 * n * elt
    if op == "softmax":  # one pass over the row: read x, write y
        return (lambda: torch.softmax(x, dim=-1)), 2 * n * elt
    if op == "add":  # read x and y, write z
        y = torch.randn_like(x)
        return (lambda: torch.add(x, y)), 3 * n * elt
    if op == "adam":
        # Adam (Kingma & Ba 2015, Alg. 1) reads param, grad, m, v and writes param, m, v.
        p = torch.nn.Parameter(x.reshape(-1).clone())
        p.grad = torch.randn_like(p)
        opt = torch.optim.Adam([p], lr=1e-4, foreach=False, fused=True)
        return opt.step, 7 * n * elt
    raise ValueError(f"unknown memory-bound op {op!r}; expected one of {MEMORY_BOUND_OPS}")


def measure_memory_bound(ops: list[str], elements: list[int], dtypes: list[str],
                         device: str | torch.device, repeats: int = 10, warmup: int = 2,
                         budget_s: float = 0.5) -> pd.DataFrame:
    """One MEMORY_BOUND_COLUMNS row per (op, size, dtype). Adam runs only in fp32: mixed
    precision keeps fp32 master weights and optimizer state (Micikevicius et al. 2018)."""
    device = torch.device(device)
    rows = []
    for dtype in dtypes:
        for op in ops:
            if op == "adam" and dtype != "fp32":
                continue
            for n in elements:
                call, nbytes = _memory_bound_call(op, n, dtype, device)
                median_s, std_s, k = time_call_s(call, device, repeats, warmup, budget_s)
                rows.append((op, nbytes, dtype, median_s, std_s, k))
    return pd.DataFrame(rows, columns=list(MEMORY_BOUND_COLUMNS))
