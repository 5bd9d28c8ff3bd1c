"""The device mesh: the sizes of the parallel axes and the order in which consecutive ranks
vary along them (innermost first), over nodes of `gpus_per_node` devices. From that, the
ranks of each parallel group and how many of a group's ranks share a node (which decides
the link level its collectives run over).

Training uses the axes tp, cp, dp, pp (tp innermost by default, as Megatron-LM and
torchtitan order ranks, so a TP group stays inside a node); serving uses tp, pp, dp
(replicas outermost); the executor builds its torch DeviceMesh in the same order."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from math import prod
from operator import mul

import numpy as np


@dataclass(frozen=True)
class Group:
    """A communication group: its size, how many of its ranks share one node, and the
    fraction of the per-rank inter-node bandwidth it gets when every group of its kind
    communicates at once (1.0: a NIC of its own and no oversubscribed uplink; computed from
    the profile's fabric by hw_profiles/fabric.py)."""

    size: int
    ranks_per_node: int
    link_share: float = 1.0

    @property
    def nodes(self) -> int:
        return self.size // self.ranks_per_node


@dataclass(frozen=True)
class Mesh:
    """`placement` lists the axes innermost-first; `sizes` their degrees in that order."""

    placement: tuple[str, ...]
    sizes: tuple[int, ...]
    gpus_per_node: int

    @classmethod
    def of(cls, sizes: dict[str, int], placement: tuple[str, ...], gpus_per_node: int) -> Mesh:
        return cls(tuple(placement), tuple(int(sizes[a]) for a in placement), int(gpus_per_node))

    @property
    def world_size(self) -> int:
        return prod(self.sizes)

    def size(self, axis: str) -> int:
        return self.sizes[self.placement.index(axis)]

    def stride(self, axis: str) -> int:
        """Rank distance between neighbours along `axis`."""
        return prod(self.sizes[:self.placement.index(axis)])

    def ranks(self, axes: tuple[str, ...], origin: int = 0) -> np.ndarray:
        """The ranks that differ from `origin` only along `axes`, sorted."""
        strides = dict(zip(self.placement, accumulate(self.sizes[:-1], mul, initial=1)))
        sizes = dict(zip(self.placement, self.sizes))
        return axis_offsets(self.strided(axes)) + sum(
            (origin // strides[a]) % sizes[a] * strides[a] for a in self.placement if a not in axes)

    def strided(self, axes: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
        """(size, stride) of each of `axes`: the shape of a group along them."""
        return tuple((self.size(a), self.stride(a)) for a in axes)

    def group(self, axes: tuple[str, ...]) -> Group:
        """Rank 0's group along `axes` (every group of a mesh is placed alike)."""
        return _group(self.strided(axes), self.gpus_per_node)

    def neighbour_pair(self, axis: str) -> Group:
        """Two ranks adjacent along `axis` (pipeline stages): inside one node or across two."""
        return Group(2, 2 if self.stride(axis) < self.gpus_per_node else 1)

    def end_pair(self, axis: str) -> Group:
        """The first and the last rank along `axis` (a pipeline's first and last stage):
        inside one node or across two."""
        return Group(2, 2 if self.stride(axis) * (self.size(axis) - 1) < self.gpus_per_node else 1)


@lru_cache(maxsize=4096)
def _group(axes: tuple[tuple[int, int], ...], gpus_per_node: int) -> Group:
    """The group of rank 0 along axes given as (size, stride): meshes of different shapes
    share it where those match (a search places thousands of meshes)."""
    ranks = axis_offsets(axes)
    nodes = 1 + np.count_nonzero(np.diff(ranks // gpus_per_node))  # sorted
    return Group(size=int(ranks.size), ranks_per_node=int(ranks.size // nodes))


def axis_offsets(axes: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Sorted rank offsets from a group's first rank along axes given as (size, stride)."""
    offsets = np.zeros(1, dtype=np.int64)
    for size, stride in axes:
        offsets = (offsets[:, None] + np.arange(size) * stride).ravel()
    offsets.sort()
    return offsets
