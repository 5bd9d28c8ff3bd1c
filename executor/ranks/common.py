"""What every rank entry point does around its jobs: read run.json, set up the device and
the process group, run the jobs one after the other, and have each node's local rank 0
write result.json (the per-job results as the launcher reads them, executor/records.py)."""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist

from meshplan.core.host_memory import keep_freed_memory
from meshplan.core.io import write_json


def pin_rank_to_core(local_rank: int) -> int:
    """Bind this CPU rank to one core (round robin when ranks outnumber cores), as each GPU
    rank owns one device: otherwise the OS lets a rank's gloo threads and a neighbour's
    compute share a core. Returns the core."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[local_rank % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def setup_device() -> torch.device:
    """This rank's CUDA device, or on CPU one thread pinned to one core, freed memory kept
    (core/host_memory.py)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(1)
    keep_freed_memory()
    pin_rank_to_core(int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def gather_from_ranks(item) -> list:
    """Every rank's `item` (a picklable object), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def run_rank_jobs(run_file: Path, read_options: Callable[[dict], object],
                  run_one: Callable[[dict, int, object, torch.device], dict]) -> NoReturn:
    """The body of a rank's entry point: read run.json, set up the device and the process
    group, run each job through run_one(job, index, options, device) with the options that
    read_options builds from run.json's, and have each node's local rank 0 write
    result.json atomically; then leave."""
    config = json.loads(run_file.read_text())
    options = read_options(config["options"])
    device = setup_device()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=options.timeout_s))
    results = [run_one(job, i, options, device) for i, job in enumerate(config["jobs"])]
    if int(os.environ["LOCAL_RANK"]) == 0:
        write_json(run_file.parent / "result.json",
                   {"results": results, "world_size": dist.get_world_size()})
    leave()


def leave() -> NoReturn:
    """End a rank whose work is done and written: meet the others, tear the process group
    down and exit without interpreter shutdown: on CPU, gloo threads of DTensor's
    sub-groups torn down during finalisation abort the process now and then ("terminate
    called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
