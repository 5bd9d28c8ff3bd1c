"""Serving rank entry point, started by torchrun (executor/launch.py):
`python -m meshplan.executor.ranks.serve RUN.json`.

RUN.json holds the jobs (model + inference plan pairs of one world size, run one after the
other in one process group) and the ServeRankOptions (rank 0 draws a progress bar per job
on stderr when asked). Each job
builds this rank's ServingRank (generate.py), runs `warmup` untimed generations and then
`repeats` timed ones, each timed in two barrier-synchronised phases (measure.timed):
TTFT = prefill of every micro-batch up to the last sequence's first token; decode = the
gen_len - 1 decode steps. Memory is accounted as the simulator counts it: this rank's weight
shards plus its KV cache at the end of a generation (the allocator's peak on CUDA), with the
process's peak RSS beside it. Local rank 0 writes result.json into the run folder.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from meshplan.core.progress import progress_bar
from meshplan.executor.generate import Generation, ServingRank
from meshplan.executor.measure import max_rss_bytes, peak_bytes, timed
from meshplan.executor.options import ServeRankOptions, serving_dtype
from meshplan.executor.ranks.common import gather_from_ranks, run_rank_jobs
from meshplan.executor.records import ServeResult
from meshplan.simulator.serve import InferencePlan
from meshplan.simulator.model_spec import ModelSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ServeMemory:
    """One rank's memory, bytes. peak_bytes: allocator peak (CUDA) or weights + KV cache."""

    rank: int
    weights_bytes: int
    kv_cache_bytes: int
    peak_bytes: int
    max_rss_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def run_job(spec: ModelSpec, plan: InferencePlan, options: ServeRankOptions, device: torch.device) -> dict:
    dtype = serving_dtype(plan.dtype, device.type)
    rank = ServingRank(spec, plan, options.seed, device, TORCH_DTYPES[dtype])
    if device.type == "cuda":  # from here: the stage's weights, not the full model built first
        torch.cuda.reset_peak_memory_stats(device)
    ttft_s, decode_s = [], []
    label = f"serve tp{plan.tp} pp{plan.pp} x{plan.replicas} batch {plan.batch}"
    show = options.progress and dist.get_rank() == 0
    with progress_bar(options.warmup + options.repeats, label, show,
                      force_terminal=True) as bar:
        for i in range(options.warmup + options.repeats):
            generation = Generation(rank)
            prefill_s = timed(generation.prefill, device)
            all_steps_s = timed(generation.decode, device)
            if i >= options.warmup:
                ttft_s.append(prefill_s)
                decode_s.append(all_steps_s)
            bar.advance()
    kv_bytes = sum(cache.nbytes for cache in generation.caches)
    memory = ServeMemory(dist.get_rank(), rank.weights_bytes, kv_bytes,
                         peak_bytes(rank.weights_bytes + kv_bytes, device), max_rss_bytes())
    mine = (rank.replica, generation.tokens().tolist()) if rank.holds_tokens else None
    replicas = sorted(r for r in gather_from_ranks(mine) if r is not None)
    return ServeResult(ttft_s=tuple(ttft_s), decode_s=tuple(decode_s),
                       memory_by_rank=tuple(m.to_json() for m in gather_from_ranks(memory)),
                       dtype=dtype, device=device.type,
                       tokens=tuple(tuple(row) for _, rows in replicas for row in rows)).to_json()


@record
def main(argv: list[str] | None = None) -> None:
    run_rank_jobs(Path((argv or sys.argv[1:])[0]), lambda data: ServeRankOptions(**data),
                  lambda job, _i, options, device: run_job(
                      ModelSpec.from_dict(job["model"]), InferencePlan.from_dict(job["plan"]),
                      options, device))


if __name__ == "__main__":
    main()
