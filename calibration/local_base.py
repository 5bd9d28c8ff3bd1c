"""The `base` device description (calibrate.BASE_FIELDS) of a machine measured by
calibration.measure.run: what fit_profile needs beside the samples.

On CPU a "device" is one rank running one torch thread, as the executor runs it; the figures
a datasheet would give come from the best rates measured here. On CUDA the peak figures
come from the datasheets of known GPUs (KNOWN_GPUS), else from the best rates measured.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from meshplan.hw_profiles.collective_model import bus_factor
from meshplan.hw_profiles.profile import cpu_device_name
from meshplan.calibration.samples import Samples
from meshplan.core.errors import ProfileError
from meshplan.core.units import GIB, TB as TBPS, TFLOPS



@dataclass(frozen=True)
class GpuSpec:
    """Dense peak FLOP/s per dtype and device-memory bandwidth of one GPU model; `pattern`
    matches torch.cuda.get_device_name (case-insensitive)."""

    pattern: str
    peak_flops: dict
    hbm_bytes_per_s: float
    source: str


def _peaks(fp32: float, tf32: float, bf16: float) -> dict:
    return {"fp32": fp32 * TFLOPS, "tf32": tf32 * TFLOPS, "bf16": bf16 * TFLOPS,
            "fp16": bf16 * TFLOPS}


DENSE = "dense figures: half the datasheet's with-sparsity tensor-core figures"
# Most specific first: the first pattern that matches the device name wins.
KNOWN_GPUS = (
    GpuSpec(r"H200.*NVL", _peaks(60, 417.5, 835.5), 4.8 * TBPS,
            f"NVIDIA H200 Tensor Core GPU datasheet (2024), H200 NVL column; {DENSE}"),
    GpuSpec(r"H200", _peaks(67, 494.5, 989.5), 4.8 * TBPS,
            f"NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column; {DENSE}"),
    GpuSpec(r"H100.*NVL", _peaks(60, 417.5, 835.5), 3.9 * TBPS,
            f"NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column; {DENSE}"),
    GpuSpec(r"H100.*PCIE", _peaks(51, 378, 756.5), 2.0 * TBPS,
            f"NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column; {DENSE}"),
    GpuSpec(r"H100", _peaks(67, 494.5, 989.5), 3.35 * TBPS,
            f"NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column; {DENSE}"),
    GpuSpec(r"A100.*(80GB.*PCIE|PCIE.*80GB)", _peaks(19.5, 156, 312), 1.935 * TBPS,
            "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 80GB PCIe column"),
    GpuSpec(r"A100.*40GB", _peaks(19.5, 156, 312), 1.555 * TBPS,
            "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 40GB columns"),
    GpuSpec(r"A100", _peaks(19.5, 156, 312), 2.039 * TBPS,
            "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 80GB SXM column"),
    GpuSpec(r"L40S", _peaks(91.6, 183, 362.05), 0.864 * TBPS,
            f"NVIDIA L40S datasheet; {DENSE}"),
    GpuSpec(r"\bL4\b", _peaks(30.3, 60, 121), 0.3 * TBPS, f"NVIDIA L4 datasheet; {DENSE}"),
    GpuSpec(r"\bA10\b", _peaks(31.2, 62.5, 125), 0.6 * TBPS, f"NVIDIA A10 datasheet; {DENSE}"),
)


def known_gpu(device_name: str) -> GpuSpec | None:
    return next((g for g in KNOWN_GPUS if re.search(g.pattern, device_name, re.IGNORECASE)), None)


def best_gemm_flops(samples: Samples) -> dict[str, float]:
    """Highest measured GEMM rate (FLOP/s, 2mnk per GEMM) per measured dtype."""
    g = samples.gemm[samples.gemm["time_s"].astype(float) > 0]
    flops = 2.0 * g["m"] * g["n"] * g["k"] * g["batch"] / g["time_s"].astype(float)
    return {str(d): float(r) for d, r in flops.groupby(g["dtype"]).max().items()}


def best_memory_bytes_per_s(samples: Samples) -> float:
    """Highest measured memory-bound rate (bytes read + written per second)."""
    m = samples.memory_bound[samples.memory_bound["time_s"].astype(float) > 0]
    if m.empty:
        raise ProfileError("samples.memory_bound", "has no timed rows",
                           "measure memory-bound operators (meshplan profile does)")
    return float((m["bytes"].astype(float) / m["time_s"].astype(float)).max())


def best_busbw_bytes_per_s(samples: Samples) -> tuple[float, str]:
    """Highest measured send_recv busbw (point to point), else of any collective; and which."""
    c = samples.collectives[samples.collectives["time_s"].astype(float) > 0]
    if c.empty:
        raise ProfileError("samples.collectives", "has no timed rows",
                           "measure collectives over 2 or more ranks")
    if (c["collective"] == "send_recv").any():
        c = c[c["collective"] == "send_recv"]
    busbw = [bus_factor(k, n) * b / t for k, n, b, t in
             zip(c["collective"], c["group_size"], c["message_bytes"].astype(float),
                 c["time_s"].astype(float))]
    i = max(range(len(busbw)), key=busbw.__getitem__)
    return busbw[i], str(c["collective"].iloc[i])


def _measured_peaks(samples: Samples, why: str) -> tuple[dict, str]:
    """Peak FLOP/s per dtype = the best measured GEMM rate; unmeasured dtypes take their
    sibling's (tf32 <- fp32, fp16 <- bf16, either way), else the fastest measured one's."""
    best = best_gemm_flops(samples)
    if not best:
        raise ProfileError("samples.gemm", "has no timed rows", "measure GEMMs (meshplan profile does)")
    peaks, parts = {}, []
    for dtype, sibling in (("fp32", "tf32"), ("tf32", "fp32"), ("bf16", "fp16"), ("fp16", "bf16")):
        donor = dtype if dtype in best else sibling if sibling in best else max(best, key=best.get)
        peaks[dtype] = best[donor]
        parts.append(f"{dtype} {best[dtype] / 1e9:.2f}" if donor == dtype
                     else f"{dtype} = {donor}'s (not measured)")
    return peaks, (f"peak_flops = the best GEMM rate measured here per dtype, GFLOP/s: "
                   f"{', '.join(parts)}; {why}")


def _world_size(samples: Samples) -> int:
    groups = samples.collectives["group_size"]
    return int(groups.max()) if len(groups) else 1


def _common_extra(machine: dict) -> dict:
    return {"machine": {k: v for k, v in machine.items() if k != "measurement"},
            "measurement": machine.get("measurement", {})}


def cpu_base(samples: Samples, machine: dict, name: str) -> dict:
    """One rank = one torch thread on this machine's CPU."""
    world = _world_size(samples)
    cores = int(machine["usable_cpus"])
    ram = machine.get("memory_bytes") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peaks, peak_note = _measured_peaks(
        samples, "one thread has no trustworthy nominal peak (its clock varies with load and "
        "vector width), and CPUs have no TF32 path")
    hbm = best_memory_bytes_per_s(samples)
    nic, kind = best_busbw_bytes_per_s(samples)
    measured = machine.get("measurement", {})
    return {
        "name": name, "device_name": cpu_device_name(machine["cpu_model"]),
        "memory_bytes": int(ram // world), "peak_flops": peaks, "hbm_bytes_per_s": hbm,
        "gpus_per_node": world, "nics_per_node": 1, "nic_bytes_per_s": nic,
        "intra_node_link": "shared-memory",
        "sources": [
            f"measured on this machine ({machine['cpu_model']}, {cores} usable CPUs, torch "
            f"{machine.get('torch')}, {machine.get('date_utc')}, quick={measured.get('quick')}) "
            "by `meshplan profile`",
            peak_note,
            f"hbm_bytes_per_s = {hbm / 1e9:.2f} GB/s, the best memory-bound rate measured here "
            "(bytes read + written per second; smaller sizes run from cache)",
            f"memory_bytes = RAM {ram / GIB:.1f} GiB / {world}: the {world} ranks of the largest "
            "measured world share this machine's memory",
            f"gpus_per_node = {world}: the largest world size measured, ranks that share this "
            f"machine; beyond cores_per_node = {cores} the cost model divides compute among them",
            f"nics_per_node = 1, nic_bytes_per_s = {nic / 1e9:.2f} GB/s: the best {kind} busbw "
            "measured between ranks of this machine (gloo over TCP loopback), the stand-in for a "
            "network",
            "intra_node_link shared-memory: the ranks share this machine; gloo moves their "
            "collectives over TCP loopback"],
        "extra": {**_common_extra(machine), "cores_per_node": cores},
    }


def cuda_base(samples: Samples, machine: dict, name: str) -> dict:
    """One rank = one CUDA device of this machine (all alike, as device 0)."""
    gpu = machine["gpus"][0]
    spec = known_gpu(gpu["name"])
    if spec is not None:
        peaks, hbm = dict(spec.peak_flops), spec.hbm_bytes_per_s
        figure_notes = [f"peak_flops, hbm_bytes_per_s ({gpu['name']}): {spec.source}"]
    else:
        peaks, peak_note = _measured_peaks(samples, f"{gpu['name']} is not in "
                                           "meshplan.calibration.local_base.KNOWN_GPUS")
        hbm = best_memory_bytes_per_s(samples)
        figure_notes = [peak_note, f"hbm_bytes_per_s = {hbm / 1e9:.0f} GB/s, the best "
                        "memory-bound rate measured here"]
    nic, kind = best_busbw_bytes_per_s(samples)
    return {
        "name": name, "device_name": gpu["name"], "memory_bytes": int(gpu["memory_bytes"]),
        "peak_flops": peaks, "hbm_bytes_per_s": hbm, "gpus_per_node": int(machine["gpu_count"]),
        "nics_per_node": 1, "nic_bytes_per_s": nic, "intra_node_link": "cuda peer-to-peer",
        "sources": [
            f"measured on this machine ({machine['gpu_count']}x {gpu['name']}, torch "
            f"{machine.get('torch')}, CUDA {machine.get('cuda')}, {machine.get('date_utc')}) by "
            "`meshplan profile`",
            f"memory_bytes: torch.cuda.get_device_properties(0).total_memory of {gpu['name']}",
            *figure_notes,
            f"gpus_per_node = {machine['gpu_count']}: the CUDA devices of this machine",
            f"nics_per_node = 1, nic_bytes_per_s = {nic / 1e9:.1f} GB/s: the best intra-node "
            f"{kind} busbw measured, a stand-in (no cross-node measurement); import the "
            "cluster's nccl-tests logs (meshplan profile --import-nccl-tests) for its fabric",
            "intra_node_link: CUDA peer-to-peer (NVLink or PCIe, not detected); the "
            "intra-node collective fits carry the rate measured"],
        "extra": _common_extra(machine),
    }


def local_base(samples: Samples, machine: dict, name: str) -> dict:
    """The base for fit_profile of a machine described by describe_machine() (with its
    "measurement" section) and measured into `samples`."""
    device = machine.get("measurement", {}).get("device", "cuda" if machine["gpu_count"] else "cpu")
    return cuda_base(samples, machine, name) if device == "cuda" else cpu_base(samples, machine, name)
