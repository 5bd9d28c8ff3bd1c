"""The CPUs this process may run on."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The cores this process is allowed on (its affinity mask, Linux), else every logical
    CPU the OS reports (macOS has no affinity call), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
