"""Whole-file-or-nothing output: every file meshplan writes goes through `write_atomic`
(a temporary file beside the target, renamed over it at the end), with one file mode."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644  # what a plain open() gives under the usual umask 022, not mkstemp's 0600


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` whole or not at all; parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_json(data) -> str:
    """JSON as meshplan prints and writes it: indented, keys in insertion order."""
    return json.dumps(data, indent=2) + "\n"


def write_json(path: str | os.PathLike, data) -> None:
    write_atomic(path, dump_json(data))
