"""The closed loop's refit recovers known throughput factors from synthetic measurements,
and validation statistics are computed as defined."""
import pytest

from meshplan.executor.records import RunRecord
from meshplan.calibration.refit import refit
from meshplan.validation.suite import SUITE, VALIDATION_MODEL, ValidationRun, summary
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.plan import Cluster
from meshplan.simulator.train import simulate

BASE = load_profile("a100-80gb")


def _record(plan, step_s, memory_bytes, prediction=None) -> RunRecord:
    return RunRecord(model=VALIDATION_MODEL, plan=plan, dtype_requested=plan.dtype, device="cpu",
                     world_size=plan.world_size, profile="a100-80gb", prediction=prediction,
                     prediction_note="", losses=(1.0,) * 4, step_times_s=(step_s,) * 4, warmup=1,
                     memory_by_rank=({"peak_bytes": memory_bytes},), seed=0, lr=1e-3, data=None)


def test_refit_recovers_known_factors():
    # "Measurements" made by a machine with 40% of the FLOP/s and 2x the bandwidths: the
    # refit, seeing only step times, finds predictions matching the held-out half again.
    truth = BASE.scaled(flops=0.4, hbm_bw=2.0, intra_node_bw=2.0)
    names, records = [], []
    for name, plan in SUITE:
        cluster = Cluster(plan.world_size, plan.world_size)
        measured = simulate(VALIDATION_MODEL, plan, cluster, truth).step_time_s
        names.append(name)
        records.append(_record(plan, measured, 1))
    fitted = refit(BASE, names, records)
    assert fitted.before["held_out"]["median_abs_error"] > 0.2
    assert fitted.after["held_out"]["max_abs_error"] < 0.02
    assert fitted.factors["flops"] == pytest.approx(0.4, rel=0.05)
    assert set(fitted.train).isdisjoint(fitted.held_out) and len(fitted.train) + len(fitted.held_out) == len(SUITE)


def test_scaled_latencies_add_per_op_and_multiply_collective_alpha():
    slow = BASE.scaled(op_latency_s=1e-4, collective_latency=3.0)
    assert slow.gemm_time_s(64, 64, 64, "bf16") == pytest.approx(BASE.gemm_time_s(64, 64, 64, "bf16") + 1e-4)
    assert slow.memory_bound_time_s(1024, "bf16") == pytest.approx(BASE.memory_bound_time_s(1024, "bf16") + 1e-4)
    tiny = 8  # bytes: latency-bound, time ~ alpha
    assert slow.collective_time_s("all_reduce", tiny, 8, 8) == pytest.approx(
        3.0 * BASE.collective_time_s("all_reduce", tiny, 8, 8), rel=0.01)


def test_summary_statistics():
    plan = SUITE[0][1]
    runs = [ValidationRun(f"r{i}", _record(plan, measured, 100,
                                           {"step_time_s": predicted, "peak_memory_bytes": 110}))
            for i, (predicted, measured) in enumerate([(1.1, 1.0), (1.8, 2.0), (3.3, 3.0)])]
    stats = summary(runs)
    assert stats["median_abs_error"] == pytest.approx(0.1)
    assert stats["max_abs_error"] == pytest.approx(0.1)
    assert stats["spearman"] == pytest.approx(1.0)
    assert stats["memory_median_abs_error"] == pytest.approx(0.1)


def test_rounds_take_turns_and_each_plan_keeps_its_least_disturbed_round(monkeypatch):
    from dataclasses import replace

    import meshplan.validation.suite as validate
    from meshplan.executor.options import RunOptions
    calls = []
    # timed steps per launch in turn (world 2, world 4, world 2, world 4): dp2 hit by a slow
    # spell in its first round, dp4 in its second
    steps = iter([(5.0, 6.0), (3.0, 4.0), (1.0, 2.0), (7.0, 8.0)])

    def fake_launch_many(jobs, cluster, options):
        calls.append(cluster.num_gpus)
        # a warm-up step of 9 s, then the round's timed steps
        return [replace(_record(plan, 0.0, 1), step_times_s=(9.0, *next(steps))) for _, plan in jobs]
    monkeypatch.setattr(validate, "launch_train_many", fake_launch_many)
    runs = validate.run_suite(RunOptions(steps=3, warmup=1), ("dp2", "dp4"), rounds=2,
                              after_launch=lambda: calls.append("after"))
    assert calls == [2, "after", 4, "after", 2, "after", 4, "after"]  # world sizes take turns
    dp2, dp4 = (r.record for r in runs)
    assert dp2.timed_step_times_s == (1.0, 2.0)  # its second round, warm-up dropped
    assert dp4.timed_step_times_s == (3.0, 4.0)  # its first


def test_a_failed_suite_launch_is_started_once_more(monkeypatch):
    from dataclasses import replace

    import meshplan.validation.suite as validate
    from meshplan.executor.launch import RunFailed
    from meshplan.executor.options import RunOptions
    attempts = []

    def dies_first(fails):
        def launch(jobs, cluster, options):
            attempts.append(cluster.num_gpus)
            if len(attempts) <= fails:
                raise RunFailed("rank 0 (local rank 0) failed first, with killed by signal SIGABRT")
            return [replace(_record(plan, 0.0, 1), step_times_s=(9.0, 1.0, 2.0)) for _, plan in jobs]
        return launch
    monkeypatch.setattr(validate, "launch_train_many", dies_first(1))
    runs = validate.run_suite(RunOptions(steps=3, warmup=1), ("dp2",))
    assert attempts == [2, 2] and runs[0].record.timed_step_times_s == (1.0, 2.0)
    attempts.clear()
    monkeypatch.setattr(validate, "launch_train_many", dies_first(2))
    with pytest.raises(RunFailed, match="SIGABRT"):  # a second failure is the run's
        validate.run_suite(RunOptions(steps=3, warmup=1), ("dp2",))
    assert attempts == [2, 2]


def test_validate_cli_rejects_bad_rounds_and_plans(capsys):
    from meshplan.cli import main
    assert main(["validate", "--rounds", "0"]) == 2
    assert main(["validate", "--plans", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--rounds" in err[0] and "--plans" in err[1]
