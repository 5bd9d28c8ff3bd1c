"""Cluster topology as a graph: devices, the intra-node fabric, NICs and the switch levels
above them; ranks placed on devices; and the share of the bottleneck link each parallel
group's ring traffic gets when all groups of a dimension communicate at once.

Edges are full duplex: `bandwidth_bytes_per_s` is the rate in each direction, and traffic
is counted per direction. Each leaf's uplinks to the spines are one aggregate edge to a
single "spine" node, of the leaf's downlink capacity / oversubscription (a non-blocking
fat tree has oversubscription 1: Leiserson 1985, "Fat-trees"; ECMP is assumed to spread
flows evenly over the spines).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, fields

import networkx as nx

from meshplan.core.errors import PlanError, ProfileError

FABRICS = ("nvswitch", "pcie", "nvlink-pairs")
LEVELS = ("single-switch", "fat-tree", "rail-optimized")
# Route weights: a hop onto a NIC costs more than one through the intra-node fabric, so
# traffic between GPUs of one node stays inside it (NCCL uses P2P inside a node and the
# network only between nodes: NCCL docs, NCCL_P2P_LEVEL / NCCL_NET_GDR_LEVEL).
FABRIC_WEIGHT, NIC_WEIGHT, NETWORK_WEIGHT = 1, 2, 1


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of num_nodes nodes of gpus_per_node GPUs. intra_node_bytes_per_s is one GPU's
    link into the fabric (NVSwitch port, PCIe slot, or the NVLink of a pair; then
    pcie_bytes_per_s links the pairs). GPUs split evenly over nics_per_node NICs. Leaves
    switch nodes_per_leaf nodes (fat-tree) or the same NIC of nodes_per_leaf nodes (one
    rail per NIC index, rail-optimized)."""

    gpus_per_node: int
    num_nodes: int
    intra_node_fabric: str
    intra_node_bytes_per_s: float
    nics_per_node: int
    nic_bytes_per_s: float
    levels: str
    intra_node_latency_s: float
    inter_node_latency_s: float
    oversubscription: float = 1.0
    nodes_per_leaf: int | None = None
    pcie_bytes_per_s: float | None = None

    def __post_init__(self):
        for f in ("gpus_per_node", "num_nodes", "nics_per_node"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProfileError(f, f"must be a positive integer, got {v!r}", f"set {f} >= 1")
        for f in ("intra_node_bytes_per_s", "nic_bytes_per_s"):
            if not getattr(self, f) > 0:
                raise ProfileError(f, f"must be positive, got {getattr(self, f)!r}",
                                   f"set {f} to the link's rate in bytes/s")
        for f in ("intra_node_latency_s", "inter_node_latency_s"):
            if not getattr(self, f) >= 0:
                raise ProfileError(f, f"must be >= 0, got {getattr(self, f)!r}",
                                   f"set {f} in seconds")
        if self.intra_node_fabric not in FABRICS:
            raise ProfileError("intra_node_fabric", f"unknown fabric {self.intra_node_fabric!r}",
                               f"use one of {FABRICS}")
        if self.levels not in LEVELS:
            raise ProfileError("levels", f"unknown network {self.levels!r}", f"use one of {LEVELS}")
        if not self.oversubscription >= 1:
            raise ProfileError("oversubscription", f"must be >= 1, got {self.oversubscription!r}",
                               "use 1 for a non-blocking network, 2 for 2:1 leaf uplinks, ...")
        if self.levels == "rail-optimized" and self.nics_per_node > self.gpus_per_node:
            raise ProfileError("nics_per_node", f"{self.nics_per_node} rails for "
                               f"{self.gpus_per_node} GPUs per node", "rail-optimized networks "
                               "need at least one GPU per rail NIC; lower nics_per_node")
        if self.gpus_per_node % self.nics_per_node:
            raise ProfileError("nics_per_node", f"{self.gpus_per_node} GPUs do not split evenly "
                               f"over {self.nics_per_node} NICs", "use a divisor of gpus_per_node")
        if self.levels == "single-switch":
            if self.oversubscription != 1:
                raise ProfileError("oversubscription", "a single switch has no uplinks to "
                                   "oversubscribe", "use 1, or levels 'fat-tree'")
            if self.nodes_per_leaf is not None:
                raise ProfileError("nodes_per_leaf", "a single switch has no leaves",
                                   "leave it unset, or use levels 'fat-tree'")
        elif not (isinstance(self.nodes_per_leaf, int) and self.nodes_per_leaf >= 1):
            raise ProfileError("nodes_per_leaf", f"{self.levels} needs the nodes per leaf "
                               f"switch, got {self.nodes_per_leaf!r}", "set nodes_per_leaf >= 1")
        if self.intra_node_fabric == "nvlink-pairs":
            if self.gpus_per_node % 2:
                raise ProfileError("gpus_per_node", f"{self.gpus_per_node} GPUs cannot form "
                                   "NVLink pairs", "use an even gpus_per_node")
            if not (self.pcie_bytes_per_s or 0) > 0:
                raise ProfileError("pcie_bytes_per_s", "nvlink-pairs needs the PCIe rate "
                                   "between pairs", "set pcie_bytes_per_s > 0")
        elif self.pcie_bytes_per_s is not None:
            raise ProfileError("pcie_bytes_per_s", f"only used by 'nvlink-pairs', not "
                               f"{self.intra_node_fabric!r}", "leave it unset")

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes


def device_name(node: int, local: int) -> str:
    return f"n{node}/gpu{local}"


def build_graph(spec: ClusterSpec) -> nx.Graph:
    """Nodes have `kind` (device, nvswitch, pcie, nic, leaf, spine); devices and NICs also
    `node` and `local`. Edges have bandwidth_bytes_per_s, latency_s and route_weight."""
    g = nx.Graph(spec={f.name: getattr(spec, f.name) for f in fields(spec)})

    def link(a, b, bw, latency, weight):
        g.add_edge(a, b, bandwidth_bytes_per_s=float(bw), latency_s=float(latency),
                   route_weight=weight)

    intra, lat_in = spec.intra_node_bytes_per_s, spec.intra_node_latency_s
    gpus_per_nic = spec.gpus_per_node // spec.nics_per_node
    for n in range(spec.num_nodes):
        gpus = [device_name(n, i) for i in range(spec.gpus_per_node)]
        for i, d in enumerate(gpus):
            g.add_node(d, kind="device", node=n, local=i)
        if spec.intra_node_fabric == "nvlink-pairs":
            hub, hub_bw = f"n{n}/pcie", spec.pcie_bytes_per_s
            for i in range(0, spec.gpus_per_node, 2):
                link(gpus[i], gpus[i + 1], intra, lat_in, FABRIC_WEIGHT)
        else:
            hub, hub_bw = f"n{n}/{spec.intra_node_fabric}", intra
        g.add_node(hub, kind="pcie" if spec.intra_node_fabric != "nvswitch" else "nvswitch", node=n)
        for d in gpus:
            link(d, hub, hub_bw, lat_in, FABRIC_WEIGHT)
        for j in range(spec.nics_per_node):
            nic = f"n{n}/nic{j}"
            g.add_node(nic, kind="nic", node=n, local=j)
            for d in gpus[j * gpus_per_nic:(j + 1) * gpus_per_nic]:
                link(d, nic, spec.nic_bytes_per_s, lat_in, NIC_WEIGHT)
    _add_network(g, spec, link)
    return g


def _add_network(g: nx.Graph, spec: ClusterSpec, link) -> None:
    nic_bw, lat = spec.nic_bytes_per_s, spec.inter_node_latency_s
    if spec.levels == "single-switch":
        g.add_node("leaf0", kind="leaf")
        for n in range(spec.num_nodes):
            for j in range(spec.nics_per_node):
                link(f"n{n}/nic{j}", "leaf0", nic_bw, lat, NETWORK_WEIGHT)
        return
    per_leaf = spec.nodes_per_leaf
    blocks = math.ceil(spec.num_nodes / per_leaf)
    rails = range(spec.nics_per_node) if spec.levels == "rail-optimized" else [None]
    for b in range(blocks):
        nodes = range(b * per_leaf, min((b + 1) * per_leaf, spec.num_nodes))
        for rail in rails:
            leaf = f"leaf{b}" if rail is None else f"rail{rail}/leaf{b}"
            g.add_node(leaf, kind="leaf")
            nics = range(spec.nics_per_node) if rail is None else [rail]
            for n in nodes:
                for j in nics:
                    link(f"n{n}/nic{j}", leaf, nic_bw, lat, NETWORK_WEIGHT)
            if blocks > 1 or rail is not None and spec.nics_per_node > 1:
                uplink = len(nodes) * len(nics) * nic_bw / spec.oversubscription
                g.add_node("spine", kind="spine")
                link(leaf, "spine", uplink, lat, NETWORK_WEIGHT)


@dataclass(frozen=True)
class Placement:
    """devices[rank] is the graph node of that rank; groups[dim] lists the rank groups that
    differ only along dim, ordered by their first rank."""

    devices: tuple[str, ...]
    groups: dict[str, tuple[tuple[int, ...], ...]]

    def device_groups(self, dim: str) -> list[tuple[str, ...]]:
        return [tuple(self.devices[r] for r in grp) for grp in self.groups[dim]]


def place_ranks(spec: ClusterSpec, world_size: int, dims: dict[str, int]) -> Placement:
    """Ranks fill nodes in order (rank r on node r // gpus_per_node) and vary fastest along the
    first entry of dims (innermost-first, e.g. {"tp": 8, "cp": 1, "dp": 16, "pp": 8}: TP
    groups are consecutive ranks, as in Megatron-LM and torchtitan)."""
    for dim, size in dims.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise PlanError(dim, f"must be a positive integer, got {size!r}", f"set {dim} >= 1")
    if math.prod(dims.values()) != world_size:
        raise PlanError("dims", f"{dict(dims)} multiply to {math.prod(dims.values())}, not the "
                        f"world size {world_size}", "make the product of the sizes the world size")
    if world_size > spec.num_gpus:
        raise PlanError("world_size", f"{world_size} ranks for {spec.num_gpus} GPUs",
                        "add nodes or lower the parallel sizes")
    devices = tuple(device_name(r // spec.gpus_per_node, r % spec.gpus_per_node)
                    for r in range(world_size))
    groups, stride = {}, 1
    for dim, size in dims.items():
        groups[dim] = tuple(tuple(r + c * stride for c in range(size))
                            for r in range(world_size) if (r // stride) % size == 0)
        stride *= size
    return Placement(devices, groups)


@dataclass(frozen=True)
class LinkShare:
    """One group's ring under concurrent traffic of all groups given together: the per-rank
    bandwidth of its bottleneck link direction, the slowest level it spans, its ranks per
    node, and how many of the groups send over that bottleneck (itself included)."""

    bandwidth_bytes_per_s: float
    level: str
    ranks_per_node: int
    groups_sharing: int
    bottleneck: tuple[str, str] | None


def _ring(graph: nx.Graph, group: tuple[str, ...]) -> list[str]:
    """NCCL orders rings to cross each node boundary once (Jeaugey 2019, "Massively scale
    your deep learning training with NCCL 2.4", NVIDIA blog): sort by (node, local GPU)."""
    return sorted(group, key=lambda d: (graph.nodes[d]["node"], graph.nodes[d]["local"]))


def group_link_share(graph: nx.Graph, groups: list[tuple[str, ...]]) -> list[LinkShare]:
    """Route every group's ring (each member sends to the next) over shortest paths by
    route_weight, count ring streams per directed edge, and give each group its bottleneck."""
    paths: dict[tuple[str, str], list[tuple[str, str]]] = {}
    load: Counter = Counter()
    users: dict[tuple[str, str], set[int]] = defaultdict(set)
    group_edges = []
    for i, group in enumerate(groups):
        ring = _ring(graph, tuple(group))
        edges = []
        for a, b in zip(ring, ring[1:] + ring[:1]):  # a lone rank pairs with itself: no edges
            if (a, b) not in paths:
                p = nx.shortest_path(graph, a, b, weight="route_weight")
                paths[a, b] = list(zip(p, p[1:]))
            edges += paths[a, b]
        for e in edges:
            load[e] += 1
            users[e].add(i)
        group_edges.append(edges)
    shares = []
    for group, edges in zip(groups, group_edges):
        per_node = Counter(graph.nodes[d]["node"] for d in group)
        level = "intra_node" if len(per_node) == 1 else "inter_node"
        if not edges:
            shares.append(LinkShare(math.inf, level, max(per_node.values()), 0, None))
            continue
        bottleneck = min(edges, key=lambda e: graph.edges[e]["bandwidth_bytes_per_s"] / load[e])
        shares.append(LinkShare(graph.edges[bottleneck]["bandwidth_bytes_per_s"] / load[bottleneck],
                                level, max(per_node.values()), len(users[bottleneck]), bottleneck))
    return shares
