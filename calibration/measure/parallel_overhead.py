"""Time the overhead probe's tiny model (calibration/overhead.py) on two real ranks, plain,
under the executor's tensor parallelism (with and without SP), under its FSDP2 ZeRO-2 and
ZeRO-3, under its context parallelism (Ulysses' all-to-all, over a sequence twice as long,
each rank's shard as long as the plain model's), and in its mixture-of-experts form with and
without expert parallelism over both, as the executor's training step runs them: DTensor
layers, the vocab-parallel head and the fused vocab-parallel cross-entropy, FSDP2's per-layer gathers
and reduce-scatters, the attention's head/sequence all-to-alls, the experts' all-to-all
exchange, each collective moving data between the ranks. A one-rank mesh would skip
the redistributions and collectives whose host work this is meant to see.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m meshplan.calibration.measure.parallel_overhead --out rows.json

For each variant (plain and moe: each rank its own model, no communication; tp; sp; zero2;
zero3; cp; moe_ep)
and layer count of overhead.LAYERS: the forward, and forward + backward, each call preceded
by a barrier, all taking turns within every repeat (an FSDP2 model is resharded after its
forward-only call, so that every call starts from sharded weights, as a step does); a
rank's time is its mean over the repeats (the collectives inside are priced by their mean:
collectives.py), the row's the slowest rank's. Rank 0 writes the rows as JSON records to
--out.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from meshplan.calibration.measure.collectives import run_rank
from meshplan.calibration.overhead import LAYERS, PROBE_TOKENS, VARIANTS, probe_model
from meshplan.executor.context_parallel import ContextParallel
from meshplan.executor.loss import fused_cross_entropy
from meshplan.executor.model import build_model, set_context_parallel
from meshplan.executor.parallelize import apply_dp, apply_ep, apply_tp, build_mesh
from meshplan.simulator.plan import Plan

RANKS = 2


def _calls(num_layers: int, variant: str, device: torch.device) -> tuple:
    """(forward, forward + backward) of the probe model under `variant`."""
    model = build_model(probe_model(num_layers, moe=variant.startswith("moe")), seed=0)
    mesh = init_device_mesh(device.type, (RANKS,), mesh_dim_names=("x",))["x"]
    if variant in ("tp", "sp"):
        apply_tp(model, mesh, sequence_parallel=variant == "sp", training=True)
    elif variant == "moe_ep":
        plan = Plan(global_batch=RANKS, seq_len=PROBE_TOKENS, dp=RANKS, ep=RANKS)
        apply_ep(model, build_mesh(plan.expert_mesh(RANKS), device.type), plan.dp)
    elif variant.startswith("zero"):
        model = apply_dp(model, mesh, Plan(global_batch=RANKS, seq_len=PROBE_TOKENS, dp=RANKS,
                                           zero=int(variant[-1])))
    cp = ContextParallel(mesh.get_group(), "a2a") if variant == "cp" else None
    set_context_parallel(model, cp)
    seq = RANKS * PROBE_TOKENS if cp else PROBE_TOKENS
    tokens = torch.randint(0, 128, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    if cp is not None:
        x, y = cp.shard(x), cp.shard(y)
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def forward():
        fused_cross_entropy(model(x), y)
        for module in sharded:
            module.reshard()

    def step():
        fused_cross_entropy(model(x), y).backward()
    return forward, step


def measure(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    keys = [(v, n) for v in VARIANTS for n in LAYERS]
    calls = [call for v, n in keys for call in _calls(n, v, device)]

    def timed(call) -> float:
        dist.barrier()
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    for _ in range(warmup):
        for call in calls:
            timed(call)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, out in zip(calls, times):
            out.append(timed(call))
    means = torch.tensor([statistics.fmean(t) for t in times], dtype=torch.float64)
    dist.all_reduce(means, op=dist.ReduceOp.MAX)
    return [{"variant": v, "layers": n, "forward_s": means[2 * i].item(), "step_s": means[2 * i + 1].item()}
            for i, (v, n) in enumerate(keys)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes the rows to")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    run_rank(args.out, lambda device: measure(device, args.repeats, args.warmup))


if __name__ == "__main__":
    main()
