"""Save and load a training job's checkpoints on the ranks with torch.distributed.checkpoint
(DCP), in the folder layout of executor/checkpoint.py.

What DCP saves, by the plain model's parameter names (get_state_dict strips the DDP and
activation-checkpoint wrappers), so that a checkpoint loads into any plan of the same model
and DCP reshards it (DP into TP, FSDP2 or another pipeline split):
  model      the parameters (this rank's DTensor shards under TP, FSDP2 and replicate)
  optim      the AdamW state, flattened by parameter name (under ZeRO-1, each rank's part)
  progress   {"step": the next step}: the data position, as step s trains on global batch s
  rng_rank<R>  each rank's torch RNG state (CPU; and CUDA on a GPU)

A tied embedding's optimizer state is the plain model's under the embedding's name; a
pipeline's last stage, whose head is a copy of it (pipeline.TiedEmbedding), loads the copy's
state from there, as the two take the same updates. Experts split over EP ranks (each rank
holds E/ep of them under the whole layer's names) are saved and loaded as DTensors sharded
on the expert dimension over ep, on their split width over etp, and replicated over edp,
their Adam moments alike, so DCP writes each expert once and reshards them into another
expert layout.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import implicit_replication

from meshplan.core.io import write_atomic, write_json
from meshplan.executor.checkpoint import INFO, KEEP, LATEST, CheckpointInfo, latest, step_name
from meshplan.executor.moe import WIDTH_DIMS, expert_parameters
from meshplan.executor.parallelize import parameter_name

# Optimizer state keyed by parameter name rather than position, so it reshards (torchtitan's choice).
DCP_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
HEAD, EMBEDDING = ".output.weight.", ".tok_embeddings.weight."  # in the flattened optimizer keys


def stage_view(modules: list[nn.Module]) -> nn.Module:
    """One module holding this rank's stage modules' parts under the plain model's names
    (tok_embeddings, layers.<i>, norm, output), for get_state_dict: several pipeline stages
    on one rank (interleaving) then save and load as the one model they are parts of."""
    if len(modules) == 1:
        return modules[0]
    view, layers = nn.Module(), nn.ModuleDict()
    for module in modules:
        for name, child in module.named_children():
            if name == "layers":
                layers.update(child)
            else:
                view.add_module(name, child)
    view.add_module("layers", layers)
    return view


class Checkpointer:
    """Save and load this rank's part of a training job: its stage modules and optimizer
    (ZeroRedundancyOptimizer: its inner optimizer, this rank's partition)."""

    def __init__(self, folder: str, modules: list[nn.Module], optimizer: torch.optim.Optimizer,
                 device: torch.device, tied: bool = False, expert_mesh: DeviceMesh | None = None):
        self.folder, self.device, self.tied = Path(folder), device, tied
        self.model = stage_view(modules)
        split = {p for m in modules for p in expert_parameters(m)}
        self.experts = {parameter_name(n) for m in modules for n, p in m.named_parameters() if p in split}
        self.expert_mesh = (expert_mesh[tuple(n for n in expert_mesh.mesh_dim_names if n in ("edp", "ep", "etp"))]
                            if self.experts else None)
        self.optimizer = getattr(optimizer, "optim", optimizer)
        self.rng_key = f"rng_rank{dist.get_rank()}"
        if dist.get_rank() == 0:  # saves a crash cut short
            for stale in self.folder.glob("step-*.tmp"):
                shutil.rmtree(stale)
        dist.barrier()

    def _state(self, step: int) -> dict:
        # an optimizer with no state yet takes a step of zero gradients here, which mixes the
        # plain experts (or step counts) with DTensor parameters, as train_step's steps do
        with implicit_replication():
            model, optim = get_state_dict(self.model, self.optimizer, options=DCP_OPTIONS)
        self._experts_as_dtensors(model, optim)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": model, "optim": optim, "progress": {"step": step}, self.rng_key: rng}

    def save(self, info: CheckpointInfo, before_commit: Callable[[], None] = lambda: None) -> None:
        """Save the checkpoint at info.step (collective over every rank). before_commit runs
        on each rank once its part is on disk and before the checkpoint counts (fault tests)."""
        final = self.folder / step_name(info.step)
        tmp = final.with_name(final.name + ".tmp")
        dcp.save(self._state(info.step), checkpoint_id=tmp)
        before_commit()
        if dist.get_rank() == 0:
            write_json(tmp / INFO, info.to_json())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            write_atomic(self.folder / LATEST, final.name + "\n")
            done = sorted(p for p in self.folder.glob("step-*") if p.suffix != ".tmp")
            for old in done[:-KEEP]:
                shutil.rmtree(old)
        dist.barrier()

    def load(self, lr: float) -> tuple[int, tuple[float, ...]]:
        """Load the newest checkpoint into the modules and optimizer, with the learning rate
        set to `lr`; returns (the next step, the losses before it), or (0, ()) when there is
        no checkpoint yet."""
        found = latest(self.folder)
        if found is None:
            return 0, ()
        path, info = found
        state = self._state(0)
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        # Only the RNG states saved: a rank the checkpoint's world did not have has none, a
        # CPU checkpoint none for CUDA.
        rng = {k: v for k, v in state.pop(self.rng_key).items() if f"{self.rng_key}.{k}" in saved}
        if rng:
            state[self.rng_key] = rng
        heads = self._heads_as_embedding(state["optim"])
        dcp.load(state, checkpoint_id=path)
        for part in (state["model"], state["optim"]):  # the experts' local shards, loaded in place
            part.update({k: v.to_local() for k, v in part.items() if isinstance(v, DTensor) and self._expert_key(k)})
        for head, embedding, borrowed in heads:
            value = state["optim"].pop(embedding) if borrowed else state["optim"][embedding]
            state["optim"][head] = value.clone() if isinstance(value, torch.Tensor) else value
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=DCP_OPTIONS)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return state["progress"]["step"], info.losses[:state["progress"]["step"]]

    def _expert_key(self, key: str) -> bool:
        """Whether `key` (of the model's state or the flattened optimizer's) is an EP-split
        expert's weight or one of its moments (not the step count, a scalar)."""
        name = key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key
        return name in self.experts

    def _experts_as_dtensors(self, model: dict, optim: dict) -> None:
        """The EP-split experts' local tensors in `model` and `optim` as DTensors over the
        expert mesh (sharing their storage): Shard(0) on ep, replicated on edp, and on etp
        sharded along each weight's split width (moe.WIDTH_DIMS), replicated where it has
        none (the down projection's bias)."""
        if self.expert_mesh is None:
            return
        for part in (model, optim):
            for key, value in part.items():
                if self._expert_key(key) and isinstance(value, torch.Tensor) and value.ndim:
                    weight = (key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key)
                    width = WIDTH_DIMS.get(weight.rsplit(".", 1)[-1])
                    placements = [Shard(0) if n == "ep" else Replicate() if n == "edp" or width is None
                                  else Shard(width) for n in self.expert_mesh.mesh_dim_names]
                    part[key] = DTensor.from_local(value, self.expert_mesh, placements, run_check=False)

    def _heads_as_embedding(self, optim: dict) -> list[tuple[str, str, bool]]:
        """With tied embeddings, replace the optimizer keys of the head's copy of the
        embedding by the embedding's, and return (head key, embedding key, whether this rank
        borrowed the embedding key, not holding the embedding itself) for each: every
        checkpoint of a tied model has the embedding's state, not every one the copy's."""
        heads = [(key, key.replace(HEAD, EMBEDDING)) for key in optim if self.tied and HEAD in key]
        borrowed = [(head, embedding, embedding not in optim) for head, embedding in heads]
        for head, embedding in heads:
            optim.setdefault(embedding, optim.pop(head))
        return borrowed
