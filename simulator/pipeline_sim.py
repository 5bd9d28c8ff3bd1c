"""Discrete-event simulation of one pipeline-parallel training step.

Each rank runs its ops strictly in the schedule's order (schedule.stage_op_tuples); an op
starts when its rank is free and its inputs have arrived. F of virtual stage j needs F of
j-1, B of j needs B of j+1 (the last virtual stage: its own F), W needs its own B. Sends are
asynchronous: data produced at time t on one rank is usable on the next at t + p2p_s.
Instead of an event queue, the ops are put in an order where each comes after its inputs
(a rank runs ahead until its next op's input is not yet produced, then waits to be woken by
the op that produces it), found once per schedule shape; a simulation then times every op
once, in that order.

With the experts' all-to-all overlap (Megatron-Core's combined 1F1B), each F, B pair of the
steady state runs as one combined op: it starts when both inputs have arrived, and its two
halves take their paired durations (each one's all-to-all hidden behind the other's compute,
cost.layer_times); the warm-up forwards and cool-down backwards run alone, at full duration.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from meshplan.simulator.schedule import SPLIT_BACKWARD, stage_index, stage_op_tuples, warmup_ops


@dataclass(frozen=True, slots=True)
class PipelineEvent:
    """One interval on one rank. kind: F, B, W (compute), SEND (a p2p transfer, `stage` is
    the sender) or SYNC (the rank's tail: exposed data-parallel sync and optimizer step;
    microbatch and chunk are -1). `paired`: an F or B run in a combined pair (all-to-all
    overlap)."""

    stage: int
    kind: str
    microbatch: int
    chunk: int
    start_s: float
    end_s: float
    paired: bool = False


@dataclass(frozen=True)
class SharedCores:
    """Pipeline ranks that share CPU cores (the executor on CPU, more ranks than cores on a
    node): devices[n][s] of pipeline rank s's devices are on node n, of `cores` cores. The
    op durations given are those of every device of the node busy, each with cores/ranks
    of a core; a rank that waits (a pipeline bubble, its input not yet sent) runs nothing,
    and the operating system gives its share to the busy ones (processor sharing): while B
    devices of a node are busy each runs at min(1, cores/B) of a core, and a pipeline
    rank's op runs at the pace of its slowest node."""

    devices: tuple[tuple[int, ...], ...]
    cores: float


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """What simulate_pipeline returns; per-rank arrays have one entry per pipeline rank."""

    step_time_s: float              # makespan over all ranks, tails included
    stage_busy_s: np.ndarray        # per rank: F + B + W time
    stage_idle_s: np.ndarray        # per rank: idle time before its last compute op ends
    max_in_flight: np.ndarray       # per rank: peak (micro-batch, chunk) count with F done, B not
    # the ops as run, _events' arguments (None: simulated with record_events=False)
    ops_run: tuple | None = field(default=None, repr=False)

    @cached_property
    def events(self) -> tuple[PipelineEvent, ...]:
        """Every interval, ordered by start time (built on first use: a search reads only the
        step time of most of the plans it simulates); empty without record_events."""
        return () if self.ops_run is None else _events(*self.ops_run)


def _times(name: str, value, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (num_stages, num_chunks) or (num_stages,), "
                         f"got {np.shape(value)}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name}: shape {arr.shape} differs from fwd_s's {shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}: times must be finite and >= 0")
    return arr


