"""Whole-file-or-nothing output: every file meshplan writes goes through `write_atomic`
(a temporary file beside the target, renamed over it at the end), with one file mode.
Every JSON file a user hands in is read by `read_json`, which turns each way it can be
unreadable into one ValueError."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from meshplan.core.errors import OutputError

FILE_MODE = 0o644  # what a plain open() gives under the usual umask 022, not mkstemp's 0600


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` whole or not at all; parent folders are created. OutputError
    when the path cannot be written."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise IsADirectoryError(21, "is a folder")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(str(target), f"cannot be written ({exc.strerror or exc})",
                          "give a file path in a folder you can write") from None
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | os.PathLike):
    """The JSON value in `path`; ValueError saying why for a missing or unreadable file,
    bytes that are not UTF-8, invalid JSON, NaN/Infinity, or nesting too deep to parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_no_constant)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg}, line {exc.lineno}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
