"""Rebuild the stock profiles hw_profiles/data/{a100-80gb,h100-80gb}.json from Vidur's
measurements and print their fit quality and a check against published nccl-tests figures.

    python -m meshplan.calibration.build_stock [--data PATH] [--out DIR] [--inter-node {dgx,vidur}]

PATH defaults to $MESHPLAN_VIDUR_DATA, else shared/data/vidur-profiles beside the repository.
Vidur's cross-node rows were measured on a cluster whose fabric is ~10x slower than the DGX
fabric (8 NICs per node, one per GPU) the stock profiles describe, so by default (dgx) the
inter-node level comes from published nccl-tests figures of that fabric and Vidur's cross-node
fit is kept as reference (extra / fit_report "measured_inter_node_not_used"); --inter-node vidur
writes <name>-vidur-fabric.json whose inter-node level is Vidur's fit. Each profile's `fabric` (how the NICs are switched) is the
published DGX SuperPOD compute fabric (STOCK[...]["network"]).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from meshplan.calibration.fit import fit_profile
from meshplan.hw_profiles.collective_model import bus_factor
from meshplan.hw_profiles.profile import DATA_DIR, HardwareProfile
from meshplan.calibration.vidur_import import load_vidur_samples
from meshplan.core.units import GIB

INTER_LATENCY = ("inter-node alpha 20 us: NVIDIA/nccl-tests#150, all_reduce_perf of 8 B over 2 "
                 "A100 nodes (1 GPU each, HDR InfiniBand) takes 19-20 us")
# Overlapped communication slows the computation beside it: 18.9% on average (max 40%) over
# GPT and Llama training kernels on 4x A100 and 4x H100 (arXiv 2507.03114, "Characterizing
# Compute-Communication Overlap in GPU-Accelerated Distributed Deep Learning", sec. 5).
CONTENTION = {"compute_slowdown": 0.189, "source": "arXiv 2507.03114 (2025) sec. 5: compute "
              "slows 18.9% on average (max 40.0%) while NCCL collectives overlap it, measured "
              "on 4x A100 and 4x H100 over GPT and Llama layers"}
# Each layer of a ZeRO-3 group waits for its slowest rank (HardwareProfile.stragglers): the
# spread fitted by `python benchmarks/published.py --fit-stragglers` (least squares over the
# fit half's weak-scaling pairs: torchtitan Llama 3.1 8B FSDP 8 -> 128 H100, MPT-7B 8 -> 512
# and MPT-70B 64 -> 512 H100 of llm-foundry's benchmark table).
STRAGGLERS = {"spread": 0.0482, "source": "benchmarks/published.py --fit-stragglers: per-layer time "
              "spread fitted on 3 weak-scaling pairs of published FSDP runs (8 to 512 H100; the fit "
              "half of benchmarks/published/training.csv)"}
# The GEMM rate a training step sustains against the kernels' own timing (HardwareProfile.
# sustained): fitted by `python benchmarks/published.py --fit-sustained` (least |log error|
# over each profile's dense fit-half rows). The H100's 700 W holds its clock below the
# microbenchmarks'; on A100 the fit finds nothing lost.
SUSTAINED = {
    "a100-80gb": {"gemm_loss": 0.0, "source": "benchmarks/published.py --fit-sustained: no GEMM rate "
                  "lost in 13 dense published A100 runs (8 to 12,288 A100; the fit half of "
                  "benchmarks/published/training.csv)"},
    "h100-80gb": {"gemm_loss": 0.108, "source": "benchmarks/published.py --fit-sustained: 10.8% of the "
                  "fitted GEMM rate lost in 36 dense published H100 runs (8 to 16,384 H100; the fit half "
                  "of benchmarks/published/training.csv), the clock a training run holds at the power "
                  "limit and whatever else slows its GEMMs against the microbenchmark"},
}
# A GPU trainer's host runs ahead of its kernels except in MoE blocks, where the GPU waits
# for it (FrameworkOverhead.moe_host_gap_s): the gap fitted by `python benchmarks/published.py
# --fit-moe-gap` (least |log error| over the fit half's 13 MoE rows: Megatron-Bridge, the MoE
# Model Zoo and Automodel on 16 to 1024 H100).
MOE_OVERHEAD = {"moe_host_gap_s": 4.74e-3, "source": "benchmarks/published.py --fit-moe-gap: the "
                "GPU waits 4.74 ms for the host per MoE block forward (its sync on the routing "
                "counts, its kernel launches), fitted on 13 published MoE runs (16 to 1024 H100; the "
                "fit half of benchmarks/published/training.csv); elsewhere the host queues kernels "
                "ahead of the GPU"}
# cuDNN's fused attention on H100 against FlashAttention-2, whose rate the stock profiles'
# GEMM fits give the attention matmuls (FusedAttention): causal head-dim-128 at 4K-16K, FA2
# forward 319/333/335 TFLOPS against cuDNN's 518/529/539, backward 310/318/322 against
# 499/518/516 (Shah et al. 2024, FlashAttention-3, Figs. 5-6): time ratios 0.622 and 0.620.
CUDNN_ATTENTION = {
    "h100-80gb": {"forward_scale": 0.622, "backward_scale": 0.620,
                  "source": "Shah et al. 2024 (FlashAttention-3) Figs. 5-6, H100 SXM5, causal head dim 128, "
                            "4K-16K: cuDNN 518-539 TFLOPS forward, 499-518 backward against FlashAttention-2's "
                            "319-335 and 310-322, the rate the GEMM fits price; scales are the FA2/cuDNN time "
                            "ratios (0.622, 0.620)"},
}
SUPERPOD_H100 = ("NVIDIA DGX SuperPOD reference architecture, DGX H100 (RA-11333-001; docs.nvidia.com/"
                 "dgx-superpod/reference-architecture-scalable-infrastructure-h100, Network Fabrics): "
                 "compute fabric rail-aligned in scalable units of 32 nodes, traffic per rail one hop "
                 "away inside an SU, between rails or SUs through the spine; Table 4 cables per SU: "
                 "252 node-leaf, 256 leaf-spine (uplinks >= downlinks: non-blocking)")
SUPERPOD_A100 = ("NVIDIA DGX SuperPOD reference architecture, DGX A100 (RA-09950-001, Nov 2020): "
                 "scalable units of 20 DGX A100, one HDR 200 Gb/s NIC per GPU (1:1 GPU to NIC, "
                 "Hot Chips 32 DGX A100 SuperPOD talk), rail-optimised compute fabric, 8 leaf "
                 "switches per SU (one per rail), full fat tree above: non-blocking")
VIDUR = ("microsoft/vidur data/profiling @7d47513 (MIT): measured fp16 operator and NCCL "
         "collective timings; GEMM, memory-bound and collective curves are fitted to them")
STOCK = {
    "a100-80gb": {
        "gpu": "a100", "system": "a100_dgx",
        "base": {
            "name": "a100-80gb", "device_name": "NVIDIA A100-SXM4-80GB in a DGX A100",
            "memory_bytes": 80 * GIB,
            "peak_flops": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
            "hbm_bytes_per_s": 2.039e12, "gpus_per_node": 8, "nics_per_node": 8,
            "nic_bytes_per_s": 200e9 / 8, "intra_node_link": "nvswitch",
            "sources": [
                "peak_flops (dense), hbm_bytes_per_s (HBM2e 2,039 GB/s), memory_bytes (80 GB): "
                "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM4 80GB column",
                "gpus_per_node, nvswitch, nics_per_node (8x ConnectX-6 HDR 200 Gb/s for compute): "
                "NVIDIA DGX A100 datasheet / user guide",
                VIDUR + " (compute/a100, network/a100_dgx)"]},
        "fabric": {
            "name": "DGX A100 fabric: 8x HDR 200 Gb/s InfiniBand per node, one NIC per GPU, "
                    "rail-optimised",
            "allreduce_busbw_bytes_per_s": 192e9, "nic_busbw_bytes_per_s": 24e9, "alpha_s": 20e-6,
            "sources": [
                "inter-node all_reduce busbw 192 GB/s, 8 ranks per node: NVIDIA/nccl#812 "
                "(AddyLaddy: DGX A100 with 8x200 Gb/s IB measures 192 GB/s AllReduce busbw)",
                "one HDR NIC 24 GB/s: NVIDIA/nccl#412 (sjeaugey: ~24 GB/s inter-node per HDR NIC), "
                "NVIDIA/nccl-tests#160 (sjeaugey: 24 GB/s per NIC on good setups; ring busbw "
                "reflects the NICs on 3+ nodes)", INTER_LATENCY]},
        "network": {"topology": "rail-optimized", "nodes_per_leaf": 20, "oversubscription": 1.0,
                    "source": SUPERPOD_A100},
        "published": {
            "intra_allreduce_8_busbw_GBps": (232.5, "NVIDIA/nccl-tests#175: single-node 8x A100 "
                                             "all_reduce_perf busbw 232.54 GB/s"),
            "inter_allreduce_16_r8_busbw_GBps": (192.0, "NVIDIA/nccl#812 (AddyLaddy): DGX-A100 with "
                                                 "8x200Gb/s IB measures 192 GB/s AllReduce BusBW"),
            "inter_allreduce_128_r8_busbw_GBps": (192.0, "NVIDIA/nccl#812 figure; ring busbw does not "
                                                  "depend on node count (nccl-tests#160)"),
            "inter_allreduce_16_r1_busbw_GBps": (24.0, "one HDR NIC per node: NVIDIA/nccl#412"),
            "inter_send_recv_2_r1_busbw_GBps": (24.0, "one HDR NIC: NVIDIA/nccl#412, nccl#1048")}},
    "h100-80gb": {
        "gpu": "h100", "system": "h100_dgx",
        "base": {
            "name": "h100-80gb", "device_name": "NVIDIA H100-SXM5-80GB in a DGX H100",
            "memory_bytes": 80 * GIB,
            "peak_flops": {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12},
            "hbm_bytes_per_s": 3.35e12, "gpus_per_node": 8, "nics_per_node": 8,
            "nic_bytes_per_s": 400e9 / 8, "intra_node_link": "nvswitch",
            "sources": [
                "peak_flops (dense: half the with-sparsity figures), hbm_bytes_per_s (HBM3 "
                "3.35 TB/s), memory_bytes (80 GB): NVIDIA H100 Tensor Core GPU datasheet, SXM5 column",
                "gpus_per_node, nvswitch, nics_per_node (8x ConnectX-7 NDR 400 Gb/s for compute): "
                "NVIDIA DGX H100 datasheet",
                VIDUR + " (compute/h100, network/h100_dgx)"]},
        "fabric": {
            "name": "DGX H100 fabric: 8x NDR 400 Gb/s InfiniBand per node, one NIC per GPU, "
                    "rail-optimised",
            "allreduce_busbw_bytes_per_s": 376e9, "nic_busbw_bytes_per_s": 47e9, "alpha_s": 20e-6,
            "sources": [
                "one NDR NIC 47 GB/s: NVIDIA/nccl-tests#290 (AddyLaddy: 46-48 GB/s per NIC at NDR "
                "400 Gb/s), NVIDIA/nccl-tests#267 (48-49 GB/s per CX-7 NIC)",
                "inter-node all_reduce busbw 376 GB/s, 8 ranks per node: 8 NICs x 47 GB/s, the ring "
                "busbw being the NICs' (NVIDIA/nccl-tests#160, #290)",
                INTER_LATENCY + "; no H100 figure found, reused (NCCL's software path and one IB hop "
                "dominate; Vidur's H100 cluster send_recv fit gives 19.6 us)"]},
        "network": {"topology": "rail-optimized", "nodes_per_leaf": 32, "oversubscription": 1.0,
                    "source": SUPERPOD_H100},
        "published": {
            "intra_allreduce_8_busbw_GBps": (370.0, "NVIDIA/nccl-tests#212 (sjeaugey): effective "
                                             "NVLink busbw ~370 GB/s without NVLS, ~480 with NVLS"),
            "inter_allreduce_16_r8_busbw_GBps": (376.0, "NVIDIA/nccl-tests#290 (AddyLaddy): NDR "
                                                 "400 Gb/s gives 46-48 GB/s per NIC; x 8 NICs for a ring"),
            "inter_allreduce_128_r8_busbw_GBps": (376.0, "as above; ring busbw does not depend on node "
                                                  "count (nccl-tests#160)"),
            "inter_allreduce_16_r1_busbw_GBps": (47.0, "one NDR NIC per node: NVIDIA/nccl-tests#290"),
            "inter_send_recv_2_r1_busbw_GBps": (47.0, "one NDR NIC: NVIDIA/nccl-tests#290")}},
}


# FP8 GEMMs, where the device has them (the A100 has none: its datasheet lists no FP8 Tensor
# Core rate, so a100-80gb has no fp8 entry and rules.HARDWARE refuses FP8 plans on it).
FP8 = {
    "h100-80gb": {
        "peak_flops": 1979e12,
        "source": "peak_flops fp8 1,979 TFLOP/s dense (3,958 with sparsity), 2x the BF16 989: NVIDIA "
                  "H100 Tensor Core GPU datasheet, SXM5 column. gemm.fp8 is derived, not measured "
                  "(Vidur measured fp16 only): the bf16 fit (latency, eff_max, half-sizes, hbm_eff) at "
                  "the fp8 peak with 1-byte operands, i.e. each shape reaches the same fraction of its "
                  "dtype's peak, since Hopper runs FP8 MMA at 2x the BF16 rate through the same "
                  "tile pipeline (NVIDIA H100 architecture whitepaper, 2022); benchmarks/published.py "
                  "checks it against the published FP8 training runs"},
}


def with_fp8(profile: HardwareProfile, fp8: dict) -> HardwareProfile:
    """The profile with FP8 GEMMs by FP8's derivation (the bf16 fit at the fp8 peak)."""
    data = profile.to_dict()
    data["peak_flops"]["fp8"] = fp8["peak_flops"]
    data["gemm"]["fp8"] = dict(data["gemm"]["bf16"])
    data["sources"] = data["sources"] + [fp8["source"]]
    return HardwareProfile.from_dict(data)


