"""Context parallelism as DeepSpeed-Ulysses runs it (Jacobs et al. 2023 sec 3; Megatron-LM
--cp-comm-type a2a, Transformer Engine's AttnFuncWithCPAndQKVOA2A; plan.cp_comm a2a): each
rank of the CP group holds a contiguous 1/cp of every sequence everywhere but in the
attention core, which runs on the whole sequence for 1/cp of the heads. Q, K and V go from
sequence to head shards by one all-to-all each before the core, the output back by another
after it; backward sends their gradients the other way (all_to_all_single's autograd).

Unlike Transformer Engine, autograd keeps the core's output in its head shards for backward
rather than sending it again (the same bytes held), so its backward moves one output-sized
all-to-all fewer than cost.cp_comm_s prices.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


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


def sequence_shard(tokens: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous 1/cp of the sequence dimension (1) of `tokens`."""
    if group is None:
        return tokens
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    return tokens.chunk(cp, dim=1)[rank].contiguous()


def sequence_start(seq: int, group: dist.ProcessGroup | None) -> int:
    """The position of the first token of this rank's sequence shard of `seq` tokens."""
    return 0 if group is None else dist.get_rank(group) * seq
