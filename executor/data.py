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


def check_token_file(path: str, seq_len: int, vocab_size: int, global_batch: int) -> None:
    """Raise PlanError (run.data) unless `path` is a 1-D .npy of integer token ids whose
    dtype can hold the model's vocabulary, all < vocab_size, with at least one global batch
    of distinct windows of seq_len + 1 tokens."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise PlanError("run.data", f"cannot read {path} ({exc})", "pass a .npy file of token ids") from None
    if not isinstance(tokens, np.ndarray):  # an .npz archive
        raise PlanError("run.data", f"{path} is an archive of arrays, not one array",
                        "save one 1-D array of token ids with numpy.save")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise PlanError("run.data", f"{path} holds {tokens.dtype} of shape {tokens.shape}",
                        "save a 1-D integer array of token ids with numpy.save")
    if np.iinfo(tokens.dtype).max < vocab_size - 1:
        raise PlanError("run.data", f"{path} holds {tokens.dtype}, which cannot hold the ids of "
                        f"a {vocab_size}-token vocabulary", "tokenize with the model's vocabulary "
                        "and save the ids in a wide enough integer type (uint16 up to 65536 tokens)")
    windows = max(tokens.size - 1, 0) // seq_len
    if windows < global_batch:
        raise PlanError("run.data", f"{tokens.size} tokens give {windows} windows of seq_len+1 = "
                        f"{seq_len + 1}, fewer than the {global_batch} sequences of one global batch",
                        "use a longer token file, a shorter --seq-len or a smaller --global-batch")
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