def _hop_delays_s(p2p_s, p: int, v: int, v_shaped: bool = False) -> list[float]:
    """Delay from virtual stage j to j+1, for j < p*v - 1; the wrap-around hop from the last
    rank back to the first (interleaved) takes the mean of the per-boundary delays. In a V
    (zb-v) the hop between the two stages on rank p-1 is none, and the way back up crosses
    the boundaries in reverse."""
    arr = np.asarray(p2p_s, dtype=float)
    if arr.ndim == 0:
        per_boundary = np.full(p - 1, float(arr))
    elif arr.shape == (p - 1,):
        per_boundary = arr
    else:
        raise ValueError(f"p2p_s: expected a scalar or shape ({p - 1},), got {arr.shape}")
    if not np.all(np.isfinite(per_boundary)) or np.any(per_boundary < 0):
        raise ValueError("p2p_s: delays must be finite and >= 0")
    if v_shaped:
        down = per_boundary.tolist()
        return down + [0.0] + down[::-1]
    wrap_s = float(per_boundary.mean()) if p > 1 else 0.0
    boundary = per_boundary.tolist() + [wrap_s]
    return [boundary[j % p] if p > 1 else 0.0 for j in range(p * v - 1)]


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: the op tuples and events hold no reference cycles,
    and its repeated scans over millions of them would take most of the run time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def simulate_pipeline(schedule: str, num_microbatches: int, fwd_s, bwd_s, p2p_s=0.0,
                      wgrad_s=None, tail_s=None, record_events: bool = True,
                      paired_s=None, shared: SharedCores | None = None) -> PipelineResult:
    """Time one step of `schedule`. fwd_s, bwd_s (and wgrad_s for zb-h1 and zb-v, where bwd_s
    is the input-gradient part only): time of one micro-batch through chunk c of rank s, shape
    (num_stages, num_chunks) or (num_stages,). tail_s: per-rank time after its last op.
    paired_s: (forward, backward) times of an F and a B that run as one combined op, for
    the all-to-all overlap's order (schedule.warmup_ops); None runs every op alone.
    shared: the ranks' devices on nodes of too few CPU cores (SharedCores), whose ops then
    run faster while other ranks of their node wait; None: every op takes its duration."""
    fwd = _times("fwd_s", fwd_s, None)
    bwd = _times("bwd_s", bwd_s, fwd.shape)
    paired = None if paired_s is None else tuple(
        _times(name, x, fwd.shape) for name, x in zip(("paired_s[0]", "paired_s[1]"), paired_s))
    if (schedule in SPLIT_BACKWARD) != (wgrad_s is not None):
        raise ValueError(f"wgrad_s: give it for schedule {' or '.join(map(repr, SPLIT_BACKWARD))} "
                         "(bwd_s is then the input-gradient part) and only then")
    wgrad = _times("wgrad_s", wgrad_s, fwd.shape) if wgrad_s is not None else np.zeros_like(fwd)
    p, v = fwd.shape
    tail = np.zeros(p) if tail_s is None else np.asarray(tail_s, dtype=float)
    if tail.shape != (p,) or not np.all(np.isfinite(tail)) or np.any(tail < 0):
        raise ValueError(f"tail_s: expected {p} finite times >= 0, got {np.shape(tail_s)}")
    with _gc_paused():
        return _simulate(schedule, num_microbatches, fwd, bwd, wgrad,
                         _hop_delays_s(p2p_s, p, v, schedule == "zb-v"),
                         tail, record_events, paired, shared)


@dataclass(frozen=True)
class _OpGraph:
    """The ops of one step of a schedule, each after the ops it waits for: per op its rank,
    its (kind, microbatch, chunk, virtual stage), the op before it on its rank and the op
    whose output it needs (index `none` for neither: time 0), the hop its input takes
    (index `no_hop` for none: 0 s) and its duration's index in (F, B, W, paired F, paired B)
    x rank x chunk. Under the all-to-all overlap the F of a combined pair also waits for its
    B's input: `partner` maps such an F to (that input, its hop)."""

    ops: tuple[tuple[int, int, int, int], ...]  # (before, input, hop, duration) per op
    what: tuple[tuple[int, str, int, int, int, bool], ...]  # (rank, kind, mb, chunk, stage, paired)
    rank_ops: tuple[tuple[int, ...], ...]       # per rank, its ops in its order
    peak: tuple[int, ...]                       # per rank, max_in_flight
    none: int
    no_hop: int
    partner: dict = field(default_factory=dict)


