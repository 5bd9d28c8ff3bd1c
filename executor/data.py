"""Training batches: the same global batch of token windows on every rank and every plan,
from a token file or synthetic tokens drawn from the seed.

A step's global batch is [global_batch, seq_len + 1] token ids; inputs are the first
seq_len columns, targets the last seq_len. Data-parallel rank r takes rows
r*B/dp .. (r+1)*B/dp; micro-batches are consecutive rows of those.
"""
from __future__ import annotations

import numpy as np
import torch

from meshplan.core.errors import PlanError


def check_token_file(path: str, seq_len: int, vocab_size: int) -> None:
    """Raise PlanError unless `path` is a 1-D .npy of integer token ids < vocab_size, long
    enough for one window."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise PlanError("run.data", f"cannot read {path} ({exc})", "pass a .npy file of token ids")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise PlanError("run.data", f"{path} holds {tokens.dtype} of shape {tokens.shape}",
                        "save a 1-D integer array of token ids with numpy.save")
    if tokens.size < seq_len + 1:
        raise PlanError("run.data", f"{tokens.size} tokens are fewer than seq_len+1 = {seq_len + 1}",
                        "use a longer token file or a shorter --seq-len")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise PlanError("run.data", f"token ids span {low}..{high}, outside the vocab of {vocab_size}",
                        "tokenize with the model's vocabulary")


def global_batch(step: int, batch: int, seq_len: int, vocab_size: int, seed: int,
                 data: str | None = None) -> torch.Tensor:
    """The step's [batch, seq_len + 1] int64 token windows."""
    if data is None:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, vocab_size, (batch, seq_len + 1), generator=gen)
    tokens = np.load(data, mmap_mode="r")
    windows = (tokens.size - 1) // seq_len  # consecutive, non-overlapping windows, cycled
    starts = ((step * batch + np.arange(batch)) % windows) * seq_len
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows)


def dp_rows(tokens: torch.Tensor, dp_rank: int, dp: int) -> torch.Tensor:
    rows = tokens.shape[0] // dp
    return tokens[dp_rank * rows:(dp_rank + 1) * rows]


def split_inputs_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

