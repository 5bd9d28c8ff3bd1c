"""The inter-node network as a graph, and the share of it each parallel group gets.

A profile's `fabric` section says how the nodes' NICs (the profile's nics_per_node, GPUs split
evenly over them) are switched:
- "single-switch": every NIC on one switch;
- "fat-tree": the NICs of nodes_per_leaf nodes on one leaf switch;
- "rail-optimized": NIC j of nodes_per_leaf nodes on leaf j of their block, one rail per NIC
  index (the DGX SuperPOD compute fabric: NVIDIA DGX SuperPOD reference architectures,
  "each group of 32 nodes is rail-aligned ... traffic between rails traverses the spine").
Leaves reach each other through a spine. Each leaf's uplinks are one aggregate edge of its
downlink capacity / oversubscription (a non-blocking fat tree has oversubscription 1:
Leiserson 1985, "Fat-trees"; ECMP is assumed to spread flows evenly over the spines, so they
are one node). Edges are full duplex: `bandwidth_bytes_per_s` is the rate in each direction
and traffic is counted per direction.

link_share routes the inter-node traffic of every group of one kind at once over the graph:
a group of r ranks per node runs its inter-node step as r rings over its nodes, ring j
joining the j-th rank of the group on each node (the hierarchical composition of
collective_model; NCCL likewise gives each rank's channel its own NIC), pipeline stages as a
chain. Each stream takes its share of the most loaded edge on its path; a group's rate is
its slowest stream's, a kind's the slowest group's (the step waits for every group). All
groups of a kind are taken to communicate at once: pessimistic where they are staggered
(the DP groups of different pipeline stages finish their backward at different times).
A profile without a fabric section (HardwareProfile.fabric None) has no contention between
groups: every link share is 1.0 and the inter-node curves apply as measured.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from meshplan.core.errors import ProfileError
from meshplan.core.mesh import Group, Mesh, axis_offsets

if TYPE_CHECKING:
    import networkx as nx

TOPOLOGIES = ("single-switch", "fat-tree", "rail-optimized")
ALIASES = {"rail": "rail-optimized", "fat": "fat-tree", "single": "single-switch"}


@dataclass(frozen=True)
class Fabric:
    """How the nodes' NICs are switched (module docstring); `source` says where it is from."""

    topology: str
    nodes_per_leaf: int | None = None
    oversubscription: float = 1.0
    source: str = ""

    def __post_init__(self):
        if self.topology not in TOPOLOGIES:
            raise ProfileError("fabric.topology", f"unknown topology {self.topology!r}",
                               f"use one of {', '.join(TOPOLOGIES)}")
        over = self.oversubscription
        if isinstance(over, bool) or not isinstance(over, (int, float)) or not over >= 1 \
                or not math.isfinite(over):
            raise ProfileError("fabric.oversubscription", f"must be a number >= 1, got {over!r}",
                               "use 1 for non-blocking leaf uplinks, 2 for 2:1, ...")
        per_leaf = self.nodes_per_leaf
        if self.topology == "single-switch":
            if per_leaf is not None or over != 1:
                raise ProfileError("fabric.nodes_per_leaf" if per_leaf is not None else
                                   "fabric.oversubscription", "a single switch has no leaves to "
                                   "fill or uplinks to oversubscribe",
                                   "leave them unset, or use topology 'fat-tree'")
        elif isinstance(per_leaf, bool) or not isinstance(per_leaf, int) or per_leaf < 1:
            raise ProfileError("fabric.nodes_per_leaf", f"{self.topology} needs the nodes per "
                               f"leaf switch, got {per_leaf!r}", "set nodes_per_leaf >= 1")
        if not isinstance(self.source, str):
            raise ProfileError("fabric.source", f"is {type(self.source).__name__}", "give a string")

    @property
    def label(self) -> str:
        if self.topology == "single-switch":
            return self.topology
        return f"{self.topology}:{self.oversubscription:g}:{self.nodes_per_leaf}"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data, where: str = "profile") -> Fabric:
        """From to_dict()'s output; an unknown, missing or ill-typed key raises ProfileError
        naming the field."""
        if not isinstance(data, dict):
            raise ProfileError("fabric", f"is {type(data).__name__} in {where}, expected an object",
                               "give topology, nodes_per_leaf, oversubscription, source")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ProfileError(f"fabric.{unknown[0]}", f"is unknown in {where}", f"use {known}")
        if "topology" not in data:
            raise ProfileError("fabric.topology", f"missing in {where}",
                               f"give one of {', '.join(TOPOLOGIES)}")
        return cls(**data)