@lru_cache(maxsize=128)
def _op_graph(schedule: str, p: int, m: int, v: int, overlap: bool = False) -> _OpGraph:
    """Each rank runs its ops (schedule.stage_op_tuples) in order until the next one's
    input is not yet produced, then waits to be woken by the op that produces it: the
    order in which ops are produced, which the timing depends on only through who waits
    for whom. Raises RuntimeError when the ranks deadlock."""
    orders = stage_op_tuples(schedule, p, m, v, overlap)
    stage = stage_index(schedule == "zb-v", p, *np.indices((p, v))).tolist()  # [rank][chunk]
    # per rank, the op indices [lo, hi) that run as combined F, B pairs
    lo = [warmup_ops(schedule, p, s, m, v, True) if overlap else 0 for s in range(p)]
    hi = [lo[s] + 2 * (m * v - lo[s]) if overlap else 0 for s in range(p)]
    partner = {}
    last_j, no_hop = p * v - 1, p * v - 1
    f_at = [[-1] * m for _ in range(p * v)]    # the op that is F(mb) on virtual stage j; -1: not yet
    b_at = [[-1] * m for _ in range(p * v)]
    f_wait = [[-1] * m for _ in range(p * v)]  # the rank blocked until F(mb) of j is produced
    b_wait = [[-1] * m for _ in range(p * v)]
    none = sum(map(len, orders))
    ptr, before, in_flight, peak = [0] * p, [none] * p, [0] * p, [0] * p
    ops, what, rank_ops = [], [], [[] for _ in range(p)]
    kinds = {"F": 0, "B": 1, "W": 2}
    runnable = list(range(p - 1, -1, -1))
    while runnable:
        s = runnable.pop()
        mine, i, n = orders[s], ptr[s], len(orders[s])
        while i < n:
            kind, mb, c = mine[i]
            j = stage[s][c]
            if kind == "F":
                needs, hop = none, no_hop
                if j:
                    needs, hop = f_at[j - 1][mb], j - 1
                    if needs < 0:
                        f_wait[j - 1][mb] = s
                        break
            elif kind == "B" and j != last_j:
                needs, hop = b_at[j + 1][mb], j
                if needs < 0:
                    b_wait[j + 1][mb] = s
                    break
            else:  # last virtual stage's B needs its own F, W its own B: earlier on this rank
                needs, hop = (f_at if kind == "B" else b_at)[j][mb], no_hop
                if needs < 0:
                    break
            k, paired = len(ops), lo[s] <= i < hi[s]
            if paired and kind == "F":  # the combined op waits for its backward's input too
                _, pmb, pc = mine[i + 1]
                pj = stage[s][pc]
                if pj == last_j:  # its own forward, earlier on this rank
                    partner[k] = (f_at[pj][pmb], no_hop)
                else:
                    if b_at[pj + 1][pmb] < 0:
                        b_wait[pj + 1][pmb] = s
                        break
                    partner[k] = (b_at[pj + 1][pmb], pj)
            ops.append((before[s], needs, hop, ((kinds[kind] + 3 * paired) * p + s) * v + c))
            what.append((s, kind, mb, c, j, paired))
            rank_ops[s].append(k)
            before[s] = k
            if kind == "F":
                f_at[j][mb] = k
                if f_wait[j][mb] >= 0:
                    runnable.append(f_wait[j][mb])
                in_flight[s] += 1
                peak[s] = max(peak[s], in_flight[s])
            elif kind == "B":
                b_at[j][mb] = k
                if b_wait[j][mb] >= 0:
                    runnable.append(b_wait[j][mb])
                in_flight[s] -= 1
            i += 1
        ptr[s] = i
    if any(ptr[s] < len(orders[s]) for s in range(p)):
        raise RuntimeError(f"schedule {schedule!r} deadlocked: ranks stuck at ops {ptr}")
    return _OpGraph(tuple(ops), tuple(what), tuple(map(tuple, rank_ops)), tuple(peak), none, no_hop,
                    partner)


