"""GEMMs whose weights the device read moments before, by the bytes touched in between
(hw_profiles.profile.CachedReads).

A decode step reads its stage's weights, then the next step reads the same weights again;
whether they come back from a cache or from memory depends on how many bytes the step
touches. Measured the way a decode step reads: the decoder's linear layers (F.linear, x W^T
with W stored [n, k], on one CPU core up to 1.45x the time of x @ W stored [k, n] at 8 rows)
over `rows` sequences and distinct weight matrices in turn, as many as make up the working
set, the whole round repeated. The time per call, less the per-call cost of a GEMM whose operands
sit in the first-level cache, divided by the matrix's bytes, is the time per weight byte at
that working set and row count: the weight's read from wherever it stays, and the
multiply-adds, which do not fully overlap it (on one CPU core 16 rows take 1.7x one row's
time at a 16 MiB working set, where the multiply-adds alone take 1.1x). Working sets double
from one matrix up to past the last-level cache.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from meshplan.calibration.measure.compute import DTYPES, last_level_cache_bytes, time_call_s, torch_threads
from meshplan.hw_profiles.gemm_model import DTYPE_BYTES
from meshplan.hw_profiles.profile import CachedReads

SIDE = 512               # each weight matrix is SIDE x SIDE (1 MiB in fp32)
ROWS = (1, 4, 16, 64)    # sequences per decode GEMM
TINY = 16                # the first-level-cache GEMM whose time is the per-call cost
ROUNDS = 5               # rounds over the working set; the median round is kept
CALLS_PER_POINT = 64     # at least this many calls per point (small sets take more rounds)


def _per_call_s(x: torch.Tensor, weights: list[torch.Tensor], device: torch.device) -> float:
    """Median over ROUNDS of the seconds per GEMM of F.linear(x, w) over every w in turn
    (the untimed rounds before them bring the weights to where a step finds them)."""
    passes = max(1, -(-CALLS_PER_POINT // len(weights)))

    def round_():
        for _ in range(passes):
            for w in weights:
                F.linear(x, w)
    return time_call_s(round_, device, ROUNDS, 1, budget_s=None)[0] / (passes * len(weights))


def measure_cached_reads(device: str | torch.device, dtype: str, max_working_set_bytes: int = 0) -> CachedReads:
    """The device's CachedReads in `dtype` (on CPU with one thread, as a rank runs), working
    sets from one SIDE x SIDE matrix doubling to twice the last-level cache (or to
    `max_working_set_bytes` where given, or 256 MiB where the cache size is unknown)."""
    device = torch.device(device)
    with torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        return _measure(device, dtype, max_working_set_bytes)


def _measure(device: torch.device, dtype: str, max_working_set_bytes: int) -> CachedReads:
    t = DTYPES[dtype]
    matrix_bytes = SIDE * SIDE * DTYPE_BYTES[dtype]
    top = max_working_set_bytes or 2 * last_level_cache_bytes(device) or 2 ** 28
    inputs = [torch.randn(rows, SIDE, dtype=t, device=device) for rows in ROWS]
    latency_s = _per_call_s(inputs[0][:, :TINY], [torch.randn(TINY, TINY, dtype=t, device=device)], device)
    sizes, table, count = [], [], 1
    weights = [torch.randn(SIDE, SIDE, dtype=t, device=device)]
    while True:
        sizes.append(float(count * matrix_bytes))
        table.append(tuple(max(_per_call_s(x, weights, device) - latency_s, 1e-12) / matrix_bytes
                           for x in inputs))
        if count * matrix_bytes >= top:
            break
        weights += [torch.randn(SIDE, SIDE, dtype=t, device=device) for _ in range(count)]
        count *= 2
    return CachedReads(tuple(sizes), tuple(float(r) for r in ROWS), tuple(table), latency_s, dtype,
                       f"calibration/measure/cached_reads.py: F.linear of [{'/'.join(map(str, ROWS))}, {SIDE}] "
                       f"rows by [{SIDE}, {SIDE}] {dtype} weights, distinct, working sets "
                       f"{sizes[0] / 2 ** 20:g}-{sizes[-1] / 2 ** 20:g} MiB, torch {torch.__version__} "
                       f"on {device.type}")


def median_reading(readings: list[CachedReads]) -> CachedReads:
    """The per-point median of readings of one device taken minutes apart (the same working
    sets and rows): a reading takes about 13 s on a CPU, short enough for one slow or fast
    spell of a shared VM to cover it whole (at a 64 MiB working set one row read 25 GB/s in
    one reading, 15 GB/s in two others that day, 2026-12-04, Xeon VM)."""
    first = readings[0]
    table = np.median(np.array([r.seconds_per_byte for r in readings], dtype=float), axis=0)
    return replace(first, seconds_per_byte=tuple(tuple(float(x) for x in row) for row in table),
                   latency_s=float(np.median([r.latency_s for r in readings])),
                   source=f"{first.source}; the per-point median of {len(readings)} readings minutes apart"
                   if len(readings) > 1 else first.source)
