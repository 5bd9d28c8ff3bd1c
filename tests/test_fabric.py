"""The fabric graph and the link share of each group kind on small clusters, checked by hand;
the collective model's and the planner's use of the share."""
import dataclasses
import json

import pytest

from meshplan.core.errors import ProfileError
from meshplan.core.mesh import Group, Mesh
from meshplan.hw_profiles.fabric import (Fabric, build_graph, link_share, parse_fabric,
                                         training_groups)
from meshplan.hw_profiles.profile import HardwareProfile, load_profile
from meshplan.planner.space import candidate_table
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate

NIC = 25e9
TWO_LEAVES_OS2 = Fabric("fat-tree", nodes_per_leaf=2, oversubscription=2.0)


def mesh(order, gpus_per_node, **sizes):
    return Mesh.of({"tp": 1, "cp": 1, "dp": 1, "pp": 1, **sizes}, order, gpus_per_node)


def test_graph_nodes_edges_and_uplinks():
    g = build_graph(Fabric("fat-tree", 2, 4.0), num_nodes=4, gpus_per_node=8, nics_per_node=2,
                    nic_bytes_per_s=NIC)
    kinds = [k for _, k in g.nodes(data="kind")]
    assert (kinds.count("device"), kinds.count("nic"), kinds.count("leaf"), kinds.count("spine")) == (32, 8, 2, 1)
    assert g.has_edge("n1/gpu3", "n1/nic0") and g.has_edge("n1/gpu4", "n1/nic1")
    # a leaf's downlinks: 2 nodes x 2 NICs; its uplink a quarter of that
    assert g.edges["leaf0", "spine"]["bandwidth_bytes_per_s"] == 4 * NIC / 4
    rail = build_graph(Fabric("rail-optimized", 2), 2, 8, 8, NIC)
    assert set(rail["rail3/leaf0"]) == {"n0/nic3", "n1/nic3", "spine"}
    single = build_graph(Fabric("single-switch"), 3, 1, 1, NIC)
    assert "spine" not in single and single.degree("leaf0") == 3


def test_dp_across_leaves_gets_half_at_oversubscription_2():
    # 4 one-GPU nodes, leaves {0,1} and {2,3}, each leaf's uplink = 2 NICs / 2 = 1 NIC.
    # Pipeline innermost: DP pairs {0,2} and {1,3} both cross leaf0's uplink: 1 NIC / 2 streams.
    pp_inner = training_groups(TWO_LEAVES_OS2, 1, mesh(("pp", "dp", "tp", "cp"), 1, dp=2, pp=2))
    assert pp_inner["dp"] == Group(2, 1, 0.5)
    assert pp_inner["pp"] == Group(2, 1, 1.0)       # stage pairs {0,1}, {2,3}: inside a leaf
    dp_inner = training_groups(TWO_LEAVES_OS2, 1, mesh(("dp", "pp", "tp", "cp"), 1, dp=2, pp=2))
    assert dp_inner["dp"] == Group(2, 1, 1.0)
    assert dp_inner["pp"] == Group(2, 1, 0.5)


def test_ring_over_both_leaves_crosses_each_uplink_once():
    # DP ring 0-1-2-3-0: one stream leaves each leaf per direction: fits a 1-NIC uplink (2:1),
    # half of a 0.5-NIC uplink (4:1).
    m = mesh(("dp", "tp", "cp", "pp"), 1, dp=4)
    assert link_share(TWO_LEAVES_OS2, 1, m, ("dp",)) == 1.0
    assert link_share(Fabric("fat-tree", 2, 4.0), 1, m, ("dp",)) == 0.5


def test_rail_optimized_dp_of_same_index_gpus_gets_full_rate():
    m = mesh(("tp", "cp", "dp", "pp"), 8, tp=8, dp=4)   # DP group k: GPU k of each node
    assert link_share(Fabric("rail-optimized", 2), 8, m, ("dp", "cp")) == 1.0


@pytest.mark.parametrize("fabric", [Fabric("rail-optimized", 2), Fabric("fat-tree", 3),
                                    Fabric("single-switch")])
