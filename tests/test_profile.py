"""HardwareProfile: JSON round trip, load errors, collective and GEMM cost against hand
computations, and the stock profiles against Vidur's README example and published busbw."""
import json
import math

import numpy as np
import pytest

from meshplan.hw_profiles.collective_model import KINDS, CollectiveFit, Curve, Line, collective_time_s
from meshplan.hw_profiles.gemm_model import GemmFit, MemoryBoundFit
from meshplan.hw_profiles.profile import HardwareProfile, available_profiles, load_profile
from meshplan.core.errors import ProfileError

US, GB = 1e-6, 1e9


def one_line(alpha_s, busbw):
    return Curve(Line(alpha_s, busbw), Line(alpha_s, busbw), "test")


def tiny_collectives(nics_per_node=8) -> CollectiveFit:
    intra = {k: {2: one_line(10 * US, 100 * GB), 4: one_line(20 * US, 50 * GB)} for k in KINDS}
    inter = {k: {1: one_line(50 * US, 10 * GB)} for k in KINDS}
    return CollectiveFit(intra, inter, nics_per_node)


def tiny_profile() -> HardwareProfile:
    gemm = GemmFit(latency_s=5 * US, eff_max=0.8, m_half=64.0, n_half=32.0, k_half=48.0, hbm_eff=0.9)
    return HardwareProfile(
        name="tiny", device_name="test device", memory_bytes=16 * 2**30,
        peak_flops={"fp32": 10e12, "tf32": 50e12, "bf16": 100e12, "fp16": 100e12},
        hbm_bytes_per_s=1e12, gpus_per_node=4, nics_per_node=8, nic_bytes_per_s=25e9,
        intra_node_link="nvswitch", gemm={d: gemm for d in ("fp32", "tf32", "bf16", "fp16")},
        memory_bound={d: MemoryBoundFit(2 * US, 0.5) for d in ("fp32", "tf32", "bf16", "fp16")},
        collectives=tiny_collectives(), sources=("hand-made",),
        fit_report={"error_band": {"median": 0.05, "p95": 0.3}}, extra={"note": "x"})


def test_json_round_trip(tmp_path):
    hw = tiny_profile()
    assert HardwareProfile.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    path = tmp_path / "tiny.json"
    hw.save(path)
    assert load_profile(str(path)) == hw
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_stock_profiles_round_trip():
    for name in ("a100-80gb", "h100-80gb"):
        hw = load_profile(name)
        assert HardwareProfile.from_dict(hw.to_dict()) == hw


def test_datasheet_variants_are_their_base_scaled():
    """H200: the H100's compute with 141 GB at 4.8 TB/s; A100 40GB: half the memory at
    1,555 GB/s; H800: NVLink at 400 of 900 GB/s; each named, sourced and round-tripping."""
    h100, a100 = load_profile("h100-80gb"), load_profile("a100-80gb")
    h200, a40, h800 = (load_profile(n) for n in ("h200-141gb", "a100-40gb", "h800-80gb"))
    assert {"h200-141gb", "a100-40gb", "h800-80gb", "h100-96gb-500w"} <= set(available_profiles())
    assert h200.name == "h200-141gb" and h200.peak_flops == h100.peak_flops
    assert h200.memory_bytes == int(h100.memory_bytes * 141 / 80)
    assert h200.hbm_bytes_per_s == pytest.approx(h100.hbm_bytes_per_s * 4.8 / 3.35)
    assert a40.memory_bytes == a100.memory_bytes // 2 and a40.gemm == a100.gemm
    assert a40.hbm_bytes_per_s == pytest.approx(a100.hbm_bytes_per_s * 1555 / 2039)
    nvlink = lambda hw: hw.collectives.intra["all_reduce"][8].large.busbw_bytes_per_s  # noqa: E731
    assert nvlink(h800) == pytest.approx(nvlink(h100) * 400 / 900)
    assert h800.nic_bytes_per_s == h100.nic_bytes_per_s and h800.memory_bytes == h100.memory_bytes
    assert any(s.startswith("h200-141gb: h100-80gb scaled by H200 datasheet") for s in h200.sources)
    assert HardwareProfile.from_dict(h200.to_dict()) == h200


