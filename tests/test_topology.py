"""Topology graph, rank placement and link sharing on small clusters checked by hand."""
import math

import pytest

from meshplan.hw_profiles.topology import ClusterSpec, build_graph, group_link_share, place_ranks
from meshplan.core.errors import PlanError, ProfileError

GB = 1e9
NVSWITCH_BW, NIC_BW = 300 * GB, 25 * GB


def spec(**overrides) -> ClusterSpec:
    base = dict(gpus_per_node=8, num_nodes=2, intra_node_fabric="nvswitch",
                intra_node_bytes_per_s=NVSWITCH_BW, nics_per_node=1, nic_bytes_per_s=NIC_BW,
                levels="single-switch", intra_node_latency_s=1e-6, inter_node_latency_s=3e-6)
    return ClusterSpec(**{**base, **overrides})


def shares(s: ClusterSpec, dims: dict, dim: str):
    placement = place_ranks(s, math.prod(dims.values()), dims)
    return group_link_share(build_graph(s), placement.device_groups(dim))


def test_place_ranks_innermost_first():
    s = spec(gpus_per_node=4)
    p = place_ranks(s, 8, {"tp": 2, "dp": 2, "pp": 2})
    assert p.groups["tp"] == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert p.groups["dp"] == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert p.groups["pp"] == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert p.devices[5] == "n1/gpu1"
    assert p.device_groups("pp")[3] == ("n0/gpu3", "n1/gpu3")


def test_place_ranks_rejects_bad_dims():
    with pytest.raises(PlanError, match="multiply"):
        place_ranks(spec(), 16, {"tp": 8, "dp": 4})
    with pytest.raises(PlanError, match="world_size"):
        place_ranks(spec(), 32, {"tp": 8, "dp": 4})


def test_graph_nodes_and_edges():
    g = build_graph(spec(nics_per_node=2, levels="fat-tree", nodes_per_leaf=1))
    kinds = [k for _, k in g.nodes(data="kind")]
    assert kinds.count("device") == 16 and kinds.count("nvswitch") == 2
    assert kinds.count("nic") == 4 and kinds.count("leaf") == 2 and kinds.count("spine") == 1
    # GPUs 0-3 use NIC 0, GPUs 4-7 NIC 1; each leaf's uplink carries its 2 NICs.
    assert g.has_edge("n0/gpu3", "n0/nic0") and g.has_edge("n0/gpu4", "n0/nic1")
    assert g.edges["leaf0", "spine"]["bandwidth_bytes_per_s"] == 2 * NIC_BW
    assert all(d["latency_s"] > 0 for *_, d in g.edges(data=True))


def test_tp_group_inside_node_gets_nvswitch_rate():
    tp = shares(spec(), {"tp": 8, "dp": 2}, "tp")
    assert len(tp) == 2
    for share in tp:
        assert share.bandwidth_bytes_per_s == NVSWITCH_BW
        assert (share.level, share.ranks_per_node, share.groups_sharing) == ("intra_node", 8, 1)


def test_group_spanning_two_nodes_gets_nic_rate():
    (tp,) = shares(spec(), {"tp": 16}, "tp")
    assert tp.bandwidth_bytes_per_s == NIC_BW
    assert (tp.level, tp.ranks_per_node, tp.groups_sharing) == ("inter_node", 8, 1)


def test_dp_groups_share_a_single_nic():
    dp = shares(spec(), {"tp": 8, "dp": 2}, "dp")
    assert len(dp) == 8
    for share in dp:
        assert share.bandwidth_bytes_per_s == NIC_BW / 8
        assert (share.level, share.ranks_per_node, share.groups_sharing) == ("inter_node", 1, 8)
        assert "nic0" in share.bottleneck[0] or "nic0" in share.bottleneck[1]


def test_rail_optimized_gives_each_dp_group_a_nic():
    s = spec(nics_per_node=8, levels="rail-optimized", nodes_per_leaf=2)
    for share in shares(s, {"tp": 8, "dp": 2}, "dp"):
        assert share.bandwidth_bytes_per_s == NIC_BW
        assert share.groups_sharing == 1


def test_oversubscription_halves_cross_spine_bandwidth():
    def dp_bw(oversubscription):
        s = spec(nics_per_node=8, levels="fat-tree", nodes_per_leaf=1,
                 oversubscription=oversubscription)
        return {x.bandwidth_bytes_per_s for x in shares(s, {"tp": 8, "dp": 2}, "dp")}
    assert dp_bw(1.0) == {NIC_BW}
    assert dp_bw(2.0) == {NIC_BW / 2}


def test_nvlink_pairs_ring_limited_by_pcie():
    s = spec(num_nodes=1, intra_node_fabric="nvlink-pairs", pcie_bytes_per_s=16 * GB)
    pair, = shares(s, {"tp": 2, "dp": 4}, "tp")[:1]
    assert pair.bandwidth_bytes_per_s == NVSWITCH_BW  # the pair's own NVLink
    (tp8,) = shares(s, {"tp": 8}, "tp")
    assert tp8.bandwidth_bytes_per_s == 16 * GB and tp8.level == "intra_node"


def test_single_rank_groups_have_no_traffic():
    (one,) = shares(spec(num_nodes=1, gpus_per_node=1), {"tp": 1}, "tp")
    assert one.bandwidth_bytes_per_s == math.inf and one.groups_sharing == 0


@pytest.mark.parametrize("overrides, field", [
    (dict(nics_per_node=16, levels="rail-optimized", nodes_per_leaf=1), "nics_per_node"),
    (dict(nics_per_node=3), "nics_per_node"),
    (dict(nic_bytes_per_s=0.0), "nic_bytes_per_s"),
    (dict(intra_node_bytes_per_s=-1.0), "intra_node_bytes_per_s"),
    (dict(num_nodes=0), "num_nodes"),
    (dict(inter_node_latency_s=-1e-6), "inter_node_latency_s"),
    (dict(oversubscription=0.5, levels="fat-tree", nodes_per_leaf=1), "oversubscription"),
    (dict(oversubscription=2.0), "oversubscription"),
    (dict(levels="fat-tree"), "nodes_per_leaf"),
    (dict(nodes_per_leaf=4), "nodes_per_leaf"),
    (dict(intra_node_fabric="nvlink-pairs"), "pcie_bytes_per_s"),
    (dict(pcie_bytes_per_s=16 * GB), "pcie_bytes_per_s"),
    (dict(gpus_per_node=3, nics_per_node=1, intra_node_fabric="nvlink-pairs",
          pcie_bytes_per_s=16 * GB), "gpus_per_node"),
    (dict(intra_node_fabric="infiniband"), "intra_node_fabric"),
    (dict(levels="dragonfly"), "levels"),
])
def test_spec_validation_names_the_field(overrides, field):
    with pytest.raises(ProfileError) as err:
        spec(**overrides)
    assert err.value.field == field
