"""Eager elementwise ops (plan.elementwise eager, torchtitan without compile) against hand
counts of the bytes each PyTorch kernel of RMSNorm, RoPE and SwiGLU moves, the time they
add, the rules that keep the knob consistent, and the published rows that ran eager."""
from dataclasses import replace

import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.cost import op_times
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.ops import Shard, eager_bytes_per_element, head_ops, layer_ops
from meshplan.simulator.plan import Cluster, Plan, complete_fields
from meshplan.simulator.train import simulate
from meshplan.validation.published import load_runs

LLAMA, GPT = ZOO["llama-2-7b"], ZOO["gpt3-175b"]
H100 = load_profile("h100-80gb")


def test_eager_bytes_by_hand():
    # RMSNorm in bf16: x.float() 2+4, pow 4+4, mean 4, x*rsqrt 4+4, type_as 4+2, *weight 2+2
    assert eager_bytes_per_element(LLAMA, "input_norm", 2) == (36, 8 + 6 + 16 + 4 + 12 + 12 + 6)
    # in fp32 the casts are no-ops: 8 + 4 + 8 + 8
    assert eager_bytes_per_element(LLAMA, "final_norm", 4) == (28, 16 + 16 + 4 + 12 + 12)
    # RoPE through complex numbers in bf16: float 2+4, complex product 4+4, cast back 4+2
    assert eager_bytes_per_element(LLAMA, "rope", 2) == (20, 20)
    # SwiGLU: silu 2+2, product 4+2; backward the product's two (4+2 each) and silu's 4+2
    assert eager_bytes_per_element(LLAMA, "mlp_act", 2) == (10, 18)
    # one kernel in eager PyTorch too: LayerNorm, GELU, the residual add
    assert eager_bytes_per_element(GPT, "input_norm", 2) is None
    assert eager_bytes_per_element(GPT, "mlp_act", 2) is None
    assert eager_bytes_per_element(LLAMA, "residual_add", 2) is None


def test_eager_ops_move_those_bytes_and_nothing_else_changes():
    fused, eager = Shard(1, 4096), Shard(1, 4096, eager=True)
    tokens, h, f = 4096, LLAMA.hidden_size, LLAMA.ffn_hidden_size
    ops = {op.name: op for op in layer_ops(LLAMA, eager)}
    assert ops["input_norm"].bytes_moved == tokens * h * 36 and ops["input_norm"].bwd_bytes == tokens * h * 64
    assert ops["rope"].bytes_moved == tokens * 2 * h * 20   # queries and keys (MHA: 32 + 32 heads)
    assert ops["mlp_act"].bytes_moved == tokens * f * 10 and ops["mlp_act"].bwd_bytes == tokens * f * 18
    same = [(a, b) for a, b in zip(layer_ops(LLAMA, fused), layer_ops(LLAMA, eager))
            if a.name not in ("input_norm", "post_attention_norm", "rope", "mlp_act")]
    assert all(a == b for a, b in same) and len(same) == len(layer_ops(LLAMA, fused)) - 4
    assert {op.name: op.bytes_moved for op in head_ops(LLAMA, eager)}["final_norm"] == tokens * h * 36
    # so the layer's forward grows by those ops' time, eager as plain kernels at the
    # activation kernel's bandwidth, fused at their class's
    assert all(op.eager == (name in ("input_norm", "post_attention_norm", "rope", "mlp_act"))
               for name, op in ops.items())
    eager_s, fused_s = (op_times([layer_ops(LLAMA, s)], H100, "bf16").fwd_s for s in (eager, fused))
    grown = eager_s - fused_s
    by_hand = sum(H100.memory_bound_time_s(tokens * w * new, "bf16", "activation")
                  - H100.memory_bound_time_s(tokens * w * old, "bf16", cls)
                  for w, new, old, cls in ((h, 36, 4, "norm"), (h, 36, 4, "norm"), (2 * h, 20, 4, "rope"),
                                           (f, 10, 6, "activation")))
    assert grown[0] == pytest.approx(by_hand, rel=1e-9)


def test_an_eager_step_is_slower_by_its_compute_only():
    plan = Plan(global_batch=64, seq_len=4096, dp=8, zero=3, recompute="op", mlp_kernel="eager")
    fused = simulate(LLAMA, plan, Cluster(8, 8), H100)
    eager = simulate(LLAMA, replace(plan, elementwise="eager"), Cluster(8, 8), H100)
    assert eager.step_time_s > fused.step_time_s
    grew = {k for k in fused.breakdown_s if abs(eager.breakdown_s[k] - fused.breakdown_s[k]) > 1e-9}
    assert grew <= {"compute", "recompute", "contention", "stragglers", "dp_comm"} and "compute" in grew


def test_eager_elementwise_runs_the_gated_activation_eager_too():
    with pytest.raises(PlanError) as err:
        Plan(global_batch=64, seq_len=4096, dp=8, elementwise="eager").validate(LLAMA, Cluster(8, 8))
    assert "mlp_kernel" in str(err.value)
    Plan(global_batch=64, seq_len=2048, dp=8, elementwise="eager").validate(GPT, Cluster(8, 8))  # GELU


def test_published_rows_run_as_compiled_or_not():
    runs = {run.id: run for run in load_runs()}
    eager, compiled = runs["tt24-8b-8gpu-fsdp"], runs["tt24-8b-8gpu-fsdp-compile"]
    assert (eager.fixed["elementwise"], eager.fixed["mlp_kernel"]) == ("eager", "eager")
    assert (compiled.fixed["elementwise"], compiled.fixed["mlp_kernel"]) == ("fused", "fused")
    assert "elementwise" not in runs["narayanan21-t1-1t"].fixed


def test_published_megatron_fp8_rows_before_its_recipe_flag_scale_by_delayed_scaling():
    runs = {run.id: run for run in load_runs()}
    nemo, bridge = runs["nemo2407-llama2-70b-64"], runs["mbridge2604-llama3-70b-64"]
    assert nemo.fixed["fp8_recipe"] == "delayed" and "fp8_recipe" not in bridge.fixed  # fp8_cs: tensorwise
    plan = Plan(**complete_fields({**nemo.fixed, "micro_batch": 1, "recompute": "none", "zero": 1},
                                  nemo.cluster.num_gpus))
    hw = load_profile(nemo.hardware)
    delayed, current = (simulate(nemo.model, replace(plan, fp8_recipe=r), nemo.cluster, hw)
                        for r in ("delayed", "tensorwise"))
    assert delayed.step_time_s < current.step_time_s  # no amax pass before each cast
