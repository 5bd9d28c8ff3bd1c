"""The executor's fused vocab-parallel cross-entropy (executor/loss.py) against
F.cross_entropy: the loss and the logits' gradient, on one process and with the vocabulary
split unevenly over two gloo ranks; and the memory the activation meter sees at its peak,
by hand."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from meshplan.executor.loss import fused_cross_entropy
from meshplan.executor.measure import ActivationMeter
from meshplan.executor.options import training_fields
from tests.gloo import spawn_gloo

VOCAB = 11  # two ranks hold 6 and 5 of it


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(leaf.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.detach(), leaf.grad


def _batch(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, VOCAB, generator=gen)).to(dtype)
    return logits, torch.randint(0, VOCAB, (2, 5), generator=gen)


def test_fused_matches_f_cross_entropy_in_fp32_and_bf16():
    # bf16 logits: the fp32 loss of their fp32 copy, the gradient rounded to bf16 once (|g| <
    # 0.1 here, where bf16's spacing is 2^-11)
    for dtype, grad_tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -11)):
        logits, targets = _batch(dtype)
        want_loss, want_grad = _reference(logits, targets)
        leaf = logits.clone().requires_grad_()
        loss = fused_cross_entropy(leaf, targets)
        loss.backward()
        assert loss.dtype == torch.float32 and leaf.grad.dtype == dtype
        assert torch.allclose(loss, want_loss, atol=1e-6)
        assert torch.allclose(leaf.grad.float(), want_grad, rtol=0, atol=grad_tol)


def test_fp32_logits_another_op_saved_are_not_overwritten():
    logits, targets = _batch()
    leaf = logits.clone().requires_grad_()
    capped = 3 * torch.tanh(leaf / 3)  # tanh saves its output: Gemma 2's final soft-capping
    fused_cross_entropy(capped, targets).backward()  # autograd refuses a saved tensor changed
    want_loss, want_grad = _reference(capped, targets)
    assert torch.allclose(leaf.grad, want_grad * (1 - (capped.detach() / 3) ** 2), atol=1e-6)


def test_meter_sees_the_logits_and_probabilities_at_once():
    logits, targets = _batch()
    leaf = logits.clone().requires_grad_()
    with ActivationMeter(set()) as meter:
        fused_cross_entropy(leaf * 1.0, targets)
    unit = 2 * 5 * VOCAB * 4  # fp32 logits of the batch
    # the product, which nothing saves (a product by a number keeps only the number), and the
    # probabilities copied from it: later the probabilities, the target's index and its mask
    # are saved (one unit and 10 x 9 bytes)
    assert meter.peak_bytes == 2 * unit


def _vocab_parallel(rank: int) -> None:
    torch.set_num_threads(1)
    logits, targets = _batch()
    want_loss, want_grad = _reference(logits, targets)
    mesh = init_device_mesh("cpu", (2,))
    sharded = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
    loss = fused_cross_entropy(sharded, targets)
    loss.backward()
    assert torch.allclose(loss, want_loss, atol=1e-6)
    shard = want_grad.tensor_split((6,), dim=-1)[rank]
    assert sharded.grad.to_local().shape[-1] == (6, 5)[rank]
    assert torch.allclose(sharded.grad.to_local(), shard, atol=1e-6)


def test_vocab_parallel_over_two_ranks_matches_one_process(tmp_path):
    spawn_gloo(_vocab_parallel, 2, tmp_path)


def test_a_compiled_loss_runs_eager_and_the_others_as_planned():
    assert training_fields("bf16", "cpu", "compiled")["cross_entropy"] == "eager"
    assert training_fields("bf16", "cpu", "fused")["cross_entropy"] == "fused"
    assert training_fields("bf16", "cuda", "eager")["cross_entropy"] == "eager"
