"""The KV cache of generation: per decoder layer, the keys and values (after RoPE) of every
position seen so far, so a decode step computes K and V for its new token only.

Buffers are allocated on a layer's first append with the shape of its K and V, so under
tensor parallelism each rank's cache holds just its local KV heads.
"""
from __future__ import annotations

import torch


class LayerCache:
    """One layer's keys and values, [batch, max_len, kv_heads, head_dim], filled up to
    `length` positions."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [batch, new, kv_heads, head_dim]; return the keys
        and values of every position so far."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take position {end}")
        if self.keys is None:
            shape = (k.shape[0], self.max_len, *k.shape[2:])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCache:
    """The caches of a model's (or a pipeline stage's) layers, by the keys of its
    `layers` ModuleDict."""

    def __init__(self, layer_keys, max_len: int):
        self.layers = {key: LayerCache(max_len) for key in layer_keys}

    @property
    def length(self) -> int:
        """Positions cached so far: the position of the next token."""
        return next(iter(self.layers.values())).length

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.layers.values())
