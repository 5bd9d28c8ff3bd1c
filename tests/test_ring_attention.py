"""The executor's CP ring (executor/context_parallel.py) over 4 gloo ranks against one
process's attention core on the whole sequence: with a sliding window (blocks hidden whole,
in part, and query rows that see none of a block's keys), gpt-oss's sink logits and Gemma
2's soft-capped scores, by CPU flash attention's blocks and by the unfused ring; outputs and
the gradients of Q, K, V and the sinks. Under the executor's per-op checkpoint policy the
flash ring is kept whole: its recompute passes nothing round the ring."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from meshplan.executor import context_parallel
from meshplan.executor.context_parallel import ContextParallel
from meshplan.executor.model import CausalCore
from meshplan.executor.parallelize import _op_contexts, _op_policy
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
    results[rank, "passes"] = _checkpointed_passes(ContextParallel(dist.group.WORLD, "p2p"),
                                                   *(cp.shard(t) for t in (q, k, v, seen)))


def _checkpointed_passes(cp: ContextParallel, q, k, v, seen):
    """(passes round the ring, gradients) of the flash ring's forward and backward, plain
    and under a checkpoint with the executor's per-op policy."""
    counted = []
    start = context_parallel._start_pass

    def counting(*args):
        counted.append(1)
        return start(*args)
    context_parallel._start_pass = counting
    core = CausalCore(None, "flash", None)
    core.cp = cp
    runs = []
    try:
        for checkpointed in (False, True):
            counted.clear()
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = (checkpoint(core, *leaves, use_reentrant=False, context_fn=lambda: _op_contexts(_op_policy(None)))
                   if checkpointed else core(*leaves))
            grads = torch.autograd.grad((out * seen).sum(), leaves)
            runs.append((len(counted), grads))
    finally:
        context_parallel._start_pass = start
    return runs


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    results = mp.Manager().dict()
    spawn_gloo(_ring, 4, tmp_path_factory.mktemp("ring"), 4, results)
    return dict(results)


def test_ring_matches_one_process(ring_results):
    size, results = 4, ring_results
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


def test_per_op_checkpoint_keeps_the_ring_whole(ring_results):
    """Forward passes K,V on cp - 1 times, backward cp - 1 times more and the K,V gradients cp
    times: 3 cp - 2 passes, the same under the per-op checkpoint (a recompute of the ring
    would add cp - 1), with the same gradients."""
    for rank in range(4):
        (plain, plain_grads), (kept, kept_grads) = ring_results[rank, "passes"]
        assert plain == kept == 3 * 4 - 2
        for a, b in zip(plain_grads, kept_grads):
            torch.testing.assert_close(a, b)
