"""Cost model: time of each piece of a training or serving step on one device, as pure
functions of the model, the per-device shard and the hardware profile. Every function is
vectorised over numpy arrays: `simulate` and the serving simulator call them for one plan,
the planner for every candidate at once, so a cost term is written here once.

Compute: GEMMs from the profile's fitted shape-dependent efficiency, memory-bound operators
from bytes moved. Backward GEMMs are the input-gradient and weight-gradient GEMMs of each
forward GEMM (2x forward FLOPs, Narayanan et al. 2021 sec 5.1); backward memory-bound ops
move twice the forward bytes (read saved input and incoming gradient, write the gradient).
Communication: Megatron-LM tensor parallelism all-reduces twice per layer in forward and
twice in backward (Shoeybi et al. 2019 Fig. 4); with sequence parallelism each all-reduce
becomes a reduce-scatter + all-gather of the same volume (Korthikanti et al. 2022 sec 4.2.2).
A mixture-of-experts block exchanges its tokens over the expert mesh instead (ep_comm_s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import GEMM, Op, Shard, changed, embedding_ops, head_ops, layer_ops
from meshplan.simulator.plan import RECOMPUTE

NONE, SELECTIVE, FULL, OP, NORM_ACT = (RECOMPUTE.index(r) for r in ("none", "selective", "full", "op", "norm_act"))


def per_rank_profile(hw: HardwareProfile, ranks_per_node: int) -> HardwareProfile:
    """The profile as one rank sees it beside other ranks on a node of CPU cores: slowed by
    its busy neighbours sharing the cache and memory (extra["neighbour_slowdown"], measured
    with every core busy by calibration/measure/machine_load.py; a share of it where fewer
    are), and when more ranks than cores share the node each rank gets cores/ranks of a
    core's compute and memory throughput, and its host overhead stretches by ranks/cores.
    Collectives are CPU work too: a group of n ranks was measured with n ranks on the cores
    (max(1, n/cores) to a core), so its curve stretches by the ratio of the run's sharing to
    that."""
    cores = hw.extra.get("cores_per_node")
    if not cores or ranks_per_node <= 1:
        return hw
    busy = max(min(ranks_per_node, cores) - 1, 0)  # cores may be a fraction (emulated nodes)
    slowdown = 1.0 + (float(hw.extra.get("neighbour_slowdown", 1.0)) - 1.0) * busy / max(cores - 1, 1)
    share = max(1.0, ranks_per_node / cores)
    if share * slowdown == 1.0:
        return hw

    def stretched(table: dict) -> dict:
        return {kind: {n: c.scaled(alpha=share / max(1.0, n / cores), bandwidth=max(1.0, n / cores) / share)
                       for n, c in by_n.items()} for kind, by_n in table.items()}
    slow = share * slowdown
    return replace(hw.scaled(flops=1 / slow, hbm_bw=1 / slow), overhead=hw.overhead.scaled(slow),
                   collectives=replace(hw.collectives, intra=stretched(hw.collectives.intra)))


@dataclass(frozen=True)
class OpTimes:
    """Per op list (one entry each): forward, backward input-gradient and weight-gradient
    time, the attention core's share of the forward, the GEMM FLOPs of the forward, the
    forward and backward time of the GEMMs with a weight (the ones tensor-parallel
    communication can overlap with), and the forward and whole backward time of the ops
    between the MoE dispatch and combine (Op.routed), and the forward time per-op selective
    AC redoes (Op.sac_redo) and recompute norm_act redoes (Op.module_redo), the forward
    time the fused attention kernel's backward runs again (Op.kernel_redo), and the
    attention core's backward beyond that redo."""

    fwd_s: np.ndarray
    bwd_input_s: np.ndarray
    bwd_weight_s: np.ndarray
    core_s: np.ndarray
    fwd_flops: np.ndarray
    weight_fwd_s: np.ndarray
    weight_bwd_s: np.ndarray
    routed_fwd_s: np.ndarray
    routed_bwd_s: np.ndarray
    sac_redo_s: np.ndarray
    module_redo_s: np.ndarray
    kernel_redo_s: np.ndarray
    core_bwd_s: np.ndarray


def compute_dtype(dtype: str) -> str:
    """The dtype a plan's non-FP8 work runs in: an FP8 plan keeps it in bf16 (ops.py)."""
    return "bf16" if dtype == "fp8" else dtype


def forward_s(ops: list[Op], hw: HardwareProfile, dtype: str) -> np.ndarray:
    """Forward time of each op: GEMMs from the fitted efficiency, memory-bound ops at their
    class's bandwidth."""
    return _op_arrays(ops, hw, dtype)[0]