def parse_fabric(spec: str, base: Fabric | None) -> Fabric:
    """A fabric from "TOPOLOGY[:OVERSUBSCRIPTION[:NODES_PER_LEAF]]" (topology names or their
    short forms rail, fat, single); what is left out comes from `base` (the profile's)."""
    parts = [p.strip() for p in spec.split(":")]
    topology = ALIASES.get(parts[0], parts[0])
    if topology not in TOPOLOGIES or len(parts) > 3:
        raise ProfileError("fabric", f"{spec!r} is not TOPOLOGY[:OVERSUBSCRIPTION[:NODES_PER_LEAF]]",
                           f"use e.g. rail-optimized, fat-tree:2 or fat-tree:4:16 (topologies "
                           f"{', '.join(TOPOLOGIES)})")
    if topology == "single-switch":
        return Fabric(topology, source=f"what-if: {spec}")
    try:
        over = float(parts[1]) if len(parts) > 1 else 1.0
        per_leaf = int(parts[2]) if len(parts) > 2 else (base.nodes_per_leaf if base else None)
    except ValueError:
        raise ProfileError("fabric", f"{spec!r}: oversubscription and nodes per leaf must be "
                           "numbers", "use e.g. fat-tree:2:16") from None
    if per_leaf is None:
        raise ProfileError("fabric.nodes_per_leaf", f"{spec!r} gives none and the profile has no "
                           "fabric to take it from", f"use e.g. {topology}:{over:g}:32")
    return Fabric(topology, per_leaf, over, f"what-if: {spec}")


def device(node: int, local: int) -> str:
    return f"n{node}/gpu{local}"


def build_graph(fabric: Fabric, num_nodes: int, gpus_per_node: int, nics_per_node: int,
                nic_bytes_per_s: float) -> nx.Graph:
    """Nodes have `kind` (device, nic, leaf, spine); devices and NICs also `node` and
    `local`. Edges have bandwidth_bytes_per_s (each direction). GPUs split evenly over the
    NICs (GPU i uses NIC i // (gpus_per_node / nics_per_node))."""
    # imported here: a search on a non-blocking fabric with a NIC per GPU never routes, and
    # a fresh `meshplan plan` then saves networkx's 0.1 s import
    import networkx as nx

    if gpus_per_node % nics_per_node:
        raise ProfileError("nics_per_node", f"{gpus_per_node} GPUs per node do not split evenly "
                           f"over {nics_per_node} NICs", "use a divisor of gpus_per_node")
    g = nx.Graph()
    per_nic = gpus_per_node // nics_per_node
    for n in range(num_nodes):
        for j in range(nics_per_node):
            g.add_node(f"n{n}/nic{j}", kind="nic", node=n, local=j)
        for i in range(gpus_per_node):
            g.add_node(device(n, i), kind="device", node=n, local=i)
            g.add_edge(device(n, i), f"n{n}/nic{i // per_nic}", bandwidth_bytes_per_s=nic_bytes_per_s)
    if fabric.topology == "single-switch":
        g.add_node("leaf0", kind="leaf")
        for n in range(num_nodes):
            for j in range(nics_per_node):
                g.add_edge(f"n{n}/nic{j}", "leaf0", bandwidth_bytes_per_s=nic_bytes_per_s)
        return g
    per_leaf = fabric.nodes_per_leaf
    blocks = math.ceil(num_nodes / per_leaf)
    rails = range(nics_per_node) if fabric.topology == "rail-optimized" else [None]
    for b in range(blocks):
        nodes = range(b * per_leaf, min((b + 1) * per_leaf, num_nodes))
        for rail in rails:
            leaf = f"leaf{b}" if rail is None else f"rail{rail}/leaf{b}"
            g.add_node(leaf, kind="leaf")
            nics = range(nics_per_node) if rail is None else [rail]
            for n in nodes:
                for j in nics:
                    g.add_edge(f"n{n}/nic{j}", leaf, bandwidth_bytes_per_s=nic_bytes_per_s)
            if blocks > 1 or len(rails) > 1:
                g.add_node("spine", kind="spine")
                g.add_edge(leaf, "spine", bandwidth_bytes_per_s=len(nodes) * len(nics)
                           * nic_bytes_per_s / fabric.oversubscription)
    return g


