"""Describe the machine a measurement ran on: CPU, cores, memory, GPUs, software, date.
No hostname or other identifying detail is recorded."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from meshplan.core.cpus import this_cpu_model, usable_cpus

MEMINFO = Path("/proc/meminfo")
KIB = 1024


def memory_bytes(meminfo: str) -> int | None:
    """MemTotal of /proc/meminfo text ('MemTotal: 24576000 kB'), in bytes."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * KIB  # /proc/meminfo's "kB" is KiB (proc(5))
    return None


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def describe_machine() -> dict:
    """JSON-ready description of this machine and its torch build."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_bytes": int(p.total_memory)})
    return {
        "cpu_model": this_cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_bytes": memory_bytes(_read(MEMINFO)),
        "gpu_count": len(gpus),
        "gpus": gpus,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
