"""Read the tables printed by NVIDIA/nccl-tests (all_reduce_perf, all_gather_perf,
reduce_scatter_perf, broadcast_perf, sendrecv_perf, alltoall_perf) into the `collectives`
table of calibration.samples.

The format (NVIDIA/nccl-tests src/common.cu): a header "# nThread T nGpus G minBytes ...
iters: N agg iters: A ...", then "# Using devices" with one "#  Rank R Group C Pid P on HOST
device D [bus] NAME" line per rank (older versions omit "Group C"), then a table whose rows
are "size count type redop root" followed by "time algbw busbw #wrong" for out-of-place and
then in-place; time is the mean over iterations in microseconds, size follows the
convention calibration.samples documents. Ranks sharing a Group value form one communicator
(NCCL_TESTS_SPLIT_MASK); ranks on the same HOST share a node. mpirun's "[1,0]<stdout>:"
prefixes and interleaved NCCL INFO lines are skipped.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from meshplan.calibration.samples import COLLECTIVE_COLUMNS
from meshplan.core.errors import ProfileError

US_TO_S = 1e-6
BINARIES = {"all_reduce_perf": "all_reduce", "all_gather_perf": "all_gather",
            "reduce_scatter_perf": "reduce_scatter", "broadcast_perf": "broadcast",
            "sendrecv_perf": "send_recv", "alltoall_perf": "all_to_all"}
MPI_PREFIX = re.compile(r"^\[\d+,\d+\]<std(?:out|err)>:")
STARTING = re.compile(r"^#\s*Collective test starting:\s*(\S+)")
HEADER = re.compile(r"^#\s*nThread\s+\d+\s+nGpus\s+\d+\b.*?warmup iters:\s*\d+\s+"
                    r"iters:\s*(\d+)(?:\s+agg iters:\s*(\d+))?")
RANK = re.compile(r"^#\s*Rank\s+(\d+)\s+(?:Group\s+(\d+)\s+)?Pid\s+\d+\s+on\s+(\S+)\s+device\b")
TABLE = re.compile(r"^#\s*size\s+count\s+type\b")
TABLE_END = re.compile(r"^#\s*(Out of bounds|Avg bus bandwidth)")
ROW_START = re.compile(r"^\d+\s")
FIX_ROW = ("rows must read 'size count type redop root time algbw busbw #wrong ...' "
           "as nccl-tests prints them")


def _collective_of(name: str) -> str | None:
    for binary, kind in BINARIES.items():
        if binary in name:
            return kind
    return None


def _layout(ranks: list[tuple[int, int, str]], where: str) -> tuple[int, int]:
    """(group_size, ranks_per_node) of rank 0's communicator from the '# Rank' lines."""
    if not ranks:
        raise ProfileError(where, "no '#  Rank R ... on HOST device' lines before the table",
                           "keep rank 0's whole stdout, including the '# Using devices' block")
    color0 = min(ranks)[1]
    hosts = Counter(host for _, color, host in ranks if color == color0)
    per_node = set(hosts.values())
    if len(per_node) != 1:
        raise ProfileError(where, f"the group's ranks are spread unevenly over nodes "
                           f"({sorted(hosts.values())} ranks per node)",
                           "run nccl-tests with the same number of ranks on every node")
    return sum(hosts.values()), per_node.pop()


def _row(tokens: list[str], where: str, line: str) -> tuple[int, float, int]:
    """(size bytes, first (out-of-place) time us, #wrong of both runs) of one table row."""
    try:
        if len(tokens) not in (9, 13):
            raise ValueError
        size, time_us = int(tokens[0]), float(tokens[5])
        for i in range(5, len(tokens), 4):  # time, algbw, busbw, #wrong of each run
            float(tokens[i]), float(tokens[i + 1]), float(tokens[i + 2])
        wrong = sum(0 if w == "N/A" else int(w) for w in tokens[8::4])
    except ValueError:
        raise ProfileError(where, f"cannot read table row {line.strip()!r}", FIX_ROW) from None
    if time_us <= 0:
        raise ProfileError(where, f"non-positive time {tokens[5]} us", FIX_ROW)
    return size, time_us, wrong


def parse_nccl_tests_log(text_or_path, collective: str | None = None) -> pd.DataFrame:
    """COLLECTIVE_COLUMNS rows of every table in one nccl-tests stdout log (a path, or the
    text itself when it spans lines). The collective comes from `collective`, else the log's
    "# Collective test starting: X_perf" line, else the file name (e.g. all_reduce_perf.txt).
    time_s is the out-of-place mean; time_std_s is NaN (nccl-tests prints no spread)."""
    if isinstance(text_or_path, Path) or "\n" not in str(text_or_path):
        path = Path(text_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 text, byte {e.start}"
            raise ProfileError(str(path), f"cannot read ({reason})",
                               "pass the path of an nccl-tests stdout log") from None
        name = str(path)
    else:
        text, name = str(text_or_path), "<nccl-tests log>"
    if collective is not None and collective not in BINARIES.values():
        raise ProfileError("collective", f"unknown collective {collective!r}",
                           f"use one of {sorted(BINARIES.values())}")
    rows, ranks, kind, layout, repeats = [], [], None, None, None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = MPI_PREFIX.sub("", raw).strip()
        where = f"{name}:{lineno}"
        if m := STARTING.match(line):
            kind = _collective_of(m.group(1))
        elif m := HEADER.match(line):
            ranks, layout = [], None
            repeats = int(m.group(1)) * int(m.group(2) or 1)
        elif m := RANK.match(line):
            ranks.append((int(m.group(1)), int(m.group(2) or 0), m.group(3)))
        elif TABLE.match(line):
            if repeats is None:
                raise ProfileError(where, "table without the '# nThread ... iters: N' header",
                                   "keep rank 0's whole stdout, from its first line")
            layout = _layout(ranks, where)
        elif TABLE_END.match(line):
            layout = None
        elif layout and ROW_START.match(line):
            which = collective or kind or _collective_of(Path(name).name)
            if which is None:
                raise ProfileError(where, "cannot tell which collective this table measures",
                                   "pass collective=..., or name the file after the nccl-tests "
                                   "binary (e.g. all_reduce_perf.txt)")
            size, time_us, wrong = _row(line.split(), where, line)
            if wrong:
                raise ProfileError(where, f"nccl-tests found {wrong} wrong elements at size "
                                   f"{size}", "fix the fabric or NCCL setup and re-run the test")
            rows.append((which, *layout, size, time_us * US_TO_S, math.nan, repeats))
    if not rows:
        raise ProfileError(name, "no nccl-tests result table found",
                           "pass the stdout of an nccl-tests *_perf binary (starts with "
                           "'# nThread ... nGpus ...')")
    return pd.DataFrame(rows, columns=list(COLLECTIVE_COLUMNS))
