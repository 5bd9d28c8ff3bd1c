"""ZeRO-2/3 gradients under gradient accumulation (plan.grad_sync): accumulated whole and
reduced once, as torch.distributed.pipelining runs FSDP2, or reduce-scattered after each
micro-batch, as FSDP2 and DeepSpeed run without a pipeline. Memory and traffic against
hand counts, the rules of each framework, and the published rows that depend on it."""
import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate
from meshplan.validation.published import load_runs, predict

LLAMA = ZOO["llama-2-7b"]
H100 = load_profile("h100-80gb")
CLUSTER = Cluster(16, 8)


def _plan(**fields) -> Plan:
    return Plan(**{"global_batch": 64, "seq_len": 4096, "dp": 8, "pp": 2, "zero": 3, "micro_batch": 1,
                   "recompute": "full", **fields})


def _stage0(plan: Plan):
    result = simulate(LLAMA, plan, CLUSTER, H100)
    return result, result.stages[0].memory


def test_a_pipeline_holds_whole_fp32_gradients_until_its_last_micro_batch():
    # ZeRO-3 shards the bf16 weights over dp: the stage's parameters are weights x dp / 2
    _, last = _stage0(_plan())
    params = last.weights_bytes * 8 / 2
    assert last.gradients_bytes == pytest.approx(params * 4)  # fp32, unsharded
    _, each = _stage0(_plan(grad_sync="each"))
    assert each.gradients_bytes == pytest.approx(params * 4 / 8)
    assert each.weights_bytes == last.weights_bytes and each.optimizer_bytes == last.optimizer_bytes
    # bf16 reduction accumulates in bf16
    _, bf16 = _stage0(_plan(grad_reduce_dtype="bf16"))
    assert bf16.gradients_bytes == pytest.approx(params * 2)


def test_without_a_pipeline_the_default_syncs_each_micro_batch():
    one = dict(pp=1, dp=16)
    _, default = _stage0(_plan(**one))
    _, each = _stage0(_plan(**one, grad_sync="each"))
    _, last = _stage0(_plan(**one, grad_sync="last"))
    assert default == each
    assert last.gradients_bytes == pytest.approx(each.gradients_bytes * 16)
    # one micro-batch: nothing to accumulate, both the same
    _, single = _stage0(_plan(**one, global_batch=16, grad_sync="last"))
    _, single_each = _stage0(_plan(**one, global_batch=16, grad_sync="each"))
    assert single.gradients_bytes == single_each.gradients_bytes


def test_syncing_each_micro_batch_moves_the_gradients_that_many_times():
    """m micro-batches: m - 1 more reduce-scatters of the stage's fp32 gradients, one per
    layer (its share of the stage's parameters) over the 8 dp ranks of one node, each after
    FSDP2 copies the layer's bf16 gradients into its fp32 input (read 2 bytes, write 4)."""
    m, layers = 64 // (8 * 1), LLAMA.num_layers // 2
    last, memory = _stage0(_plan())
    each, _ = _stage0(_plan(grad_sync="each"))
    per_layer_bytes = memory.weights_bytes * 8 / 2 * 4 / layers
    bucket_s = (H100.collective_time_s("reduce_scatter", per_layer_bytes, 8, 8)
                + H100.memory_bound_time_s(per_layer_bytes * 6 / 4, "fp32"))
    extra_s = each.communication["dp"]["total_s"] - last.communication["dp"]["total_s"]
    assert extra_s == pytest.approx((m - 1) * layers * bucket_s, rel=1e-6)
    assert each.step_time_s > last.step_time_s


def _issues(target: str, plan: Plan) -> list[str]:
    return [field for field, *_ in rules.violations(rules.FRAMEWORKS[target], plan.fields(), LLAMA)]


def test_each_framework_syncs_as_it_runs():
    with pytest.raises(PlanError, match="plan.grad_sync"):
        _plan(zero=1, pp=1, grad_sync="each")  # whole gradients have nothing to reduce-scatter
    piped_each, flat_last = _plan(grad_sync="each"), _plan(pp=1, dp=16, grad_sync="last")
    assert "plan.grad_sync" in _issues("torchtitan", piped_each)  # torch.distributed.pipelining
    assert "plan.grad_sync" in _issues("torchtitan", flat_last)  # its trainer syncs every micro-batch
    assert "plan.grad_sync" not in _issues("torchtitan", _plan()) + _issues("torchtitan", _plan(pp=1, dp=16))
    assert "plan.grad_sync" in _issues("deepspeed", flat_last)
    assert "plan.grad_sync" in _issues("megatron", flat_last)
    executor = [f for f, *_ in rules.violations(rules.EXECUTOR_TRAINING, piped_each.fields(), LLAMA)]
    assert "plan.grad_sync" in executor


def test_torch_pipelining_refuses_to_reshard_zero3_weights_after_forward():
    """Its stages keep FSDP2's gathered weights from each backward to the next forward, so a
    plan resharding them after forward would not hold the memory it is priced at."""
    resharded, kept = _plan(reshard_after_forward=True), _plan(reshard_after_forward=False)
    flat = _plan(pp=1, dp=16, reshard_after_forward=True)
    for issues in (lambda plan: _issues("torchtitan", plan),
                   lambda plan: [f for f, *_ in rules.violations(rules.EXECUTOR_TRAINING, plan.fields(), LLAMA)]):
        assert "plan.reshard_after_forward" in issues(resharded)
        assert "plan.reshard_after_forward" not in issues(kept) + issues(flat)


def test_torchtitan_pipelines_hold_the_gradients_they_publish():
    """torchtitan's 405B runs (FSDP + PP, its benchmark page's memory column) were predicted
    at half their memory when the gradients were taken as sharded."""
    runs = {r.id: r for r in load_runs()}
    for name in ("tt24-405b-512gpu-3d-interleaved", "tt24-405b-512gpu-4d-cp1-32k"):
        run = runs[name]
        result = predict(run, load_profile(run.hardware))
        assert result.peak_memory_bytes / run.measured_memory_bytes == pytest.approx(1, abs=0.2)
