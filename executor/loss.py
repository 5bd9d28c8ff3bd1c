"""The training loss over the logits, as the plan's cross-entropy kernel says
(plan.CROSS_ENTROPY; memory.cross_entropy_logits prices what each holds).

eager: PyTorch's F.cross_entropy on an fp32 copy; logits sharded on the vocabulary (a DTensor,
under loss_parallel(), parallelize.training_context) give a replicated loss.
fused: Megatron-LM's vocab-parallel cross-entropy (tensor_parallel/cross_entropy.py;
Shoeybi et al. 2019 sec 3): each rank turns its vocabulary shard into fp32 probabilities
after all-reducing the max logit, the sum of exponentials and the target's logit over the
shard's group, keeps only those probabilities, and writes the gradient into them in
backward, without communication.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from meshplan.executor.measure import ActivationMeter


def eager_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every token of the batch, by F.cross_entropy,
    returned as a local copy (not to_local's view: the zero-bubble pipeline detaches stage
    outputs in place)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss.to_local().clone() if isinstance(loss, DTensor) else loss


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same mean by the vocab-parallel kernel: over the shard's group when `logits` is a
    DTensor sharded on the vocabulary, else over the whole vocabulary here."""
    group, first = None, 0
    if isinstance(logits, DTensor):
        if len(logits.placements) == 1 and _on_last_dim(logits):
            # torch.chunk's split, as DTensor shards: every shard before this one is full
            mesh = logits.device_mesh
            group = mesh.get_group()
            first = mesh.get_local_rank() * -(-logits.shape[-1] // mesh.size())
        logits = logits.to_local()
    return _VocabParallelCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), group, first)


def _on_last_dim(logits: DTensor) -> bool:
    placement = logits.placements[0]
    return isinstance(placement, Shard) and placement.dim % logits.ndim == logits.ndim - 1


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, first):
        with torch.autocast(logits.device.type, enabled=False):
            vocab = logits.shape[-1]
            top = logits.amax(-1).float() if vocab else torch.full(targets.shape, -torch.inf, device=logits.device)
            if group is not None:
                dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
            local = targets - first
            here = (local >= 0) & (local < vocab)
            index = local.clamp(0, max(vocab - 1, 0)).unsqueeze(-1)
            target_logit = (logits.gather(-1, index).squeeze(-1).float() - top) * here if vocab \
                else torch.zeros_like(top)
            # an fp32 copy of lower-precision logits becomes the probabilities in place; fp32
            # logits are not written (an op before the loss may have saved them)
            probs = logits.float() if logits.dtype != torch.float32 else logits.clone()
            probs.sub_(top.unsqueeze(-1)).exp_()
            meter = ActivationMeter.active()
            if meter is not None:  # the loss's peak: the logits and their probabilities at once
                meter.hold(logits, probs)
            total = probs.sum(-1)
            if group is not None:
                dist.all_reduce(total, group=group)
                dist.all_reduce(target_logit, group=group)
            probs.div_(total.unsqueeze(-1))
            ctx.save_for_backward(probs, index, here)
            ctx.logits_dtype = logits.dtype
            return (total.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        probs, index, here = ctx.saved_tensors
        grad = probs  # softmax minus the target's one-hot, scaled by the mean's share
        if grad.shape[-1]:
            grad.scatter_add_(-1, index, -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss / grad.shape[0])
        return grad.to(ctx.logits_dtype), None, None, None


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "eager": eager_cross_entropy, "fused": fused_cross_entropy}
