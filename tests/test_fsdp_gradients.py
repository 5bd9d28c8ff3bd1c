"""The CPU memory meter counts the gradients FSDP2 accumulates on its all-gathered weights
while a step reduces once (measure.unsharded_gradients), which the shards' gradients after
the step do not show."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from meshplan.executor.measure import ActivationMeter, unsharded_gradients


def _fsdp(rank: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        mesh = init_device_mesh("cpu", (1,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        whole = 4 * (8 * 16 + 16 + 16 * 4 + 4)
        held = unsharded_gradients([model])
        assert held() == 0  # nothing gathered yet
        x = torch.randn(2, 3, 8)
        model.set_requires_gradient_sync(False)
        model(x[0]).sum().backward()
        assert held() == whole  # accumulated unsharded, not reduced
        with ActivationMeter(set(), held) as meter:
            out = model(x[1])  # the next micro-batch's forward saves beside them
        assert meter.gradients_peak_bytes == whole
        model.set_requires_gradient_sync(True)
        out.sum().backward()
        assert held() == 0  # reduce-scattered into the shards' gradients, freed
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_unsharded_gradients_count_until_reduced(tmp_path):
    mp.spawn(_fsdp, args=(str(tmp_path / "store"),), nprocs=1, join=True)
