"""The CPUs this process may run on, and their model."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def usable_cpus() -> int:
    """The cores this process is allowed on (its affinity mask, Linux), else every logical
    CPU the OS reports (macOS has no affinity call), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model(cpuinfo: str) -> str:
    """The first 'model name' of /proc/cpuinfo text (x86), else its 'Model' / 'Hardware' line
    (ARM), else platform.processor()."""
    for key in ("model name", "Model", "Hardware"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or "unknown"


@functools.cache
def this_cpu_model() -> str:
    """This machine's CPU model (cpu_model of its /proc/cpuinfo), read once per process:
    every load of the `local` profile and every probe asks for it."""
    return cpu_model(CPUINFO.read_text() if CPUINFO.exists() else "")
