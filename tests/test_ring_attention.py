"""The executor's CP ring (executor/context_parallel.py) over 4 gloo ranks against one
process's attention core on the whole sequence: with a sliding window (blocks hidden whole,
in part, and query rows that see none of a block's keys), gpt-oss's sink logits and Gemma
2's soft-capped scores, by CPU flash attention's blocks and by the unfused ring; outputs and
the gradients of Q, K, V and the sinks."""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshplan.executor.context_parallel import ContextParallel
from meshplan.executor.model import CausalCore
from tests.gloo import spawn_gloo

SEQ, HEADS, KV_HEADS, DIM = 32, 4, 2, 8
# the ring's passes: send and receive, or torch's all-to-all rotation
COMMS = ("p2p", "alltoall")
# (kernel, window, sinks, softcap): a window of 6 over 4 ranks (chunks of 4 positions)
# leaves query rows blind to part of a block and hides some blocks whole
CASES = [("flash", None, False, None), ("flash", 6, False, None), ("flash", None, True, None),
         ("flash", 6, True, None), ("naive", 6, True, None), ("naive", 6, False, 0.5),
         ("naive", None, True, 0.5)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, SEQ, h, DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, torch.randn(HEADS, generator=gen), torch.randn(2, SEQ, HEADS, DIM, generator=gen)


def _attend(core: CausalCore, q, k, v, sinks, seen):
    """Output and gradients of <core(q, k, v, sinks), seen> (seen: the output's weights)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + ([sinks.detach().requires_grad_()]
                                                                 if sinks is not None else [])
    out = core(*leaves[:3], *leaves[3:])
    return out.detach(), torch.autograd.grad((out * seen).sum(), leaves)


def _ring(rank: int, size: int, results) -> None:
    q, k, v, sinks, seen = _inputs()
    for comm in COMMS:
        cp = ContextParallel(dist.group.WORLD, comm)
        positions = cp.positions(SEQ // size, "cpu")
        mine = []
        for kernel, window, with_sinks, softcap in CASES:
            core = CausalCore(window, kernel, softcap)
            core.cp = cp
            out, grads = _attend(core, *(cp.shard(t) for t in (q, k, v)), sinks if with_sinks else None,
                                 cp.shard(seen))
            mine.append((positions, out, grads))
        results[rank, comm] = mine


def test_ring_matches_one_process(tmp_path):
    size, results = 4, mp.Manager().dict()
    spawn_gloo(_ring, size, tmp_path, size, results)
    q, k, v, sinks, seen = _inputs()
    for (i, (kernel, window, with_sinks, softcap)), comm in itertools.product(enumerate(CASES), COMMS):
        # the reference: one process, the whole sequence, the unfused core (no CP)
        out, grads = _attend(CausalCore(window, "naive", softcap), q, k, v, sinks if with_sinks else None, seen)
        parts = [results[rank, comm][i] for rank in range(size)]
        for positions, ring_out, ring_grads in parts:
            torch.testing.assert_close(ring_out, out[:, positions], msg=f"{comm} {CASES[i]} output")
            torch.testing.assert_close(ring_grads[0], grads[0][:, positions], msg=f"{comm} {CASES[i]} dq")
        for j, name in ((1, "dk"), (2, "dv")):  # each rank's K,V gradients for the keys it holds
            for positions, _, ring_grads in parts:
                torch.testing.assert_close(ring_grads[j], grads[j][:, positions], msg=f"{comm} {CASES[i]} {name}")
        if with_sinks:  # each rank's sink gradient over its own query rows: summed, the whole
            torch.testing.assert_close(sum(part[2][3] for part in parts), grads[3], msg=f"{comm} {CASES[i]} dsinks")
