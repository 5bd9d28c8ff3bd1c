"""Vectorised evaluation of the candidate table: the predicted step time and peak memory of
every row, composed as simulate.simulate composes them for one plan, in numpy arithmetic.

The same as simulate(): operators and their costs (simulator/ops.py shapes; the profile's
GEMM, memory-bound and collective curves; cost.py's backward, recompute, TP and CP rules),
the balanced layer partition (partition.py's bisection and trimming, in closed form), the
ZeRO-3 weight gathers, the exposed DP gradient sync, the optimizer step and memory per
stage (memory.py). What differs: the pipeline makespan comes from closed forms instead of
the discrete-event simulation, and the end time of ranks other than the first is estimated
from the drain; tests/test_planner.py measures the difference against simulate().
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hw_profiles.profile import HardwareProfile
from simulator.memory import (ADAM_STEP_BYTES_PER_PARAM, layer_activation_bytes,
                              memory_reserve_bytes, model_state_bytes)
from simulator.model_spec import ModelSpec
from simulator.ops import GEMM, Shard, embedding_ops, head_ops, layer_ops
from simulator.plan import DTYPE_BYTES, RECOMPUTE, SCHEDULES

SHARD_KEYS = ["tp", "sp", "cp", "micro_batch"]
COST_KEYS = SHARD_KEYS + ["recompute", "tp_rpn", "cp_rpn"]
GPIPE, ONE_F_ONE_B, INTERLEAVED, ZB_H1 = (SCHEDULES.index(s)
                                          for s in ("gpipe", "1f1b", "interleaved", "zb-h1"))
NONE, SELECTIVE, FULL = (RECOMPUTE.index(r) for r in ("none", "selective", "full"))


@dataclass(frozen=True)
class Evaluation:
    """Per row of the candidate table."""

    step_time_s: np.ndarray         # NaN where not computed: does not fit, or bounded out of the top
    peak_memory_bytes: np.ndarray   # exact where its lower bound fits, else that bound
    fits: np.ndarray
    memory_limit_bytes: float


def _group(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row -> id of its key (ids in order of first appearance), and each id's first row."""
    ids = pd.factorize(key)[0]
    running = np.maximum.accumulate(ids)
    return ids, np.flatnonzero(np.r_[True, running[1:] > running[:-1]])


