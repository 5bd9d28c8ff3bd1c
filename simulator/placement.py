"""Rank placement: which ranks form each parallel group, and how many of a group's ranks
share a node (that decides the link level a collective runs over).

Ranks vary fastest along the first axis of plan.placement (tp innermost by default, as in
Megatron-LM's and torchtitan's rank order)."""
from __future__ import annotations

import itertools

from simulator.cost import Group
from simulator.plan import Cluster, Plan


def group_of(plan: Plan, cluster: Cluster, axes: tuple[str, ...]) -> Group:
    """The group of ranks that differ only along `axes` (rank 0's group), placed with
    plan.placement innermost-first: its size and how many of its ranks share a node."""
    sizes = {"tp": plan.tp, "cp": plan.cp, "dp": plan.dp, "pp": plan.pp}
    stride, strides = 1, {}
    for axis in plan.placement:
        strides[axis] = stride
        stride *= sizes[axis]
    ranks = [sum(c * strides[a] for a, c in zip(axes, coords))
             for coords in itertools.product(*(range(sizes[a]) for a in axes))]
    nodes = {r // cluster.gpus_per_node for r in ranks}
    return Group(size=len(ranks), ranks_per_node=len(ranks) // len(nodes))


def pp_neighbour_group(plan: Plan, cluster: Cluster) -> Group:
    """Adjacent pipeline stages as a pair of ranks: inside one node or across two."""
    stride = 1
    for axis in plan.placement[:plan.placement.index("pp")]:
        stride *= {"tp": plan.tp, "cp": plan.cp, "dp": plan.dp}[axis]
    return Group(2, 2 if stride // cluster.gpus_per_node == 0 else 1)
