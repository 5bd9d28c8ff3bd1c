"""core/host_memory.py: after keep_freed_memory() a freed 64 MiB block (above glibc's largest
mmap threshold, 32 MiB) stays in the heap for
the next allocation (glibc's mallinfo2 counts it free); with glibc's defaults the block is
mapped on its own and handed back to the OS when freed. Each case in a fresh interpreter,
since malloc's settings are the process's."""
import ctypes
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

SCRIPT = """
import ctypes, sys
from meshplan.core.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
kept = sys.argv[1] == "kept" and keep_freed_memory()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(block)
print(kept, mapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20)
"""


def _run(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          check=True).stdout.split()


def test_freed_memory_stays_in_the_heap():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    assert _run("kept") == ["True", "False", "True"]      # from the heap, kept when freed
    assert _run("default") == ["False", "True", "False"]  # mapped alone, returned when freed