def last_ends_s(schedule: str, num_microbatches: int, fwd_s, bwd_s, wgrad_s, p2p_s) -> np.ndarray:
    """When each rank's last op ends, (pipelines, num_stages), in many pipelines of one shape
    at once: fwd_s, bwd_s (the input-gradient part under SPLIT_BACKWARD) and wgrad_s of shape
    (pipelines, num_stages, num_chunks), one hop p2p_s between ranks per pipeline:
    simulate_pipeline's timing, with numpy arrays over the pipelines and over the ops of
    one _Wave at a time."""
    fwd = np.asarray(fwd_s, dtype=float)
    rows, p, v = fwd.shape
    graph, waves = _op_graph(schedule, p, num_microbatches, v), _waves(schedule, p, num_microbatches, v)
    # durations by _op_graph's index (kind x rank x chunk), one row per pipeline
    dur = np.concatenate([np.asarray(x, dtype=float).reshape(rows, -1) for x in (fwd, bwd_s, wgrad_s)],
                         axis=1).T.copy()
    hop = np.asarray(p2p_s, dtype=float)[None, :]
    last = [ops[-1] if ops else graph.none for ops in graph.rank_ops]
    out = np.empty((rows, p))
    for lo in range(0, rows, WAVE_ROWS):
        end = np.zeros((graph.none + 1, min(WAVE_ROWS, rows - lo)))
        d, h = dur[:, lo:lo + WAVE_ROWS], hop[:, lo:lo + WAVE_ROWS]
        for wave in waves:
            end[wave.ops] = np.maximum(end[wave.before], end[wave.needs] + wave.crosses * h) + d[wave.dur]
        out[lo:lo + WAVE_ROWS] = end[last].T
    return out


# pipelines timed together by last_ends_s: ops x rows of end times stay small (5 MB per
# 10,000 ops)
WAVE_ROWS = 64


@dataclass(frozen=True)
class _Wave:
    """Ops of _op_graph whose inputs all end in earlier waves, so they are timed together:
    their indices, the op before each on its rank, the op whose output it needs, whether that
    output crosses to another rank (1.0) or not, and its duration's index."""

    ops: np.ndarray
    before: np.ndarray
    needs: np.ndarray
    crosses: np.ndarray   # (ops, 1)
    dur: np.ndarray


@lru_cache(maxsize=128)
def _waves(schedule: str, p: int, m: int, v: int) -> tuple[_Wave, ...]:
    """_op_graph's ops by wave: an op's wave is one past the later of its rank's previous
    op's and its input's (a longest path in ops, about 6m + 4p for zb-v's 6pm ops)."""
    graph = _op_graph(schedule, p, m, v)
    crosses = [x > 0 for x in _hop_delays_s(1.0, p, v, schedule == "zb-v")] + [False]
    level = [0] * (graph.none + 1)
    for k, (before, needs, _, _) in enumerate(graph.ops):
        level[k] = 1 + max(level[before], level[needs])
    ops = np.array(graph.ops, dtype=np.int64).reshape(-1, 4)
    order = np.argsort(level[:graph.none], kind="stable")
    bounds = np.flatnonzero(np.diff(np.asarray(level)[order])) + 1
    waves = []
    for k in np.split(order, bounds):
        waves.append(_Wave(k, ops[k, 0], ops[k, 1], np.array([crosses[h] for h in ops[k, 2]], dtype=float)[:, None],
                           ops[k, 3]))
    return tuple(waves)


def _simulate(schedule: str, m: int, fwd: np.ndarray, bwd: np.ndarray, wgrad: np.ndarray,
              hop: list[float], tail: np.ndarray, record_events: bool, paired=None,
              shared: SharedCores | None = None) -> PipelineResult:
    p, v = fwd.shape
    graph = _op_graph(schedule, p, m, v, paired is not None)
    dur = np.concatenate([fwd.ravel(), bwd.ravel(), wgrad.ravel(),
                          *(x.ravel() for x in paired or ())]).tolist()
    hops = hop + [0.0]
    if shared is not None:
        start, end = _shared_times(graph, dur, hops, shared)
        busy = [sum(end[k] - start[k] for k in mine) for mine in graph.rank_ops]
    else:
        # _ready's rule written inline: the loop a search's re-rank runs for every op
        end = [0.0] * (graph.none + 1)  # end time of each op; the last entry: `none`'s
        start = [0.0] * graph.none
        partner = graph.partner
        for k, (prev, needs, h, d) in enumerate(graph.ops):
            t, ready = end[prev], end[needs] + hops[h]
            if partner and k in partner:
                other, h2 = partner[k]
                ready = max(ready, end[other] + hops[h2])
            start[k] = t if t > ready else ready
            end[k] = start[k] + dur[d]
        busy = [sum(dur[graph.ops[k][3]] for k in mine) for mine in graph.rank_ops]
    last_end = np.array([end[mine[-1]] if mine else 0.0 for mine in graph.rank_ops])
    busy_s = np.array(busy)
    return PipelineResult(step_time_s=float(np.max(last_end + tail)), stage_busy_s=busy_s,
                          stage_idle_s=last_end - busy_s, max_in_flight=np.array(graph.peak),
                          ops_run=(graph, start, end, hop, last_end, tail) if record_events else None)


