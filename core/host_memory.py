"""Keep freed host memory in the process, as a GPU's caching allocator keeps freed blocks.

Eager PyTorch on CPU takes every operator's output from the C allocator. glibc's defaults
hand the top of the heap back to the OS once 128 KiB of it is free and map blocks above a
threshold that moves with the allocation history (mallopt(3): M_TRIM_THRESHOLD,
M_MMAP_THRESHOLD), so whether a training step faults in fresh zeroed pages for its
activations depends on what ran before: the same one-rank step of the validation model ran
at 157-196 ms (medians of six processes) with the defaults and 150-157 ms with the settings
below, in interleaved pairs on this project's 2-core VM. A CUDA step never faults (PyTorch's
caching allocator keeps what it freed), and neither does the profile's operator timing, so
the executor's CPU ranks and every measurement set these before they run.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
TRIM_THRESHOLD_BYTES = 1 << 30  # free heap kept up to 1 GiB
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit); fixed, not moving


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; False where the C library is not
    glibc (nothing is changed there)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
                and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
