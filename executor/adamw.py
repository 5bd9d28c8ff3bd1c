"""AdamW whose two moments are stored in another dtype than the parameters: plan.moments_dtype
bf16 beside fp32 (master) parameters, as Megatron-LM's precision-aware optimizer keeps them
(--use-precision-aware-optimizer --exp-avg-dtype bf16, Transformer Engine's FusedAdam with
exp_avg_dtype bf16) and DeepSeek-V3 trained (arXiv 2412.19437 sec 3.3.3). torch.optim.AdamW
keeps its state in each parameter's dtype, so it cannot.

Each step reads the moments up into the parameter's dtype, updates them as torch.optim.AdamW
does (decoupled weight decay, Loshchilov & Hutter 2019, Algorithm 2; its defaults), steps the
parameter with those values and stores the moments back, rounded. A loop over the tensors:
torch has no fused kernel for state in a narrower dtype than its parameter.
"""
from __future__ import annotations

import math

import torch


class MomentsAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, moments_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype

    def _moments(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # a scalar step count as torch.optim.AdamW keeps it, so checkpoints match
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._moments(p)
                state["step"] += 1
                t = state["step"].item()
                exp_avg = state["exp_avg"].to(p.dtype).lerp_(p.grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].to(p.dtype).mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.mul_(1 - lr * decay)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer casts loaded floating-point state to its parameter's dtype:
        the moments go back to theirs."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moments_dtype)
