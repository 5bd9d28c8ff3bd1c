"""The executor's rotary embedding (one complex product in fp32, as Meta's Llama and
torchtitan compute it) against the rotation written out by hand: each consecutive pair
(x[2i], x[2i+1]) at position p turns by the angle p * theta^(-2i/d) (Su et al. 2021,
eq. 34), so a query-key dot product depends only on the distance between their positions."""
from __future__ import annotations

import math

import torch

from meshplan.executor.model import apply_rope, rope_frequencies

SEQ, HEADS, HEAD_DIM, THETA = 12, 3, 8, 10000.0


def _by_hand(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for p in range(x.shape[1]):
        for i in range(HEAD_DIM // 2):
            angle = p * THETA ** (-2 * i / HEAD_DIM)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, p, :, 2 * i], x[:, p, :, 2 * i + 1]
            out[:, p, :, 2 * i], out[:, p, :, 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def test_rope_turns_each_pair_by_its_position_angle():
    x = torch.randn(2, SEQ, HEADS, HEAD_DIM)
    torch.testing.assert_close(apply_rope(x, rope_frequencies(torch.arange(SEQ), HEAD_DIM)), _by_hand(x),
                               rtol=1e-5, atol=1e-5)


def test_rope_keeps_the_dtype_and_scores_depend_on_distance_only():
    freqs = rope_frequencies(torch.arange(SEQ), HEAD_DIM)
    # a cached decode's positions start past the prompt: the same angles as from position 0
    torch.testing.assert_close(rope_frequencies(torch.arange(4, SEQ), HEAD_DIM), freqs[4:])
    assert apply_rope(torch.randn(1, SEQ, 1, HEAD_DIM, dtype=torch.bfloat16), freqs).dtype == torch.bfloat16
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
    rq = apply_rope(q.expand(1, SEQ, 1, HEAD_DIM).contiguous(), freqs)[0, :, 0]
    rk = apply_rope(k.expand(1, SEQ, 1, HEAD_DIM).contiguous(), freqs)[0, :, 0]
    # the same distance (3) at three different places gives the same score
    scores = torch.stack([rq[p + 3] @ rk[p] for p in (0, 4, 8)])
    torch.testing.assert_close(scores, scores[:1].expand(3), rtol=1e-5, atol=1e-5)
