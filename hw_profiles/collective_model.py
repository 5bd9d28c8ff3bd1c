"""Collective cost model: alpha-beta curves per (collective, level, size), composed
hierarchically when a group spans nodes.

Each measured curve is time = alpha + bus_bytes / busbw, where bus_bytes is the message
(nccl-tests "size") times nccl-tests' bus-bandwidth factor, so that busbw is comparable across
collectives and group sizes (NVIDIA/nccl-tests doc/PERFORMANCE.md). A curve may have two
regimes, the minimum of a latency line and a bandwidth line (NCCL switches from its LL/LL128
protocols to Simple as messages grow: NCCL docs, NCCL_PROTO); a one-regime curve has both
lines equal.

Intra-node curves are keyed by group size (interpolated in log(group size), clamped outside
the measured range). Inter-node curves are keyed by ranks per node and give the per-rank
inter-node part (each rank drives its own NIC on a DGX); a group of n = r x N ranks over N
nodes runs intra-node reduce-scatter / all-gather over r ranks and the inter-node step over N
nodes on M/r bytes per rank (hierarchical all-reduce, Jia et al. 2018 "Highly scalable deep
learning training system with mixed-precision"; NCCL's tree algorithms are likewise
node-hierarchical).

`link_share` (core.mesh.Group, from the profile's fabric: hw_profiles/fabric.py) scales the
inter-node steps' bandwidth when the group shares NICs or oversubscribed uplinks with the
other groups of its kind; their latency stays.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv", "all_to_all")


def bus_factor(kind: str, n: float) -> float:
    """nccl-tests busbw = algbw x factor (NVIDIA/nccl-tests doc/PERFORMANCE.md)."""
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if kind in ("broadcast", "send_recv"):
        return 1.0
    raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")


def ring_steps(kind: str, n: float) -> float:
    """Latency steps of the ring algorithm: alpha grows with the number of sequential hops
    (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication
    operations in MPICH"); used only to derive unmeasured collectives' alpha."""
    if kind == "all_reduce":
        return 2.0 * max(n - 1, 1)
    if kind == "send_recv":
        return 1.0
    return float(max(n - 1, 1))


@dataclass(frozen=True)
class Line:
    """One alpha-beta line: time = alpha_s + bus_bytes / busbw_bytes_per_s."""

    alpha_s: float
    busbw_bytes_per_s: float

    def time_s(self, bus_bytes):
        return self.alpha_s + bus_bytes / self.busbw_bytes_per_s


@dataclass(frozen=True)
class Curve:
    """Time of one collective at one level and size: min of the latency-regime line
    (`small`) and the bandwidth-regime line (`large`); `source` says where it came from."""

    small: Line
    large: Line
    source: str

    def time_s(self, bus_bytes):
        return np.minimum(self.small.time_s(bus_bytes), self.large.time_s(bus_bytes))

    def scaled(self, alpha: float = 1.0, bandwidth: float = 1.0, source: str | None = None) -> Curve:
        def line(x: Line) -> Line:
            return Line(x.alpha_s * alpha, x.busbw_bytes_per_s * bandwidth)
        return Curve(line(self.small), line(self.large), self.source if source is None else source)


def _interpolate(curves: dict[int, Curve], key: int) -> Curve:
    """Curve at `key`, linear in log(key) between measured keys (alpha and 1/busbw, the
    coefficients time is linear in), clamped to the nearest measured key outside."""
    keys = sorted(curves)
    if key in curves:
        return curves[key]
    if key <= keys[0] or key >= keys[-1]:
        return curves[keys[0] if key <= keys[0] else keys[-1]]
    hi = next(k for k in keys if k > key)
    lo = max(k for k in keys if k < key)
    w = (np.log(key) - np.log(lo)) / (np.log(hi) - np.log(lo))

    def mix(a: Line, b: Line) -> Line:
        inv = (1 - w) / a.busbw_bytes_per_s + w / b.busbw_bytes_per_s
        return Line((1 - w) * a.alpha_s + w * b.alpha_s, 1.0 / inv)
    c_lo, c_hi = curves[lo], curves[hi]
    return Curve(mix(c_lo.small, c_hi.small), mix(c_lo.large, c_hi.large),
                 f"interpolated between {lo} and {hi}")


@dataclass(frozen=True)
class CollectiveFit:
    """Curves for every collective kind: intra[kind][group_size] (whole collective inside one
    node) and inter[kind][ranks_per_node] (per-rank inter-node step). `nics_per_node` caps how
    many ranks of a node get a NIC of their own."""

    intra: dict[str, dict[int, Curve]]
    inter: dict[str, dict[int, Curve]]
    nics_per_node: int

    def intra_curve(self, kind: str, group_size: int) -> Curve:
        return _interpolate(self.intra[kind], group_size)

    def inter_curve(self, kind: str, ranks_per_node: int) -> Curve:
        curves = self.inter[kind]
        curve = _interpolate(curves, ranks_per_node)
        nearest = min(max(ranks_per_node, min(curves)), max(curves))
        # Ranks beyond the NIC count share NICs: per-rank bandwidth falls as nics/ranks.
        share = min(1.0, self.nics_per_node / ranks_per_node) / min(1.0, self.nics_per_node / nearest)
        return curve if share == 1.0 else curve.scaled(bandwidth=share)

    def scaled(self, intra_bw: float = 1.0, inter_bw: float = 1.0, alpha: float = 1.0) -> CollectiveFit:
        def table(t: dict[str, dict[int, Curve]], bw: float) -> dict[str, dict[int, Curve]]:
            return {k: {n: c.scaled(alpha=alpha, bandwidth=bw) for n, c in v.items()}
                    for k, v in t.items()}
        return replace(self, intra=table(self.intra, intra_bw), inter=table(self.inter, inter_bw))


def intra_time_s(fit: CollectiveFit, kind: str, message_bytes, group_size: int):
    """Time of `kind` over `group_size` ranks of one node."""
    if group_size <= 1:
        return 0.0 * np.asarray(message_bytes, dtype=float)
    return fit.intra_curve(kind, group_size).time_s(message_bytes * bus_factor(kind, group_size))


def latency_steps(kind: str, nodes: float) -> float:
    """Sequential inter-node hops of `kind` over `nodes` nodes: a ring all-gather /
    reduce-scatter / broadcast takes N-1, an all-reduce the fewer of a ring's 2(N-1) and a
    tree's 2*log2(N) (NCCL picks between them; Thakur et al. 2005 sec 4; NCCL's tuning)."""
    if kind == "send_recv" or nodes <= 1:
        return 1.0
    if kind == "all_reduce":
        return min(2.0 * (nodes - 1), 2.0 * np.ceil(np.log2(nodes)))
    if kind == "all_to_all":
        return 1.0  # every pair exchanges at once
    return nodes - 1.0


def _shared_inter_curve(fit: CollectiveFit, kind: str, ranks_per_node: int, link_share: float) -> Curve:
    curve = fit.inter_curve(kind, ranks_per_node)
    return curve if link_share == 1.0 else curve.scaled(bandwidth=link_share)


def inter_step_s(fit: CollectiveFit, kind: str, per_rank_bytes, nodes: float, ranks_per_node: int,
                 link_share: float = 1.0):
    """Time of the inter-node step of `kind` over `nodes` nodes, each rank moving
    `per_rank_bytes` through its NIC (bus factor over the node count) at `link_share` of the
    curve's bandwidth. The curve's latency was fitted on two nodes; more nodes add latency for
    each further sequential hop."""
    factor = 1.0 if kind == "send_recv" else bus_factor(kind, nodes)
    curve = _shared_inter_curve(fit, kind, ranks_per_node, link_share)
    extra_hops = latency_steps(kind, nodes) / latency_steps(kind, 2.0) - 1.0
    return curve.time_s(per_rank_bytes * factor) + extra_hops * curve.small.alpha_s


def hierarchical_time_s(fit: CollectiveFit, kind: str, message_bytes, group_size: int,
                        ranks_per_node: int, link_share: float = 1.0):
    """Time of `kind` over a group spanning group_size / ranks_per_node nodes."""
    r, s = ranks_per_node, link_share
    nodes = group_size / r
    m = np.asarray(message_bytes, dtype=float)
    if kind == "send_recv":
        return inter_step_s(fit, kind, m, 2.0, r, s)
    if kind == "all_reduce":
        return (intra_time_s(fit, "reduce_scatter", m, r) + inter_step_s(fit, kind, m / r, nodes, r, s)
                + intra_time_s(fit, "all_gather", m, r))
    if kind == "reduce_scatter":
        return intra_time_s(fit, kind, m, r) + inter_step_s(fit, kind, m / r, nodes, r, s)
    if kind == "all_gather":
        return inter_step_s(fit, kind, m / r, nodes, r, s) + intra_time_s(fit, kind, m, r)
    if kind == "broadcast":
        # Root's node sends M/r through each of its r NICs, then each node all-gathers M.
        return inter_step_s(fit, kind, m / r, nodes, r, s) + intra_time_s(fit, "all_gather", m, r)
    if kind == "all_to_all":
        # Of a rank's buffer, (n-r)/n leaves the node over its NIC while (r-1)/n moves over the
        # intra-node links at the same time; the slower of the two bounds the exchange.
        inter = _shared_inter_curve(fit, kind, r, s).time_s(m * (group_size - r) / group_size)
        intra = intra_time_s(fit, kind, m * r / group_size, r)
        return np.maximum(inter, intra)
    raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")


def collective_time_s(fit: CollectiveFit, kind: str, message_bytes, group_size: int,
                      ranks_per_node: int, link_share: float = 1.0):
    """Time (s) of one collective; message_bytes in nccl-tests' size convention
    (calibration/samples.py), link_share the group's share of the inter-node bandwidth.
    Vectorised over message_bytes."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")
    if not 0.0 < link_share <= 1.0:
        raise ValueError(f"link_share {link_share!r} outside (0, 1]")
    r = min(max(int(ranks_per_node), 1), int(group_size))
    if group_size <= 1:
        t = 0.0 * np.asarray(message_bytes, dtype=float)
    elif r == group_size:
        t = intra_time_s(fit, kind, np.asarray(message_bytes, dtype=float), group_size)
    else:
        t = hierarchical_time_s(fit, kind, message_bytes, group_size, r, float(link_share))
    return float(t) if np.ndim(t) == 0 else t