def _op_arrays(ops: list[Op], hw: HardwareProfile, dtype: str):
    """Per op: forward, backward input-gradient and weight-gradient time. dX = dY W^T,
    dW = X^T dY; GEMMs without a weight (attention) take both operand gradients on the
    input side; memory-bound backward moves 2x bytes (or op.bwd_bytes). FP8 GEMMs (op.fp8)
    run all three GEMMs in FP8, the rest in compute_dtype. The matmuls of a fused attention
    kernel (op.causal) run the causal share its tiles compute and take the profile's
    FusedAttention scales of that price plus the kernel's fixed cost. An op runs op.count
    times."""
    fields = np.array([(op.kind == GEMM, op.m, op.n, op.k, op.batch, op.bytes_moved, op.count,
                        2.0 * op.bytes_moved if op.bwd_bytes is None else op.bwd_bytes, op.weight, op.fp8,
                        np.nan if op.weight_bytes is None else op.weight_bytes,
                        1.0 if op.causal is None else hw.attention.causal_share(*op.causal))
                       for op in ops], dtype=float).reshape(len(ops), 12)
    g = fields[:, 0].astype(bool)
    m, n, k, batch, moved, count, bwd_moved = np.ascontiguousarray(fields[:, 1:8].T)
    weight, f8 = fields[g, 8].astype(bool), fields[g, 9].astype(bool)
    wb = fields[g, 10]
    base = compute_dtype(dtype)

    def gemm_s(m_, n_, k_):
        t = hw.gemm_time_s(m_, n_, k_, base, batch=batch[g])
        return np.where(f8, hw.gemm_time_s(m_, n_, k_, "fp8", batch=batch[g]), t) if f8.any() else t
    fwd, bwd_in, bwd_w = np.zeros(len(ops)), np.zeros(len(ops)), np.zeros(len(ops))
    fwd[g] = gemm_s(m[g], n[g], k[g])
    quantized = ~np.isnan(wb)
    if quantized.any():  # weight-only quantized serving GEMMs: narrower weights, dequantized in the kernel
        fwd[g] = np.where(quantized, hw.gemm_time_s(m[g], n[g], k[g], base, batch=batch[g],
                                                    weight_bytes=np.where(quantized, wb, 1.0),
                                                    dequant_flops=np.array([op.dequant_flops for op in ops])[g]),
                          fwd[g])
    classes = np.array([op.op_class or "" for op in ops])
    for cls in np.unique(classes[~g]):
        mine = ~g & (classes == cls)
        fwd[mine] = hw.memory_bound_time_s(moved[mine], base, cls or None)
        bwd_in[mine] = hw.memory_bound_time_s(bwd_moved[mine], base, cls or None)
    dgrad = gemm_s(m[g], k[g], n[g])
    other = gemm_s(k[g], n[g], m[g])
    bwd_in[g] = np.where(weight, dgrad, dgrad + other)
    bwd_w[g] = np.where(weight, other, 0.0)
    share = fields[:, 11]
    fwd, bwd_in, bwd_w = fwd * share, bwd_in * share, bwd_w * share
    fused = np.array([op.causal is not None for op in ops], dtype=bool)
    if fused.any():  # the kernel's fixed cost split between the two matmuls it fuses
        att = hw.attention
        fwd[fused] = fwd[fused] * att.forward_scale + att.forward_latency_s / 2
        bwd_in[fused] = bwd_in[fused] * att.backward_scale + att.backward_latency_s / 2
    return fwd * count, bwd_in * count, bwd_w * count, g


def op_times(op_lists: list[tuple[Op, ...]], hw: HardwareProfile, dtype: str) -> OpTimes:
    """Sums over each op list (_op_arrays per op)."""
    ops = [op for lst in op_lists for op in lst]
    idx = np.repeat(np.arange(len(op_lists)), [len(lst) for lst in op_lists])
    fwd, bwd_in, bwd_w, g = _op_arrays(ops, hw, dtype)
    core = np.array([op.attention_core for op in ops], dtype=bool)
    flops = np.array([op.flops * op.count for op in ops], dtype=float)
    weighted = g & np.array([op.weight for op in ops], dtype=bool)
    routed = np.array([op.routed for op in ops], dtype=bool)
    sac = np.array([op.sac_redo for op in ops], dtype=float)
    module = np.array([op.module_redo for op in ops], dtype=bool)
    kernel = np.array([op.kernel_redo for op in ops], dtype=bool)

    def total(x):
        return np.bincount(idx, weights=x, minlength=len(op_lists))
    return OpTimes(total(fwd), total(bwd_in), total(bwd_w), total(np.where(core, fwd, 0.0)),
                   total(np.where(g, flops, 0.0)), total(np.where(weighted, fwd, 0.0)),
                   total(np.where(weighted, bwd_in + bwd_w, 0.0)), total(np.where(routed, fwd, 0.0)),
                   total(np.where(routed, bwd_in + bwd_w, 0.0)), total(fwd * sac),
                   total(np.where(module, fwd, 0.0)), total(np.where(kernel, fwd, 0.0)),
                   total(np.where(core, bwd_in + bwd_w, 0.0)))