def _ready(graph: _OpGraph, k: int, end: list[float], hops: list[float]) -> float:
    """When op k can start: its rank's previous op done and its input arrived (with the
    all-to-all overlap, a combined pair's backward input too)."""
    prev, needs, h, _ = graph.ops[k]
    t = max(end[prev], end[needs] + hops[h])
    if k in graph.partner:
        other, h2 = graph.partner[k]
        t = max(t, end[other] + hops[h2])
    return t


def _shared_times(graph: _OpGraph, dur: list[float], hops: list[float],
                  shared: SharedCores) -> tuple[list[float], list[float]]:
    """Start and end of each op under processor sharing (SharedCores), by events: an op
    starting or ending changes the busy devices of its nodes and so every running op's
    pace. A duration d is the op's time with all R devices of its node busy on C cores;
    with B busy it runs max(1, R/C) * min(1, C/B) times as fast."""
    devices = np.asarray(shared.devices, dtype=float)          # (nodes, p)
    full = np.maximum(1.0, devices.sum(axis=1) / shared.cores)  # the durations' sharing
    p, inf = devices.shape[1], float("inf")
    end = [inf] * graph.none + [0.0]
    start = [0.0] * graph.none
    at = [0] * p                 # per rank, the position of its next op in rank_ops
    left: dict[int, float] = {}  # running rank -> its op's remaining duration
    t = 0.0
    while True:
        waiting = inf
        for s in range(p):
            if s not in left and at[s] < len(graph.rank_ops[s]):
                k = graph.rank_ops[s][at[s]]
                ready = _ready(graph, k, end, hops)
                if ready <= t:
                    start[k], left[s] = t, dur[graph.ops[k][3]]
                else:
                    waiting = min(waiting, ready)
        if not left:
            if waiting == inf:
                return start, end
            t = waiting
            continue
        running = list(left)
        busy = devices[:, running].sum(axis=1)
        pace = full * np.minimum(1.0, shared.cores / np.maximum(busy, 1.0))
        speed = {s: float(pace[devices[:, s] > 0].min()) for s in running}
        step = min(min(left[s] / speed[s] for s in running), waiting - t)
        t += step
        for s in running:
            left[s] -= speed[s] * step
            if left[s] <= 1e-12 * max(1.0, t):
                k = graph.rank_ops[s][at[s]]
                end[k] = t
                at[s] += 1
                del left[s]


def _events(graph: _OpGraph, start: list[float], end: list[float], hop: list[float],
            last_end: np.ndarray, tail: np.ndarray) -> tuple[PipelineEvent, ...]:
    """Compute ops, the sends they start (when a hop takes time) and the per-rank tails,
    ordered by start time."""
    rows, last_j = [], len(hop)  # hop: one per virtual stage but the last
    for (s, kind, mb, c, j, paired), t0, t1 in zip(graph.what, start, end):
        rows.append((t0, s, kind, mb, c, t1, paired))
        if kind == "F" and j < last_j and hop[j] > 0:
            rows.append((t1, s, "SEND", mb, c, t1 + hop[j], False))
        elif kind == "B" and j > 0 and hop[j - 1] > 0:
            rows.append((t1, s, "SEND", mb, c, t1 + hop[j - 1], False))
    for s in range(len(tail)):
        if tail[s] > 0:
            rows.append((float(last_end[s]), s, "SYNC", -1, -1, float(last_end[s] + tail[s]), False))
    rows.sort()
    return tuple([PipelineEvent(s, kind, mb, c, t0, t1, paired) for t0, s, kind, mb, c, t1, paired in rows])
