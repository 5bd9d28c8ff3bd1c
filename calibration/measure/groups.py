"""Time collectives over several groups of ranks at once, across nodes: the measurement of a
fabric, where what a group gets depends on the groups beside it. Launched like the
single-machine measurement (calibration/measure/collectives.py), on every node of a
multi-node torchrun (c10d rendezvous):

    python -m torch.distributed.run --nnodes N --node-rank K --rdzv-backend c10d ... \\
        -m meshplan.calibration.measure.groups --patterns patterns.json --out rows.json

patterns.json lists {"name", "groups": [[rank, ...], ...], "kinds", "sizes"}; a pattern's
groups run the collective at the same moment (a barrier of every rank before each call;
ranks in no group wait). A row's time is the slowest rank's mean over calls, over all of
the pattern's groups. Ranks are numbered node by node (torchrun's order), so a group's ranks
per node come from LOCAL_WORLD_SIZE. gloo on CPU, NCCL on CUDA, as the single-machine
measurement. Rank 0 writes COLLECTIVE_COLUMNS + "pattern" rows.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from meshplan.calibration.measure.collectives import (ELEMENT_BYTES, _collective, _elements,
                                                       _time_sizes, run_rank)
from meshplan.calibration.samples import COLLECTIVE_COLUMNS
from meshplan.core.errors import ProfileError


def ranks_per_node(group: list[int], local_world_size: int) -> int:
    """The most ranks of `group` on one node (ranks numbered node by node)."""
    return max(Counter(r // local_world_size for r in group).values())


def measure_pattern(pattern: dict, local_world_size: int, device: torch.device, repeats: int,
                    warmup: int, budget_s: float) -> list[dict]:
    """Rows of one pattern (the same on every rank)."""
    world, me = dist.get_world_size(), dist.get_rank()
    groups = [sorted(g) for g in pattern["groups"]]
    seen = [r for g in groups for r in g]
    if len(seen) != len(set(seen)) or not all(0 <= r < world for r in seen) or \
            any(len(g) < 2 for g in groups):
        raise ProfileError(f"patterns.{pattern['name']}.groups", f"{groups} are not disjoint groups "
                           f"of 2 or more of the {world} ranks", "give each rank at most one group")
    handles = [dist.new_group(g) for g in groups]  # every rank creates every group
    mine = next((k for k, g in enumerate(groups) if me in g), None)
    sizes = {len(g) for g in groups}
    per_node = {ranks_per_node(g, local_world_size) for g in groups}
    if len(sizes) != 1 or len(per_node) != 1:
        raise ProfileError(f"patterns.{pattern['name']}.groups", "groups differ in size or ranks "
                           "per node", "measure groups placed alike in one pattern")
    size, rpn = sizes.pop(), per_node.pop()
    rows = []
    for kind in pattern["kinds"]:
        counts = [_elements(kind, int(message), size) for message in pattern["sizes"]]
        calls = [_collective(kind, n, groups[mine], handles[mine], device) if mine is not None
                 else (lambda: None) for n in counts]
        for n, (t, std, k) in zip(counts, _time_sizes(calls, None, device, repeats, warmup, budget_s)):
            rows.append({**dict(zip(COLLECTIVE_COLUMNS, (kind, size, rpn, n * ELEMENT_BYTES, t, std, k))),
                         "pattern": pattern["name"]})
            if me == 0:
                print(f"measured {pattern['name']} {kind} message_bytes={n * ELEMENT_BYTES} "
                      f"time_s={t:.4f}", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patterns", type=Path, required=True, help="JSON list of patterns")
    p.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes the rows to")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=4.0,
                   help="time per configuration beyond which fewer repeats are timed")
    args = p.parse_args(argv)
    patterns = json.loads(args.patterns.read_text())
    run_rank(args.out, lambda device: [
        row for pattern in patterns
        for row in measure_pattern(pattern, int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
                                   device, args.repeats, args.warmup, args.budget_s)])

if __name__ == "__main__":
    main()