def collective_s(hw: HardwareProfile, kind: str, message_bytes, size, ranks_per_node,
                 link_share=1.0) -> np.ndarray:
    """hw.collective_time_s over arrays of messages, group sizes, ranks per node and link
    shares (broadcast together): one profile call per distinct (size, ranks per node, share)."""
    message, size, rpn, share = np.broadcast_arrays(np.asarray(message_bytes, dtype=float),
                                                    np.asarray(size, dtype=np.int64),
                                                    np.asarray(ranks_per_node, dtype=np.int64),
                                                    np.asarray(link_share, dtype=float))
    out = np.zeros(message.shape)
    if out.size == 0:
        return out
    if (size == size.flat[0]).all() and (rpn == rpn.flat[0]).all() and (share == share.flat[0]).all():
        # one group shape (a simulated plan's, or a column of one): no grouping to do
        if size.flat[0] > 1:
            out.reshape(-1)[:] = hw.collective_time_s(kind, message.reshape(-1), int(size.flat[0]),
                                                      int(rpn.flat[0]), float(share.flat[0]))
        return out
    share_ids, shares = pd.factorize(share.ravel())
    key = ((size * (1 << 20) + rpn).ravel()) * len(shares) + share_ids
    ids, groups = pd.factorize(key)
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(len(groups) + 1))
    flat_out, flat_message = out.reshape(-1), message.reshape(-1)
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        placed, s = divmod(int(groups[g]), len(shares))
        group, ranks = divmod(placed, 1 << 20)
        if group > 1:
            rows = order[lo:hi]
            flat_out[rows] = hw.collective_time_s(kind, flat_message[rows], group, ranks, float(shares[s]))
    return out


def tp_comm_s(model: ModelSpec, tokens, sp, dtype_bytes, hw: HardwareProfile, tp, tp_rpn,
              tp_share=1.0) -> np.ndarray:
    """One direction (forward or backward) of a layer's TP communication: 2 all-reduces of
    the [tokens, hidden] activation, or 2 x (reduce-scatter + all-gather) with SP."""
    message = np.asarray(tokens, dtype=float) * model.hidden_size * dtype_bytes
    with_sp = 2.0 * (collective_s(hw, "reduce_scatter", message, tp, tp_rpn, tp_share)
                     + collective_s(hw, "all_gather", message, tp, tp_rpn, tp_share))
    return np.where(sp, with_sp, 2.0 * collective_s(hw, "all_reduce", message, tp, tp_rpn, tp_share))