class _Network:
    """The graph as arrays for routing many streams at once: each device's NIC and leaf,
    and the bandwidth (each direction) of each device's link to its NIC, each NIC's to its
    leaf and each leaf's uplink to the spine (build_graph's leaves reach each other only
    through it: a stream between two leaves takes the one's uplink and the other's
    downlink)."""

    def __init__(self, graph: nx.Graph, num_nodes: int, gpus_per_node: int, nics_per_node: int):
        def neighbour(name: str, kind: str) -> str:
            return next(x for x in graph[name] if graph.nodes[x]["kind"] == kind)

        def bandwidth(a: str, b: str) -> float:
            return graph.edges[a, b]["bandwidth_bytes_per_s"] if graph.has_edge(a, b) else 0.0
        devices = [device(n, i) for n in range(num_nodes) for i in range(gpus_per_node)]
        nics = [f"n{n}/nic{j}" for n in range(num_nodes) for j in range(nics_per_node)]
        nic_of = [neighbour(d, "nic") for d in devices]
        leaf_of = [neighbour(x, "leaf") for x in nics]
        leaves = list(dict.fromkeys(leaf_of))
        self.device_nic = np.array(list(map({x: k for k, x in enumerate(nics)}.get, nic_of)))
        self.device_leaf = np.array(list(map({x: k for k, x in enumerate(leaves)}.get, leaf_of)))[self.device_nic]
        self.device_bw = np.array([bandwidth(d, x) for d, x in zip(devices, nic_of)])
        self.nic_bw = np.array([bandwidth(x, leaf) for x, leaf in zip(nics, leaf_of)])
        self.uplink_bw = np.array([bandwidth(leaf, "spine") for leaf in leaves])

    def slowest_rate(self, src: np.ndarray, dst: np.ndarray) -> float:
        """Rate of the slowest stream src[k] -> dst[k] (device indices) when all run at once,
        each at its share of the most loaded link direction on its path: the least
        bandwidth / streams over the link directions the streams cross."""
        a, b = self.device_leaf[src], self.device_leaf[dst]
        cross = a != b
        return float(min(_least_share(self.device_bw, src), _least_share(self.device_bw, dst),
                         _least_share(self.nic_bw, self.device_nic[src]),
                         _least_share(self.nic_bw, self.device_nic[dst]),
                         _least_share(self.uplink_bw, a[cross]), _least_share(self.uplink_bw, b[cross])))


def _least_share(bandwidth: np.ndarray, link: np.ndarray) -> float:
    """The least bandwidth / streams over the links (indices into `bandwidth`) that streams
    take, one entry in `link` per stream; inf where none is taken."""
    load = np.bincount(link, minlength=bandwidth.size)
    used = load > 0
    return (bandwidth[used] / load[used]).min() if used.any() else math.inf


@lru_cache(maxsize=16)
def _network(fabric: Fabric, num_nodes: int, gpus_per_node: int, nics_per_node: int) -> _Network:
    graph = build_graph(fabric, num_nodes, gpus_per_node, nics_per_node, 1.0)
    return _Network(graph, num_nodes, gpus_per_node, nics_per_node)


