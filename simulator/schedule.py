"""Pipeline schedules: the exact order in which each pipeline rank runs its micro-batch ops.

An op is a forward (F), a backward (B) or, for zero-bubble schedules, a weight-gradient
pass (W) of one micro-batch through one model chunk. With interleaving, rank s holds
`num_chunks` chunks and chunk c is virtual stage c * num_stages + s (Megatron-LM); the
V-shaped zb-v puts stages s and 2 * num_stages - 1 - s on rank s (stage_index).
"""
from __future__ import annotations

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v")
# the schedules that split the backward into its input-gradient and weight-gradient passes
SPLIT_BACKWARD = ("zb-h1", "zb-v")
# (kind, microbatch, chunk): kind "F" forward, "B" backward (input gradient only under
# SPLIT_BACKWARD, the whole backward otherwise), "W" weight gradient (SPLIT_BACKWARD only).
Op = tuple[str, int, int]


def _check_args(schedule: str, num_stages: int, num_microbatches: int, num_chunks: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: unknown {schedule!r}; use one of {', '.join(SCHEDULES)}")
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                        ("num_chunks", num_chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if schedule == "interleaved":
        if num_chunks < 2:
            raise ValueError(f"num_chunks: interleaved needs >= 2 chunks per rank, got "
                             f"{num_chunks}; use schedule '1f1b' for one chunk")
        if num_microbatches % num_stages:
            raise ValueError(f"num_microbatches: interleaved 1F1B needs a multiple of "
                             f"num_stages ({num_stages}), got {num_microbatches}; change the "
                             "micro-batch count")
    elif schedule == "zb-v":
        if num_chunks != 2:
            raise ValueError(f"num_chunks: zb-v runs two chunks per rank (a V), got {num_chunks}")
    elif num_chunks != 1:
        raise ValueError(f"num_chunks: schedule {schedule!r} runs one chunk per rank, got "
                         f"{num_chunks}; use schedule 'interleaved' for several")


def stage_index(v_shaped, p, s, c):
    """The virtual stage that chunk c of pipeline rank s holds (numpy arrays broadcast):
    c * p + s (Megatron-LM's interleaved assignment), or where `v_shaped` (zb-v) the V of
    Qi et al. 2024 (arXiv 2401.10241 sec 6, torch's style "v"): s going down, 2p - 1 - s
    coming back, so the first and the last stage sit on rank 0."""
    return np.where(np.asarray(v_shaped, dtype=bool) & (np.asarray(c) == 1),
                    2 * np.asarray(p) - 1 - np.asarray(s), np.asarray(c) * p + np.asarray(s))


def _gpipe(m: int) -> list[Op]:
    # All forwards, then all backwards (Huang et al. 2019, GPipe sec 2.2).
    return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]


def warmup_ops(schedule: str, p: int, s: int, m: int, v: int = 1, a2a_overlap: bool = False) -> int:
    """Forward ops rank s runs before its first backward in 1F1B and interleaved 1F1B (as
    many backward ops close its step); the ops between alternate F, B. Megatron-Core's
    all-to-all overlap runs one more warm-up forward, so that each F, B pair of the steady
    state holds independent micro-batches (schedules.get_pp_rank_microbatches; without
    pipelining its combined 1F1B runs the first forward alone)."""
    base = 2 * (p - s - 1) + (v - 1) * p if schedule == "interleaved" else p - s - 1
    return min(base + int(a2a_overlap), m * v)


def _one_f_one_b(p: int, s: int, m: int, a2a_overlap: bool = False) -> list[Op]:
    # PipeDream-Flush (Narayanan et al. 2021 sec 2.2): p-s-1 warm-up forwards, 1F1B, cool-down.
    warmup = warmup_ops("1f1b", p, s, m, 1, a2a_overlap)
    ops = [("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i, 0), ("B", i, 0)]
    return ops + [("B", i, 0) for i in range(m - warmup, m)]


def _zb_h1(p: int, s: int, m: int) -> list[Op]:
    # ZB-H1 (Qi et al. 2023 sec 2.1, Fig. 3): 1F1B order of F and B, with rank s running its
    # W passes s ops late, as the authors' generator (sail-sg/zero-bubble-pipeline-parallelism,
    # zbpp_light auto_schedule) does; every rank then holds at most p micro-batches until W.
    warmup = min(p - s - 1, m)
    ops = [("F", i, 0) for i in range(warmup)]
    w = 0
    for i in range(m):
        if i < m - warmup:
            ops.append(("F", warmup + i, 0))
        ops.append(("B", i, 0))
        if i >= s:
            ops.append(("W", w, 0))
            w += 1
    return ops + [("W", i, 0) for i in range(w, m)]


def _zb_v(p: int, s: int, m: int) -> list[Op]:
    # ZB-V (Qi et al. 2024, arXiv 2401.10241 sec 6), as torch's ScheduleZBVZeroBubble
    # orders it (the executor runs that class): chunk 0 goes down the ranks, chunk 1 back up.
    # Rank s warms up with 2(p-s)-1 forwards of chunk 0, s pairs (F1, F0) and p-s triples
    # (F1, B1, W1); the steady state runs F0 B0 W0 F1 B1 W1; the cool-down s pairs (B0, B1),
    # p-s pairs (B0, W0), then the W passes left. The order is laid out for
    # max(m, 2p-1) micro-batches and the ops of those past m dropped.
    n = max(m, 2 * p - 1)
    ops: list[Op] = []
    f, b, w = [0, 0], [0, 0], [0, 0]

    def run(kind: str, c: int) -> None:
        count = {"F": f, "B": b, "W": w}[kind]
        ops.append((kind, count[c], c))
        count[c] += 1

    for _ in range(2 * (p - s) - 1):
        run("F", 0)
    for _ in range(s):
        run("F", 1)
        run("F", 0)
    for _ in range(p - s):
        for kind in "FBW":
            run(kind, 1)
    while f[1] < f[0] or f[0] < n:
        if f[0] < n:
            run("F", 0)
        for c in (0, 1):
            if c:
                run("F", 1)
            run("B", c)
            run("W", c)
    for _ in range(s):
        run("B", 0)
        run("B", 1)
    for _ in range(p - s):
        run("B", 0)
        run("W", 0)
    while w[1] < b[1]:
        run("W", 1)
    while w[0] < b[0]:
        run("W", 0)
    return [op for op in ops if op[1] < m]


def _interleaved(p: int, s: int, m: int, v: int, a2a_overlap: bool = False) -> list[Op]:
    # Megatron-LM forward_backward_pipelining_with_interleaving (Narayanan et al. 2021 sec 2.2):
    # warm-up 2(p-s-1) + (v-1)p forward ops capped at m*v, then one F and one B, then cool-down.
    # The k-th forward runs chunk (k mod pv) // p on micro-batch (k // pv) * p + k mod p; the
    # k-th backward the same micro-batch on chunk v-1-(k mod pv) // p.
    total = m * v
    warmup = warmup_ops("interleaved", p, s, m, v, a2a_overlap)

    def op(kind: str, k: int) -> Op:
        chunk = (k % (p * v)) // p
        return kind, (k // (p * v)) * p + k % p, chunk if kind == "F" else v - 1 - chunk

    ops = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [op("F", warmup + k), op("B", k)]
    return ops + [op("B", k) for k in range(total - warmup, total)]


def stage_op_tuples(schedule: str, num_stages: int, num_microbatches: int,
                    num_chunks: int = 1, a2a_overlap: bool = False) -> list[list[Op]]:
    """Per pipeline rank, the ops (kind, microbatch, chunk) in the order that rank runs them;
    with `a2a_overlap`, Megatron-Core's combined 1F1B order (warmup_ops)."""
    _check_args(schedule, num_stages, num_microbatches, num_chunks)
    p, m = num_stages, num_microbatches
    if a2a_overlap and not (schedule == "interleaved" or (schedule == "1f1b" and p == 1)):
        raise ValueError(f"a2a_overlap: pairs micro-batches in interleaved 1F1B or on one stage, "
                         f"not in {schedule} over {p} stages")
    if schedule == "gpipe":
        return [_gpipe(m) for _ in range(p)]
    if schedule == "1f1b":
        return [_one_f_one_b(p, s, m, a2a_overlap) for s in range(p)]
    if schedule == "zb-h1":
        return [_zb_h1(p, s, m) for s in range(p)]
    if schedule == "zb-v":
        return [_zb_v(p, s, m) for s in range(p)]
    return [_interleaved(p, s, m, num_chunks, a2a_overlap) for s in range(p)]


def in_flight(schedule, p, v, m, s, a2a_overlap=False):
    """Micro-batch chunks whose activations rank s holds at its peak (forward done, backward
    not), from the op order alone (numpy arrays broadcast; schedule as SCHEDULES codes):
    1F1B and ZB-H1 hold min(p - s, m) (Narayanan et al. 2021 sec 2.2), GPipe all m,
    interleaved 1F1B Megatron's warm-up 2(p-s-1) + (v-1)p plus the one in the steady
    state, at most m*v; the all-to-all overlap's extra warm-up forward holds one more.
    ZB-V holds a chunk's activations until its weight-gradient pass (torch keeps the
    autograd graph from the input-gradient pass to it): in _zb_v's order rank s peaks at
    min(m + 1 + s, 2m, 2p) chunks (the order replayed in tests/test_schedule.py), 2p
    (p whole-stage micro-batches, as 1F1B's first rank) once m >= 2p - 1."""
    extra = np.asarray(a2a_overlap, dtype=int)
    one_f_one_b = np.minimum(p - s + extra, m)
    out = np.where(schedule == SCHEDULES.index("gpipe"), m, np.where(
        schedule == SCHEDULES.index("interleaved"),
        np.minimum(2 * (p - s - 1) + (v - 1) * p + 1 + extra, m * v), one_f_one_b))
    vee = np.broadcast_to(schedule == SCHEDULES.index("zb-v"), np.shape(out))
    if vee.any():
        out = np.array(out, copy=True)
        p_v, m_v, s_v = (np.broadcast_to(x, out.shape)[vee] for x in (p, m, s))
        out[vee] = np.minimum(np.minimum(m_v + 1 + s_v, 2 * m_v), 2 * p_v)
    return out


def loss_in_flight(schedule, p, m, a2a_overlap=False):
    """Micro-batches whose loss (the log-probabilities cross-entropy saves) the last rank
    holds at its peak: in_flight of the last rank, whose one chunk ends in the loss (GPipe
    all m, 1F1B and ZB-H1 one); interleaved 1F1B runs the last chunk's backward of a
    micro-batch right after its forward (Narayanan et al. 2021 sec 2.2), so one, as does
    ZB-V on rank 0 (its F1 B1 W1 triples and steady state). The
    all-to-all overlap's extra warm-up forward puts one more forward before that backward."""
    extra = np.asarray(a2a_overlap, dtype=int)
    return np.where(schedule == SCHEDULES.index("interleaved"), np.minimum(1 + extra, m),
                    np.where(schedule == SCHEDULES.index("zb-v"), 1,
                             in_flight(schedule, p, 1, m, p - 1, a2a_overlap)))