def default_data_dir() -> Path:
    env = os.environ.get("MESHPLAN_VIDUR_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/vidur-profiles"


# check -> (collective, group size, ranks per node), each on 1 GiB
CHECKS = {"intra_allreduce_8_busbw_GBps": ("all_reduce", 8, 8),
          "inter_allreduce_16_r8_busbw_GBps": ("all_reduce", 16, 8),
          "inter_allreduce_128_r8_busbw_GBps": ("all_reduce", 128, 8),
          "inter_allreduce_16_r1_busbw_GBps": ("all_reduce", 16, 1),
          "inter_send_recv_2_r1_busbw_GBps": ("send_recv", 2, 1)}


def busbw_GBps(profile: HardwareProfile, kind: str, n: int, r: int, size: int = GIB) -> float:
    return bus_factor(kind, n) * size / profile.collective_time_s(kind, size, n, r) / 1e9


def published_checks(profile: HardwareProfile, published: dict,
                     vidur_fabric: HardwareProfile) -> dict:
    """Profile prediction vs published nccl-tests busbw for 1 GiB collectives, beside the
    prediction with Vidur's cross-node fit."""
    out = {}
    for check, (value, src) in published.items():
        predicted = busbw_GBps(profile, *CHECKS[check])
        out[check] = {"profile": round(predicted, 1), "published": value,
                      "ratio": round(predicted / value, 3),
                      "vidur_fabric": round(busbw_GBps(vidur_fabric, *CHECKS[check]), 1), "source": src}
    return out


def fit_table(profile: HardwareProfile) -> pd.DataFrame:
    rows = []
    for quantity, q in profile.fit_report.items():
        if "fitted" not in q:
            continue
        f, h = q["fitted"], q["held_out"]
        rows.append({"quantity": quantity, "points": f["points"] + h["points"],
                     "fit_median": f["median"], "fit_max": f["max"],
                     "held_median": h.get("median"), "held_p95": h.get("p95"), "held_max": h.get("max")})
    return pd.DataFrame(rows).set_index("quantity")


def inter_table(profile: HardwareProfile) -> pd.DataFrame:
    """Inter-node level per (kind, ranks per node), kinds derived from another left out: per-rank
    busbw and alpha in use, and Vidur's cross-node fit where it was measured but not used."""
    unused = profile.extra.get("measured_inter_node_not_used", {}).get("curves", {})
    rows = []
    for kind, by_r in profile.collectives.inter.items():
        for r, curve in sorted(by_r.items()):
            if curve.source.startswith("derived"):
                continue
            ref = unused.get(kind, {}).get(str(r), {})
            rows.append({"inter_node": f"{kind}/r{r}",
                         "per_rank_busbw_GBps": curve.large.busbw_bytes_per_s / 1e9,
                         "alpha_us": curve.large.alpha_s * 1e6,
                         "measured_not_used_busbw_GBps": ref.get("per_rank_busbw_bytes_per_s", np.nan) / 1e9,
                         "measured_not_used_alpha_us": ref.get("alpha_s", np.nan) * 1e6})
    return pd.DataFrame(rows).set_index("inter_node")


def build(data_dir: Path, out_dir: Path, inter_node: str = "dgx") -> dict[str, HardwareProfile]:
    """Fit and write each stock profile; inter_node "dgx" (published fabric figures) or "vidur"
    (Vidur's cross-node fit, written as <name>-vidur-fabric)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for name, spec in STOCK.items():
        samples = load_vidur_samples(data_dir, spec["gpu"], spec["system"])
        vidur_base = {**spec["base"], "name": f"{name}-vidur-fabric",
                      "device_name": spec["base"]["device_name"] + ", cross-node on Vidur's cluster fabric"}
        vidur = fit_profile(samples, vidur_base)
        profile = fit_profile(samples, spec["base"], fabric=spec["fabric"]) if inter_node == "dgx" else vidur
        checks = published_checks(profile, spec["published"], vidur)
        profile = HardwareProfile.from_dict({**profile.to_dict(), "contention": CONTENTION,
                                             "stragglers": STRAGGLERS, "overhead": MOE_OVERHEAD,
                                             "sustained": SUSTAINED[name],
                                             "cudnn_attention": CUDNN_ATTENTION.get(name),
                                             "fabric": spec["network"],
                                             "extra": {**profile.extra, "published_checks": checks}})
        if name in FP8:
            profile = with_fp8(profile, FP8[name])
        profile.save(out_dir / f"{profile.name}.json")
        profiles[profile.name] = profile
    return profiles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="vidur-profiles folder")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write <name>.json")
    parser.add_argument("--inter-node", choices=("dgx", "vidur"), default="dgx",
                        help="inter-node level: published DGX fabric figures, or Vidur's cluster fit")
    args = parser.parse_args(argv)
    try:
        profiles = build(args.data, args.out, args.inter_node)
    except FileNotFoundError as e:
        parser.error(f"{e}; pass --data or set MESHPLAN_VIDUR_DATA")
    for name, profile in profiles.items():
        print(f"\n== {name}: relative residual |pred/measured - 1| ({args.out / (name + '.json')})")
        print(fit_table(profile).to_string(float_format=lambda x: f"{x:.3f}"))
        median, p95 = profile.relative_error_band()
        print(f"error band (held-out): median {median:.3f}, p95 {p95:.3f}")
        checks = pd.DataFrame(profile.extra["published_checks"]).T
        print(inter_table(profile).to_string(float_format=lambda x: f"{x:.1f}"))
        print("1 GiB busbw (GB/s): this profile vs published vs with Vidur's cross-node fit "
              "(16-rank rows are the fabric calibration points; 128 ranks is a prediction)")
        print(checks[["profile", "published", "ratio", "vidur_fabric"]].to_string())
        for check, c in profile.extra["published_checks"].items():
            print(f"  {check}: {c['source']}")


if __name__ == "__main__":
    main()
