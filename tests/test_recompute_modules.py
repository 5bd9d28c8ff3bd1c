"""Recompute norm_act (Megatron-LM's --recompute-granularity selective --recompute-modules
layernorm moe_act): what it frees and redoes, by hand on Mixtral's layer, where it runs and
how it is exported; and in the executor, which frees the norms' outputs and the experts'
activation output once their consumers have saved them and rebuilds them in backward
(executor/rebuild.py): gradients as without it, the memory it frees counted by hand."""
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from meshplan.core.errors import PlanError
from meshplan.executor.loss import eager_cross_entropy as loss_fn
from meshplan.executor.measure import ActivationMeter, parameter_storages
from meshplan.executor.model import build_model
from meshplan.executor.parallelize import apply_recompute
from meshplan.executor.rebuild import Rebuilt
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import check, export, train_job
from meshplan.planner.exports.checkpoint import checkpoint_of
from meshplan.planner.space import candidate_table
from meshplan.simulator.cost import op_times, tp_comm_s
from meshplan.simulator.memory import layer_activation_bytes
from meshplan.simulator.model_spec import ZOO, ModelSpec, load_model
from meshplan.simulator.ops import Shard, layer_ops
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.rules import EXECUTOR_TRAINING, violations
from meshplan.simulator.train import simulate

MIXTRAL_PATH = os.path.join(os.path.dirname(__file__), "data", "hf_configs", "mixtral-8x7b.json")
MIXTRAL = load_model(MIXTRAL_PATH)
H100 = load_profile("h100-80gb")
# 4096 tokens on TP 2 with SP: 2048 in the norms' region, each gathered to 4096 rows of
# hidden 4096 for the experts over etp 1 (expert_tokens 2048 x etp 1 = 2048), top-2
SHARD = Shard(1, 4096, tp=2, sp=True, ep=8, etp=1)


@pytest.mark.parametrize("fp8", [None, "tensorwise"])
def test_it_frees_the_norm_outputs_and_the_experts_activation(fp8):
    shard = Shard(1, 4096, tp=2, sp=True, ep=8, etp=1, fp8=fp8, dtype_bytes=2)
    none, norm_act = (layer_activation_bytes(MIXTRAL, shard, r) for r in ("none", "norm_act"))
    h, ntok, rows, f = 4096, 2048, 2048 * 2, 14336
    kept = 1 if fp8 else 2  # Transformer Engine's FP8 linears keep their inputs in FP8
    # QKV input; the MLP input, kept in bf16 by the router; the experts' down-projection input
    assert none - norm_act == pytest.approx(kept * ntok * h + 2 * ntok * h + kept * rows * f)
    # selective under flash attention frees only the kernel's fp32 log-sum-exp (16 heads)
    assert none - layer_activation_bytes(MIXTRAL, shard, "selective") == 4 * 16 * 4096


def test_it_redoes_the_two_norms_and_the_routed_activation():
    ops = layer_ops(MIXTRAL, SHARD)
    redone = sorted(op.name for op in ops if op.module_redo)
    assert redone == ["input_norm", "mlp_act", "post_attention_norm"]
    assert next(op for op in ops if op.name == "mlp_act").routed
    each = op_times([(op,) for op in ops], H100, "bf16")
    expected = sum(float(each.fwd_s[i]) for i, op in enumerate(ops) if op.module_redo)
    assert op_times([ops], H100, "bf16").module_redo_s[0] == pytest.approx(expected)
    plan = Plan(global_batch=64, seq_len=4096, dp=4, tp=2, sp=True, ep=8, etp=1, zero=1)
    cluster = Cluster(8, 8)
    none = simulate(MIXTRAL, plan, cluster, H100)
    modules = simulate(MIXTRAL, Plan(**{**plan.to_dict(), "recompute": "norm_act"}), cluster, H100)
    m, layers = plan.num_microbatches, MIXTRAL.num_layers
    assert modules.breakdown_s["recompute"] == pytest.approx(m * layers * expected, rel=1e-6)
    assert modules.peak_memory_bytes < none.peak_memory_bytes