def tp_edge_comm_s(model: ModelSpec, tokens, sp, dtype_bytes, hw: HardwareProfile, tp, tp_rpn,
                   tp_share=1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TP communication of a micro-batch outside the layers: (embedding forward, embedding
    backward, head forward, head backward). The vocab-parallel embedding all-reduces its
    [tokens, hidden] output (with SP reduce-scatters it, and its backward all-gathers the
    gradient); the column-parallel head's backward all-reduces its input's gradient (with SP
    its forward all-gathers the input, its backward reduce-scatters the gradient); the
    vocab-parallel cross-entropy all-reduces three fp32 values per token, the max logit, the
    sum of exponentials and the target's logit (Megatron-LM tensor_parallel/cross_entropy.py;
    torch.distributed.tensor.parallel.loss_parallel)."""
    message = np.asarray(tokens, dtype=float) * model.hidden_size * dtype_bytes
    ar = collective_s(hw, "all_reduce", message, tp, tp_rpn, tp_share)
    rs = collective_s(hw, "reduce_scatter", message, tp, tp_rpn, tp_share)
    ag = collective_s(hw, "all_gather", message, tp, tp_rpn, tp_share)
    loss = 3.0 * collective_s(hw, "all_reduce", np.asarray(tokens, dtype=float) * 4, tp, tp_rpn, tp_share)
    return np.where(sp, rs, ar), np.where(sp, ag, 0.0), np.where(sp, ag, 0.0) + loss, np.where(sp, rs, ar)


def groups_hit(model: ModelSpec, groups, routing: str = "learned") -> np.ndarray:
    """Expected number of `groups` (ranks, nodes: G of them, each holding E/G consecutive
    experts) a token's k distinct experts sit on (plan.MOE_ROUTINGS).
    learned: each is missed with probability C(E - E/G, k) / C(E, k) (hypergeometric: k
    experts drawn from E, none of the E/G). Under group-limited routing (model.route_groups
    R, each of E/R consecutive experts, the token's k drawn from its best route_group_topk t
    of them, taken as any t alike: T = t E/R experts) a placement group holding R/G routing
    groups (G divides R) is missed with C(T - j E/R, k) / C(T, k) when j of its groups were
    chosen (hypergeometric over the groups); where R divides G only the t G/R placement
    groups inside the chosen routing groups can be hit, each missed with C(T - E/G, k) /
    C(T, k); a placement that cuts across the routing groups is taken as unlimited.
    contiguous: token t takes experts k t .. k t + k - 1 (mod E), whatever the routing
    groups: the mean over the E / gcd(k, E) starts it cycles through of the groups those k
    experts span."""
    e, k, r, t = model.num_experts, model.experts_per_token, model.route_groups, model.route_group_topk
    groups = np.asarray(groups, dtype=float)
    sizes, at = np.unique(groups, return_inverse=True)
    hit = np.array([_contiguous_groups_hit(e, k, g) if routing == "contiguous" else _groups_hit(e, k, r, t, g)
                    for g in sizes])
    return hit[at].reshape(groups.shape)


def _contiguous_groups_hit(e: int, k: int, g: float) -> float:
    if g <= 1:
        return float(g)
    starts = k * np.arange(e // math.gcd(k, e))
    experts = (starts[:, None] + np.arange(k)) % e
    spanned = np.floor(experts * g / e)
    return float(np.mean([len(np.unique(row)) for row in spanned]))


def _none_of(drawn: int, pool: float, avoided: float) -> float:
    """Probability that `drawn` distinct items taken from `pool` avoid `avoided` of them:
    C(pool - avoided, drawn) / C(pool, drawn)."""
    return float(np.prod([max(pool - avoided - i, 0.0) / (pool - i) for i in range(drawn)]))


def _groups_hit(e: int, k: int, r: int, t: int, g: float) -> float:
    if g <= 1:
        return float(g)
    if not r or (r % g and g % r):
        return g * (1.0 - _none_of(k, e, e / g))
    pool = t * e / r
    if r % g == 0:  # each placement group holds r / g routing groups, j of them chosen
        per = int(r // g)
        miss = sum(math.comb(per, j) * math.comb(r - per, t - j) / math.comb(r, t) * _none_of(k, pool, j * e / r)
                   for j in range(min(per, t) + 1))
        return g * (1.0 - miss)
    return t * g / r * (1.0 - _none_of(k, pool, e / g))


def ep_comm_s(model: ModelSpec, in_tokens, dtype_bytes, capacity, hw: HardwareProfile, ep, ep_rpn,
              etp, etp_rpn, dispatcher: str = "alltoall", routing: str = "learned") -> np.ndarray:
    """One direction (forward or backward) of an MoE block's token exchange: each rank's
    routed rows (experts_per_token per token of its `in_tokens`, x the capacity factor on the
    busiest rank) dispatched and combined over EP (Lepikhin et al. 2021, GShard sec 2.2), and
    with expert TP the rows received gathered over ETP before the experts and
    reduce-scattered after; at ep 1 the tokens themselves are gathered (Megatron-Core's
    all-gather dispatcher). "alltoall": an NCCL all-to-all of every row (Megatron-Core's
    alltoall dispatcher). "deepep": each token goes once to each rank its experts sit on
    (DeepEP's dispatch layout, is_token_in_rank [tokens, ranks]; the rank expands it to its
    local experts), and across nodes once to each other node, then on over NVLink (DeepEP
    README, "normal kernels": NVLink-to-RDMA forwarding; DeepSeek-V3 report sec 3.2.2): the
    NICs carry the remote nodes' rows per token, NVLink the ranks', as many of each as the
    `routing` (plan.MOE_ROUTINGS) spreads a token's experts over (groups_hit)."""
    row_bytes = model.hidden_size * dtype_bytes
    ep, ep_rpn = np.asarray(ep), np.asarray(ep_rpn)
    tokens = np.asarray(in_tokens, dtype=float) * capacity
    rows = tokens * model.experts_per_token
    a2a = collective_s(hw, "all_to_all", rows * row_bytes, ep, ep_rpn)
    if dispatcher == "deepep":
        across = ep_rpn < ep
        nodes = np.where(across, ep / ep_rpn, 2)
        per_rank = tokens * groups_hit(model, ep, routing) * row_bytes
        # an all-to-all over EP whose NIC share is the rows to other nodes, one per node (the
        # hierarchical all-to-all sends (n - r) / n of a rank's buffer off the node), beside
        # NVLink's
        remote = groups_hit(model, nodes, routing) * (nodes - 1) / nodes
        nic = tokens * remote * row_bytes * ep / np.where(across, ep - ep_rpn, 1)
        a2a = np.where(across, np.maximum(collective_s(hw, "all_to_all", nic, ep, ep_rpn),
                                          collective_s(hw, "all_to_all", per_rank, ep_rpn, ep_rpn)),
                       collective_s(hw, "all_to_all", per_rank, ep, ep_rpn))
    gathered = np.where(ep > 1, rows, in_tokens) * etp * row_bytes
    return 2.0 * a2a + (collective_s(hw, "all_gather", gathered, etp, etp_rpn)
                        + collective_s(hw, "reduce_scatter", gathered, etp, etp_rpn))


def ep_counts_s(model: ModelSpec, hw: HardwareProfile, ep, ep_rpn) -> np.ndarray:
    """Before an MoE block's forward dispatch the EP ranks learn how many rows each sends to
    each expert (one int64 per expert), to size the buffers they receive into: a small
    all-to-all, latency-bound (Megatron-Core's alltoall dispatcher gathers these counts over
    the EP group before its all-to-all; the executor's expert_parallel). Backward reuses them."""
    return np.where(np.asarray(ep) > 1,
                    collective_s(hw, "all_to_all", model.num_experts * 8, ep, ep_rpn), 0.0)


@dataclass(frozen=True)
class CPExchange:
    """A layer's context-parallel exchange (cp_comm_s), by the attention it runs beside: the
    local (first) block's, the later blocks', or none (alone: exposed)."""

    fwd_first_s: np.ndarray
    fwd_rest_s: np.ndarray
    fwd_alone_s: np.ndarray
    bwd_first_s: np.ndarray
    bwd_rest_s: np.ndarray
    bwd_alone_s: np.ndarray

    @property
    def fwd_s(self) -> np.ndarray:
        return self.fwd_first_s + self.fwd_rest_s + self.fwd_alone_s

    @property
    def bwd_s(self) -> np.ndarray:
        return self.bwd_first_s + self.bwd_rest_s + self.bwd_alone_s


