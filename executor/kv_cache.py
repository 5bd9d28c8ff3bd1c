"""The KV cache of generation: per decoder layer, the keys and values (after RoPE) of every
position seen so far, so a decode step computes K and V for its new token only. A
sliding-window layer keeps only its last positions, as many as vLLM's hybrid KV cache manager
holds for it (simulator.serve.window_kept_tokens), which the serving simulator prices.

Buffers are allocated on a layer's first append with the shape of its K and V, so under
tensor parallelism each rank's cache holds just its local KV heads.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from meshplan.simulator.serve import window_kept_tokens


class LayerCache:
    """One layer's keys and values, [batch, slots, kv_heads, head_dim] (latent attention's
    latent and RoPE key as one key head, no values): `length` positions seen so far, all of
    them (up to max_len), or with `keep` only the last `keep`."""

    def __init__(self, max_len: int, keep: int | None = None):
        self.max_len = max_len
        self.keep = keep
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [batch, new, kv_heads, head_dim]; return the keys
        and values of every position kept so far, the new ones included."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take position {end}")
        self.length = end
        if self.keep is not None:
            return self._slide(k, v)
        if self.keys is None:  # each as wide as its own (latent attention keeps no values)
            self.keys, self.values = (t.new_empty((t.shape[0], self.max_len, *t.shape[2:])) for t in (k, v))
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        return self.keys[:, :end], self.values[:, :end]

    def _slide(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the kept and the new positions, then keep the last `keep` of them (a
        prefill holds its whole prompt until it is done, as vLLM frees blocks only at the
        next step)."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)
        self.keys, self.values = k[:, -self.keep:].clone(), v[:, -self.keep:].clone()
        return k, v

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCache:
    """The caches of a model's (or a pipeline stage's) layers, by the keys of its `layers`
    ModuleDict, from each layer's sliding window (None: full attention)."""

    def __init__(self, windows: Mapping[str, int | None], max_len: int):
        self.layers = {key: LayerCache(max_len, None if window is None else window_kept_tokens(window))
                       for key, window in windows.items()}

    @property
    def length(self) -> int:
        """Positions cached so far: the position of the next token."""
        return next(iter(self.layers.values())).length

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.layers.values())

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on, so the next token is written there (the
        decode probe steps again and again at one context length: calibration/measure/
        machine_load.decode_step). Full-attention layers only: a sliding window has dropped
        positions it cannot get back."""
        if any(cache.keep is not None for cache in self.layers.values()):
            raise ValueError("a sliding-window layer's cache cannot be rewound")
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        for cache in self.layers.values():
            cache.length = length