def test_megatron_exports_it_and_the_others_refuse_it():
    plan = Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, zero=1, ep=8, etp=1, recompute="norm_act")
    result = simulate(MIXTRAL, plan, Cluster(64, 8), H100)
    job = train_job(MIXTRAL, result, H100, checkpoint_of(MIXTRAL_PATH, MIXTRAL))
    args = " ".join(export("megatron", job).args)
    assert "--recompute-granularity selective --recompute-modules layernorm moe_act" in args
    for target in ("torchtitan", "deepspeed"):
        with pytest.raises(PlanError) as err:
            check(target, MIXTRAL, plan)
        assert "recompute" in str(err.value)
    # meshplan run takes it under SP too (the gather rebuilt with the norm: model.Block._normed)
    assert not any(field == "plan.recompute" for field, *_ in violations(EXECUTOR_TRAINING, plan.fields(), MIXTRAL))
    dense = Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, zero=1, recompute="norm_act")
    llama = ZOO["llama-3-70b"]
    job = train_job(llama, simulate(llama, dense, Cluster(64, 8), H100), H100, checkpoint_of("llama-3-70b", llama))
    assert "--recompute-modules layernorm --" in " ".join(export("megatron", job).args)


def test_the_search_offers_it_for_models_with_experts():
    fixed = {"global_batch": 64, "seq_len": 4096, "tp": 2, "pp": 1}
    moe = candidate_table(MIXTRAL, Cluster(16, 8), fixed)
    dense = candidate_table(ZOO["llama-2-13b"], Cluster(16, 8), fixed)
    assert "norm_act" in set(moe["recompute"]) and "norm_act" not in set(dense["recompute"])
    held = candidate_table(ZOO["llama-2-13b"], Cluster(16, 8), {**fixed, "recompute": "norm_act"})
    assert np.all(held["recompute"] == "norm_act")


def test_selective_redoes_a_fused_attention_kernels_forward():
    """Megatron-Core checkpoints core attention under selective recompute whatever its
    backend (attention.py: checkpoint_core_attention), so with FlashAttention the backward
    runs the kernel's forward again, one per layer and micro-batch: the recompute term is
    the step's attention-core forward time, what it adds to none's step (one rank, no
    pipeline: nothing overlaps it)."""
    model, cluster = ZOO["llama-2-7b"], Cluster(1, 1)
    base = dict(global_batch=4, seq_len=8192, dp=1, micro_batch=1)
    none, selective = (simulate(model, Plan(**base, recompute=r), cluster, H100) for r in ("none", "selective"))
    core = op_times([tuple(op for op in layer_ops(model, Shard(1, 8192)) if op.attention_core)], H100, "bf16")
    redo = 4 * model.num_layers * float(core.fwd_s[0])
    assert none.breakdown_s["recompute"] == 0.0
    assert selective.breakdown_s["recompute"] == pytest.approx(redo, rel=1e-6)
    assert selective.step_time_s - none.step_time_s == pytest.approx(redo, rel=0.01)
    assert selective.peak_memory_bytes < none.peak_memory_bytes


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


def test_under_sp_it_gathers_the_norms_outputs_again_in_backward():
    """norm_act under SP rebuilds the norms' gathered outputs: their all-gathers, half of a
    dense layer's TP communication in one direction, run again in backward. On gloo
    (nothing overlaps) the step's TP communication grows by that; on a GPU the all-gathers
    hide behind the input-gradient GEMMs, slowing them by the profile's contention, and the
    exposed TP communication stays; without SP nothing is gathered."""
    llama = ZOO["llama-2-7b"]
    gloo = replace(H100, extra={**H100.extra, "measurement": {"collective_backend": "gloo"}})
    base = Plan(global_batch=8, seq_len=4096, tp=8, sp=True, zero=1, micro_batch=1)
    rebuilt = Plan(**{**base.to_dict(), "recompute": "norm_act"})
    cluster = Cluster(8, 8)
    none, modules = (simulate(llama, p, cluster, gloo) for p in (base, rebuilt))
    # half a layer's TP communication of one direction (its two all-gathers), per layer and
    # micro-batch (8 of 4096 tokens in bf16, tp 8 on one node)
    layer_s = float(tp_comm_s(llama, 4096, True, 2, gloo, 8, 8))
    added = modules.breakdown_s["tp_comm"] - none.breakdown_s["tp_comm"]
    assert added == pytest.approx(8 * llama.num_layers * layer_s / 2, rel=1e-9)
    none, modules = (simulate(llama, p, cluster, H100) for p in (base, rebuilt))
    assert modules.breakdown_s["tp_comm"] == pytest.approx(none.breakdown_s["tp_comm"], rel=1e-9)
    assert modules.breakdown_s["contention"] > none.breakdown_s["contention"]
    no_sp = [simulate(llama, Plan(**{**p.to_dict(), "sp": False}), cluster, gloo) for p in (base, rebuilt)]
    assert no_sp[1].breakdown_s["tp_comm"] == pytest.approx(no_sp[0].breakdown_s["tp_comm"], rel=1e-9)