def _streams(groups: np.ndarray, gpus_per_node: int, chain: bool) -> tuple[np.ndarray, np.ndarray]:
    """(source rank, destination rank) of the inter-node streams of `groups` (rows of ranks,
    each in increasing order): ring j over the nodes of a row joins its j-th rank on each
    node; a chain does not close the ring."""
    rows, n = groups.shape
    ranks = groups.ravel()
    node = ranks // gpus_per_node
    pos = np.arange(ranks.size)
    first = np.r_[True, node[1:] != node[:-1]] | (pos % n == 0)  # a row's first rank on a node
    slot = pos - np.maximum.accumulate(np.where(first, pos, 0))
    # a ring's ranks in node order: the row's ranks of one slot keep their (node) order
    ring = pos - pos % n + slot
    order = np.argsort(ring, kind="stable")
    ring, src = ring[order], ranks[order]
    start = np.r_[True, ring[1:] != ring[:-1]]
    head = np.maximum.accumulate(np.where(start, np.arange(ring.size), 0))
    nxt = np.arange(1, ring.size + 1)
    last = np.r_[start[1:], True]
    nxt[last] = head[last]
    keep = (src // gpus_per_node != src[nxt] // gpus_per_node) & (~last if chain else True)
    return src[keep], src[nxt][keep]


@lru_cache(maxsize=4096)
def _share(fabric: Fabric, nics_per_node: int, gpus_per_node: int, world_size: int,
           axes: tuple[tuple[int, int], ...], ranks_per_node: int, chain: bool) -> float:
    """link_share for groups given by (size, stride) per axis."""
    offsets = axis_offsets(axes)
    r = np.arange(world_size)
    base = r[np.all([(r // stride) % size == 0 for size, stride in axes], axis=0)]
    src, dst = _streams(base[:, None] + offsets[None, :], gpus_per_node, chain)
    if src.size == 0:
        return 1.0
    nodes = math.ceil(world_size / gpus_per_node)
    # the slowest group's rate is its slowest stream's, the slowest of all streams
    slowest = _network(fabric, nodes, gpus_per_node, nics_per_node).slowest_rate(src, dst)
    # The inter-node curves already give each of r ranks per node min(1, nics/r) of a NIC.
    assumed = min(1.0, nics_per_node / ranks_per_node)
    return float(min(1.0, slowest / assumed))


def link_share(fabric: Fabric | None, nics_per_node: int, mesh: Mesh, axes: tuple[str, ...],
               chain: bool = False) -> float:
    """The fraction of the per-rank inter-node bandwidth (as the profile's curve for the
    group's ranks per node assumes it) that the groups along `axes` get when all of them
    communicate at once: rings, or pipeline chains (`chain`). 1.0 without a fabric, inside
    one node, or with a NIC of its own and no oversubscribed uplink. The mesh's nodes have
    gcd(nics_per_node, gpus_per_node) NICs (a cluster of smaller nodes than the profile's
    keeps one NIC per GPU). Cached per group structure."""
    return _group_share(fabric, nics_per_node, mesh, axes, mesh.group(axes), chain)


def _group_share(fabric: Fabric | None, nics_per_node: int, mesh: Mesh, axes: tuple[str, ...],
                 group: Group, chain: bool) -> float:
    """link_share of the groups along `axes`, rank 0's of which is `group`."""
    if fabric is None or group.size == group.ranks_per_node:
        return 1.0
    nics = math.gcd(nics_per_node, mesh.gpus_per_node)
    if nics == mesh.gpus_per_node and fabric.oversubscription == 1:
        # A NIC per GPU and non-blocking uplinks: each rank sends one stream and receives one
        # (a ring or a chain), so no NIC or uplink carries more than its rate: the full rate.
        return 1.0
    # A chain's streams are single sends between two ranks: one rank per node each end.
    return _share(fabric, nics, mesh.gpus_per_node, mesh.world_size, mesh.strided(axes),
                  1 if chain else group.ranks_per_node, chain)


def training_groups(fabric: Fabric | None, nics_per_node: int, mesh: Mesh) -> dict[str, Group]:
    """The groups a training step communicates over, with their link shares: tp, cp, dp
    (gradients reduce over dp x cp) and pp (two adjacent stages; every pipeline's stages
    send at once)."""
    def placed(axes: tuple[str, ...]) -> Group:
        group = mesh.group(axes)
        return replace(group, link_share=_group_share(fabric, nics_per_node, mesh, axes, group, False))
    pipeline = _group_share(fabric, nics_per_node, mesh, ("pp",), mesh.group(("pp",)), True)
    return {"tp": placed(("tp",)), "cp": placed(("cp",)), "dp": placed(("dp", "cp")),
            "pp": replace(mesh.neighbour_pair("pp"), link_share=pipeline)}
