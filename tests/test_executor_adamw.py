"""MomentsAdamW (executor/adamw.py) against torch.optim.AdamW: the same update with fp32
moments, and with bf16 moments the same moments rounded to bf16 after a step."""
import copy

import pytest
import torch

from meshplan.executor.adamw import MomentsAdamW
from meshplan.executor.parallelize import optimizer_of
from meshplan.simulator.plan import Plan


def models(count: int):
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    return [first] + [copy.deepcopy(first) for _ in range(count - 1)]


def train(model, optimizer, steps: int):
    torch.manual_seed(1)
    for _ in range(steps):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fp32_moments_are_torch_adamw():
    ref, mine = models(2)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), 5)
    train(mine, MomentsAdamW(mine.parameters(), lr=1e-2, moments_dtype=torch.float32), 5)
    for a, b in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_bf16_moments_are_the_rounded_fp32_ones():
    ref, mine = models(2)
    ref_opt, opt = torch.optim.AdamW(ref.parameters(), lr=1e-2), MomentsAdamW(mine.parameters(), lr=1e-2)
    train(ref, ref_opt, 1)
    train(mine, opt, 1)
    for a, b in zip(ref.parameters(), mine.parameters()):
        state, ref_state = opt.state[b], ref_opt.state[a]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.bfloat16
            assert torch.equal(state[key], ref_state[key].to(torch.bfloat16))
        torch.testing.assert_close(b, a)  # the first step used the unrounded moments
    train(ref, ref_opt, 4)
    train(mine, opt, 4)
    drift = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), mine.parameters()))
    assert 0 < drift < 1e-2 * 5 * 2 ** -7  # rounded moments, at most a few bf16 ulps of each update


def test_loading_keeps_the_moments_in_bf16():
    (model,) = models(1)
    opt = MomentsAdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    again = MomentsAdamW(model.parameters(), lr=1e-2)
    again.load_state_dict(opt.state_dict())  # torch casts floating state to the parameter's dtype
    for p in model.parameters():
        assert again.state[p]["exp_avg"].dtype == again.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("moments,cls", [("fp32", torch.optim.AdamW), ("bf16", MomentsAdamW)])
def test_the_plan_picks_the_optimizer(moments, cls):
    assert optimizer_of(Plan(global_batch=8, seq_len=32, moments_dtype=moments))[0] is cls
