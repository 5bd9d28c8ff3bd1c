"""Vectorised evaluation of the candidate table: the predicted step time and peak memory of
every row, with the terms of simulator/step.py (the very functions `simulate` uses: layer
and block times, ZeRO-3 gathers, the pipeline hop, stage parameters and memory, the tail
after the last backward) and the balanced partition of simulator/partition.py.

What is the planner's own: the pipeline makespan comes from the schedules' closed forms
instead of the discrete-event simulation, and only a few representative pipeline ranks of
each row are evaluated (slots, below); the end time of a rank other than the first is
estimated from the drain. Where the closed form is exact (no pipeline, or identical stages)
the planner and `simulate` agree exactly; elsewhere the search re-ranks its best rows with
`simulate` (planner/search.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from meshplan.core.cpus import usable_cpus
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator import step
from meshplan.simulator.cost import FULL, NONE, NORM_ACT, OP, ShardTimes, per_rank_profile
from meshplan.simulator.memory import usable_bytes
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.partition import balanced_shape
from meshplan.simulator.pipeline_sim import last_ends_s
from meshplan.simulator.plan import PLAN_WIDE, SCHEDULES
from meshplan.simulator.schedule import in_flight, stage_index

# Rows evaluated together. Blocks of about half a million rows keep the terms' temporaries
# smaller: the GPT-3 175B table on 1024 GPUs (1.8M rows) took 1.29 s in four blocks in turn
# against 1.42-1.65 s whole, and 0.91 s on two threads (numpy's loops release the GIL).
BLOCK_ROWS = 1 << 19
GPIPE, ONE_F_ONE_B, INTERLEAVED, ZB_H1, ZB_V = (SCHEDULES.index(s)
                                                for s in ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v"))


@dataclass(frozen=True)
class Evaluation:
    """Per row of the candidate table."""

    step_time_s: np.ndarray         # NaN where not computed: does not fit, or bounded out of the top
    peak_memory_bytes: np.ndarray   # exact where its lower bound fits, else that bound
    fits: np.ndarray
    memory_limit_bytes: float
    # where step_time_s is: a rigorous lower bound on the discrete-event step time, the
    # busiest rank's work (every op of it runs one after another) plus its tail
    busy_bound_s: np.ndarray | None = None


def table_rows(table: pd.DataFrame, model: ModelSpec) -> dict:
    """step.rows of the candidate table (its knob columns, scalars in table.attrs)."""
    a = table.attrs
    knobs = {k: table[k].to_numpy() for k in ("dp", "tp", "pp", "cp", "zero", "virtual_stages",
                                              "num_microbatches", "micro_batch", "ep", "etp",
                                              "tp_rpn", "cp_rpn", "dp_rpn", "pp_rpn", "ep_rpn",
                                              "etp_rpn", "edp_rpn", *step.SHARES)}
    knobs.update(sp=table["sp"].to_numpy(bool), tp_overlap=table["tp_overlap"].to_numpy(bool),
                 a2a_overlap=table["moe_a2a_overlap"].to_numpy(bool),
                 reshard=table["reshard_after_forward"].to_numpy(bool),
                 rc=table["recompute"].cat.codes.to_numpy(np.int64),
                 sched=np.where(knobs["pp"] == 1, ONE_F_ONE_B,
                                table["schedule"].cat.codes.to_numpy()))
    return step.rows(model, knobs, {k: a[k] for k in PLAN_WIDE})


def slots(r: dict, model: ModelSpec, partition: tuple[int, ...] | None):
    """(rank, layers, layers on the ranks before it) per slot, as (partitions, slots) arrays:
    five ranks per partition under the balanced partition (rank 0, rank p-1 and the middle
    ranks where the layer count first rises: every rank's memory and time is bounded by one
    of them), or every rank for a partition the user gave; per row the index of its
    partition, the forward + backward time of its largest (virtual) stage, and an id of its
    slots (rows of one id have the same)."""
    p, v, w = r["pp"], r["virtual_stages"], model.num_layers + 3  # w above every count: stages <= L + 2
    # zb-v's V places the stages otherwise (schedule.stage_index): its slots are its own
    vee = r["sched"] == ZB_V
    first, last = r["emb_fwd"] + r["emb_bwd"], r["head_fwd"] + r["head_bwd"]
    if partition is None:
        part_id, f = step.group_ids(((r["cost_id"] * w + p) * w + v) * 2 + vee)
        # the balanced partition depends on the count of stages, not on how they sit on ranks
        stages, g = step.group_ids(r["cost_id"][f] * w + p[f] * v[f])
        shape = balanced_shape(model.num_layers, (p * v)[f[g]], r["layer"][f[g]], first[f[g]],
                               last[f[g]]).take(stages)
        found = [tuple(np.where(vee[f], a, b) for a, b in zip(x, y)) for x, y in zip(
            _v_slots(p[f], shape), _balanced_slots(model.num_layers, p[f], v[f], shape))]
        largest = _largest_balanced_s(shape, r["layer"][f], first[f], last[f])[part_id]
        key = (p[f] * w + v[f]) * 2 + vee[f]
        for x in (shape.first, shape.last, shape.base, shape.short):
            key = key * w + x
        layout = step.group_ids(key)[0][part_id]
    else:
        part_id, f = step.group_ids((p * w + v) * 2 + vee)
        found = _fixed_slots(partition, p[f], vee[f])
        sizes = np.tile(np.asarray(partition, dtype=float), (f.size, 1))
        largest = _largest_s(sizes[part_id], p, v, r["layer"], first, last)
        layout = part_id
    s, n, before = (np.stack([sl[k] for sl in found], axis=1) for k in range(3))
    return s, n, before, part_id, largest, layout


def _largest_balanced_s(shape, layer_s, first_s, last_s) -> np.ndarray:
    """Forward + backward time of the largest (virtual) stage of each balanced partition
    (its PartitionShape): the first and last stages with their extra work, and the middle
    ones, of `base` layers unless all are short (base - 1)."""
    P, c0, c1 = shape.parts, shape.first, shape.last
    middle = np.where(shape.short < P - 2, shape.base, shape.base - 1) * layer_s
    one = c0 * layer_s + first_s + last_s
    edges = np.maximum(c0 * layer_s + first_s, c1 * layer_s + last_s)
    return np.where(P == 1, one, np.where(P == 2, edges, np.maximum(edges, middle)))


def _largest_s(sizes: np.ndarray, p, v, layer_s, first_s, last_s) -> np.ndarray:
    """Forward + backward time of the largest (virtual) stage of each pipeline."""
    times = sizes * layer_s[:, None]
    times[:, 0] += first_s
    times[np.arange(len(times)), p * v - 1] += last_s
    return times.max(axis=1)


def _balanced_slots(num_layers: int, p: np.ndarray, v: np.ndarray, shape):
    """Slots of the balanced partition (its PartitionShape) of p*v virtual stages. Virtual
    stage j sits on rank j % p, so rank s holds v chunks of `base` layers, less one for each
    short middle stage among them, plus the first (last) stage's difference on rank 0 (p-1)."""
    P, base, r, c0, c1 = shape.parts, shape.base, shape.short, shape.first, shape.last

    def count(s):  # short middle virtual stages j in 1..r on rank s (j = c*p + s)
        return np.where(s == 0, r // p, np.where(r >= s, (r - s) // p + 1, 0))

    def layers(s):
        n = v * base - count(s) + (s == 0) * (c0 - base) + (s == p - 1) * (c1 - base)
        return np.where(p == 1, num_layers, np.where(P == 2, np.where(s == 0, c0, c1), n))

    q = np.maximum(r - 1, 0) // p
    cand = [np.zeros_like(p), p - 1, np.ones_like(p), r - q * p + 1, r + 1]
    ranks = [np.where((s >= 1) & (s <= p - 2) | (i < 2), s, 0) for i, s in enumerate(cand)]
    n0 = layers(np.zeros_like(p))
    out = []
    for s in ranks:
        before = n0 + (s - 1) * v * base - ((r // p) * (s - 1) + np.minimum(r % p, s - 1))
        out.append((s, layers(s), np.where(s == 0, 0, np.where(s == p - 1, num_layers - layers(s), before))))
    return out


def _v_slots(p: np.ndarray, shape):
    """Slots of the balanced partition (its PartitionShape) of 2p stages in zb-v's V: rank s
    holds stages s and 2p-1-s, so rank 0 the first and the last (c0 + c1 layers) and each
    other rank two middle stages of `base` layers, less one for each of the first `short`
    middle stages among them. Over ranks 1..p-1 at most two counts occur, each highest
    (where the in-flight chunks are most, schedule.in_flight) at p-1 or at 2p-2-short;
    with ranks 0 and 1 the slots bound every rank's memory and work. The layers before a
    slot are not used (zb-v's step is simulated, _v_step_s): 0."""
    base, short = shape.base, shape.short

    def layers(s):
        return np.where(s == 0, shape.first + shape.last,
                        2 * base - (s <= short) - (2 * p - 1 - s <= short))

    ranks = [np.zeros_like(p), p - 1, np.minimum(1, p - 1), np.clip(2 * p - 2 - short, 1, p - 1),
             np.minimum(1, p - 1)]
    return [(s, layers(s), np.zeros_like(p)) for s in ranks]


def _fixed_slots(partition: tuple[int, ...], p: np.ndarray, vee: np.ndarray):
    """Every rank as a slot, for a layer partition the user gave (in zb-v's V where `vee`)."""
    width = int(p.max())
    rows = []
    for pi, v_shaped in zip(p, vee):
        j = np.arange(len(partition))
        ranks = np.bincount(np.where(v_shaped & (j >= pi), 2 * pi - 1 - j, j % pi), weights=partition,
                            minlength=pi)
        s = np.arange(width) % pi
        rows.append((s, ranks[s], np.concatenate([[0], np.cumsum(ranks)])[s]))
    return [tuple(np.array([r[k][i] for r in rows]).astype(np.int64) for k in range(3))
            for i in range(width)]


def _sums(r: dict, model: ModelSpec) -> dict:
    """Whole-pipeline sums over all layers (one micro-batch through every stage) for the
    closed forms and the time bound; `pair`: its forward and backward as they run in the
    all-to-all overlap's pairs (the same without it)."""
    L, p, v = model.num_layers, r["pp"], r["virtual_stages"]
    first_last = np.ones((len(p), 1), bool)
    fwd, bwd, wgrad = step.chunk_s(r, np.full((len(p), 1), L), (p * v)[:, None], first_last, first_last)
    pair_f, pair_b, _ = step.chunk_s(r, np.full((len(p), 1), L), (p * v)[:, None], first_last, first_last,
                                     paired=True)
    return {"sum_w": wgrad[:, 0], "pair": pair_f[:, 0] + pair_b[:, 0],
            "fill": fwd[:, 0] + bwd[:, 0] + 2 * (p - 1) * r["hop"]}


def _time_bound(r: dict) -> np.ndarray:
    """A lower bound on the closed-form step time: no rank is faster than the average (its
    ops all paired where the all-to-all overlap pairs them)."""
    p, v, m, sched, fill = r["pp"], r["virtual_stages"], r["num_microbatches"], r["sched"], r["fill"]
    avg = r["pair"] / p
    return np.select([sched == INTERLEAVED, sched == ZB_H1, sched == ZB_V],
                     [m * avg + (p - 1) * avg / v, (m - 1) * avg + fill - 2 * r["sum_w"], m * avg],
                     (m - 1) * avg + fill)


def _step_time(r: dict, model: ModelSpec, hw: HardwareProfile, s, n, before, params,
               largest, partition: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Step time (pipeline makespan by closed form, each slot's end, plus its tail), and the
    busiest slot's work plus tail (a lower bound on any schedule's step)."""
    c = lambda x: x[:, None]  # noqa: E731  (per-row value against per-slot arrays)
    p, v, m = r["pp"], r["virtual_stages"], r["num_microbatches"]
    first, last = s == 0, s == step.head_rank(r)
    fwd, bwd, wgrad = step.chunk_s(r, n, c(v), first, last)
    pair_f, pair_b, _ = step.chunk_s(r, n, c(v), first, last, paired=True)
    fill, hop, sched = r["fill"], r["hop"], r["sched"]
    cycle = np.maximum((fwd + bwd).max(axis=1), fill / p)  # slowest rank, or rank 0's round trip
    # all-to-all overlap: after rank 0's warm-up forwards (schedule.warmup_ops, alone as are
    # the cool-down backwards) a micro-batch's ops run in pairs (Megatron-Core combined 1F1B)
    paired = np.where(r["a2a_overlap"], (pair_f + pair_b).max(axis=1), cycle)
    alone = np.minimum(2 * (p - 1) + (v - 1) * p + r["a2a_overlap"], m * v) / v
    # 1F1B: fill + (m-1) steady cycles (Narayanan et al. 2021 sec 2.2); GPipe: the forward
    # and backward waves (Huang et al. 2019); interleaved: bubble (p-1)/v of a cycle (ibid.
    # sec 2.2.2), or (p-1) of the largest chunk where the chunks are uneven; ZB-H1: W passes
    # fill the drain, bubble (p-1)(F+B-W) (Qi et al. 2023 sec 2.1).
    end0 = np.select(
        [sched == GPIPE, sched == INTERLEAVED, sched == ZB_H1],
        [(m - 1) * (fwd.max(axis=1) + bwd.max(axis=1)) + fill,
         (m - alone) * paired + alone * cycle + (p - 1) * np.maximum(cycle / v, largest) + 2 * (p - 1) * hop,
         (m - 1) * cycle + fill - r["sum_w"] + wgrad[:, 0] - (np.minimum(m, p) - 1) * wgrad.min(axis=1)],
        (m - 1) * paired + fill)
    xb, ag = r["xb"], r["ag"]
    drained = before * c(r["l_bwd"] + xb + r["agcb"]) + s * c(v * (ag - xb)) + (s > 0) * c(r["emb_bwd"])
    end = c(end0) - (s > 0) * (drained / c(v) + s * c(hop))
    tail = step.rank_tail_s(r, model, hw, s, n, params).total_s
    step_s = (end + tail).max(axis=1)
    vee = np.flatnonzero(sched == ZB_V)
    if vee.size:
        step_s[vee] = _v_step_s(step.take(r, vee), model, hw, partition)
    return step_s, (m[:, None] * (pair_f + pair_b) + tail).max(axis=1)


def _v_step_s(r: dict, model: ModelSpec, hw: HardwareProfile, partition: tuple[int, ...] | None) -> np.ndarray:
    """zb-v's step time in each row, every rank's end plus its tail as simulate() takes it:
    its V of 2p stages (the balanced partition, or the one given) timed by the simulation
    itself (pipeline_sim.last_ends_s) for up to 2p micro-batches. Past them each micro-batch
    more adds to a rank's end what the 2p-th added, and no rank ends before m times its own
    work: the W passes fill the bubble a little more with each micro-batch (Llama-2 70B pp8:
    0.140 s added a micro-batch from 16 to 26 of them, against 0.144 s of the busiest rank's
    work), or the added time grows to that work (Llama-2 13B pp4 with slow hops, by 3p), so
    the estimate is within a few per cent of simulate's, and the search re-ranks its best
    with simulate (tests/test_planner.py)."""
    p, m = r["pp"], r["num_microbatches"]
    out = np.zeros(len(p))
    for width in np.unique(p):
        rows, pp = np.flatnonzero(p == width), int(width)
        u, j = step.take(r, rows), np.arange(2 * pp)[None, :]
        if partition is None:
            layers = balanced_shape(model.num_layers, np.full(len(rows), 2 * pp), u["layer"],
                                    u["emb_fwd"] + u["emb_bwd"], u["head_fwd"] + u["head_bwd"]).counts(2 * pp)
        else:
            layers = np.tile(np.asarray(partition), (len(rows), 1))
        fwd, bwd, wgrad = step.chunk_s(u, layers, np.ones_like(layers), j == 0, j == 2 * pp - 1)
        # (row, rank, chunk): rank s holds stages s and 2p - 1 - s (schedule.stage_index)
        at = stage_index(True, pp, *np.indices((pp, 2)))
        fwd, bwd, wgrad, held = fwd[:, at], bwd[:, at], wgrad[:, at], layers[:, at].sum(axis=2)
        ranks = np.broadcast_to(np.arange(pp), held.shape)
        tail = step.rank_tail_s(u, model, hw, ranks, held, step.rank_params(u, model, ranks, held)).total_s
        short, work = np.minimum(m[rows], 2 * pp), (fwd + bwd).sum(axis=2)
        for k in np.unique(short):
            sel = short == k
            args = (fwd[sel], (bwd - wgrad)[sel], wgrad[sel], u["hop"][sel])
            ends = last_ends_s("zb-v", int(k), *args)
            more = (m[rows[sel]] - k)[:, None]
            if (more > 0).any():
                added = ends - last_ends_s("zb-v", int(k) - 1, *args)
                ends = np.maximum(ends + more * added, m[rows[sel]][:, None] * work[sel])
            out[rows[sel]] = (ends + tail[sel]).max(axis=1)
    return out


MEMORY_KEYS = ("dp", "tp", "pp", "cp", "sp", "zero", "rc", "micro_batch", "sched",
               "virtual_stages", "num_microbatches", "reshard", "ep", "etp", "a2a_overlap")
# what of a row the memory terms read (step.rank_params, step.rank_memory, in_flight)
MEMORY_READS = MEMORY_KEYS + ("dps", "edp", "per_layer", "per_layer_expert", "tokens", "act", "act_none",
                              "dtype", "d", "gd", "master", "mb", "accumulate_whole", "replicate_copy",
                              "loss_kept", "loss_peak")


def _memory_rows(r: dict, index) -> dict:
    """The rows `index` of r, with only what the memory terms read."""
    return step.take({k: r[k] for k in MEMORY_READS}, index)


def _memory_bound(r: dict, model: ModelSpec) -> np.ndarray:
    """A lower bound on peak memory without the partition: some rank holds >= ceil(L/p)
    layers, and keeps at least the fewest in-flight micro-batches of any rank (the last
    rank's; in zb-v's V the first's)."""
    last = r["pp"][:, None] - 1
    most = -(-model.num_layers // r["pp"])[:, None]
    no_edge = np.full_like(most, -1)  # a rank without the embedding or the head
    held = in_flight(r["sched"][:, None], r["pp"][:, None], r["virtual_stages"][:, None],
                     r["num_microbatches"][:, None], last, r["a2a_overlap"][:, None])
    vee = r["sched"] == ZB_V
    held[vee] = in_flight(ZB_V, r["pp"][vee, None], 2, r["num_microbatches"][vee, None], 0)
    params = step.rank_params(r, model, no_edge, most)
    return sum(step.rank_memory(r, model, no_edge, most, params, held).values())[:, 0]


def _exact_memory(r: dict, model: ModelSpec, s, n, part, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peak memory (the busiest slot's) of each row, computed once per `key` (rows that share
    the memory knobs and slots hold the same; s, n: slots per partition, part: each row's),
    and the id of each row's key with the slots' parameters per id."""
    ids, first = step.group_ids(key)
    u, s, n = _memory_rows(r, first), s[part[first]], n[part[first]]
    params = step.rank_params(u, model, s, n)
    held = in_flight(u["sched"][:, None], u["pp"][:, None], u["virtual_stages"][:, None],
                     u["num_microbatches"][:, None], s, u["a2a_overlap"][:, None])
    peak = sum(step.rank_memory(u, model, s, n, params, held).values()).max(axis=1)
    return peak[ids], ids, params


def states_fit(table: pd.DataFrame, model: ModelSpec, hw: HardwareProfile) -> np.ndarray:
    """Which rows of `table` (its columns step.STATE_KNOBS, plan-wide fields in its attrs)
    fit the memory limit with their weights, gradients and optimizer states alone, on a
    rank holding ceil(L/p) layers without the embedding or the head (some rank holds that
    many): a lower bound on every plan made of the row, whatever its placement, recompute,
    schedule and buffers. Computed once per distinct set of those columns."""
    knobs = {k: table[k].to_numpy() for k in step.STATE_KNOBS}
    ids, first = step.combo_ids(knobs, step.STATE_KNOBS)
    r = step.state_rows(model, step.take(knobs, first), {k: table.attrs[k] for k in PLAN_WIDE})
    most = -(-model.num_layers // r["pp"])[:, None]
    params = step.rank_params(r, model, np.full_like(most, -1), most)
    return (sum(step.model_states(r, params, most))[:, 0] <= usable_bytes(float(hw.memory_bytes)))[ids]


def evaluate(table: pd.DataFrame, model: ModelSpec, hw: HardwareProfile, ranks_per_node: int,
             keep: int | None = None) -> Evaluation:
    """Memory of every row (exact where a lower bound fits, else the bound) and the step
    time of the fitting rows, on `hw` as each of `ranks_per_node` ranks of a node sees it.
    With `keep`, step time is computed only where a lower bound on it beats the keep-th best
    so far: the best `keep` rows are those of a full evaluation (of each block, so of all).
    A large table is evaluated in blocks of rows, on as many threads as there are cores."""
    hw = per_rank_profile(hw, ranks_per_node)
    limit = usable_bytes(float(hw.memory_bytes))
    count, threads = -(-len(table) // BLOCK_ROWS), usable_cpus()
    if count > threads:  # more blocks than threads: a multiple of them, which then finish together
        count = -(-count // threads) * threads
    if count <= 1:
        parts = [_evaluate_block(table, model, hw, limit, keep)]
    else:
        blocks = []
        for b in range(count):
            block = table.iloc[b * len(table) // count:(b + 1) * len(table) // count]
            block.attrs.update(table.attrs)
            blocks.append(block)
        with ThreadPoolExecutor(min(count, threads)) as pool:
            parts = list(pool.map(lambda block: _evaluate_block(block, model, hw, limit, keep), blocks))
    peak, step_s, busy = (np.concatenate(column) for column in zip(*parts))
    return Evaluation(step_s, peak, peak <= limit, limit, busy)


def _evaluate_block(table: pd.DataFrame, model: ModelSpec, hw: HardwareProfile, limit: float,
                    keep: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """evaluate's (peak memory, step time, busy bound) of the rows of `table`, on the rank's
    profile `hw` under the memory limit."""
    r = table_rows(table, model)
    # placement does not enter memory: computed once per distinct set of the other knobs
    mem_id, mem_first = step.combo_ids(r, MEMORY_KEYS)
    peak, step_s = _memory_bound(_memory_rows(r, mem_first), model)[mem_id], np.full(len(table), np.nan)
    busy = np.full(len(table), np.nan)
    # full, per-op and norm_act recompute of a layout are never faster than none of it (they
    # only add recompute) and, where a layer keeps no more than none's, keep less (the one
    # layer they rebuild in backward aside): with `keep`, those rows wait until none's exact
    # memory is known, and are timed only where none does not fit. Per-op recompute can keep
    # more than none (the matmul outputs it saves that no backward reads, beside SP's
    # reduce-scatter outputs): such rows are timed as any other
    twin = _none_twin(table, r["rc"]) if keep is not None else np.full(len(table), -1)
    twin[r["act"] > r["act_none"]] = -1
    waits = (twin >= 0) & (peak[np.maximum(twin, 0)] <= limit)
    out = (peak, step_s, busy)
    partition = table.attrs["layer_partition"]
    # every row timed below is one of these (none: nothing to time)
    st = step.rows_shard_times(r, model, hw, peak <= limit) if (peak <= limit).any() else None
    _time_rows(r, model, hw, st, mem_id, np.flatnonzero((peak <= limit) & ~waits), partition, limit, keep, *out)
    rest = waits & (peak[np.maximum(twin, 0)] > limit)
    _time_rows(r, model, hw, st, mem_id, np.flatnonzero(rest & (peak <= limit)), partition, limit, keep, *out)
    return out


def _none_twin(table: pd.DataFrame, rc: np.ndarray) -> np.ndarray:
    """Per row with recompute full, op or norm_act: the row of the same layout (space.py's
    layout column) with recompute none, -1 where there is none (and for every other row)."""
    twin = np.full(len(table), -1)
    above = np.isin(rc, (FULL, OP, NORM_ACT))
    if "layout" not in table.columns or not above.any():
        return twin
    layout = table["layout"].to_numpy()
    none_row = np.full(int(layout.max()) + 1, -1)
    none_row[layout[rc == NONE]] = np.flatnonzero(rc == NONE)
    twin[above] = none_row[layout[above]]
    return twin


def _time_rows(r: dict, model: ModelSpec, hw: HardwareProfile, st: ShardTimes | None, mem_id: np.ndarray,
               maybe: np.ndarray, partition, limit: float, keep: int | None, peak: np.ndarray,
               step_s: np.ndarray, busy: np.ndarray) -> None:
    """Exact memory of the rows `maybe` (whose lower bound fits) into `peak`, and the step
    time of those that fit into `step_s` (their busy bound into `busy`): with `keep`, only
    where a lower bound on it beats the keep-th best known so far. `st`: the shards' times
    (step.rows_shard_times). The partition and memory need only each row's layer, embedding
    and head times (_light_rows); a row's other terms are added (step.add_times) once a bound
    made of those alone says it may be timed."""
    if not maybe.size:
        return
    r = r if maybe.size == len(peak) else step.take(r, maybe)
    costs = step.cost_times(r, model, hw, st)
    light = _light_rows(r, model, st, *costs)
    s, n, before, part, largest, layout = slots(light, model, partition)
    key = mem_id[maybe] * (int(layout.max()) + 1) + layout
    peak[maybe], mem_ids, params = _exact_memory(r, model, s, n, part, key)
    fit = np.flatnonzero(peak[maybe] <= limit)  # positions within `maybe`
    time_lb = _time_bound({k: light[k][fit] for k in _BOUND_READS})
    ranked = np.argsort(time_lb, kind="stable")
    order, time_lb = fit[ranked], time_lb[ranked]
    todo = np.ones(order.size, bool)
    batch = np.arange(order.size) if keep is None else np.arange(min(order.size, max(8 * keep, 2000)))
    while True:
        kth = _kth_best(step_s, keep)  # only falls: a row bounded out stays out
        batch = batch[time_lb[batch] < kth]
        if not batch.size:
            break
        todo[batch] = False
        at = order[batch]
        rows = step.add_times(step.take(r, at), model, hw, st, (costs[0][at], costs[1]))
        rows.update(_sums(rows, model))
        timed = _time_bound(rows) < kth  # the whole bound, the terms beside the layers' added
        at, rows = at[timed], step.take(rows, timed)
        g = part[at]
        step_s[maybe[at]], busy[maybe[at]] = _step_time(rows, model, hw, s[g], n[g], before[g],
                                                        params[mem_ids[at]], largest[at], partition)
        batch = np.flatnonzero(todo)


def _kth_best(step_s: np.ndarray, keep: int | None) -> float:
    """The keep-th best step time known (inf while fewer are, or without `keep`)."""
    known = step_s[np.isfinite(step_s)]
    return np.inf if keep is None or known.size < keep else float(np.partition(known, keep - 1)[keep - 1])


_BOUND_READS = ("pp", "virtual_stages", "num_microbatches", "sched", "fill", "pair", "sum_w")


def _light_rows(r: dict, model: ModelSpec, st: ShardTimes, cost_id: np.ndarray, costs: dict) -> dict:
    """What slots reads of each row, from its cost combination's and shard's times alone
    (step.cost_times, step.rows_shard_times): a layer's forward + backward, and the
    embedding's and the head's blocks with the TP communication beside them
    (step.block_times, as add_times takes them); and what the time bound reads (_sums),
    its fill and pair without the ZeRO-3 gathers, the straggler waits and the pipeline hop,
    which only add to them (step.chunk_s: what of a gather hides costs its contention, a
    share under 1), so that the bound is below the whole one."""
    cost = lambda k: costs[k][cost_id]  # noqa: E731
    b = step.block_times(st, r["shard_id"], cost)
    L, ends = model.num_layers, b["emb_fwd"] + b["emb_bwd"] + b["head_fwd"] + b["head_bwd"]
    return {**{k: r[k] for k in ("pp", "virtual_stages", "num_microbatches", "sched")}, "cost_id": cost_id,
            **{k: b[k] for k in ("layer", "emb_fwd", "emb_bwd", "head_fwd", "head_bwd")},
            "fill": L * b["layer"] + ends, "pair": L * (cost("l_fwd_pair") + cost("l_bwd_pair")) + ends,
            "sum_w": L * cost("l_bwd_w") + b["emb_bwd_w"] + b["head_bwd_w"]}
