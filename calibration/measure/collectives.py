"""Time torch.distributed collectives over real process groups, one rank per process, launched
the way the executor launches ranks:

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m meshplan.calibration.measure.collectives --out rows.json [--group-sizes 2 4] [--sizes ...]

gloo on CPU (one torch thread per rank), NCCL on CUDA (rank i on GPU i). For each group size
g (ranks 0..g-1, a dist.new_group), collective and message size: `warmup` untimed calls, then
timed calls each preceded by a barrier of the group, the sizes of a collective taking turns
over ROUNDS rounds; a rank's time is its mean over calls
(nccl-tests' time is a timed loop's total over its iterations; a training step pays every
call, the slow ones too: gloo's calls here are heavy-tailed, a 256 KiB all-reduce over two
ranks taking 0.23 ms at the median, 0.79 ms on average and 3.2 ms at p90 of 100 calls) and
the row's time is the maximum of those means over the group's ranks (an all_reduce MAX, as
nccl-tests reports the slowest rank with -a 3). Rank 0 writes the COLLECTIVE_COLUMNS rows
as JSON records to --out and prints one line per row on stdout (for progress bars). All
ranks run on one machine (--standalone), so ranks_per_node is the group size.

message_bytes follows nccl-tests' "size" (see calibration.samples), rounded down so that the
fp32 element count splits evenly over the group where the collective needs it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist

from meshplan.hw_profiles.collective_model import KINDS
from meshplan.core.io import write_atomic
from meshplan.executor.ranks.common import leave, setup_device
from meshplan.calibration.samples import COLLECTIVE_COLUMNS
from meshplan.core.errors import ProfileError

ELEMENT_BYTES = 4  # fp32, nccl-tests' default type
MIN_REPEATS = 3
ROUNDS = 4  # turns the message sizes of one collective take (_time_sizes)
KIB = 1024
# a collective of a measurement waiting longer than this has lost its peer (no timed call
# takes a second): the rank fails, for launch_rows to start the launch again
RANK_TIMEOUT_S = 300


def _elements(kind: str, message_bytes: int, group_size: int) -> int:
    """fp32 elements of the nccl-tests size, a multiple of the group size where it must split."""
    n = max(message_bytes // ELEMENT_BYTES, 1)
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        n = max(n // group_size, 1) * group_size
    return n


def _collective(kind: str, n: int, ranks: list[int], group,
                device: torch.device) -> Callable[[], None]:
    """A call running one `kind` over `group` (whose ranks are `ranks`) on n fp32 elements."""
    g, me = len(ranks), ranks.index(dist.get_rank())
    x = torch.ones(n, device=device)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    if kind == "all_gather":  # size = whole output
        shard = torch.ones(n // g, device=device)
        return lambda: dist.all_gather_into_tensor(x, shard, group=group)
    if kind == "reduce_scatter":  # size = whole input
        shard = torch.empty(n // g, device=device)
        return lambda: dist.reduce_scatter_tensor(shard, x, group=group)
    if kind == "broadcast":
        return lambda: dist.broadcast(x, src=ranks[0], group=group)
    if kind == "all_to_all":  # size = per-rank buffer
        out = torch.empty(n, device=device)
        return lambda: dist.all_to_all_single(out, x, group=group)
    if kind == "send_recv":
        # Ring exchange as nccl-tests sendrecv_perf: send to rank+1, receive from rank-1, as one
        # batch (NCCL needs the pair grouped, else both ranks block in their send).
        out = torch.empty(n, device=device)
        ops = [dist.P2POp(dist.isend, x, ranks[(me + 1) % g], group),
               dist.P2POp(dist.irecv, out, ranks[(me - 1) % g], group)]

        def exchange():
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return exchange
    raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")


def _timed_s(call: Callable[[], None], group, device: torch.device) -> float:
    """One call's time on this rank, the group's ranks started together by a barrier."""
    dist.barrier(group=group)
    t0 = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _calls_per_round(call: Callable[[], None], group, device: torch.device, repeats: int,
                     warmup: int, budget_s: float) -> int:
    """After `warmup` untimed calls, the timed calls of each of ROUNDS rounds: `repeats` in
    all, fewer where they would overrun `budget_s` (never under MIN_REPEATS), the same on
    every rank (the slowest rank's probe call decides)."""
    for _ in range(warmup):
        _timed_s(call, group, device)
    probe = torch.tensor([_timed_s(call, group, device)], dtype=torch.float64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    n = max(MIN_REPEATS, min(repeats, int(budget_s / max(probe.item(), 1e-9))))
    return -(-n // ROUNDS)


def _time_sizes(calls: list[Callable[[], None]], group, device: torch.device, repeats: int,
                warmup: int, budget_s: float) -> list[tuple[float, float, int]]:
    """Per call (one per message size): (max over ranks of the mean s, max over ranks of the
    std s, calls timed). The sizes take turns over ROUNDS rounds, so that a slow spell of
    the machine falls on all of them alike: timed one size after another, gloo's small
    send_recv over two ranks read 0.30, 0.95, 0.43 and 0.51 ms at 4, 16, 64 and 256 KiB
    (means of 200; 2026-12-04, Xeon VM), a fast spell fitting half the latency of the
    profile before."""
    per_round = [_calls_per_round(c, group, device, repeats, warmup, budget_s) for c in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(ROUNDS):
        for call, n, mine in zip(calls, per_round, times):
            mine.extend(_timed_s(call, group, device) for _ in range(n))
    stats = torch.tensor([[statistics.fmean(t), statistics.pstdev(t)] for t in times],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    return [(mean, std, len(t)) for (mean, std), t in zip(stats.tolist(), times)]


def measure_collectives(kinds: list[str], group_sizes: list[int], sizes_bytes: list[int],
                        device: torch.device, repeats: int, warmup: int,
                        budget_s: float) -> list[dict]:
    """Rows (on every rank of group 0..g-1; identical) for an initialised default group."""
    world = dist.get_world_size()
    bad = [g for g in group_sizes if not 2 <= g <= world]
    if bad:
        raise ProfileError("measure.group_sizes", f"{bad} outside 2..{world} (the world size)",
                           f"pass group sizes between 2 and {world}, or launch more ranks")
    rows = []
    for g in group_sizes:
        ranks = list(range(g))
        group = dist.new_group(ranks)  # every rank must call new_group, members or not
        if dist.get_rank() in ranks:
            for kind in kinds:
                counts = [_elements(kind, size, g) for size in sizes_bytes]
                calls = [_collective(kind, n, ranks, group, device) for n in counts]
                for n, (t, std, k) in zip(counts, _time_sizes(calls, group, device, repeats, warmup,
                                                              budget_s)):
                    rows.append(dict(zip(COLLECTIVE_COLUMNS,
                                         (kind, g, g, n * ELEMENT_BYTES, t, std, k))))
                    if dist.get_rank() == 0:
                        print(f"measured {kind} group_size={g} message_bytes={n * ELEMENT_BYTES}",
                              flush=True)
                del calls  # this kind's buffers freed before the next kind's are made
        dist.barrier()
    return rows


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes the rows to")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--group-sizes", nargs="+", type=int,
                   help="group sizes to measure (default: 2 .. world size)")
    p.add_argument("--sizes", nargs="+", type=int,
                   default=[KIB * 4 ** i for i in range(9)], help="message sizes in bytes")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=0.5,
                   help="time per configuration beyond which fewer repeats are timed")
    return p.parse_args(argv)


def run_rank(out: Path, measure: Callable[[torch.device], list[dict]]) -> NoReturn:
    """Start this rank (GPU i for local rank i under NCCL, else one thread pinned to one
    core under gloo, freed memory kept), take the rows measure(device) gives, let rank 0
    write them to out, and leave as the executor's ranks do."""
    torch.set_num_threads(1)
    device = setup_device()  # as the executor's ranks
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=RANK_TIMEOUT_S))
    rows = measure(device)
    if dist.get_rank() == 0:
        write_atomic(out, json.dumps(rows))
    leave()


def main(argv=None) -> None:
    args = _parse_args(argv)
    run_rank(args.out, lambda device: measure_collectives(
        args.kinds, args.group_sizes or list(range(2, dist.get_world_size() + 1)), args.sizes,
        device, args.repeats, args.warmup, args.budget_s))


if __name__ == "__main__":
    main()
