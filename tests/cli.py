"""The `meshplan` console script run as a user runs it: a fresh interpreter, output captured."""
from __future__ import annotations

import subprocess
import sys


def meshplan(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`meshplan ARGS...` (each argument as str); `timeout` in seconds guards against a hang."""
    return subprocess.run([sys.executable, "-m", "meshplan.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)
