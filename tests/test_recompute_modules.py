"""Module recompute (recompute norm_act, Megatron-LM's --recompute-modules layernorm moe_act)
in the executor: the norms' outputs and the experts' activation output are freed once their
consumers have saved them and rebuilt in backward (executor/rebuild.py). Gradients as
without it, and the memory it frees counted by hand."""
from __future__ import annotations

from dataclasses import replace

import torch

from meshplan.executor.measure import ActivationMeter, parameter_storages
from meshplan.executor.model import build_model, loss_fn
from meshplan.executor.parallelize import apply_recompute
from meshplan.executor.rebuild import Rebuilt
from meshplan.simulator.model_spec import ModelSpec

DENSE = ModelSpec("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  vocab_size=64, max_seq_len=16)
MOE = replace(DENSE, name="tiny-moe", num_experts=4, experts_per_token=2, moe_ffn_hidden_size=24)


def _run(spec: ModelSpec, recompute: str | None):
    """(activation peak bytes, loss, gradients by name) of one forward and backward."""
    model = build_model(spec, seed=0)
    if recompute:
        apply_recompute(model, recompute)
    gen = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, spec.vocab_size, (2, 16), generator=gen) for _ in range(2))
    with ActivationMeter(parameter_storages(model.parameters())) as meter:
        loss = loss_fn(model(tokens), targets)
        loss.backward()
    return meter.peak_bytes, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_rebuilt_output_is_freed_after_its_consumer_and_refilled_for_backward():
    x = torch.randn(5, 8, requires_grad=True)
    norm, linear = torch.nn.RMSNorm(8), torch.nn.Linear(8, 3)
    expected = linear(norm(x)).square().sum()
    expected.backward()
    grads = [t.grad.clone() for t in (x, norm.weight, linear.weight)]
    for t in (x, norm.weight, linear.weight):
        t.grad = None
    normed = Rebuilt(norm, x, params=(norm.weight,))
    out = linear(normed.output)
    normed.discard(out)
    assert normed.output.untyped_storage().nbytes() == 0
    out.square().sum().backward()
    for got, want in zip((x.grad, norm.weight.grad, linear.weight.grad), grads):
        torch.testing.assert_close(got, want)


def test_norm_act_gives_the_same_gradients_and_frees_the_norms_and_the_expert_activation():
    """Per layer the two norms' outputs (the QKV and MLP inputs), and what the eager
    RMSNorm keeps for its own backward beyond its input: the normalised product (for its
    weight's gradient) and the inverse RMS of each row; in the MoE layers also what the
    experts' eager SwiGLU keeps beyond its two inputs: silu's output and the product, a row
    per routed token copy. 32 tokens x 32 wide x 4 bytes a norm tensor, 64 rows x 24 wide x
    4 bytes an activation tensor."""
    norm = 2 * 32 * 32 * 4 + 32 * 4
    for spec, freed in ((DENSE, 2 * 2 * norm), (MOE, 2 * (2 * norm + 2 * 64 * 24 * 4))):
        (plain_peak, plain_loss, plain), (peak, loss, grads) = _run(spec, None), _run(spec, "norm_act")
        assert loss == plain_loss
        for name, grad in plain.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert plain_peak - peak == freed
