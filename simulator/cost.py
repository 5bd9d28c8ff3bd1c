"""Cost model: time of each piece of a training step on one device, as pure functions of
the model, the per-device shard and the hardware profile.

Compute: GEMMs from the profile's fitted shape-dependent efficiency, memory-bound operators
from bytes moved. Backward GEMMs are the input-gradient and weight-gradient GEMMs of each
forward GEMM (2x forward FLOPs, Narayanan et al. 2021 sec 5.1); backward memory-bound ops
move twice the forward bytes (read saved input and incoming gradient, write the gradient).
Communication: Megatron-LM tensor parallelism all-reduces twice per layer in forward and
twice in backward (Shoeybi et al. 2019 Fig. 4); with sequence parallelism each all-reduce
becomes a reduce-scatter + all-gather of the same volume (Korthikanti et al. 2022 sec 4.2.2).
"""
from __future__ import annotations

from dataclasses import dataclass

from hw_profiles.profile import HardwareProfile
from simulator.model_spec import ModelSpec
from simulator.ops import GEMM, Op, Shard, embedding_ops, head_ops, layer_ops


@dataclass(frozen=True)
class Group:
    """A communication group: its size and how many of its ranks share one node."""

    size: int
    ranks_per_node: int


@dataclass(frozen=True)
class BlockCosts:
    """Times (s) and FLOPs of a block (a layer, the embedding or the head) for one
    micro-batch on one device."""

    fwd_compute_s: float
    bwd_input_s: float       # input-gradient GEMMs + backward of memory-bound ops
    bwd_weight_s: float      # weight-gradient GEMMs (the W of zero-bubble schedules)
    recompute_s: float       # forward work redone in backward under the recompute setting
    tp_comm_fwd_s: float
    tp_comm_bwd_s: float     # includes recomputed forward communication (full recompute)
    cp_comm_fwd_s: float     # exposed ring-attention exchange
    cp_comm_bwd_s: float
    fwd_flops: float
    flops_by_op: dict

    @property
    def fwd_s(self) -> float:
        return self.fwd_compute_s + self.tp_comm_fwd_s + self.cp_comm_fwd_s

    @property
    def bwd_s(self) -> float:
        """Whole backward: input and weight gradients, recompute, communication."""
        return (self.bwd_input_s + self.bwd_weight_s + self.recompute_s + self.tp_comm_bwd_s
                + self.cp_comm_bwd_s)


def _op_forward_s(op: Op, hw: HardwareProfile, dtype: str) -> float:
    if op.kind == GEMM:
        return float(hw.gemm_time_s(op.m, op.n, op.k, dtype, batch=op.batch))
    return float(hw.memory_bound_time_s(op.bytes_moved, dtype, op.op_class))


def _op_backward_s(op: Op, hw: HardwareProfile, dtype: str) -> tuple[float, float]:
    """(input-gradient part, weight-gradient part) of one op's backward."""
    if op.kind != GEMM:
        return float(hw.memory_bound_time_s(2.0 * op.bytes_moved, dtype, op.op_class)), 0.0
    # dX = dY [m,n] x W^T [n,k]; dW = X^T [k,m] x dY [m,n]. Non-weight GEMMs (attention)
    # need gradients for both operands: two GEMMs on the input side.
    dgrad = float(hw.gemm_time_s(op.m, op.k, op.n, dtype, batch=op.batch))
    other = float(hw.gemm_time_s(op.k, op.n, op.m, dtype, batch=op.batch))
    return (dgrad, other) if op.weight else (dgrad + other, 0.0)


def _blocks_costs(ops: tuple[Op, ...], hw: HardwareProfile, dtype: str, recompute: str,
                  flash: bool) -> tuple[float, float, float, float, float, dict]:
    fwd = bwd_in = bwd_w = redo = core_fwd = 0.0
    flops_by_op: dict[str, float] = {}
    for op in ops:
        f = _op_forward_s(op, hw, dtype)
        bi, bw = _op_backward_s(op, hw, dtype)
        fwd, bwd_in, bwd_w = fwd + f, bwd_in + bi, bwd_w + bw
        if op.attention_core:
            core_fwd += f
        if op.kind == GEMM:
            flops_by_op[op.name] = flops_by_op.get(op.name, 0.0) + op.flops
    # Fused attention recomputes its scores in backward (Dao 2022 sec 3.1); selective
    # recompute redoes the attention core (Korthikanti sec 4.3); full redoes the whole forward.
    redo = core_fwd if (flash or recompute == "selective") else 0.0
    if recompute == "full":
        redo += fwd
    fwd_flops = sum(flops_by_op.values())
    return fwd, bwd_in, bwd_w, redo, fwd_flops, flops_by_op


