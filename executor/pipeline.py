"""Pipeline parallelism with torch.distributed.pipelining: split the model into (virtual)
stages by the plan's layer partition, and build the plan's schedule over them.

Stage j of pp * v holds layers partition[:j].sum() .. partition[:j+1].sum() and sits on
pipeline rank j % pp (chunk j // pp), as Megatron-LM and torch's interleaved schedules
place them, or under zb-v on the V of torch's ScheduleZBVZeroBubble (schedule.stage_index:
rank s holds stages s and 2 pp - 1 - s); the embedding is on stage 0 and the final norm and
head on the last stage.
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (PipelineScheduleSingle, Schedule1F1B,
                                                    ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleInterleavedZeroBubble,
                                                    ScheduleZBVZeroBubble)

from meshplan.executor.model import Transformer
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
    partition runs (parameter names kept)."""
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


def build_schedule(modules: list[nn.Module], indices: list[int], plan: Plan,
                   group, device: torch.device, loss_fn):
    """The plan's schedule over this rank's stages, with `plan.num_microbatches`
    micro-batches; gradients are averaged over them (scale_grads), matching a mean loss."""
    stages = [PipelineStage(m, i, plan.num_virtual, device, group=group)
              for m, i in zip(modules, indices)]
    schedule_class = SCHEDULES[plan.schedule]
    if issubclass(schedule_class, PipelineScheduleSingle):
        return schedule_class(stages[0], n_microbatches=plan.num_microbatches, loss_fn=loss_fn)
    return schedule_class(stages, n_microbatches=plan.num_microbatches, loss_fn=loss_fn)