def _ids(table: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """_group over the combination of several columns."""
    key = np.zeros(len(table), np.int64)
    for k in keys:
        col = table[k]
        codes = col.cat.codes.to_numpy(np.int64) if isinstance(col.dtype, pd.CategoricalDtype) \
            else pd.factorize(col)[0]
        key = key * (int(codes.max()) + 1) + codes
    return _group(key)


def _block_times(op_lists: list, hw: HardwareProfile, dtype: str) -> tuple[np.ndarray, ...]:
    """Per op list: forward, backward input-gradient, weight-gradient and attention-core
    forward time, as cost._blocks_costs sums them (dX = dY W^T, dW = X^T dY; weightless GEMMs
    take both operand gradients on the input side; memory-bound backward moves 2x bytes)."""
    ops = [op for lst in op_lists for op in lst]
    idx = np.repeat(np.arange(len(op_lists)), [len(lst) for lst in op_lists])
    g = np.array([op.kind == GEMM for op in ops])
    m, n, k, batch, moved = (np.array([getattr(op, f) for op in ops], dtype=float)
                             for f in ("m", "n", "k", "batch", "bytes_moved"))
    weight = np.array([op.weight for op in ops])[g]
    core = np.array([op.attention_core for op in ops])
    fwd, bwd_in, bwd_w = np.zeros(len(ops)), np.zeros(len(ops)), np.zeros(len(ops))
    fwd[g] = hw.gemm_time_s(m[g], n[g], k[g], dtype, batch=batch[g])
    classes = np.array([op.op_class or "" for op in ops])
    for cls in np.unique(classes[~g]):
        mine = ~g & (classes == cls)
        fwd[mine] = hw.memory_bound_time_s(moved[mine], dtype, cls or None)
        bwd_in[mine] = hw.memory_bound_time_s(2.0 * moved[mine], dtype, cls or None)
    dgrad = hw.gemm_time_s(m[g], k[g], n[g], dtype, batch=batch[g])
    other = hw.gemm_time_s(k[g], n[g], m[g], dtype, batch=batch[g])
    bwd_in[g] = np.where(weight, dgrad, dgrad + other)
    bwd_w[g] = np.where(weight, other, 0.0)
    total = lambda x: np.bincount(idx, weights=x, minlength=len(op_lists))  # noqa: E731
    return total(fwd), total(bwd_in), total(bwd_w), total(np.where(core, fwd, 0.0))


def _collective(hw: HardwareProfile, kind: str, message, size, rpn) -> np.ndarray:
    """hw.collective_time_s with per-row group sizes and ranks per node: one call per
    distinct (size, ranks per node), vectorised over that group's rows."""
    message = np.asarray(message, dtype=float)
    rows = message.shape[0]
    key = np.broadcast_to(np.asarray(size, dtype=np.int64) * (1 << 20) + rpn, (rows,))
    out = np.zeros_like(message)
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    for lo, hi in zip(starts, np.r_[starts[1:], rows]):
        idx = order[lo:hi]
        group, ranks = divmod(int(key[idx[0]]), 1 << 20)
        if group > 1:
            out[idx] = hw.collective_time_s(kind, message[idx], group, ranks)
    return out


def shard_times(model: ModelSpec, hw: HardwareProfile, shards: list[Shard], dtype: str) -> dict:
    """Per shard: layer, embedding and head block times (the parts of cost.layer_costs /
    cost.edge_costs that do not depend on recompute or on where the groups are placed)."""
    out = dict(zip(("fwd", "bwd_in", "bwd_w", "core"),
                   _block_times([layer_ops(model, s) for s in shards], hw, dtype)))
    host = np.array([hw.overhead.training_layer_s(s.tp, s.sp) for s in shards], dtype=float)
    out["fwd"], out["bwd_in"] = out["fwd"] + host[:, 0], out["bwd_in"] + host[:, 1]
    for name, ops in (("emb", embedding_ops), ("head", head_ops)):
        f, bi, bw, _ = _block_times([ops(model, s) for s in shards], hw, dtype)
        out.update({f"{name}_fwd": f, f"{name}_bwd": bi + bw, f"{name}_bwd_w": bw})
    return out


def layer_times(model: ModelSpec, hw: HardwareProfile, c: dict, st: dict, flash: bool) -> dict:
    """Per cost combination (arrays c: tp, cp, sp, rc, tp_rpn, cp_rpn, tokens, d; st: the
    shard_times of each): the layer's forward and whole-backward time, BlockCosts.fwd_s and
    .bwd_s of cost.layer_costs (TP: 2 all-reduces or 2 x RS+AG per direction, Shoeybi et al.
    2019 / Korthikanti et al. 2022; CP: ring exchange hidden behind the chunk's attention,
    Liu et al. 2023; recompute: Korthikanti et al. 2022 sec 4.3)."""
    tp, cp, rc, core, fwd = c["tp"], c["cp"], c["rc"], st["core"], st["fwd"]
    msg = c["tokens"] * model.hidden_size * c["d"]
    tp_s = np.where(c["sp"], 2.0 * (_collective(hw, "reduce_scatter", msg, tp, c["tp_rpn"])
                                    + _collective(hw, "all_gather", msg, tp, c["tp_rpn"])),
                    2.0 * _collective(hw, "all_reduce", msg, tp, c["tp_rpn"]))
    kv = 2 * c["tokens"] * (model.num_kv_heads // tp) * model.head_dim * c["d"]
    step = core / cp
    cp_f = (cp - 1) * np.maximum(0.0, _collective(hw, "send_recv", kv, cp, c["cp_rpn"]) - step)
    cp_b = (cp - 1) * np.maximum(0.0, _collective(hw, "send_recv", 2 * kv, cp, c["cp_rpn"]) - 2 * step)
    redo = core * (flash | (rc == SELECTIVE)) + fwd * (rc == FULL)
    return {"fwd": fwd + tp_s + cp_f,
            "bwd": st["bwd_in"] + st["bwd_w"] + redo + tp_s * (1 + (rc == FULL)) + cp_b}


def partition_slots(num_layers: int, p: np.ndarray, v: np.ndarray, layer_s, first_s, last_s):
    """Layers per pipeline rank under partition.balanced_partition, in closed form.

    The bisection's bottleneck is the smallest n*layer_s + e (e in the stages' extras) that
    fits; the excess is then trimmed from the most loaded part, ties to the lowest index, so
    middle stages lose layers in index order. Returns, for 5 slots (rank 0, rank p-1 and the
    middle ranks where the layer count first rises), the rank index, its layers, and the
    layers on ranks before it: every rank's memory and time is bounded by one of these."""
    L, P = num_layers, p * v
    ls = np.maximum(np.asarray(layer_s, dtype=float), 1e-30)
    e0, e1 = np.asarray(first_s, dtype=float), np.asarray(last_s, dtype=float)
    mids = np.maximum(P - 2, 0)

    def cap(budget, extra, lay):
        return np.where(budget >= extra, (np.floor_divide(budget - extra, lay) + 1e-9).astype(np.int64), 0)

    def fits(budget, i=slice(None)):
        c0, c1, cm = cap(budget, e0[i], ls[i]), cap(budget, e1[i], ls[i]), cap(budget, 0.0, ls[i])
        return (np.minimum(c0, c1) >= 1) & (c0 + c1 + mids[i] * cm >= L)

    def smallest_fitting(extra):  # least n with fits(n * ls + extra), or L + 1 if none
        # caps at n*ls + extra are n + floor((extra - e_i) / ls) up to rounding: start there and
        # step each row toward the least fitting n (feasibility grows with n)
        d0, d1, dm = (np.floor((extra - e) / ls) for e in (e0, e1, 0.0))
        need = np.ceil((L - d0 - d1 - mids * dm) / (mids + 2))
        n = np.clip(np.maximum.reduce([need, 1 - d0, 1 - d1]), 1, L).astype(np.int64)
        ok = np.zeros(n.shape, bool)
        todo = np.arange(n.size)
        while todo.size:
            nt, lt, xt = n[todo], ls[todo], extra[todo]
            here = fits(nt * lt + xt, todo)
            below = (nt > 1) & fits((nt - 1) * lt + xt, todo)
            step = np.where(here, -below.astype(np.int64), (nt < L).astype(np.int64))
            n[todo], ok[todo] = nt + step, here
            todo = todo[step != 0]
        return np.where(ok, n, L + 1)

    best = np.full(ls.shape, np.inf)
    for extra in (e0, e1, np.where(P >= 3, 0.0, e0)):
        n = smallest_fitting(extra)
        best = np.where(n <= L, np.minimum(best, n * ls + extra), best)
    best = np.where(np.isfinite(best), best, 0.0)  # only one-part pipelines find none
    c0, c1, cm = cap(best, e0, ls), cap(best, e1, ls), cap(best, 0.0, ls)
    excess = np.where(P >= 2, c0 + c1 + mids * cm - L, 0)
    dec = np.zeros(ls.shape, np.int64)  # middle decrements so far
    safe_mids = np.maximum(mids, 1)
    todo = np.flatnonzero(excess > 0)
    while todo.size:
        c0t, c1t, dt, mt, lt = c0[todo], c1[todo], dec[todo], safe_mids[todo], ls[todo]
        top = cm[todo] - dt // mt
        k0 = np.where(c0t > 1, c0t * lt + e0[todo], -1.0)
        km = np.where((mids[todo] > 0) & (top > 1), top * lt, -1.0)
        k1 = np.where(c1t > 1, c1t * lt + e1[todo], -1.0)
        pick0 = (k0 >= km) & (k0 >= k1)
        pickm = ~pick0 & (km >= k1)
        c0[todo], dec[todo], c1[todo] = c0t - pick0, dt + pickm, c1t - (~pick0 & ~pickm)
        excess[todo] -= 1
        todo = todo[excess[todo] > 0]
    base = np.where(mids > 0, cm - dec // safe_mids, 0)
    r = np.where(mids > 0, dec % safe_mids, 0)  # middle stages 1..r hold base - 1 layers

    def count(s):  # middle virtual stages j <= r on rank s (j = c*p + s)
        return np.where(s == 0, r // p, np.where(r >= s, (r - s) // p + 1, 0))

    def layers(s):
        n = v * base - count(s) + (s == 0) * (c0 - base) + (s == p - 1) * (c1 - base)
        return np.where(p == 1, L, np.where(P == 2, np.where(s == 0, c0, c1), n))

    q = np.maximum(r - 1, 0) // p
    cand = [np.zeros_like(p), p - 1, np.ones_like(p), r - q * p + 1, r + 1]
    slots = [np.where((s >= 1) & (s <= p - 2) | (i < 2), s, 0) for i, s in enumerate(cand)]
    n0 = layers(np.zeros_like(p))
    out = []
    for s in slots:
        before = n0 + (s - 1) * v * base - ((r // p) * (s - 1) + np.minimum(r % p, s - 1))
        out.append((s, layers(s), np.where(s == 0, 0, np.where(s == p - 1, L - layers(s), before))))
    return out


def _fixed_slots(partition: tuple[int, ...], p: np.ndarray):
    """Every rank as a slot, for a layer partition the user gave."""
    width = int(p.max())
    rows = []
    for pi in p:
        ranks = np.bincount(np.arange(len(partition)) % pi, weights=partition, minlength=pi)
        s = np.arange(width) % pi
        rows.append((s, ranks[s], np.concatenate([[0], np.cumsum(ranks)])[s]))
    return [tuple(np.array([r[k][i] for r in rows]).astype(np.int64) for k in range(3))
            for i in range(width)]


def _inflight(schedule, p, v, m, s):
    """Micro-batch chunks whose activations a rank holds at once (simulate's max_in_flight):
    1F1B and ZB-H1 p - s (Narayanan et al. 2021 sec 2.2), GPipe m, interleaved Megatron's
    warm-up 2(p-s-1) + (v-1)p plus one."""
    one_f_one_b = np.minimum(p - s, m)
    return np.where(schedule == GPIPE, m, np.where(
        schedule == INTERLEAVED, np.minimum(2 * (p - s - 1) + (v - 1) * p + 1, m * v), one_f_one_b))


def _basics(table: pd.DataFrame, model: ModelSpec) -> dict:
    """Per row: the knobs as arrays, group ids, and the memory terms that need no timing."""
    a = table.attrs
    d = DTYPE_BYTES[a["dtype"]]
    shard_id, first = _ids(table, SHARD_KEYS)
    shards = [Shard(int(x.micro_batch), a["seq_len"], int(x.tp), int(x.cp), bool(x.sp), d,
                    a["attention"] == "flash") for x in table.iloc[first].itertuples(index=False)]
    r = {k: table[k].to_numpy() for k in ("dp", "tp", "pp", "cp", "zero", "virtual_stages",
                                          "num_microbatches", "tp_rpn", "cp_rpn", "dp_rpn", "pp_rpn")}
    r.update(sp=table["sp"].to_numpy(bool), rc=table["recompute"].cat.codes.to_numpy(np.int64),
             sched=np.where(r["pp"] == 1, ONE_F_ONE_B, table["schedule"].cat.codes.to_numpy()),
             shard_id=shard_id, cost_id=_ids(table, COST_KEYS)[0], shards=shards, d=d,
             dtype=a["dtype"], flash=a["attention"] == "flash", dps=r["dp"] * r["cp"])
    act = np.array([[layer_activation_bytes(model, s, k) for k in RECOMPUTE] for s in shards])
    r["act"], r["act_none"] = act[shard_id, r["rc"]], act[shard_id, NONE]
    r["tokens"] = np.array([s.tokens for s in shards], dtype=float)[shard_id]
    r["per_layer"] = (model.attention_params() + model.mlp_params()) / r["tp"] + 2 * model.norm_params()
    return r


def _add_times(r: dict, model: ModelSpec, hw: HardwareProfile) -> dict:
    """r with the layer / embedding / head times, ZeRO-3 gather, p2p hop and the pipeline
    sums over all layers, computed once per unique shard and cost combination."""
    r = dict(r)
    shard_id, sfirst = _group(r["shard_id"])
    st = shard_times(model, hw, [r["shards"][i] for i in r["shard_id"][sfirst]], r["dtype"])
    cost_id, cfirst = _group(r["cost_id"])
    combo = {k: r[k][cfirst] for k in ("tp", "cp", "sp", "rc", "tp_rpn", "cp_rpn", "tokens")}
    lt = layer_times(model, hw, {**combo, "d": r["d"]}, {k: x[shard_id[cfirst]] for k, x in st.items()},
                     r["flash"])
    for k in ("fwd", "bwd"):
        r[f"l_{k}"] = lt[k][cost_id]
    for k in ("fwd", "bwd_in", "bwd_w"):
        r[f"l_{k}_compute"] = st[k][shard_id]
    for k in ("emb_fwd", "emb_bwd", "emb_bwd_w", "head_fwd", "head_bwd", "head_bwd_w"):
        r[k] = st[k][shard_id]
    tp, p, v, z, d = r["tp"], r["pp"], r["virtual_stages"], r["zero"], r["d"]
    r["layer"] = r["l_fwd"] + r["l_bwd"]
    # ZeRO-3 gathers each layer's weights before its forward and its backward (simulate).
    r["ag"] = np.where(z == 3, _collective(hw, "all_gather", r["per_layer"] * d, r["dps"], r["dp_rpn"]), 0.0)
    # Exposed part of each layer's gather beyond the first; all of it on CPU (gloo) ranks.
    hidden = 1.0 if hw.comm_overlaps_compute else 0.0
    r["xf"] = np.maximum(0.0, r["ag"] - hidden * r["l_fwd_compute"])
    r["xb"] = np.maximum(0.0, r["ag"] - hidden * r["l_bwd_in_compute"])
    p2p_bytes = r["tokens"] * model.hidden_size * d / np.where(r["sp"], tp, 1)
    r["hop"] = np.where(p > 1, _collective(hw, "send_recv", p2p_bytes, 2, r["pp_rpn"]), 0.0)
    L = model.num_layers
    r["sum_f"] = L * (r["l_fwd"] + r["xf"]) + p * v * (r["ag"] - r["xf"]) + r["emb_fwd"] + r["head_fwd"]
    r["sum_b"] = L * (r["l_bwd"] + r["xb"]) + p * v * (r["ag"] - r["xb"]) + r["emb_bwd"] + r["head_bwd"]
    r["sum_w"] = L * r["l_bwd_w_compute"] + r["emb_bwd_w"] + r["head_bwd_w"]
    r["fill"] = r["sum_f"] + r["sum_b"] + 2 * (p - 1) * r["hop"]
    return r


def _take(r: dict, rows: np.ndarray) -> dict:
    return {k: (x[rows] if isinstance(x, np.ndarray) else x) for k, x in r.items()}


def _slots(r: dict, model: ModelSpec, partition):
    """(rank, layers, layers on the ranks before it) per slot, as (rows, slots) arrays."""
    p, v, w = r["pp"], r["virtual_stages"], model.num_layers + 1
    if partition is None:
        part_id, f = _group((r["cost_id"] * w + p) * w + v)
        slots = partition_slots(model.num_layers, p[f], v[f], r["layer"][f],
                                r["emb_fwd"][f] + r["emb_bwd"][f], r["head_fwd"][f] + r["head_bwd"][f])
    else:
        part_id, f = _group(p * w + v)
        slots = _fixed_slots(partition, p[f])
    return tuple(np.stack([sl[k][part_id] for sl in slots], axis=1) for k in range(3))


def _memory(r: dict, model: ModelSpec, s, n, inflight_rank=None):
    """Bytes per slot: weights, gradients and Adam states of rank s's parameters
    (simulate._stage_params, memory.model_state_bytes), activations of the micro-batches in
    flight on it (or on `inflight_rank`), buffers; and the parameters themselves."""
    c = lambda x: x[:, None]  # noqa: E731  (per-row value against per-slot arrays)
    tp, p, v, z, d = r["tp"], r["pp"], r["virtual_stages"], r["zero"], r["d"]
    head_weights = model.norm_params() + np.where(
        ~model.tied_embeddings | (p > 1), model.vocab_size * model.hidden_size / tp, 0.0)
    params = (n * c(r["per_layer"]) + (s == 0) * c(model.embedding_params() / tp)
              + (s == c(p) - 1) * c(head_weights))
    per_param = np.select([z == k for k in range(4)],
                          [sum(model_state_bytes(1.0, r["dtype"], d, k, r["dps"])) for k in range(4)])
    inflight = _inflight(c(r["sched"]), c(p), c(v), c(r["num_microbatches"]),
                         s if inflight_rank is None else inflight_rank)
    buffers = ((s == c(p) - 1) * c(2 * 4 * r["tokens"] * model.vocab_size / tp)
               + c((r["rc"] == FULL) * r["act_none"] + (z == 3) * 2 * r["per_layer"] * d))
    return params * c(per_param) + inflight * n / c(v) * c(r["act"]) + buffers, params


def _memory_bound(r: dict, model: ModelSpec) -> np.ndarray:
    """A lower bound on peak memory without the partition: some rank holds >= ceil(L/p)
    layers, and keeps at least the last rank's in-flight micro-batches."""
    last = r["pp"][:, None] - 1
    most = -(-model.num_layers // r["pp"])[:, None]
    no_edge = np.full_like(most, -1)  # a rank without the embedding or the head
    return _memory(r, model, no_edge, most, inflight_rank=last)[0][:, 0]


def _time_bound(r: dict) -> np.ndarray:
    """A lower bound on the closed-form step time: no rank is faster than the average."""
    p, v, m, sched, fill = r["pp"], r["virtual_stages"], r["num_microbatches"], r["sched"], r["fill"]
    avg = (r["sum_f"] + r["sum_b"]) / p
    return np.select([sched == INTERLEAVED, sched == ZB_H1],
                     [m * avg + (p - 1) * avg / v, (m - 1) * avg + fill - 2 * r["sum_w"]],
                     (m - 1) * avg + fill)


def _step_time(r: dict, model: ModelSpec, hw: HardwareProfile, s, n, before, params) -> np.ndarray:
    """Step time: pipeline makespan by closed form, each slot's end, plus its tail."""
    c = lambda x: x[:, None]  # noqa: E731
    p, v, m, z, tp = r["pp"], r["virtual_stages"], r["num_microbatches"], r["zero"], r["tp"]
    first, last = s == 0, s == c(p) - 1
    ag, xf, xb = r["ag"], r["xf"], r["xb"]
    fwd = n * c(r["l_fwd"] + xf) + c(v * (ag - xf)) + first * c(r["emb_fwd"]) + last * c(r["head_fwd"])
    bwd = n * c(r["l_bwd"] + xb) + c(v * (ag - xb)) + first * c(r["emb_bwd"]) + last * c(r["head_bwd"])
    wgrad = n * c(r["l_bwd_w_compute"]) + first * c(r["emb_bwd_w"]) + last * c(r["head_bwd_w"])
    fill, hop, sched = r["fill"], r["hop"], r["sched"]
    cycle = np.maximum((fwd + bwd).max(axis=1), fill / p)  # slowest rank, or rank 0's round trip
    # 1F1B: fill + (m-1) steady cycles (Narayanan et al. 2021 sec 2.2); GPipe: the forward
    # and backward waves (Huang et al. 2019); interleaved: bubble (p-1)/v of a cycle (ibid.
    # sec 2.2.2); ZB-H1: W passes fill the drain, bubble (p-1)(F+B-W) (Qi et al. 2023 sec 2.1).
    end0 = np.select(
        [sched == GPIPE, sched == INTERLEAVED, sched == ZB_H1],
        [(m - 1) * (fwd.max(axis=1) + bwd.max(axis=1)) + fill,
         m * cycle + (p - 1) * cycle / v + 2 * (p - 1) * hop,
         (m - 1) * cycle + fill - r["sum_w"] + wgrad[:, 0] - (np.minimum(m, p) - 1) * wgrad.min(axis=1)],
        (m - 1) * cycle + fill)
    drained = before * c(r["l_bwd"] + xb) + s * c(v * (ag - xb)) + (s > 0) * c(r["emb_bwd"])
    end = c(end0) - (s > 0) * (drained / c(v) + s * c(hop))
    # Tail: exposed DP gradient sync (bucketed, PyTorch DDP), ZeRO-1/2 weight all-gather,
    # tied-embedding sync, optimizer step (simulate).
    grad_bytes, dps, rpn = params * r["d"], r["dps"], r["dp_rpn"]
    bucket = np.where(c(z == 0), _collective(hw, "all_reduce", grad_bytes / n, dps, rpn),
                      _collective(hw, "reduce_scatter", grad_bytes / n, dps, rpn))
    hidden = 1.0 if hw.comm_overlaps_compute else 0.0  # gloo on CPU ranks hides nothing
    tail = bucket + (n - 1) * np.maximum(0.0, bucket - hidden * c(r["l_bwd"]))
    tail += c(np.isin(z, (1, 2))) * _collective(hw, "all_gather", grad_bytes, dps, rpn)
    if model.tied_embeddings:
        sync = _collective(hw, "all_reduce", model.vocab_size * model.hidden_size / tp * r["d"], 2,
                           r["pp_rpn"])
        tail += (first | last) * c(np.where(p > 1, sync, 0.0))
    opt_params = params / c(np.where(z >= 1, dps, 1))
    tail += hw.memory_bound_time_s(ADAM_STEP_BYTES_PER_PARAM[r["dtype"]] * opt_params, "fp32",
                                   "optimizer")
    return (end + tail).max(axis=1)


def evaluate(table: pd.DataFrame, model: ModelSpec, hw: HardwareProfile,
             keep: int | None = None) -> Evaluation:
    """Memory of every row (exact where a lower bound fits, else the bound) and the step
    time of the fitting rows. With `keep`, step time is computed only where a lower bound on
    it beats the keep-th best so far: the best `keep` rows are those of a full evaluation."""
    limit = hw.memory_bytes - memory_reserve_bytes(float(hw.memory_bytes))
    r = _basics(table, model)
    peak, step = _memory_bound(r, model), np.full(len(table), np.nan)
    maybe = np.flatnonzero(peak <= limit)
    if not maybe.size:
        return Evaluation(step, peak, peak <= limit, limit)
    r = _add_times(_take(r, maybe), model, hw)
    s, n, before = _slots(r, model, table.attrs["layer_partition"])
    mem, params = _memory(r, model, s, n)
    peak[maybe] = mem.max(axis=1)
    fit = np.flatnonzero(peak[maybe] <= limit)  # positions within `maybe`
    time_lb = _time_bound({k: r[k][fit] for k in ("pp", "virtual_stages", "num_microbatches", "sched",
                                                  "fill", "sum_f", "sum_b", "sum_w")})
    order = fit[np.argsort(time_lb, kind="stable")]
    time_lb = np.sort(time_lb, kind="stable")
    todo = np.ones(order.size, bool)
    batch = np.arange(order.size) if keep is None else np.arange(min(order.size, max(8 * keep, 2000)))
    while batch.size:
        at = order[batch]
        step[maybe[at]] = _step_time(_take(r, at), model, hw, s[at], n[at], before[at], params[at])
        todo[batch] = False
        known = step[maybe[order[~todo]]]
        if keep is None or known.size < keep:
            batch = np.flatnonzero(todo)
            continue
        batch = np.flatnonzero(todo & (time_lb < np.partition(known, keep - 1)[keep - 1]))
    return Evaluation(step, peak, peak <= limit, limit)
