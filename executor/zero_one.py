"""ZeRO stage 1 (Rajbhandari et al. 2020 sec 5.1, P_os) for the parameters torch 2.13's
ZeroRedundancyOptimizer cannot take: those TP's DTensor shards or a pipeline stage holds
(it views whole parameters in flat buckets, which a DTensor does not allow, and runs beside
DDP, which takes neither), and expert-parallel experts, which differ along dp and are
replicated only along their EDP group. The gradients are reduced first (by the
data-parallel wrapper, FSDP2's replicate or DDP, and the experts' over EDP by
moe.reduce_expert_gradients); each rank steps the optimizer of the parameters it owns within
each group that replicates them (the dense ones over dp, the experts over edp, as
Megatron-LM's distributed optimizer shards them), and each rank's updated parameters go out
in one broadcast per group (plan.zero1_sync all_reduce, as ZeroRedundancyOptimizer with
parameters_as_bucket_view).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshplan.executor.measure import local_part


def partition(sizes: list[int], ranks: int) -> list[list[int]]:
    """Indices of the parameters each rank owns: largest first, each to the rank owning the
    fewest elements so far (ZeroRedundancyOptimizer's greedy partition)."""
    owned, loads = [[] for _ in range(ranks)], [0] * ranks
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = loads.index(min(loads))
        owned[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(indices) for indices in owned]


class ZeroOneOptimizer:
    """`optimizer_class` over this rank's share of each (parameters, group) of `shards` (its
    `optim`, as ZeroRedundancyOptimizer's, which the checkpointer and the memory account
    read), the other ranks' shares broadcast from them after each step."""

    def __init__(self, shards: list[tuple[list[torch.nn.Parameter], dist.ProcessGroup]],
                 optimizer_class: type, options: dict, lr: float):
        self.params = [p for params, _ in shards for p in params]
        self.buckets = []  # (group, source rank, the parameters it updates), in one order on every rank
        mine = []
        for params, group in shards:
            owned = partition([local_part(p).numel() for p in params], dist.get_world_size(group))
            for rank, indices in enumerate(owned):
                if indices:
                    self.buckets.append((group, dist.get_global_rank(group, rank), [params[i] for i in indices]))
            mine += [params[i] for i in owned[dist.get_rank(group)]]
        # a group of no parameters where the rank owns none (a stage of fewer than dp)
        self.optim = optimizer_class([{"params": mine}], lr=lr, **options)

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.optim.step()
        me = dist.get_rank()
        for group, source, owned in self.buckets:
            tensors = [local_part(p) for p in owned]
            flat = (torch.cat([t.reshape(-1) for t in tensors]) if source == me else
                    tensors[0].new_empty(sum(t.numel() for t in tensors)))
            dist.broadcast(flat, src=source, group=group)
            if source != me:
                for tensor, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
                    tensor.copy_(chunk.view_as(tensor))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None