def test_a_nic_per_gpu_without_oversubscription_gives_every_group_the_full_rate(fabric):
    # the shortcut against routing every group's streams over the graph
    from meshplan.hw_profiles.fabric import _share
    for order in (("tp", "cp", "dp", "pp"), ("dp", "tp", "pp", "cp"), ("pp", "dp", "cp", "tp")):
        m = mesh(order, 4, tp=2, cp=2, dp=4, pp=2)
        for axes, chain in ((("tp",), False), (("cp",), False), (("dp", "cp"), False), (("pp",), True)):
            structure = m.strided(axes)
            group = m.group(axes)
            routed = _share(fabric, 4, 4, m.world_size, structure,
                            1 if chain else group.ranks_per_node, chain)
            assert routed == 1.0 and link_share(fabric, 4, m, axes, chain) == 1.0


def test_single_nic_per_node_shared_by_8_dp_groups_gets_an_eighth():
    m = mesh(("tp", "cp", "dp", "pp"), 8, tp=8, dp=2)
    assert link_share(Fabric("fat-tree", 2), 1, m, ("dp", "cp")) == 1 / 8
    assert link_share(Fabric("single-switch"), 1, m, ("dp", "cp")) == 1 / 8
    # one group of 16 ranks over 2 nodes: its 8 ranks per node share the NIC, which the
    # inter-node curve for 8 ranks per node already assumes (min(1, nics/r))
    assert link_share(Fabric("single-switch"), 1, mesh(("tp", "cp", "dp", "pp"), 8, tp=16), ("tp",)) == 1.0


def test_two_ranks_of_a_group_on_one_nic_get_half():
    # 8 GPUs on 2 NICs (GPUs 0-3 on NIC 0); a DP x CP group of GPUs 0 and 1 of each node
    m = mesh(("cp", "tp", "dp", "pp"), 8, cp=2, tp=4, dp=2)
    assert m.group(("dp", "cp")).ranks_per_node == 2
    # 4 such groups (one per TP index), 2 on each NIC, each with 2 rings: 4 streams per NIC
    assert link_share(Fabric("fat-tree", 4), 2, m, ("dp", "cp")) == 1 / 4


def test_no_fabric_or_one_node_means_no_contention():
    m = mesh(("tp", "cp", "dp", "pp"), 8, tp=8, dp=2)
    assert link_share(None, 1, m, ("dp",)) == 1.0
    assert link_share(Fabric("fat-tree", 1, 8.0), 1, m, ("tp",)) == 1.0  # inside a node
    assert training_groups(None, 1, m)["pp"] == Group(2, 1, 1.0)


def test_fabric_validation_names_the_field():
    for kwargs, field in [(dict(topology="dragonfly"), "fabric.topology"),
                          (dict(topology="fat-tree"), "fabric.nodes_per_leaf"),
                          (dict(topology="fat-tree", nodes_per_leaf=2, oversubscription=0.5),
                           "fabric.oversubscription"),
                          (dict(topology="single-switch", oversubscription=2.0), "fabric.oversubscription"),
                          (dict(topology="single-switch", nodes_per_leaf=4), "fabric.nodes_per_leaf")]:
        with pytest.raises(ProfileError) as err:
            Fabric(**kwargs)
        assert err.value.field == field
    with pytest.raises(ProfileError) as err:
        Fabric.from_dict({"topology": "fat-tree", "nodes_per_leaf": 2, "uplinks": 4}, "x.json")
    assert err.value.field == "fabric.uplinks" and "x.json" in err.value.problem


def test_parse_fabric_takes_what_is_left_out_from_the_profile():
    base = Fabric("rail-optimized", 32)
    assert parse_fabric("fat-tree:2", base) == Fabric("fat-tree", 32, 2.0, "what-if: fat-tree:2")
    assert parse_fabric("fat:4:8", None).nodes_per_leaf == 8
    with pytest.raises(ProfileError) as err:
        parse_fabric("rail", None)
    assert err.value.field == "fabric.nodes_per_leaf"
    with pytest.raises(ProfileError):
        parse_fabric("torus:2", base)


def test_profile_fabric_round_trip_and_default(tmp_path):
    a100 = load_profile("a100-80gb")
    assert a100.fabric == Fabric("rail-optimized", 20, 1.0, a100.fabric.source)
    assert "SuperPOD" in a100.fabric.source and load_profile("h100-80gb").fabric.nodes_per_leaf == 32
    data = a100.to_dict()
    assert HardwareProfile.from_dict(json.loads(json.dumps(data))).fabric == a100.fabric
    data.pop("fabric")
    assert HardwareProfile.from_dict(data).fabric is None   # not described: today's behaviour
    with pytest.raises(ProfileError) as err:
        HardwareProfile.from_dict({**data, "fabric": {"topology": "fat-tree"}}, "p.json")
    assert err.value.field == "fabric.nodes_per_leaf"


