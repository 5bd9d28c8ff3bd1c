"""Gloo ranks spawned for tests that run collectives: each joins one group through a file
store, runs the test's function and leaves the group, whatever the function raised."""
from __future__ import annotations

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, fn, path: str, size: int, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, size: int, tmp_path, *args) -> None:
    """fn(rank, *args) on `size` spawned processes joined in one gloo group (fn a module-level
    function, which the children import)."""
    mp.spawn(_rank, args=(fn, str(tmp_path / "store"), size, args), nprocs=size, join=True)
