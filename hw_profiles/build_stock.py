"""Rebuild the stock profiles hw_profiles/data/{a100-80gb,h100-80gb}.json from Vidur's
measurements and print their fit quality and a check against published nccl-tests figures.

    python -m hw_profiles.build_stock [--data PATH] [--out DIR]

PATH defaults to $MESHPLAN_VIDUR_DATA, else shared/data/vidur-profiles beside the repository.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from hw_profiles.calibrate import fit_profile
from hw_profiles.profile import DATA_DIR, HardwareProfile
from hw_profiles.vidur_import import load_vidur_samples

GIB = 2**30
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
        "published": {
            "intra_allreduce_8_busbw_GBps": (232.5, "NVIDIA/nccl-tests#175: single-node 8x A100 "
                                             "all_reduce_perf busbw 232.54 GB/s"),
            "inter_allreduce_16_busbw_GBps": (192.0, "NVIDIA/nccl#812 (AddyLaddy): DGX-A100 with "
                                              "8x200Gb/s IB measures 192 GB/s AllReduce BusBW")}},
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
        "published": {
            "intra_allreduce_8_busbw_GBps": (370.0, "NVIDIA/nccl-tests#212 (sjeaugey): effective "
                                             "NVLink busbw ~370 GB/s without NVLS, ~480 with NVLS"),
            "inter_allreduce_16_busbw_GBps": (376.0, "NVIDIA/nccl-tests#290 (AddyLaddy): NDR 400 Gb/s "
                                              "gives 46-48 GB/s per NIC; x 8 NICs for a ring")}},
}


def default_data_dir() -> Path:
    env = os.environ.get("MESHPLAN_VIDUR_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/vidur-profiles"


def published_checks(profile: HardwareProfile, published: dict) -> dict:
    """Profile prediction vs published nccl-tests busbw for 1 GiB all-reduces."""
    intra_s = profile.collective_time_s("all_reduce", GIB, 8, 8)
    inter_s = profile.collective_time_s("all_reduce", GIB, 16, 8)
    predicted = {"intra_allreduce_8_busbw_GBps": 2 * 7 / 8 * GIB / intra_s / 1e9,
                 "inter_allreduce_16_busbw_GBps": 2 * 15 / 16 * GIB / inter_s / 1e9}
    return {k: {"profile": round(predicted[k], 1), "published": v, "ratio": round(predicted[k] / v, 3),
                "source": src} for k, (v, src) in published.items()}


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


def build(data_dir: Path, out_dir: Path) -> dict[str, HardwareProfile]:
    profiles = {}
    for name, spec in STOCK.items():
        samples = load_vidur_samples(data_dir, spec["gpu"], spec["system"])
        profile = fit_profile(samples, spec["base"])
        checks = published_checks(profile, spec["published"])
        profile = HardwareProfile.from_dict({**profile.to_dict(),
                                             "extra": {**profile.extra, "published_checks": checks}})
        profile.save(out_dir / f"{name}.json")
        profiles[name] = profile
    return profiles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="vidur-profiles folder")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write <name>.json")
    args = parser.parse_args(argv)
    try:
        profiles = build(args.data, args.out)
    except FileNotFoundError as e:
        parser.error(f"{e}; pass --data or set MESHPLAN_VIDUR_DATA")
    for name, profile in profiles.items():
        print(f"\n== {name}: relative residual |pred/measured - 1| ({args.out / (name + '.json')})")
        print(fit_table(profile).to_string(float_format=lambda x: f"{x:.3f}"))
        median, p95 = profile.relative_error_band()
        print(f"error band (held-out): median {median:.3f}, p95 {p95:.3f}")
        for check, c in profile.extra["published_checks"].items():
            print(f"{check}: profile {c['profile']} vs published {c['published']} "
                  f"(x{c['ratio']}) [{c['source']}]")


if __name__ == "__main__":
    main()
