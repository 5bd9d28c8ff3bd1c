"""Other processes on this machine."""
from __future__ import annotations

import os


def running(pid: int) -> bool:
    """Whether a process with this pid runs (one of another user's counts: signal 0 is then
    refused, not unanswered)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