def test_missing_file_and_unknown_name():
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("/nonexistent/x.json")
    with pytest.raises(ProfileError, match="a100-80gb") as err:
        load_profile("no-such-gpu")
    assert err.value.field == "hardware"
    # the published figures beside the profiles are not a profile
    assert "end_to_end" not in available_profiles()
    with pytest.raises(ProfileError, match="no stock profile named 'end_to_end'"):
        load_profile("end_to_end")


def test_corrupt_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x", ')
    with pytest.raises(ProfileError, match="not valid JSON") as err:
        load_profile(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("field, edit", [
    ("peak_flops", lambda d: d.pop("peak_flops")),
    ("memory_bytes", lambda d: d.update(memory_bytes="80GB")),
    ("peak_flops.bf16", lambda d: d["peak_flops"].pop("bf16")),
    ("gemm.fp16.eff_max", lambda d: d["gemm"]["fp16"].pop("eff_max")),
    ("collectives.intra.all_reduce.4.large.alpha_s",
     lambda d: d["collectives"]["intra"]["all_reduce"]["4"]["large"].pop("alpha_s")),
    ("collectives.inter.send_recv", lambda d: d["collectives"]["inter"].pop("send_recv")),
    ("attention.key_block", lambda d: d["attention"].update(key_block=0)),
    ("attention.forward_latency_s", lambda d: d["attention"].update(forward_latency_s=-1e-3)),
])
def test_missing_or_bad_field_names_field_and_file(tmp_path, field, edit):
    data = tiny_profile().to_dict()
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    assert err.value.field == field
    assert str(path) in str(err.value)


def test_a_profile_its_reader_refuses_is_not_written(tmp_path):
    from dataclasses import replace
    from meshplan.hw_profiles.profile import FusedAttention
    path = tmp_path / "p.json"
    with pytest.raises(ProfileError) as err:
        replace(tiny_profile(), attention=FusedAttention(key_block=0)).save(path)
    assert err.value.field == "attention.key_block" and not path.exists()


def test_collective_alpha_beta_by_hand():
    fit = tiny_collectives()
    mb = 1e6
    # all_reduce, 4 ranks in one node: 20 us + 1 MB * 2*3/4 / 50 GB/s = 20 + 30 us.
    assert collective_time_s(fit, "all_reduce", mb, 4, 4) == pytest.approx(50 * US)
    # all_gather, 2 ranks: 10 us + 1 MB * 1/2 / 100 GB/s = 15 us.
    assert collective_time_s(fit, "all_gather", mb, 2, 2) == pytest.approx(15 * US)
    assert collective_time_s(fit, "all_reduce", mb, 1, 1) == 0.0
    # 3 ranks: weight w = ln(3/2)/ln(2) between the 2- and 4-rank lines (alpha and 1/busbw).
    w = math.log(1.5) / math.log(2)
    alpha = (1 - w) * 10 * US + w * 20 * US
    inv_bw = (1 - w) / (100 * GB) + w / (50 * GB)
    assert collective_time_s(fit, "all_reduce", mb, 3, 3) == pytest.approx(alpha + mb * 4 / 3 * inv_bw)
    # 8 ranks as 2 nodes x 4: intra RS (20 + 15) + inter AR on M/4 over 2 nodes
    # (50 us + 0.25 MB * 2*(1/2) / 10 GB/s = 75 us) + intra AG (35) = 145 us.
    assert collective_time_s(fit, "all_reduce", mb, 8, 4) == pytest.approx(145 * US)
    # Only 2 NICs for 4 ranks: each rank gets half a NIC, the inter step takes 50 + 50 us.
    assert collective_time_s(tiny_collectives(2), "all_reduce", mb, 8, 4) == pytest.approx(170 * US)
    # Cross-node point to point: 50 us + 1 MB / 10 GB/s.
    assert collective_time_s(fit, "send_recv", mb, 2, 1) == pytest.approx(150 * US)


def test_two_regime_curve_is_min_of_lines():
    curve = Curve(Line(5 * US, 10 * GB), Line(30 * US, 100 * GB), "test")
    assert curve.time_s(0.0) == pytest.approx(5 * US)
    assert curve.time_s(1e6) == pytest.approx(40 * US)  # min(5 + 100, 30 + 10) us


def test_gemm_monotone_and_saturates():
    hw = tiny_profile()
    sizes = np.array([1, 8, 64, 512, 4096, 32768])
    for shape in ((sizes, 4096, 4096), (4096, sizes, 4096), (4096, 4096, sizes)):
        t = hw.gemm_time_s(*shape, "bf16")
        assert t.shape == sizes.shape and np.all(np.diff(t) > 0)
    big = 65536
    achieved = 2.0 * big**3 / hw.gemm_time_s(big, big, big, "bf16")
    assert 0.97 * 0.8 * 100e12 < achieved <= 0.8 * 100e12
    assert hw.gemm_time_s(4096, 4096, 4096, "fp32") > hw.gemm_time_s(4096, 4096, 4096, "bf16")


def test_memory_bound_and_scaled():
    hw = tiny_profile()
    assert hw.memory_bound_time_s(1e9) == pytest.approx(2 * US + 1e9 / (0.5 * 1e12))
    fast = hw.scaled(flops=2.0, hbm_bw=2.0, inter_node_bw=4.0, memory=0.5)
    assert fast.memory_bound_time_s(1e9) == pytest.approx(2 * US + 1e9 / (1e12))
    assert fast.gemm_time_s(8192, 8192, 8192, "bf16") == pytest.approx(
        5 * US + (hw.gemm_time_s(8192, 8192, 8192, "bf16") - 5 * US) / 2)
    assert fast.collective_time_s("send_recv", 1e6, 2, 1) == pytest.approx(50 * US + 1e6 / (40 * GB))
    assert fast.memory_bytes == 8 * 2**30 and fast.name != hw.name
    assert hw.scaled() is hw
    # the fixed cost per call scales alone: a one-byte memory-bound op's, the measured
    # decode attention kernel's of the local profile
    slow = hw.scaled(op_latency=3.0)
    assert slow.memory_bound_time_s(1.0) == pytest.approx(3 * hw.memory_bound_time_s(1.0), rel=1e-6)
    local = load_profile("local")
    assert local.attention.decode_latency_s > 0
    assert local.scaled(op_latency=3.0).attention.decode_latency_s == pytest.approx(3 * local.attention.decode_latency_s)


def test_unknown_dtype_is_a_profile_error():
    with pytest.raises(ProfileError) as err:
        tiny_profile().gemm_time_s(1, 1, 1, "fp8")
    assert err.value.field == "dtype"


def test_stock_a100_matches_vidur_readme_example():
    # Vidur README: Llama-2-70B mlp_up_proj (fused gate+up: n = 2*28672, k = 8192),
    # 4096 tokens, TP1 on A100: median 15.94 ms.
    hw = load_profile("a100-80gb")
    assert hw.gemm_time_s(4096, 2 * 28672, 8192, "fp16") == pytest.approx(15.94e-3, rel=0.10)


def test_stock_a100_intra_node_all_reduce_busbw_in_published_range():
    hw = load_profile("a100-80gb")
    size = 2**30
    busbw = 2 * 7 / 8 * size / hw.collective_time_s("all_reduce", size, 8, 8)
    assert 200e9 <= busbw <= 240e9  # DGX A100 NVSwitch, NVIDIA/nccl-tests#175: 232.5 GB/s


def test_stock_error_band():
    median, p95 = load_profile("h100-80gb").relative_error_band()
    assert 0 < median < p95 < 1


def busbw(hw, kind, n, r, size=2**30):
    factor = {"all_reduce": 2 * (n - 1) / n, "send_recv": 1.0}[kind]  # nccl-tests PERFORMANCE.md
    return factor * size / hw.collective_time_s(kind, size, n, r)


# (profile, inter-node all_reduce busbw with 8 ranks/node, one NIC's busbw): DGX A100 192 GB/s
# (NVIDIA/nccl#812), HDR NIC ~23-24 GB/s (NVIDIA/nccl#412); DGX H100 ~376 GB/s, NDR NIC
# 46-48 GB/s (NVIDIA/nccl-tests#290).
DGX = [("a100-80gb", 192e9, 23e9), ("h100-80gb", 376e9, 46e9)]


@pytest.mark.parametrize("name, node_busbw, nic_busbw", DGX)
def test_stock_inter_node_matches_published_dgx_fabric(name, node_busbw, nic_busbw):
    hw = load_profile(name)
    assert busbw(hw, "all_reduce", 16, 8) == pytest.approx(node_busbw, rel=0.15)
    assert busbw(hw, "all_reduce", 128, 8) == pytest.approx(node_busbw, rel=0.20)
    # DP group of 16 with TP8 inside each node: one rank, so one NIC, per node.
    assert busbw(hw, "all_reduce", 16, 1) == pytest.approx(nic_busbw, rel=0.20)
    assert busbw(hw, "send_recv", 2, 1) == pytest.approx(nic_busbw, rel=0.20)
    # Ranks per node add NICs: 2 and 4 ranks per node reach about 2 and 4 NICs.
    for r in (2, 4):
        assert busbw(hw, "all_reduce", 8 * r, r) == pytest.approx(r * nic_busbw, rel=0.25)


@pytest.mark.parametrize("name", ["a100-80gb", "h100-80gb"])
def test_stock_collectives_monotone_in_size_and_nodes(name):
    hw = load_profile(name)
    sizes = 2.0 ** np.arange(3, 34, 2)
    for kind in KINDS:
        for n, r in ((8, 8), (16, 8), (16, 1), (64, 4), (128, 8)):
            t = hw.collective_time_s(kind, sizes, 2 if kind == "send_recv" else n, r)
            assert np.all(np.diff(t) > 0), (kind, n, r)
        if kind != "send_recv":
            for r in (1, 2, 8):
                t = [hw.collective_time_s(kind, 2**26, r * nodes, r) for nodes in (1, 2, 4, 16, 64)]
                # A pipelined broadcast moves the same bytes per link whatever the node count.
                assert np.all(np.diff(t) >= 0 if kind == "broadcast" else np.diff(t) > 0), (kind, r)


@pytest.mark.parametrize("name", ["a100-80gb", "h100-80gb"])
def test_stock_keeps_vidur_cross_node_fit_as_unused_reference(name):
    hw = load_profile(name)
    ref = hw.extra["measured_inter_node_not_used"]
    assert "not used" in ref["note"] and ref["curves"]["send_recv"]["1"]["per_rank_busbw_bytes_per_s"] > 0
    assert hw.fit_report["measured_inter_node_not_used"]["fits"]
    assert any("nccl" in s for s in hw.sources)


def test_inter_node_latency_grows_with_ring_hops():
    from meshplan.hw_profiles.profile import load_profile
    hw = load_profile("a100-80gb")
    two = hw.collective_time_s("all_gather", 1024, 16, 8)
    # a ring all-gather over 128 nodes has 127 sequential inter-node hops instead of 1
    alpha = hw.collective_time_s("all_gather", 1024, 32, 8) - two   # 4 nodes: 2 extra hops
    assert hw.collective_time_s("all_gather", 1024, 1024, 8) == pytest.approx(two + 126 * alpha / 2, rel=0.05)
    # all-reduce switches to a tree: 2*log2(128) = 14 hops against 2 on two nodes
    ar2 = hw.collective_time_s("all_reduce", 1024, 16, 8)
    ar128 = hw.collective_time_s("all_reduce", 1024, 1024, 8)
    assert ar128 - ar2 == pytest.approx(6 * alpha / 2, rel=0.05)
