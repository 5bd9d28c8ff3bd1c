"""Real multi-process runs (torchrun, gloo, 1 thread per rank) against the single-process
run of the same model, seed and data: the losses of the first steps must agree (fp32,
rtol 1e-4: only the order of floating-point reductions differs)."""
import pytest

from executor.launch import RunOptions, launch, launch_many
from simulator.model_spec import ModelSpec
from simulator.plan import Cluster, Plan

pytestmark = pytest.mark.slow

MODEL = ModelSpec(name="tiny", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=128, vocab_size=256, max_seq_len=128)
OPTIONS = RunOptions(steps=3, warmup=1, profile="a100-80gb", progress=False)


def _p(**kw) -> Plan:
    return Plan(**{**dict(global_batch=8, seq_len=32, micro_batch=2, dtype="fp32"), **kw})


WORLD2 = {
    "dp2": _p(dp=2), "dp2 zero1": _p(dp=2, zero=1), "dp2 zero2": _p(dp=2, zero=2),
    "dp2 zero3": _p(dp=2, zero=3), "dp2 full recompute": _p(dp=2, recompute="full"),
    "tp2": _p(tp=2), "tp2 sp": _p(tp=2, sp=True), "tp2 selective": _p(tp=2, recompute="selective"),
    "pp2 gpipe": _p(pp=2, schedule="gpipe"), "pp2 1f1b": _p(pp=2, schedule="1f1b"),
    "pp2 interleaved": _p(pp=2, schedule="interleaved", virtual_stages=2),
}
WORLD4 = {"dp2 tp2 zero2": _p(dp=2, tp=2, zero=2), "tp2 pp2": _p(tp=2, pp=2)}


@pytest.fixture(scope="module")
def reference():
    return launch(MODEL, _p(), Cluster(1, 1), OPTIONS).losses


@pytest.mark.parametrize("world,plans", [(2, WORLD2), (4, WORLD4)])
def test_parallel_losses_match_single_process(reference, world, plans):
    records = launch_many([(MODEL, p) for p in plans.values()], Cluster(world, world), OPTIONS)
    for name, record in zip(plans, records):
        assert len(record.losses) == 3
        assert record.losses == pytest.approx(reference, rel=1e-4), name
        assert record.losses[-1] < record.losses[0], name   # it trains
        assert record.prediction is not None and record.measured_step_time_s > 0
