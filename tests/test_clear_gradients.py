"""Between steps the executor keeps DDP's gradients in its all-reduce buckets
(parallelize.clear_gradients): a step's micro-batches accumulate there under no_sync, with
no second copy of the gradients, and train as freed gradients would."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from meshplan.executor.parallelize import clear_gradients, gradient_sync
from tests.gloo import spawn_gloo


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(model: nn.Module, params, clear, seen: list | None) -> list[torch.Tensor]:
    """Three steps of two micro-batches (DDP rebuilds its buckets in the second); `seen` gets
    each parameter's gradient storage after each of the third step's micro-batches."""
    optimizer = torch.optim.AdamW(params, lr=0.1)
    batches = torch.randn(3, 2, 3, 8, generator=torch.Generator().manual_seed(1))
    for step, micro in enumerate(batches):
        for i, x in enumerate(micro):
            with gradient_sync(model, i == 1, i == 1, 0):
                model(x).square().mean().backward()
            if step == 2 and seen is not None:
                seen.append([p.grad.untyped_storage().data_ptr() for p in params])
        optimizer.step()
        clear(optimizer)
    return [p.detach().clone() for p in params]


def _ddp(rank: int) -> None:
    plain = _net()
    want = _train(plain, list(plain.parameters()), lambda o: o.zero_grad(set_to_none=True), None)
    for keep in (True, False):
        model = DistributedDataParallel(_net(), gradient_as_bucket_view=True)
        params = list(model.parameters())
        seen: list = []
        clear = (lambda o: clear_gradients(o, [model])) if keep else (lambda o: o.zero_grad(set_to_none=True))
        got = _train(model, params, clear, seen)
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
        first, in_bucket = seen  # after the sync the gradients are views of the bucket
        assert len(set(in_bucket)) == 1  # one bucket holds these few
        # freed, the first micro-batch's gradients are new tensors beside the bucket
        assert (first == in_bucket) == keep


def test_ddp_gradients_accumulate_in_their_buckets_across_steps(tmp_path):
    spawn_gloo(_ddp, 1, tmp_path)
