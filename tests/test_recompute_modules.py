"""Recompute norm_act (Megatron-LM's --recompute-granularity selective --recompute-modules
layernorm moe_act): what it frees and redoes, by hand on Mixtral's layer, where it runs and
how it is exported."""
import os

import numpy as np
import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import check, export, train_job
from meshplan.planner.exports.checkpoint import checkpoint_of
from meshplan.planner.space import candidate_table
from meshplan.simulator.cost import op_times
from meshplan.simulator.memory import layer_activation_bytes
from meshplan.simulator.model_spec import ZOO, load_model
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
    assert any(field == "plan.recompute" for field, *_ in violations(EXECUTOR_TRAINING, plan.fields(), MIXTRAL))
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
