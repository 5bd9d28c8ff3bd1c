"""Context parallelism in the executor: each rank of the CP group holds a part of every
sequence, and attention sees the keys of the whole sequence through the exchange
plan.cp_comm names (cost.cp_comm_s prices each):

- a2a, DeepSpeed-Ulysses (Jacobs et al. 2023 sec 3; Megatron-LM --cp-comm-type a2a,
  Transformer Engine's AttnFuncWithCPAndQKVOA2A): a contiguous 1/cp of the sequence; Q, K and
  V go from sequence to head shards in one all-to-all before the attention core, which runs
  on the whole sequence for 1/cp of the heads, and its output back in another.
- p2p, the ring (Liu et al. 2023, Ring Attention sec 3; Megatron-LM --cp-comm-type p2p): K
  and V, in one buffer, passed on to the next rank of the group cp - 1 times, the queries
  attending to each block as it arrives and the blocks' partial results merged by their
  running maximum and sum (online softmax, Milakov & Gimelshein 2018); alltoall is the same
  ring with each pass one all-to-all (torch's context_parallel, _RotateMethod.ALL_TO_ALL).
- allgather: the K and V of the whole sequence gathered at once (Llama 3, Dubey et al. 2024
  sec 3.3.2; torch's ALL_GATHER rotation) and attended under the mask of the tokens'
  positions.

The ring and the gather balance the causal mask's work as Megatron-LM
(get_batch_on_this_cp_rank) and torchtitan (its head-tail load balancer) do: the sequence cut
into 2 cp chunks, rank r holding chunks r and 2 cp - 1 - r; RoPE and learned positions are
those of the tokens held (positions). Each runs inside the attention core (CausalCore.cp), so
that selective recompute redoes the exchange as Megatron-LM's core-attention checkpoint does;
the per-op policy keeps the ring's output (one operator, flash_ring) and gathers again in its
recompute, where torch's gather gathers again in backward.
The flash ring's backward is torch's (flash_ring: the K,V passed round again, their
gradients in fp32 travelling with them), as cost.cp_comm_s prices an eager ring. Under
--attention naive the ring's backward is autograd's: the passes' gradients go round the
other way and the blocks are kept from forward. The gather's gradients are
reduce-scattered.

Unlike Transformer Engine, autograd keeps the Ulysses core's output in its head shards for
backward rather than sending it again (the same bytes held), so its backward moves one
output-sized all-to-all fewer than cost.cp_comm_s prices.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Equal chunks of x's first dimension to each rank of `group`, theirs back in rank order."""
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, group))


