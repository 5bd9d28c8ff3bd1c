"""Training rank entry point, started by torchrun (executor/launch.py):
`python -m meshplan.executor.ranks.train RUN.json`.

RUN.json (written by launch.py) holds the jobs (model + plan pairs of one world size, run
one after the other in the same process group) and the TrainRankOptions. Each job: build the
full model from the seed on every rank, split it into pipeline stages, parallelize each
stage (parallelize.py), train `steps` steps on the same global batches as a single process
would, and time and account memory (measure.py). Each node's local rank 0 writes
result.json into the run folder; with `save_grads` set, every rank also saves the gradients of
the first step (for the numerics tests). With a checkpoint folder, the job saves a checkpoint
every `checkpoint_every` steps and after the last one, and starts from the newest one there
when asked to resume or when torchrun restarts the ranks after a failure
(executor/checkpoint.py); the losses it reports are then those of every step from 0.

Set MESHPLAN_FAULT=RANK:STEP to make that rank exit abruptly after that step, or
RANK:STEP:save in the middle of the checkpoint saved after that step (its part written, the
checkpoint not yet complete); only in the first attempt, not after a torchrun restart (fault
tests).
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor.experimental import implicit_replication

from meshplan.core.progress import progress_bar
from meshplan.executor import data as batches
from meshplan.executor.checkpoint import CheckpointInfo
from meshplan.executor.loss import LOSSES
from meshplan.executor.measure import (ActivationMeter, model_state_bytes, parameter_storages, rank_memory,
                                       timed, unsharded_gradients)
from meshplan.executor.model import build_model
from meshplan.executor.moe import reduce_expert_gradients, routing_imbalance, update_expert_bias
from meshplan.executor.parallelize import (build_mesh, build_optimizer, clear_gradients, context_parallel,
                                           data_parallel_mesh, full_gradients, gradient_sync, parallelize,
                                           training_context)
from meshplan.executor.pipeline import TiedEmbedding, build_schedule, split_stage, stage_indices
from meshplan.executor.options import TrainRankOptions, compute_dtype
from meshplan.executor.records import TrainResult
from meshplan.executor.ranks.checkpointer import Checkpointer
from meshplan.executor.ranks.common import gather_from_ranks, run_rank_jobs
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Plan

FAULT_ENV = "MESHPLAN_FAULT"
FAULT_EXIT_CODE = 17


def fault_here(step: int, when: str) -> None:
    """Exit abruptly if MESHPLAN_FAULT names this rank, this step and `when` ("step": after
    the step, "save": in the middle of its checkpoint), in the first attempt only."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    at, _, phase = rest.partition(":")
    if (rank, at, phase or "step") == (str(dist.get_rank()), str(step), when):
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)


