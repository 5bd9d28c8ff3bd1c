"""The CPU memory meter counts the gradients FSDP2 accumulates on its all-gathered weights
while a step reduces once (measure.unsharded_gradients), which the shards' gradients after
the step do not show."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from meshplan.executor.measure import ActivationMeter, unsharded_gradients
from tests.gloo import spawn_gloo


def _fsdp(rank: int) -> None:
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


def test_unsharded_gradients_count_until_reduced(tmp_path):
    spawn_gloo(_fsdp, 1, tmp_path)