def cp_comm_s(model: ModelSpec, tokens, tp, dtype_bytes, hw: HardwareProfile, cp, cp_rpn,
              cp_share=1.0, method="p2p", kv_repeat=False, eager=False) -> CPExchange:
    """One layer's context-parallel exchange (plan.CP_COMMS `method`), whole. p2p (Liu et al.
    2023 sec 3): cp-1 steps each pass the local K,V chunk on beside a later block, in
    backward with their gradients in one buffer of their dtype. alltoall: the same forward;
    allgather: the chunks gathered at once beside the local block. In backward torch passes
    the K,V again as in forward, and their gradients in fp32 after each of the cp blocks,
    each beside the next but the last; so does an `eager` p2p ring of fused kernels
    (plan.elementwise eager: the executor's _FlashRing), by send and receive. a2a
    (DeepSpeed-Ulysses, Jacobs et al. 2023 sec 3; Transformer Engine's
    AttnFuncWithCPAndQKVOA2A): Q,K,V all-to-all'ed from sequence to head shards before the
    kernel and the output back after it, in backward the output and its gradient in and the
    Q,K,V gradients back, nothing beside them. K,V of the kv heads, or of the query heads
    where they are repeated before the kernel (`kv_repeat`)."""
    heads = (model.num_heads if kv_repeat else model.num_kv_heads) // tp
    kv_bytes = 2 * np.asarray(tokens, dtype=float) * heads * model.head_dim * dtype_bytes
    none = np.zeros(np.broadcast(kv_bytes, cp, cp_rpn, cp_share).shape)
    if method == "p2p" and not eager:
        hop = collective_s(hw, "send_recv", kv_bytes, cp, cp_rpn, cp_share)
        both = collective_s(hw, "send_recv", 2 * kv_bytes, cp, cp_rpn, cp_share)
        return CPExchange(none, (cp - 1) * hop, none, none, (cp - 1) * both, none)
    if method == "a2a":
        per_head = np.asarray(tokens, dtype=float) * (model.num_heads // tp) * dtype_bytes
        q_bytes, out_bytes = per_head * model.head_dim, per_head * model.value_head_dim
        qkv = collective_s(hw, "all_to_all", q_bytes + kv_bytes, cp, cp_rpn, cp_share)
        out = collective_s(hw, "all_to_all", out_bytes, cp, cp_rpn, cp_share)
        outs = collective_s(hw, "all_to_all", 2 * out_bytes, cp, cp_rpn, cp_share)
        return CPExchange(none, none, qkv + out, none, none, outs + qkv)
    grads = collective_s(hw, "send_recv", kv_bytes * 4 / dtype_bytes, cp, cp_rpn, cp_share)
    if method in ("alltoall", "p2p"):
        hop = collective_s(hw, "send_recv", kv_bytes, cp, cp_rpn, cp_share)
        return CPExchange(none, (cp - 1) * hop, none, none, (cp - 1) * (hop + grads), grads)
    gather = collective_s(hw, "all_gather", cp * kv_bytes, cp, cp_rpn, cp_share)
    return CPExchange(gather, none, none, gather, (cp - 1) * grads, grads)


def overlap_split(comm_s, compute_s, hw: HardwareProfile, min_exposed_s=0.0):
    """(exposed communication, compute slowdown) of communication `comm_s` overlapped with
    compute `compute_s` on the same device: what the compute cannot hide is exposed (never
    less than `min_exposed_s`), and while the two run at once the compute slows by the
    profile's contention (HardwareProfile.contention); without overlap (gloo on CPU ranks)
    all of it is exposed."""
    comm = np.asarray(comm_s, dtype=float)
    if not hw.comm_overlaps_compute:
        return comm, np.zeros_like(comm)
    exposed = np.maximum(np.maximum(comm - compute_s, min_exposed_s), 0.0)
    exposed = np.minimum(exposed, comm)
    return exposed, hw.contention.compute_slowdown * (comm - exposed)


@dataclass(frozen=True)
class ShardTimes:
    """Per shard: one layer's op times (host overhead of the eager executor included, the
    profile's FrameworkOverhead), the embedding's and the head's, and what splitting the
    layer's weight GEMMs into tp pieces costs on top (forward, backward): the decomposition
    that overlaps TP communication with them (Wang et al. 2023, ASPLOS, "Overlap
    communication with dependent computation via decomposition")."""

    layer: OpTimes
    embedding: OpTimes
    head: OpTimes
    split_fwd_s: np.ndarray
    split_bwd_s: np.ndarray

    def take(self, index) -> ShardTimes:
        def pick(t: OpTimes) -> OpTimes:
            return OpTimes(*(getattr(t, f)[index] for f in OpTimes.__dataclass_fields__))
        return ShardTimes(pick(self.layer), pick(self.embedding), pick(self.head),
                          self.split_fwd_s[index], self.split_bwd_s[index])


def shard_times(model: ModelSpec, hw: HardwareProfile, shards: list[Shard], dtype: str,
                op_lists: list[tuple[Op, ...]] | None = None) -> ShardTimes:
    """Times of each shard's layer, embedding and head (op_lists: each shard's ops.layer_ops
    where the caller has them)."""
    op_lists = [layer_ops(model, s) for s in shards] if op_lists is None else op_lists
    layer = op_times(op_lists, hw, dtype)
    moe = moe_layer_share(model)
    host = np.array([hw.overhead.training_layer_s(s.tp, s.sp, moe, s.ep, s.cp > 1 and s.cp_comm == "a2a")
                     for s in shards],
                    dtype=float).reshape(-1, 2)
    # per-op recompute re-runs the layer's forward, the kept ops answered from the cache:
    # the host work is the whole forward's
    layer = replace(layer, fwd_s=layer.fwd_s + host[:, 0], bwd_input_s=layer.bwd_input_s + host[:, 1],
                    sac_redo_s=layer.sac_redo_s + host[:, 0])
    split = [tuple(changed(op, m=max(op.m // s.tp, 1), flops=op.flops / s.tp)
                   for op in ops if op.kind == GEMM and op.weight) for ops, s in zip(op_lists, shards)]
    pieces = op_times(split, hw, dtype)
    tps = np.array([s.tp for s in shards], dtype=float)
    # the host work of TP's vocab-parallel embedding, head and loss, measured together: on the head
    edge = np.array([hw.overhead.training_edge_s(s.tp, s.sp) for s in shards], dtype=float).reshape(-1, 2)
    head = op_times([head_ops(model, s) for s in shards], hw, dtype)
    head = replace(head, fwd_s=head.fwd_s + edge[:, 0], bwd_input_s=head.bwd_input_s + edge[:, 1])
    return ShardTimes(layer, op_times([embedding_ops(model, s) for s in shards], hw, dtype), head,
                      np.maximum(tps * pieces.fwd_s - layer.weight_fwd_s, 0.0),
                      np.maximum(tps * (pieces.bwd_input_s + pieces.bwd_weight_s) - layer.weight_bwd_s, 0.0))


@dataclass(frozen=True)
class LayerTimes:
    """One decoder layer for one micro-batch on one device (arrays over plans), seconds."""

    fwd_compute_s: np.ndarray
    bwd_input_s: np.ndarray     # input-gradient GEMMs + backward of memory-bound ops
    bwd_weight_s: np.ndarray    # weight-gradient GEMMs (the W of zero-bubble schedules)
    recompute_s: np.ndarray     # forward work redone in backward under the recompute setting
    tp_fwd_s: np.ndarray        # exposed TP communication
    tp_bwd_s: np.ndarray        # includes recomputed forward communication (full recompute)
    cp_fwd_s: np.ndarray        # exposed ring-attention exchange
    cp_bwd_s: np.ndarray
    contention_fwd_s: np.ndarray  # compute slowed by overlapped TP / CP communication
    contention_bwd_s: np.ndarray
    tp_raw_s: np.ndarray        # TP communication of forward and backward, whole
    cp_raw_fwd_s: np.ndarray    # the ring exchange, whole
    cp_raw_bwd_s: np.ndarray
    ep_fwd_s: np.ndarray        # MoE dispatch and combine, counts first (exposed: nothing in the
    ep_bwd_s: np.ndarray        # same micro-batch overlaps it); backward: includes the recomputed
    # forward's (full recompute). Paired (all-to-all overlap): what of them the other
    # micro-batch's compute leaves exposed, and the compute slowdown of the hidden part
    ep_pair_fwd_s: np.ndarray
    ep_pair_bwd_s: np.ndarray
    contention_pair_fwd_s: np.ndarray
    contention_pair_bwd_s: np.ndarray
    host_gap_fwd_s: np.ndarray  # the GPU waiting for the host in the MoE block (moe_host_gap_s)
    host_gap_bwd_s: np.ndarray  # ... in the forward that full recompute redoes

    @property
    def fwd_s(self) -> np.ndarray:
        return (self.fwd_compute_s + self.tp_fwd_s + self.cp_fwd_s + self.ep_fwd_s + self.contention_fwd_s
                + self.host_gap_fwd_s)

    @property
    def bwd_s(self) -> np.ndarray:
        """Whole backward: input and weight gradients, recompute, communication."""
        return (self.bwd_input_s + self.bwd_weight_s + self.recompute_s + self.tp_bwd_s
                + self.cp_bwd_s + self.ep_bwd_s + self.contention_bwd_s + self.host_gap_bwd_s)

    @property
    def fwd_pair_s(self) -> np.ndarray:
        """A forward run beside another micro-batch's backward (all-to-all overlap)."""
        return self.fwd_s - self.ep_fwd_s + self.ep_pair_fwd_s + self.contention_pair_fwd_s

    @property
    def bwd_pair_s(self) -> np.ndarray:
        """A backward run beside another micro-batch's forward (all-to-all overlap)."""
        return self.bwd_s - self.ep_bwd_s + self.ep_pair_bwd_s + self.contention_pair_bwd_s


@dataclass(frozen=True)
class ExpertMesh:
    """Per plan (arrays): the expert mesh's degrees and link levels (ranks per node), the
    capacity factor, the tokens a device feeds its MoE blocks (ops.Shard.norm_tokens) and
    the token dispatcher and routing (plan.MOE_DISPATCHERS, plan.MOE_ROUTINGS)."""

    ep: np.ndarray
    etp: np.ndarray
    ep_rpn: np.ndarray
    etp_rpn: np.ndarray
    capacity: float
    in_tokens: np.ndarray
    dispatcher: str = "alltoall"
    routing: str = "learned"


def moe_layer_share(model: ModelSpec) -> float:
    return sum(n for kind, n in model.layer_kinds() if kind.moe) / model.num_layers


def tp_overlapped(tp_overlap, tp):
    """Whether a plan's TP collectives overlap its GEMMs: asked for, and TP to overlap."""
    return np.asarray(tp_overlap, dtype=bool) & (np.asarray(tp) > 1)


def layer_times(model: ModelSpec, hw: HardwareProfile, st: ShardTimes, tokens, dtype_bytes, tp,
                sp, cp, recompute, tp_rpn, cp_rpn, flash: bool, tp_overlap,
                em: ExpertMesh | None = None, tp_share=1.0, cp_share=1.0, a2a_overlap=False,
                tp_overlap_bwd=True, cp_comm="p2p", kv_repeat=False, eager=False) -> LayerTimes:
    """Per plan (arrays; st indexed alike): the layer's times under its recompute setting,
    the placement of its TP and CP groups (ranks per node, link share) and TP overlap.

    Fused attention recomputes its scores (Q K^T) in backward (Dao 2022 sec 3.1;
    Op.kernel_redo): compute, not recompute. Selective recompute redoes the attention core
    where it was kept (Korthikanti et al. 2022 sec 4.3; nothing to redo under fused
    attention); full recompute redoes the
    whole forward, its TP and CP communication too; per-op selective AC (torchtitan) redoes what
    ops.op_sac marks, and the TP collectives whose outputs it does not save. TP overlap
    (Megatron-LM --tp-comm-overlap, torchtitan async TP) splits each TP collective and its weight GEMMs into tp pieces run
    as a pipeline: one piece of the communication stays exposed, the rest hides behind the
    GEMMs at the cost of the smaller GEMMs and the contention; in backward too only with
    `tp_overlap_bwd` (Plan.tp_overlap_scope "both"; torchtitan's async TP overlaps the
    forward's). CP's exchange (`cp_comm`, cp_comm_s) hides behind the attention blocks it
    runs beside, in backward behind the core's backward with the scores the fused kernel
    redoes (five matmuls against the forward's two, Op.kernel_redo); torch's last pass of
    the K,V gradients, after the last block, and the a2a exchange stay exposed. In the MoE layers (with SP, or
    without TP) the experts' half of the TP communication becomes the expert mesh's exchange
    (ep_comm_s), except that shared experts run as a TP MLP and keep theirs; nothing in its
    own micro-batch overlaps the exchange. `eager` (plan.elementwise eager) with a fused
    kernel: the executor's ring, priced as torch's (cp_comm_s).
    With `a2a_overlap` (Megatron-Core --overlap-moe-expert-parallel-comm, ep > 1)
    a forward F and another micro-batch's backward B run layer by layer on a communication
    and a compute stream in four phases (combined 1F1B, Megatron-Core
    model_chunk_schedule_plan.py TransformerLayerSchedulePlan.run; DeepSeek-V3 report sec
    3.2.1): B's combine beside F's attention, F's dispatch beside B's routed experts, B's
    dispatch beside F's routed experts, F's combine beside B's attention, each phase as long
    as the longer of the two; the exchange's halves are its dispatch (with the counts) and
    its combine. The `pair` terms are what each direction's exchange leaves exposed, and
    the compute it slows (overlap_split). `em` defaults to ep 1 and etp = tp."""
    lay = st.layer
    if em is None:
        em = ExpertMesh(1, tp, 1, tp_rpn, 1.0, np.where(sp, np.asarray(tokens) // tp, tokens))
    exchanges = moe_layer_share(model) * (np.asarray(sp) | (np.asarray(tp) == 1))
    tp_raw = tp_comm_s(model, tokens, sp, dtype_bytes, hw, tp, tp_rpn, tp_share) * (
        1.0 - exchanges * (0.0 if model.num_shared_experts else 0.5))
    ep_raw = exchanges * (ep_comm_s(model, em.in_tokens, dtype_bytes, em.capacity, hw, em.ep, em.ep_rpn,
                                    em.etp, em.etp_rpn, em.dispatcher, em.routing) if model.num_experts else 0.0)
    counts = exchanges * (ep_counts_s(model, hw, em.ep, em.ep_rpn) if model.num_experts else 0.0)
    # the GPU's wait for the host in an MoE block's forward: exposed, nothing runs beside it
    gap = moe_layer_share(model) * hw.overhead.moe_host_gap_s
    overlap = tp_overlapped(tp_overlap, tp)
    tp_f, tp_cf = overlap_split(tp_raw, np.where(overlap, lay.weight_fwd_s, 0.0), hw, tp_raw / tp)
    overlap_b = overlap & bool(tp_overlap_bwd)
    tp_b, tp_cb = overlap_split(tp_raw, np.where(overlap_b, lay.weight_bwd_s, 0.0), hw, tp_raw / tp)
    split_f, split_b = np.where(overlap, st.split_fwd_s, 0.0), np.where(overlap_b, st.split_bwd_s, 0.0)
    cx = cp_comm_s(model, tokens, tp, dtype_bytes, hw, cp, cp_rpn, cp_share, cp_comm, kv_repeat,
                   eager and flash)
    cp_raw_f, cp_raw_b = cx.fwd_s, cx.bwd_s
    flash_redo = lay.kernel_redo_s if flash else 0.0
    core_b = lay.core_bwd_s + flash_redo
    cp_f, cp_cf = (a + b for a, b in zip(overlap_split(cx.fwd_first_s, lay.core_s / cp, hw),
                                         overlap_split(cx.fwd_rest_s, (cp - 1) * lay.core_s / cp, hw)))
    cp_b, cp_cb = (a + b for a, b in zip(overlap_split(cx.bwd_first_s, core_b / cp, hw),
                                         overlap_split(cx.bwd_rest_s, (cp - 1) * core_b / cp, hw)))
    cp_f, cp_b = cp_f + cx.fwd_alone_s, cp_b + cx.bwd_alone_s
    selective, full, op, norm_act = (recompute == r for r in (SELECTIVE, FULL, OP, NORM_ACT))
    # selective redoes the attention core, a fused kernel's forward too: Megatron-Core
    # checkpoints core attention whatever its backend (attention.py, checkpoint_core_attention)
    ov = hw.overhead
    redo = (lay.core_s * selective + (lay.fwd_s + tp_cf + cp_cf + split_f) * full
            + lay.sac_redo_s * op + lay.module_redo_s * norm_act
            # the checkpoint's own host work (FrameworkOverhead.*_recompute_layer_s; zero on a GPU)
            + np.select([selective, full, op, norm_act],
                        [ov.selective_recompute_layer_s, ov.full_recompute_layer_s, ov.op_recompute_layer_s,
                         ov.norm_act_recompute_layer_s], 0.0))
    # per-op selective AC saves reduce-scatter outputs, so it redoes SP's all-gathers (half
    # the layer's TP communication) or, without SP, the all-reduces
    tp_redo = full + op * np.where(sp, 0.5, 1.0)
    # norm_act under SP rebuilds the norms' gathered outputs: their all-gathers (half the
    # layer's TP communication) run again in backward beside the input-gradient GEMMs, as
    # Megatron-LM's column-parallel linears gather their input again under SP, overlapped
    # with that GEMM (LinearWithGradAccumulationAndAsyncCommunication); exposed where
    # collectives overlap nothing (gloo: the executor's rebuild, model.Block._normed)
    regather = tp_raw * 0.5 * (norm_act & np.asarray(sp, dtype=bool))
    rg_b, rg_cb = overlap_split(regather, lay.bwd_input_s, hw)
    fwd_compute, bwd_input = lay.fwd_s + split_f, lay.bwd_input_s + flash_redo + split_b
    ep_f, ep_b = ep_raw + counts, ep_raw + (ep_raw + counts) * full
    paired = np.asarray(a2a_overlap, dtype=bool) & (np.asarray(em.ep) > 1)
    # the compute of the other direction beside each half (none where nothing is paired)
    routed_f, routed_b = np.where(paired, lay.routed_fwd_s, 0.0), np.where(paired, lay.routed_bwd_s, 0.0)
    rest_f = np.where(paired, fwd_compute, 0.0) - routed_f
    rest_b = np.where(paired, bwd_input + lay.bwd_weight_s + redo, 0.0) - routed_b
    dispatch_f, dispatch_b, combine = ep_raw / 2 + counts, ep_b - ep_raw / 2, ep_raw / 2
    pair_f, pair_cf = (a + b for a, b in zip(overlap_split(dispatch_f, routed_b, hw),
                                             overlap_split(combine, rest_b, hw)))
    pair_b, pair_cb = (a + b for a, b in zip(overlap_split(combine, rest_f, hw),
                                             overlap_split(dispatch_b, routed_f, hw)))
    return LayerTimes(
        fwd_compute_s=fwd_compute, bwd_input_s=bwd_input,
        bwd_weight_s=lay.bwd_weight_s, recompute_s=redo, tp_fwd_s=tp_f, tp_bwd_s=tp_b + tp_f * tp_redo + rg_b,
        cp_fwd_s=cp_f, cp_bwd_s=cp_b + cp_f * full, contention_fwd_s=tp_cf + cp_cf,
        contention_bwd_s=tp_cb + cp_cb + rg_cb, tp_raw_s=tp_raw * (2 + tp_redo) + regather,
        cp_raw_fwd_s=cp_raw_f, cp_raw_bwd_s=cp_raw_b + cp_raw_f * full,
        ep_fwd_s=ep_f, ep_bwd_s=ep_b, ep_pair_fwd_s=pair_f, ep_pair_bwd_s=pair_b,
        contention_pair_fwd_s=pair_cf, contention_pair_bwd_s=pair_cb,
        host_gap_fwd_s=gap * np.ones_like(ep_f), host_gap_bwd_s=gap * full)
