"""Int8 weight-only serving weights, in plain torch: the weights the simulator prices as
quantized (simulator/quantize.py: every weight GEMM of the decoder layers; not the router,
the shared experts' gate, the embedding or the head) are stored as uint8 with, per output
channel, a scale and a zero point for each group of `group_size` input features (AWQ, Lin
et al. 2024 sec 3; GPTQ, Frantar et al. 2023 sec 4 "grouping"), and dequantized inside each
forward (w = (q - zero) * scale, then the GEMM in the serving dtype), so only the 8-bit
weights and their scales stay in memory between steps.

    quantize_int8(model, group_size)   # in place, before the model serves
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshplan.executor.moe import GroupedExperts, expert_mlps

LEVELS = 255  # uint8 codes 0..255


class Int8Weight(nn.Module):
    """A weight [..., in] as uint8 codes with a scale and a zero point per group of
    `group_size` along the last (input) dimension; the scales in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        super().__init__()
        groups = weight.detach().float().unflatten(-1, (-1, group_size))
        low = groups.amin(-1, keepdim=True).clamp(max=0.0)   # 0 stays exactly representable
        high = groups.amax(-1, keepdim=True).clamp(min=0.0)
        scale = ((high - low) / LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (-low / scale).round().clamp(0, LEVELS)
        codes = ((groups / scale).round() + zero).clamp(0, LEVELS)
        self.register_buffer("codes", codes.to(torch.uint8).flatten(-2))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.register_buffer("zero", zero.to(torch.uint8))
        self.group_size = group_size

    def forward(self) -> torch.Tensor:
        """The dequantized weight, in the scales' dtype."""
        codes = self.codes.unflatten(-1, (-1, self.group_size)).to(self.scale.dtype)
        return ((codes - self.zero.to(self.scale.dtype)) * self.scale).flatten(-2)


class Int8Linear(nn.Module):
    """nn.Linear with an Int8Weight ([out, in]: groups along the input features)."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.weight = Int8Weight(linear.weight, group_size)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class Int8Experts(nn.Module):
    """GroupedExperts with Int8Weights, each stored transposed ([E, out, in]) so that its
    groups run along the input features as in Int8Linear."""

    def __init__(self, experts: GroupedExperts, group_size: int):
        super().__init__()
        self.w1, self.w2 = (Int8Weight(w.transpose(1, 2), group_size) for w in (experts.w1, experts.w2))
        self.w3 = Int8Weight(experts.w3.transpose(1, 2), group_size) if experts.w3 is not None else None
        self.biases = (experts.w1_bias, experts.w2_bias, experts.w3_bias)  # kept in full precision
        self.act = experts.act
        self.sharding = None  # served whole: no expert parallelism

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w().transpose(1, 2) if w is not None else None for w in (self.w1, self.w2, self.w3))
        return expert_mlps(rows, counts, self.act, w1, w2, w3, self.biases)


# Attention and MLP projections (dense MLP, shared experts): everything simulator/quantize.py
# counts as quantized apart from the routed experts.
QUANTIZED_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def quantize_int8(model: nn.Module, group_size: int) -> None:
    """Replace the decoder layers' weight GEMMs of `model` (a Transformer or a pipeline stage
    of one) by their int8 forms, in place."""
    for layer in model.layers.values():
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in QUANTIZED_LINEARS:
                    setattr(parent, name, Int8Linear(child, group_size))
                elif isinstance(child, GroupedExperts):
                    setattr(parent, name, Int8Experts(child, group_size))
