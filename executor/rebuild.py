"""Module recompute without keeping the output (Megatron-Core's CheckpointWithoutOutput,
behind --recompute-granularity selective --recompute-modules layernorm moe_act; plan
recompute norm_act): a cheap module (a norm, the experts' activation) runs without autograd
keeping anything of it but its input; once the module's consumers have run, and saved its
output for their backward, the output's storage is freed, their saved references staying
in place, empty; when backward reaches the consumers' output the module runs again (under
the forward's autocast) and its output is copied back into that storage before their
backward reads it. The module's own backward then runs through the graph of that second
run. What it saves: the module's output (the norms' outputs, the QKV projection's and the
MLP's or router's input; the experts' activation output, their down projection's input),
which simulator/memory.norm_act_savings prices."""
from __future__ import annotations

import torch

from meshplan.executor.measure import local_part


class Rebuilt:
    """fn(*inputs), its output (`output`) kept only by its consumers until discard();
    `params`: the parameters fn uses (a norm's weight), whose gradients its backward gives."""

    def __init__(self, fn, *inputs: torch.Tensor, params: tuple[torch.Tensor, ...] = ()):
        self.fn = fn
        device = inputs[0].device.type
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self.ctx = None                             # _Rebuild's, holding the inputs
        self.again: torch.Tensor | None = None      # the second run, with its graph
        self.inputs: tuple[torch.Tensor, ...] = ()  # its detached inputs
        self.output = _Rebuild.apply(self, len(inputs), *inputs, *params)

    def discard(self, consumed: torch.Tensor) -> None:
        """Free the output's storage now that `consumed` (its consumers' output) exists, and
        rebuild it when backward reaches `consumed`. Nothing to do without a backward."""
        if not consumed.requires_grad:
            return
        local_part(self.output).untyped_storage().resize_(0)
        consumed.register_hook(self._rebuild)

    def _rebuild(self, grad: torch.Tensor) -> None:
        device, dtype, enabled = self.autocast
        self.inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in self.ctx.saved_tensors)
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            self.again = self.fn(*self.inputs)
        with torch.no_grad():
            storage, again = local_part(self.output).untyped_storage(), local_part(self.again).untyped_storage()
            storage.resize_(again.nbytes())
            storage.copy_(again)


class _Rebuild(torch.autograd.Function):
    """fn's output without its graph; backward through the rebuilt one, giving the gradients
    of the inputs and of the parameters to autograd (which accumulates them, or not, as the
    backward or grad call that runs it asks)."""

    @staticmethod
    def forward(ctx, rebuilt: Rebuilt, count: int, *inputs_and_params):
        inputs = inputs_and_params[:count]
        with torch.no_grad():
            out = rebuilt.fn(*inputs)
        ctx.save_for_backward(*inputs)
        ctx.params = inputs_and_params[count:]
        ctx.rebuilt, rebuilt.ctx = rebuilt, ctx
        return out

    @staticmethod
    def backward(ctx, grad):
        rebuilt = ctx.rebuilt
        if rebuilt.again is None:  # never discarded: its consumers' output took no hook
            rebuilt._rebuild(grad)
        wrt = [t for t in (*rebuilt.inputs, *ctx.params) if t.requires_grad]
        found = iter(torch.autograd.grad(rebuilt.again, wrt, grad, allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in (*rebuilt.inputs, *ctx.params)]
        # drop the cycle rebuilt <-> ctx, which runs through autograd's C++ node
        rebuilt.again, rebuilt.inputs, rebuilt.ctx, ctx.rebuilt, ctx.params = None, (), None, None, ()
        return (None, None, *grads)