def heads_from_sequence(tensors: tuple[torch.Tensor, ...], group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """Each [batch, seq/cp, heads, dim] of this rank's sequence shard -> [batch, seq,
    heads/cp, dim] of its head shard (rank r: heads r*heads/cp ..), all in one all-to-all
    (Q, K and V together, as Transformer Engine sends them)."""
    cp = dist.get_world_size(group)
    batch, seq, _, dim = tensors[0].shape
    widths = [t.shape[2] // cp for t in tensors]
    send = torch.cat([t.reshape(batch, seq, cp, w, dim) for t, w in zip(tensors, widths)], dim=3)
    parts = _all_to_all(send.permute(2, 0, 1, 3, 4), group).permute(1, 0, 2, 3, 4)
    return tuple(p.reshape(batch, cp * seq, w, dim) for p, w in zip(parts.split(widths, dim=3), widths))


def sequence_from_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """heads_from_sequence's inverse for one tensor: [batch, seq, heads/cp, dim] ->
    [batch, seq/cp, heads, dim]."""
    cp = dist.get_world_size(group)
    batch, seq, heads, dim = x.shape
    parts = _all_to_all(x.reshape(batch, cp, seq // cp, heads, dim).permute(1, 0, 2, 3, 4), group)
    return parts.permute(1, 2, 0, 3, 4).reshape(batch, seq // cp, cp * heads, dim)


def _start_pass(x: torch.Tensor, group: dist.ProcessGroup, step: int, comm: str):
    """Start sending x to the rank `step` places on in the group's ring and receiving the
    one from `step` places back: a send and a receive (p2p) or one all-to-all carrying only
    them. Returns (the receiving buffer, the works to wait on)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    to, source = (rank + step) % size, (rank - step) % size
    x = x.contiguous()
    received = torch.empty_like(x)
    if comm == "alltoall":
        rows = x.shape[0]
        return received, [dist.all_to_all_single(received, x, [rows * (r == source) for r in range(size)],
                                                 [rows * (r == to) for r in range(size)], group=group,
                                                 async_op=True)]
    return received, dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, x, dist.get_global_rank(group, to), group),
         dist.P2POp(dist.irecv, received, dist.get_global_rank(group, source), group)])


def _finish(pending) -> torch.Tensor:
    received, works = pending
    for work in works:
        work.wait()
    return received


def _pass_on(x: torch.Tensor, group: dist.ProcessGroup, step: int, comm: str) -> torch.Tensor:
    """x passed `step` places on round the ring (_start_pass), the one from behind received."""
    return _finish(_start_pass(x, group, step, comm))


class _RingPass(torch.autograd.Function):
    """One pass round the ring, its gradient passed back the other way."""

    @staticmethod
    def forward(ctx, x, group, comm):
        ctx.group, ctx.comm = group, comm
        return _pass_on(x, group, 1, comm)

    @staticmethod
    def backward(ctx, grad):
        return _pass_on(grad, ctx.group, -1, ctx.comm), None, None


@functools.lru_cache(maxsize=32)
def _chunk_positions(local: int, size: int, rank: int, balanced: bool, device: torch.device) -> torch.Tensor:
    if not balanced:
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    half = local // 2
    return torch.cat([torch.arange(c * half, (c + 1) * half, device=device) for c in (rank, 2 * size - 1 - rank)])


@functools.lru_cache(maxsize=16)
def _visible(local: int, size: int, rank: int, balanced: bool, window: int | None,
             device: torch.device) -> torch.Tensor:
    queries = _chunk_positions(local, size, rank, balanced, device)[:, None]
    keys = torch.cat([_chunk_positions(local, size, r, balanced, device) for r in range(size)])[None, :]
    visible = keys <= queries
    return visible if window is None else visible & (keys > queries - window)


# the CP groups made, by name: flash_ring, an operator, takes only tensors and plain values
_GROUPS: dict[str, dist.ProcessGroup] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class ContextParallel:
    """A CP group and its exchange (plan.cp_comm)."""
    group: dist.ProcessGroup
    comm: str

    def __post_init__(self):
        _GROUPS[self.group.group_name] = self.group

    @staticmethod
    def by_name(group: str, comm: str) -> ContextParallel:
        """The CP group named `group` (one made before) with exchange `comm`."""
        return ContextParallel(_GROUPS[group], comm)

    @property
    def balanced(self) -> bool:
        """Whether each rank holds two chunks of the sequence (the ring, the gather) rather
        than one contiguous part (Ulysses)."""
        return self.comm != "a2a"

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's part of the sequence dimension (1) of `tokens`."""
        if not self.balanced:
            return tokens.chunk(self.size, dim=1)[self.rank].contiguous()
        chunks = tokens.chunk(2 * self.size, dim=1)
        return torch.cat([chunks[self.rank], chunks[2 * self.size - 1 - self.rank]], dim=1)

    def positions(self, local: int, device, rank: int | None = None) -> torch.Tensor:
        """The sequence positions of the `local` tokens rank `rank` (this one) holds, in
        their order there."""
        return _chunk_positions(local, self.size, self.rank if rank is None else rank, self.balanced,
                                torch.device(device))

    def attend(self, q, k, v, masked_core, kernel: str, window: int | None = None, sinks=None,
               softcap: float | None = None) -> torch.Tensor:
        """Causal attention of this rank's queries [batch, seq/cp, heads, dim] to the keys
        and values of the whole sequence (the last `window` of them up to each query's),
        each head's `sinks` logit in its softmax (gpt-oss), by the gather (`masked_core(q,
        k, v, visible, sinks)` runs the core under a [queries, keys] mask) or the ring:
        block by block with CPU flash attention's kernel (flash_ring), or with the unfused
        kernel's separate ops for plan.attention naive, which alone soft-caps the scores
        (`softcap`, as the unfused core; the gather's core caps its own). Values narrower
        than the keys (latent attention's) are padded with zeros to their width for the
        exchange, as cost.cp_comm_s counts them, and the output cut back."""
        width = v.shape[-1]
        if width != k.shape[-1]:
            v = F.pad(v, (0, k.shape[-1] - width))
        if self.comm == "allgather":
            return self._gathered(q, k, v, masked_core, window, sinks)[..., :width]
        if kernel == "naive":
            return self._unfused_ring(q, k, v, window, sinks, softcap)[..., :width]
        rows_q = q.transpose(1, 2).contiguous()  # [batch, heads, seq, dim]
        kv = torch.stack((k, v)).transpose(2, 3).contiguous()  # [2, batch, kv heads, seq, dim]
        out, _ = flash_ring(rows_q, kv, sinks, self.group.group_name, self.comm, window)
        return out.transpose(1, 2)[..., :width]

    def visible(self, local: int, device, window: int | None = None) -> torch.Tensor:
        """[local, cp x local] True where a query of this rank's `local` tokens sees a key of
        the whole sequence, the keys in rank order: one at or before it (within `window` of
        it); built once per shape, not in every layer's forward (as model.key_mask)."""
        return _visible(local, self.size, self.rank, self.balanced, window, torch.device(device))

    def _gathered(self, q, k, v, masked_core, window: int | None, sinks) -> torch.Tensor:
        kv = funcol.all_gather_single_autograd(torch.stack((k, v)), 2, self.group)
        return masked_core(q, kv[0], kv[1], self.visible(q.shape[1], q.device, window), sinks)

    def _unfused_ring(self, q, k, v, window: int | None = None, sinks=None, softcap: float | None = None):
        """Each block's scores (soft-capped before the mask, Gemma 2 report sec 2.2) and
        probabilities as separate ops, autograd's backward; the blocks' partial softmax
        merged in fp32 by each query row's running maximum (a constant of the result, so
        kept out of autograd) and sum, each head's sink logit joining the sum last as a key
        with no value. Every block leaves a row its own keys or none (the keys past its
        window hidden): the rank's own block comes first, where each query sees at least
        itself, so the running maximum is finite from the start."""
        batch, seq, heads, dim = q.shape
        kv_heads = k.shape[2]
        group = heads // kv_heads
        visible = self.visible(seq, q.device, window)
        with torch.autocast(q.device.type, enabled=False):
            # [batch, kv heads, group x seq, dim]: the query heads that share a KV head stacked
            rows = q.float().permute(0, 2, 1, 3).reshape(batch, kv_heads, group * seq, dim) * dim ** -0.5
            block = torch.stack((k, v))
            top = total = out = None
            for step in range(self.size):
                if step:
                    block = _RingPass.apply(block, self.group, self.comm)
                keys, values = (t.float().permute(0, 2, 1, 3) for t in block)
                source = (self.rank - step) % self.size
                hidden = ~visible[:, source * seq:(source + 1) * seq].repeat(group, 1)
                scores = rows @ keys.transpose(-1, -2)
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                scores = scores.masked_fill(hidden, float("-inf"))
                peak = scores.amax(-1, keepdim=True).detach()
                if step == 0:
                    top = peak
                    weights = torch.exp(scores - top)
                    total, out = weights.sum(-1, keepdim=True), weights @ values
                    continue
                new_top = torch.maximum(top, peak)
                weights, scale = torch.exp(scores - new_top), torch.exp(top - new_top)
                total = total * scale + weights.sum(-1, keepdim=True)
                out = out * scale + weights @ values
                top = new_top
            if sinks is not None:  # [kv heads, group x seq, 1], as the rows are stacked
                sink = sinks.float().view(kv_heads, group, 1).expand(kv_heads, group, seq).reshape(
                    1, kv_heads, group * seq, 1)
                new_top = torch.maximum(top, sink.detach())
                scale = torch.exp(top - new_top)
                total, out = total * scale + torch.exp(sink - new_top), out * scale
            out = (out / total).reshape(batch, kv_heads, group, seq, -1)
        return out.permute(0, 3, 1, 2, 4).reshape(batch, seq, heads, -1).to(q.dtype)


# CPU flash attention's kernel with its log-sum-exp output, and its backward given one
cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def additive_mask(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's attn_mask for boolean `hidden` (True where a query must not see a key):
    0 where it sees, -inf where it does not."""
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))


def with_sinks(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Each query row's log-sum-exp [batch, heads, rows] with its head's sink logit joined,
    the sink a key with no value (gpt-oss); the kernel's output is rescaled by exp(lse -
    that) and its backward runs under it."""
    return torch.logaddexp(lse, sinks.float().view(1, -1, 1))


def sink_gradient(sinks: torch.Tensor, total: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sink logits' gradient, -p_sink <dO, O> summed over each head's rows (p_sink =
    exp(sink - total), total: with_sinks' log-sum-exp; grad and out [batch, heads, rows,
    dim])."""
    share = torch.exp(sinks.float().view(1, -1, 1) - total)
    return -(share * (grad.float() * out.float()).sum(-1)).sum((0, 2)).to(sinks.dtype)


def _block(rank: int, source: int, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) where rank `rank`'s queries see rank `source`'s keys,
    each rank holding chunks r and 2cp-1-r of its sequence: its own block under the causal
    mask (the positions held rise with the rows); an earlier rank's first chunk, whole, to
    every query (its second chunk is later than both of this rank's); a later rank's both
    chunks, whole, to the second chunk's queries alone. Half of each block, so every
    rank does the same work (Megatron-LM's and Transformer Engine's three cases)."""
    if source == rank:
        return slice(None), slice(None), True
    if source < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


@dataclasses.dataclass(frozen=True, eq=False)
class _RingBlock:
    """What one ring step computes: the query and key rows of the block (_block), whether
    under the causal mask, else an additive mask where a sliding window hides part of it,
    and the query rows that see none of its keys (whose log-sum-exp the kernel gives as 0,
    not -inf: set to -inf, so the merge takes nothing from them)."""
    rows: slice
    keys: slice
    causal: bool
    mask: torch.Tensor | None = None
    blind: torch.Tensor | None = None


@functools.lru_cache(maxsize=16)
def _ring_blocks(size: int, rank: int, local: int, device: torch.device, dtype, window: int | None
                 ) -> list[_RingBlock | None]:
    """Per ring step, the block of rank (rank - step)'s keys rank `rank`'s `local` queries
    attend to; None where a sliding `window` hides it whole (its K,V still pass on). Built
    once per shape, for forward and backward alike."""
    half = local // 2
    visible = None if window is None else _visible(local, size, rank, True, window, device)
    blocks = []
    for step in range(size):
        source = (rank - step) % size
        rows, keys, causal = _block(rank, source, half)
        if visible is None:
            blocks.append(_RingBlock(rows, keys, causal))
            continue
        seen = visible[rows, source * local:(source + 1) * local][:, keys]
        if not seen.any():
            blocks.append(None)
        elif seen.all():
            blocks.append(_RingBlock(rows, keys, False))
        else:
            blind = ~seen.any(-1)
            blocks.append(_RingBlock(rows, keys, False, additive_mask(~seen, dtype), blind if blind.any() else None))
    return blocks


@torch.library.custom_op("meshplan::flash_ring", mutates_args=(),
                         schema="(Tensor rows_q, Tensor kv, Tensor? sinks, str group, str comm, int? window)"
                                " -> (Tensor, Tensor)")
def flash_ring(rows_q, kv, sinks, group, comm, window):
    """The ring with CPU flash attention's kernel, as one operator: the queries [batch,
    heads, seq/cp, dim] of this rank of CP group `group` (by name, ContextParallel.by_name)
    attend to the K,V [2, batch, kv heads, seq/cp, dim] of every rank as they pass round
    (`comm`: _start_pass), each block's output and log-sum-exp merged in fp32 (Liu et al.
    2023; torch's _templated_ring_attention), the next block's pass under way while the
    kernel runs on this one; under a sliding window the blocks it hides whole skipped, the
    others' hidden keys masked (_ring_blocks). Each head's sink logit joins the merged
    log-sum-exp last, the output rescaled by the share its keys keep (model._SinkAttention's
    rule). Returns the output [batch, heads, seq/cp, value dim] and the fp32 log-sum-exp.
    One operator, as torch's ring is one under SDPA's, so that a per-op checkpoint policy
    keeps its output whole and its recompute runs no exchange (parallelize._KEPT)."""
    cp = ContextParallel.by_name(group, comm)
    group_size = rows_q.shape[1] // kv.shape[2]
    blocks = _ring_blocks(cp.size, cp.rank, rows_q.shape[2], rows_q.device, rows_q.dtype, window)
    with torch.autocast(rows_q.device.type, enabled=False):
        out = rows_q.new_zeros(*rows_q.shape[:-1], kv.shape[-1], dtype=torch.float32)
        lse = rows_q.new_full(rows_q.shape[:-1], float("-inf"), dtype=torch.float32)
        block = kv
        for step, b in enumerate(blocks):
            pending = _start_pass(block, cp.group, 1, comm) if step < cp.size - 1 else None
            if b is not None:
                keys_b, values_b = (t[:, :, b.keys].repeat_interleave(group_size, dim=1) for t in block)
                part, part_lse = cpu_flash(rows_q[:, :, b.rows], keys_b, values_b, 0.0, b.causal,
                                           attn_mask=b.mask)
                if b.blind is not None:
                    part_lse = part_lse.masked_fill(b.blind, float("-inf"))
                merged = torch.logaddexp(lse[:, :, b.rows], part_lse)
                out[:, :, b.rows] = (out[:, :, b.rows] * torch.exp(lse[:, :, b.rows] - merged)[..., None]
                                     + part.float() * torch.exp(part_lse - merged)[..., None])
                lse[:, :, b.rows] = merged
            if pending is not None:
                block = _finish(pending)
        if sinks is not None:
            total = with_sinks(lse, sinks)
            out, lse = out * torch.exp(lse - total)[..., None], total
    return out.to(rows_q.dtype), lse


def _flash_ring_context(ctx, inputs, output):
    rows_q, kv, sinks, group, comm, window = inputs
    ctx.ring = (group, comm, window)
    ctx.save_for_backward(rows_q, kv, sinks, *output)


def _flash_ring_backward(ctx, grad, _):
    """flash_ring's backward: the K,V passed round the ring again, each block's gradients
    from the kernel's backward under the merged output and log-sum-exp (the sink a key with
    no value), the K,V gradients accumulated in fp32 as they travel with their block and
    sent home after the last, each pass beside the next block's kernel (torch's
    _templated_ring_attention_backward); the sink's gradient -p_sink <dO, O> over this
    rank's rows. The KV heads are repeated to the query heads for the kernel, as SDPA's
    enable_gqa does, and their gradients summed back."""
    group_name, comm, window = ctx.ring
    rows_q, kv, sinks, out, lse = ctx.saved_tensors
    cp = ContextParallel.by_name(group_name, comm)
    group = rows_q.shape[1] // kv.shape[2]
    blocks = _ring_blocks(cp.size, cp.rank, rows_q.shape[2], rows_q.device, rows_q.dtype, window)
    with torch.autocast(rows_q.device.type, enabled=False):
        grad = grad.to(rows_q.dtype).contiguous()
        dq = torch.zeros_like(rows_q, dtype=torch.float32)
        block, gradients = kv, None  # gradients: the K,V gradients of the block before, on their way
        for step, b in enumerate(blocks):
            pending = _start_pass(block, cp.group, 1, comm) if step < cp.size - 1 else None
            dkv = torch.zeros_like(block, dtype=torch.float32) if gradients is None else _finish(gradients)
            if b is not None:
                keys_b, values_b = (t[:, :, b.keys].repeat_interleave(group, dim=1) for t in block)
                dq_b, dk_b, dv_b = cpu_flash_backward(grad[:, :, b.rows], rows_q[:, :, b.rows], keys_b,
                                                   values_b, out[:, :, b.rows], lse[:, :, b.rows], 0.0,
                                                   b.causal, attn_mask=b.mask)
                dq[:, :, b.rows] += dq_b.float()
                for i, part in enumerate((dk_b, dv_b)):
                    dkv[i][:, :, b.keys] += part.float().unflatten(1, (-1, group)).sum(2)
            gradients = _start_pass(dkv, cp.group, 1, comm)
            if pending is not None:
                block = _finish(pending)
        dkv = _finish(gradients).to(kv.dtype)
        dsinks = None if sinks is None else sink_gradient(sinks, lse, grad, out)
    return dq.to(rows_q.dtype), dkv, dsinks, None, None, None


torch.library.register_autograd("meshplan::flash_ring", _flash_ring_backward, setup_context=_flash_ring_context)
