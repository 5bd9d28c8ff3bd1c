"""Pipeline parallelism with torch.distributed.pipelining: split the model into (virtual)
stages by the plan's layer partition, and build the plan's schedule over them.

Stage j of pp * v holds layers partition[:j].sum() .. partition[:j+1].sum() and sits on
pipeline rank j % pp (chunk j // pp), as Megatron-LM and torch's interleaved schedules
place them, or under zb-v on the V of torch's ScheduleZBVZeroBubble (schedule.stage_index:
rank s holds stages s and 2 pp - 1 - s); the embedding is on stage 0 and the final norm and
head on the last stage. A model with tied embeddings keeps a copy of the embedding as the
head on the last stage, and the two copies' gradients are summed after every step's backward
(TiedEmbedding), as Megatron-LM's embedding group does, so both take the same update.
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (PipelineScheduleSingle, Schedule1F1B,
                                                    ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleInterleavedZeroBubble,
                                                    ScheduleZBVZeroBubble)

from meshplan.executor.measure import local_part
from meshplan.executor.model import Transformer
from meshplan.executor.moe import uncounted
from meshplan.simulator.plan import Plan
from meshplan.simulator.schedule import stage_index

# zb-h1 (Qi et al. 2024) with one chunk per rank is torch's ZB1P schedule with one local stage.
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved": ScheduleInterleaved1F1B, "zb-h1": ScheduleInterleavedZeroBubble,
             "zb-v": ScheduleZBVZeroBubble}


def stage_indices(plan: Plan, pp_rank: int) -> list[int]:
    """The (virtual) stages pipeline rank `pp_rank` holds, chunk by chunk."""
    chunks = np.arange(plan.virtual_stages)
    return stage_index(plan.schedule == "zb-v", plan.pp, pp_rank, chunks).tolist()


def split_stage(model: Transformer, partition: tuple[int, ...], stage_index: int) -> Transformer:
    """A copy of `model` keeping only what (virtual) stage `stage_index` of the layer
    partition runs (parameter names kept). With tied embeddings the last stage's head is a
    copy of the embedding, a parameter of its own (see TiedEmbedding)."""
    bounds = [0, *itertools.accumulate(partition)]
    first, last = bounds[stage_index], bounds[stage_index + 1]
    stage = copy.deepcopy(model)
    if stage_index > 0:
        stage.tok_embeddings = stage.pos_embeddings = None
    if stage_index < len(partition) - 1:
        stage.norm = stage.output = None
    for key in list(stage.layers):
        if not first <= int(key) < last:
            del stage.layers[key]
    return stage


class _Stage(PipelineStage):
    """torch's stage, whose metadata inference (the stage run once more on the first
    micro-batch's shapes in the first step, past the first stage on empty tensors) the MoE
    layers leave out of their load and imbalance counts (moe.uncounted)."""

    def _forward_metadata_inference(self, *args, **kwargs):
        with uncounted():
            return super()._forward_metadata_inference(*args, **kwargs)


def build_schedule(modules: list[nn.Module], indices: list[int], plan: Plan,
                   group, device: torch.device, loss_fn):
    """The plan's schedule over this rank's stages, with `plan.num_microbatches`
    micro-batches; gradients are averaged over them (scale_grads), matching a mean loss."""
    stages = [_Stage(m, i, plan.num_virtual, device, group=group)
              for m, i in zip(modules, indices)]
    schedule_class = SCHEDULES[plan.schedule]
    if issubclass(schedule_class, PipelineScheduleSingle):
        return schedule_class(stages[0], n_microbatches=plan.num_microbatches, loss_fn=loss_fn)
    return schedule_class(stages, n_microbatches=plan.num_microbatches, loss_fn=loss_fn)


def head_rank(plan: Plan) -> int:
    """The pipeline rank holding the last (virtual) stage: the last rank, or rank 0 in zb-v's V."""
    return next(r for r in range(plan.pp) if plan.num_virtual - 1 in stage_indices(plan, r))


class TiedEmbedding:
    """A tied embedding under a pipeline: the first stage's embedding and the last stage's
    head are copies of one weight, initialised alike, whose gradients `sync` sums after each
    step's backward (after the data-parallel reduction), so that every copy holds the tied
    weight's whole gradient and takes the same optimizer step: Megatron-LM's all-reduce over
    its embedding group of the first and last pipeline ranks (_allreduce_embedding_grads),
    here a group of two ranks per pipeline, or a sum on one rank where it holds both (zb-v).
    Built on every rank (dist.new_group is collective over the world)."""

    def __init__(self, plan: Plan, mesh: DeviceMesh):
        pp_axis = mesh.mesh_dim_names.index("pp")
        pipelines = mesh.mesh.movedim(pp_axis, -1).reshape(-1, plan.pp).tolist()
        last, me = head_rank(plan), dist.get_rank()
        self.group = None
        for ranks in pipelines if last != 0 else ():
            group = dist.new_group([ranks[0], ranks[last]])
            if me in (ranks[0], ranks[last]):
                self.group = group

    @staticmethod
    def copies(modules: list[nn.Module]) -> list[nn.Parameter]:
        """This rank's copies of the tied weight: the embedding of the first stage, the head
        of the last."""
        return ([m.tok_embeddings.weight for m in modules if m.tok_embeddings is not None]
                + [m.output.weight for m in modules if m.output is not None])

    def sync(self, modules: list[nn.Module]) -> None:
        grads = [p.grad for p in self.copies(modules) if p.grad is not None]
        if not grads:
            return
        local = [local_part(g) for g in grads]
        with torch.no_grad():
            total = torch.stack(local).sum(0) if len(local) > 1 else local[0].clone()
            if self.group is not None:
                dist.all_reduce(total, group=self.group)
            for g in local:
                g.copy_(total)