def test_link_share_scales_only_the_inter_node_bandwidth():
    hw = load_profile("a100-80gb")
    m = 1 << 30
    send = hw.collectives.inter_curve("send_recv", 1).large
    assert hw.collective_time_s("send_recv", m, 2, 1, 0.25) == pytest.approx(
        send.alpha_s + m / (0.25 * send.busbw_bytes_per_s))
    # all_reduce over 2 nodes of 8: intra reduce-scatter + inter step on M/8 + intra all-gather
    inter = hw.collectives.inter_curve("all_reduce", 8)
    intra = hw.collective_time_s("reduce_scatter", m, 8, 8) + hw.collective_time_s("all_gather", m, 8, 8)
    full = intra + float(inter.time_s(m / 8))
    half = intra + float(inter.scaled(bandwidth=0.5).time_s(m / 8))
    assert hw.collective_time_s("all_reduce", m, 16, 8) == pytest.approx(full)
    assert hw.collective_time_s("all_reduce", m, 16, 8, 0.5) == pytest.approx(half)
    assert hw.collective_time_s("all_reduce", m, 8, 8, 0.5) == hw.collective_time_s("all_reduce", m, 8, 8)
    with pytest.raises(ValueError):
        hw.collective_time_s("all_reduce", m, 16, 8, 0.0)


ONE_GPU_NODES = Cluster(num_gpus=4, gpus_per_node=1)
PLAN = dict(global_batch=8, seq_len=1024, dp=2, pp=2, zero=0, micro_batch=1, schedule="1f1b")


def test_planner_keeps_placements_that_differ_only_in_link_share():
    fixed = {k: PLAN[k] for k in ("global_batch", "seq_len", "dp", "pp", "zero")}
    model = ZOO["megatron-gpt-1.7b"]
    plain = candidate_table(model, ONE_GPU_NODES, fixed)
    shared = candidate_table(model, ONE_GPU_NODES, fixed, TWO_LEAVES_OS2, 1)
    assert plain["placement"].nunique() == 1
    assert shared["placement"].nunique() == 2
    assert set(shared["dp_share"]) == {0.5, 1.0} and set(shared["pp_share"]) == {0.5, 1.0}


def test_simulated_dp_comm_grows_when_dp_crosses_the_oversubscribed_uplink():
    hw = load_profile("a100-80gb").with_fabric(TWO_LEAVES_OS2)
    model = ZOO["megatron-gpt-1.7b"]
    inside = simulate(model, Plan(**PLAN, placement=("dp", "pp", "tp", "cp")), ONE_GPU_NODES, hw)
    across = simulate(model, Plan(**PLAN, placement=("pp", "dp", "tp", "cp")), ONE_GPU_NODES, hw)
    plain = simulate(model, Plan(**PLAN, placement=("pp", "dp", "tp", "cp")), ONE_GPU_NODES,
                     dataclasses.replace(hw, fabric=None))
    assert across.breakdown_s["dp_comm"] > plain.breakdown_s["dp_comm"]
    assert across.step_time_s > inside.step_time_s


def test_whatif_replans_each_fabric_with_placement():
    from meshplan.reports.whatif import plan_scenarios, report_html

    model, fixed = ZOO["megatron-gpt-1.7b"], {"global_batch": 16, "seq_len": 1024}
    a100 = load_profile("a100-80gb")
    scenarios = plan_scenarios(model, [a100], [16], None, fixed, {}, ("single-switch", "fat-tree:4:1"))
    labels = [s.label for s in scenarios]
    assert labels == ["a100-80gb, 16 GPUs", "a100-80gb, 16 GPUs, fabric single-switch",
                      "a100-80gb, 16 GPUs, fabric fat-tree:4:1"]
    assert all(s.best is not None for s in scenarios)
    # a slower fabric never makes the best plan faster
    assert scenarios[2].best.step_time_s >= scenarios[0].best.step_time_s
    assert "Fabric" in report_html(model, scenarios)