class Job:
    """One plan, parallelized on this rank: its stage modules, optimizer and step function."""

    def __init__(self, spec: ModelSpec, plan: Plan, options: TrainRankOptions, device: torch.device):
        self.spec, self.plan, self.options, self.device = spec, plan, options, device
        self.mesh = build_mesh(plan.mesh(plan.world_size), device.type)
        # experts split over ep, or replicated over TP ranks that route different tokens
        expert_mesh = (build_mesh(plan.expert_mesh(plan.world_size), device.type)
                       if spec.num_experts and plan.ep * plan.tp > 1 else None)
        self.expert_mesh = expert_mesh
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.dp_mesh = data_parallel_mesh(self.mesh, plan)
        self.cp = context_parallel(self.mesh, plan)
        self.dtype = compute_dtype(plan.dtype, device.type)
        self.loss_fn = LOSSES[plan.cross_entropy]
        model = build_model(spec, options.seed).to(device)
        if plan.pp > 1:
            self.indices = stage_indices(plan, self.mesh["pp"].get_local_rank())
            stages = [split_stage(model, plan.layer_partition, i) for i in self.indices]
            del model
            self.modules = [parallelize(m, plan, self.mesh, self.dp_mesh, expert_mesh) for m in stages]
            self.schedule = build_schedule(self.modules, self.indices, plan,
                                           self.mesh["pp"].get_group(), device, self.loss_fn)
            self.has_first = 0 in self.indices
            self.has_last = plan.num_virtual - 1 in self.indices
            self.tied = TiedEmbedding(plan, self.mesh) if spec.tied_embeddings else None
        else:
            self.modules = [parallelize(model, plan, self.mesh, self.dp_mesh, expert_mesh)]
            self.has_first = self.has_last = True
            self.tied = None
        self.params = [p for m in self.modules for p in m.parameters()]
        # the ranks holding this pipeline stage, which sum their experts' load for the
        # choice biases (update_expert_bias)
        self.stage_group = (self.mesh[tuple(n for n in self.mesh.mesh_dim_names if n != "pp")]._flatten(
            "stage").get_group() if spec.router_choice_bias and plan.world_size > plan.pp else None)
        self.optimizer = build_optimizer(self.modules, plan, self.dp_mesh, options.lr)
        self.memory = None

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        tokens = batches.global_batch(step, plan.global_batch, plan.seq_len, self.spec.vocab_size,
                                      self.options.seed, self.options.data)
        rows = batches.dp_rows(tokens, self.dp_rank, plan.dp).to(self.device)
        inputs_targets = batches.split_inputs_targets(rows)
        return inputs_targets if self.cp is None else tuple(self.cp.shard(t) for t in inputs_targets)

    def forward_backward(self, inputs, targets) -> torch.Tensor:
        """Loss (mean over this rank's micro-batches; 0 off the last stage) after backward."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) \
            if self.dtype == "bf16" else nullcontext()
        with training_context(self.plan):
            return self._forward_backward(inputs, targets, autocast)

    def _forward_backward(self, inputs, targets, autocast) -> torch.Tensor:
        if self.plan.pp > 1:
            losses: list[torch.Tensor] = []
            with autocast:
                # the last stage's outputs (logits) are not wanted: without return_outputs
                # False torch keeps every micro-batch's until the next step (output_chunks)
                self.schedule.step(*([inputs] if self.has_first else []),
                                   target=targets if self.has_last else None,
                                   losses=losses if self.has_last else None, return_outputs=False)
            for module in self.modules:
                reduce_expert_gradients(module)
            if self.tied is not None:
                self.tied.sync(self.modules)
            return torch.stack(losses).mean().detach() if losses else torch.zeros((), device=self.device)
        model, n = self.modules[0], self.plan.num_microbatches
        total = torch.zeros((), device=self.device)
        each = not self.plan.grad_sync_once  # ZeRO-2/3 reducing after every micro-batch
        for i, (x, y) in enumerate(zip(inputs.chunk(n), targets.chunk(n))):
            with gradient_sync(model, each or i == n - 1, i == n - 1, self.plan.zero):
                with autocast:
                    loss = self.loss_fn(model(x), y) / n
                loss.backward()
            total += loss.detach()
        return total

    def train_step(self, inputs, targets, account: bool, grads_file: Path | None) -> torch.Tensor:
        """One optimizer step. With `account`, measure this rank's memory (self.memory) and
        save the gradients to `grads_file` if given."""
        meter = ActivationMeter(parameter_storages(self.params), unsharded_gradients(self.modules)) \
            if account else None
        with meter or nullcontext():
            loss = self.forward_backward(inputs, targets)
        if grads_file is not None:
            torch.save(full_gradients(self.modules, self.spec.tied_embeddings), grads_file)
        # the fused AdamW's step counts are plain tensors beside the DTensor parameters
        with implicit_replication():
            self.optimizer.step()
        if self.spec.router_choice_bias:
            update_expert_bias(self.modules, self.stage_group)
        if meter is not None:
            self.memory = rank_memory(dist.get_rank(), model_state_bytes(self.params, self.optimizer),
                                      meter, self.device)
        clear_gradients(self.optimizer, self.modules)
        return loss


def run_job(spec: ModelSpec, plan: Plan, options: TrainRankOptions, device: torch.device,
            job_index: int, run_dir: Path) -> dict:
    """Train one plan from step 0, or from its newest checkpoint; memory is accounted on the
    first step this launch runs (a warm-up step, untimed in the summary, when warmup >= 1)."""
    job = Job(spec, plan, options, device)
    rank = dist.get_rank()
    label = f"run dp{plan.dp} tp{plan.tp} pp{plan.pp} cp{plan.cp}" + (f" ep{plan.ep}" if plan.ep > 1 else "")
    grads_file = run_dir / f"grads{job_index}_rank{rank}.pt" if options.save_grads else None
    saver = (Checkpointer(options.checkpoint_dir, job.modules, job.optimizer, device, spec.tied_embeddings,
                          job.expert_mesh) if options.checkpoint_dir else None)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    start, before = saver.load(options.lr) if saver and (options.resume or restarted) else (0, ())
    every = options.checkpoint_every or options.steps
    losses, times_s = [], []
    with progress_bar(options.steps - start, label, rank == 0 and options.progress,
                      force_terminal=True) as bar:
        for step in range(start, options.steps):
            inputs, targets = job.local_batch(step)
            first = step == start
            times_s.append(timed(lambda: losses.append(
                job.train_step(inputs, targets, first, grads_file if first else None)), device))
            bar.advance()
            done = step + 1
            if saver and (done % every == 0 or done == options.steps):
                so_far = (*before, *global_losses(losses, job.has_last, device))
                saver.save(CheckpointInfo(done, spec.to_dict(), plan.to_dict(), dist.get_world_size(),
                                          options.seed, options.lr, options.data, so_far),
                           before_commit=lambda: fault_here(step, "save"))
            fault_here(step, "step")
    # No step left (a restart after the last checkpoint): nothing was measured.
    memory = [m.to_json() for m in gather_from_ranks(job.memory) if m is not None]
    imbalance = [i for i in gather_from_ranks(routing_imbalance(job.modules)) if i is not None]
    return TrainResult(losses=(*before, *global_losses(losses, job.has_last, device)),
                       step_times_s=tuple(times_s), memory_by_rank=tuple(memory),
                       routing_imbalance=max(imbalance) if imbalance else None,
                       dtype=job.dtype, device=device.type).to_json()


def global_losses(losses: list[torch.Tensor], has_loss: bool, device) -> list[float]:
    """Per-step mean loss over the global batch, the same on every rank: ranks holding a loss
    (the last pipeline stage) contribute theirs, averaged over how many did."""
    if not losses:  # no step ran, on any rank
        return []
    local = torch.stack(losses).float() if has_loss else torch.zeros(len(losses), device=device)
    buf = torch.cat([local, torch.tensor([float(has_loss)], device=device)])
    dist.all_reduce(buf)
    return (buf[:-1] / buf[-1]).tolist()


@record
def main(argv: list[str] | None = None) -> None:
    run_file = Path((argv or sys.argv[1:])[0])
    # Our loss never modifies the logits in place, the case this FSDP2 warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    run_rank_jobs(run_file, lambda data: TrainRankOptions(**data), lambda job, i, options, device: run_job(
        ModelSpec.from_dict(job["model"]), Plan.from_dict(job["plan"]), options, device, i,
        run_file.parent))


if __name__ == "__main__":
    main()
