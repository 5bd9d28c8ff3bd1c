"""The cross-entropy kernel (plan.cross_entropy): the logits' memory each keeps and holds at
its backward peak, counted by hand; which framework runs which; the published rows' kernels
and the comparison of their logged (reserved) memory."""
import pytest

from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import dictated
from meshplan.simulator import rules
from meshplan.simulator.memory import FRAGMENTATION_SHARE, cross_entropy_logits
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate
from meshplan.validation.published import load_runs, predict, reserved_bytes

LLAMA = ZOO["llama-3-8b"]
H100 = load_profile("h100-80gb")


def _buffers(**fields) -> float:
    plan = Plan(**{"global_batch": 2, "seq_len": 4096, "dp": 1, "micro_batch": 1, **fields})
    return simulate(LLAMA, plan, Cluster(1, 8), H100).stages[0].memory.buffers_bytes


def test_each_kernel_holds_its_logits_at_the_backward_peak():
    # one micro-batch of 4096 tokens over a 128,256 vocabulary: fp32 logits of
    fp32_logits = 4096 * 128256 * 4
    fused, eager, compiled = (_buffers(cross_entropy=k) for k in ("fused", "eager", "compiled"))
    assert fused == pytest.approx(2 * fp32_logits)  # fp32 probabilities + their gradient in place
    assert eager == pytest.approx(3 * fp32_logits)  # log_softmax out, nll grad, log_softmax grad
    assert compiled == pytest.approx(2 * 4096 * 128256 * 2)  # bf16 logits + their bf16 gradient
    # training in fp32 the compiled graph keeps fp32 logits
    assert tuple(map(float, cross_entropy_logits("compiled", 4, 1))) == (1.0, 2.0)


def test_loss_parallel_holds_one_more_logit_tensor():
    """Over vocabulary-sharded logits (TP 2) PyTorch's loss_parallel backward forms
    (zeros + exp(log_probs)) * grad: four fp32 tensors of the local logits at once."""
    local_fp32_logits = 4096 * (128256 // 2) * 4
    plan = dict(global_batch=2, seq_len=4096, tp=2, sp=True, micro_batch=1)
    eager = Plan(**plan, cross_entropy="eager")
    fused = Plan(**plan)
    memory = [simulate(LLAMA, p, Cluster(2, 8), H100).stages[0].memory.buffers_bytes for p in (eager, fused)]
    assert memory[0] - memory[1] == pytest.approx(2 * local_fp32_logits)


def test_micro_batches_in_flight_keep_what_each_kernel_saves():
    """GPipe with pp 2 keeps every micro-batch's saved loss tensor on the last rank."""
    def last_stage(kernel):
        plan = Plan(global_batch=4, seq_len=4096, pp=2, micro_batch=1, schedule="gpipe",
                    cross_entropy=kernel)
        return simulate(LLAMA, plan, Cluster(2, 8), H100).stages[-1].memory.buffers_bytes
    fp32_logits = 4096 * 128256 * 4
    assert last_stage("fused") == pytest.approx((3 * 1 + 2) * fp32_logits)
    assert last_stage("eager") == pytest.approx((3 * 1 + 3) * fp32_logits)
    assert last_stage("compiled") == pytest.approx((3 * 0.5 + 1) * fp32_logits)


def test_frameworks_run_their_own_kernel():
    def issues(target, **fields):
        plan = Plan(global_batch=8, seq_len=4096, dp=8, zero=3, **fields)
        return [f for f, *_ in rules.violations(rules.FRAMEWORKS[target], plan.fields(), LLAMA)]
    assert "plan.cross_entropy" in issues("torchtitan")  # fused: it compiles the loss instead
    assert "plan.cross_entropy" not in issues("torchtitan", cross_entropy="compiled")
    assert "plan.cross_entropy" in issues("torchtitan", cross_entropy="compiled", elementwise="eager",
                                          mlp_kernel="eager")
    assert "plan.cross_entropy" not in issues("torchtitan", cross_entropy="eager", elementwise="eager",
                                              mlp_kernel="eager")
    assert "plan.cross_entropy" in issues("megatron", cross_entropy="eager")
    assert "plan.cross_entropy" in issues("deepspeed", cross_entropy="compiled")


def test_published_torchtitan_rows_name_their_loss_and_compare_reserved_memory():
    runs = {run.id: run for run in load_runs()}
    assert runs["tt24-8b-8gpu-fsdp-compile"].fixed["cross_entropy"] == "eager"  # blocks compiled only
    assert runs["trainy25-8b-h200-32gpu-fsdp-fp8"].fixed["cross_entropy"] == "compiled"
    assert "cross_entropy" not in runs["narayanan21-t1-1t"].fixed
    run = runs["tt24-8b-8gpu-fsdp"]
    hw = load_profile(run.hardware)
    result = predict(run, hw)
    assert reserved_bytes(result, hw) == result.peak_memory_bytes + FRAGMENTATION_SHARE * hw.memory_bytes


def test_a_search_for_torchtitan_prices_its_loss():
    assert dictated("torchtitan", {})["cross_entropy"] == "compiled"
    assert dictated("torchtitan", {"elementwise": "eager"})["cross_entropy"] == "eager"  # uncompiled
    assert "cross_entropy" not in dictated("megatron", {})  # the default, fused, is Megatron-LM's
