"""How much a CPU rank's training step slows when the node's other cores run ranks too: they
share the last-level cache and the memory bandwidth. Operators timed alone in a loop stay
hot in the cache and barely notice a neighbour (a 256x704x256 GEMM and 4 MiB adds here
within 4%); a whole step, streaming its weights, gradients, Adam states and activations,
does: an 8M-parameter model's step on one core of this 2-core VM took 60-61 ms alone and
63-67 ms beside the same step on the other core, so a profile of operators timed on an idle
machine priced every multi-rank run 5-10% fast.

Measured as the ratio of the executor's own training step (model, fused AdamW) of
LOAD_MODEL on one core, beside the same step on every other usable core (one thread each,
each process pinned to its core as ranks are: executor.ranks.common), to the step alone,
in alternating rounds so that the machine's drift falls on both."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import time
from contextlib import contextmanager

import torch

from meshplan.core.host_memory import keep_freed_memory
from meshplan.executor.launch import RunFailed
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Plan
from meshplan.simulator.serve import InferencePlan

# A Llama-style model whose weights, gradients and Adam states (128 MB) and activations
# stream through the cache as a training rank's do.
LOAD_MODEL = ModelSpec(name="machine-load", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4,
                       ffn_hidden_size=704, vocab_size=4096, max_seq_len=256)
# What training_step runs, as the simulator prices it: one micro-batch of 2 x 128 tokens.
LOAD_PLAN = Plan(global_batch=2, seq_len=128, micro_batch=2, dtype="fp32")
# What decode_step runs, as the serving simulator prices it: one new token for each of 4
# sequences over a 128-token cache (the serving suite's batch and prompt).
DECODE_PLAN = InferencePlan(batch=4, prompt_len=128, gen_len=2, dtype="fp32")
READY_TIMEOUT_S = 120
# Workers start afresh (not forked from a process that may hold torch threads or a group).
SPAWN = mp.get_context("spawn")


def training_step(seed: int):
    """LOAD_MODEL's training step (LOAD_PLAN's one rank) on this process's one thread, as a
    function."""
    from meshplan.executor.loss import fused_cross_entropy
    from meshplan.executor.model import build_model
    model = build_model(LOAD_MODEL, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, LOAD_MODEL.vocab_size, (LOAD_PLAN.global_batch, LOAD_PLAN.seq_len + 1),
                           generator=torch.Generator().manual_seed(seed))

    def step():
        fused_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def decode_step(seed: int):
    """LOAD_MODEL's one-token decode step of DECODE_PLAN's batch over a cache of its prompt,
    the cache rewound to the prompt after each step so that every step sees one context
    length, on this process's one thread, as a function."""
    from meshplan.executor.generate import greedy, prompt_tokens
    from meshplan.executor.model import build_model
    model = build_model(LOAD_MODEL, seed=seed).eval()
    context = DECODE_PLAN.prompt_len
    prompts = prompt_tokens(DECODE_PLAN.batch, context, LOAD_MODEL.vocab_size, seed)
    cache = model.new_cache(context + 1)
    with torch.no_grad():
        token = greedy(model(prompts, cache))[:, None]

    @torch.no_grad()
    def step():
        greedy(model(token, cache))
        cache.rewind(context)
    return step


STEPS = {"train": training_step, "decode": decode_step}


def _train(core: int, results, stop) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    step = training_step(core)
    step()
    results.put((core, True))
    while not stop.is_set():
        step()


@contextmanager
def _processes_on(cores: list[int], target, *args, stop=None):
    """Within the block a spawned process runs target(core, results, *args) on each of
    `cores`, and the block gets a reader of what they put in `results` (_gather); on leaving,
    `stop` (an event of SPAWN, if given) is set and each process is given 30 s to end, then
    killed."""
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=target, args=(core, results, *args), daemon=True) for core in cores]
    try:
        for worker in workers:
            worker.start()
        yield lambda: _gather(results, workers)
    finally:
        if stop is not None:
            stop.set()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def _gather(results, workers) -> dict:
    """{core: value} of the (core, value) each worker puts in `results`; RunFailed as soon as
    one has exited without putting it, or after READY_TIMEOUT_S."""
    out, deadline = {}, time.monotonic() + READY_TIMEOUT_S
    while len(out) < len(workers):
        try:
            core, value = results.get(timeout=0.5)
            out[core] = value
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RunFailed(f"the machine-load step's processes failed (exit codes {dead})" if dead
                                else f"the machine-load step gave no reading within {READY_TIMEOUT_S} s") from None
    return out


@contextmanager
def _busy_neighbours(others: list[int]):
    """Within the block each of the `others` cores trains LOAD_MODEL (from its first step on)."""
    stop = SPAWN.Event()
    with _processes_on(others, _train, stop, stop=stop) as gather:
        gather()
        yield


def _timed_steps(core: int, results, warmup: int, steps: int, kind: str) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    keep_freed_memory()  # as the executor's ranks run
    step = STEPS[kind](core)
    for _ in range(warmup):
        step()
    results.put((core, statistics.median(_times(step, steps))))


def step_s_by_core(cores: list[int], warmup: int, steps: int, kind: str = "train") -> dict[int, float]:
    """Median seconds of LOAD_MODEL's training step (or with kind "decode" its decode step,
    decode_step) on each of `cores` at once (a process pinned to each, one thread), as a
    run's ranks fill the cores."""
    with _processes_on(cores, _timed_steps, warmup, steps, kind) as gather:
        return gather()


def neighbour_slowdown(ranks: int, rounds: int = 3, steps: int = 12) -> float:
    """Median step time beside ranks - 1 busy cores (as many as there are) over the median
    alone, each pooled over `rounds` alternations, at least 1.0; 1.0 for one rank or one core."""
    usable = os.sched_getaffinity(0)
    cores = sorted(usable)[:max(ranks, 1)]
    if len(cores) < 2:
        return 1.0
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {cores[0]})
    try:
        step = training_step(0)
        for _ in range(3):
            step()
        alone, beside = [], []
        for _ in range(rounds):
            alone += _times(step, steps)
            with _busy_neighbours(cores[1:]):
                beside += _times(step, steps)
    finally:
        os.sched_setaffinity(0, usable)
        torch.set_num_threads(before)
    # a neighbour does not speed a rank up: a ratio below 1 is noise, read as none
    return max(1.0, statistics.median(beside) / statistics.median(alone))


def _times(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out