def tp_comm_s(model: ModelSpec, shard: Shard, hw: HardwareProfile, tp: Group) -> float:
    """One direction (forward or backward) of a layer's TP communication: 2 all-reduces of
    the [tokens, hidden] activation, or 2 x (reduce-scatter + all-gather) with SP."""
    if tp.size == 1:
        return 0.0
    message = shard.tokens * model.hidden_size * shard.dtype_bytes
    if shard.sp:
        return 2.0 * (hw.collective_time_s("reduce_scatter", message, tp.size, tp.ranks_per_node)
                      + hw.collective_time_s("all_gather", message, tp.size, tp.ranks_per_node))
    return 2.0 * hw.collective_time_s("all_reduce", message, tp.size, tp.ranks_per_node)


def cp_comm_s(model: ModelSpec, shard: Shard, hw: HardwareProfile, cp: Group,
              attention_s: float) -> tuple[float, float]:
    """Exposed ring-attention exchange of one layer, (forward, backward): cp-1 steps each
    passing the local K,V chunk (forward) and K,V + their gradients (backward) to the next
    rank, overlapped with the attention of the current chunk (Liu et al. 2023 sec 3)."""
    if cp.size == 1:
        return 0.0, 0.0
    kv_bytes = 2 * shard.tokens * (model.num_kv_heads // shard.tp) * model.head_dim * shard.dtype_bytes
    step_comm_fwd = hw.collective_time_s("send_recv", kv_bytes, cp.size, cp.ranks_per_node)
    step_comm_bwd = hw.collective_time_s("send_recv", 2 * kv_bytes, cp.size, cp.ranks_per_node)
    step_attn = attention_s / cp.size
    # backward attention is ~2x forward, so each backward step has 2x the compute to hide behind
    return ((cp.size - 1) * max(0.0, step_comm_fwd - step_attn),
            (cp.size - 1) * max(0.0, step_comm_bwd - 2.0 * step_attn))


def layer_costs(model: ModelSpec, shard: Shard, hw: HardwareProfile, dtype: str, recompute: str,
                tp: Group, cp: Group) -> BlockCosts:
    ops = layer_ops(model, shard)
    fwd, bwd_in, bwd_w, redo, flops, by_op = _blocks_costs(ops, hw, dtype, recompute, shard.flash)
    host_fwd, host_bwd = hw.overhead.training_layer_s(shard.tp, shard.sp)
    fwd, bwd_in = fwd + host_fwd, bwd_in + host_bwd
    if recompute == "full":
        redo += host_fwd
    tp_s = tp_comm_s(model, shard, hw, tp)
    attention_s = sum(_op_forward_s(op, hw, dtype) for op in ops if op.attention_core)
    cp_fwd, cp_bwd = cp_comm_s(model, shard, hw, cp, attention_s)
    return BlockCosts(
        fwd_compute_s=fwd, bwd_input_s=bwd_in, bwd_weight_s=bwd_w, recompute_s=redo,
        tp_comm_fwd_s=tp_s, tp_comm_bwd_s=tp_s * (2.0 if recompute == "full" else 1.0),
        cp_comm_fwd_s=cp_fwd, cp_comm_bwd_s=cp_bwd, fwd_flops=flops, flops_by_op=by_op)


def edge_costs(model: ModelSpec, shard: Shard, hw: HardwareProfile, dtype: str,
               which: str) -> BlockCosts:
    """The embedding (`which="embedding"`, first stage) or final norm + LM head + loss
    (`which="head"`, last stage). The vocab-parallel embedding and head all-reduce their
    output over TP (Megatron-LM VocabParallelEmbedding); the head's loss all-reduces only
    per-token scalars, which we neglect."""
    ops = embedding_ops(model, shard) if which == "embedding" else head_ops(model, shard)
    fwd, bwd_in, bwd_w, _, flops, by_op = _blocks_costs(ops, hw, dtype, "none", shard.flash)
    return BlockCosts(fwd_compute_s=fwd, bwd_input_s=bwd_in, bwd_weight_s=bwd_w, recompute_s=0.0,
                      tp_comm_fwd_s=0.0, tp_comm_bwd_s=0.0, cp_comm_fwd_s=0.0, cp_comm_bwd_s=0.0, fwd_flops=flops,
                      flops_by_op=by_op)


def overlapped_exposed_s(comm_per_item_s: float, compute_per_item_s: float, items: int,
                         overlaps: bool = True) -> float:
    """Exposed time of `items` equal transfers on one communication stream overlapped with
    `items` equal compute blocks, each transfer waiting for (or feeding) its block, as
    bucketed DDP gradient reduction and FSDP prefetching do (Li et al. 2020, PyTorch DDP
    sec 3.2.3): the last (or first) transfer is always exposed, and when communication is
    slower than compute the stream falls further behind with each item. Without overlap
    (`overlaps` False: CPU ranks, HardwareProfile.comm_overlaps_compute) all of it is exposed."""
    if items <= 0 or comm_per_item_s <= 0.0:
        return 0.0
    if not overlaps:
        return items * comm_per_item_s
    return comm_per_item_s + (items - 1) * max(0.0, comm_per_item_s - compute_per_item_s)
