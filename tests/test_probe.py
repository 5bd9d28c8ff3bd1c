"""The machine probe shared by `meshplan run` and `meshplan validate` (calibration/probe.py):
a stub measurement in, ratios, drift verdict and rescaled profile out, checked by hand;
skipped for CUDA ranks and non-CPU profiles; a run's prediction made again on the rescaled
profile. The real measurement runs in tests/test_run_cli.py."""
from __future__ import annotations

import os

import pytest

from dataclasses import replace

from meshplan.calibration.measure.machine_load import DECODE_PLAN, LOAD_MODEL, LOAD_PLAN
from meshplan.calibration.probe import (ADD_ELEMENTS, COLLECTIVE_BYTES, COLLECTIVE_LARGE_BYTES,
                                        COLLECTIVE_SMALL_BYTES, GEMM, REFERENCE_KEY, Measurement, Probe,
                                        check_drift, compare, reference, repredicted)
from meshplan.core.cpus import this_cpu_model
from meshplan.core.errors import ProfileError
from meshplan.executor.records import RunRecord
from meshplan.hw_profiles.profile import DATA_DIR, HardwareProfile, cpu_device_name, load_profile
from meshplan.simulator.cost import per_rank_profile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import simulate_inference
from meshplan.simulator.train import simulate

# the Intel Xeon VM's committed profile, by path (`local` is this machine's): the readings
# below are set against its figures
XEON = str(DATA_DIR / "local.json")
LOCAL = load_profile(XEON)
FP32_ADD_BYTES = 3 * 4 * ADD_ELEMENTS  # two fp32 operands read, one written


def one_rank_step_s(hw: HardwareProfile) -> float:
    """The cost model's time for the probe's one-rank step on `hw`, beside busy neighbours
    on the other usable cores, written out."""
    ranks = len(os.sched_getaffinity(0))
    return simulate(LOAD_MODEL, LOAD_PLAN, Cluster(1, 1), per_rank_profile(hw, ranks)).step_time_s


def one_rank_decode_s(hw: HardwareProfile) -> float:
    """The cost model's time per token of the probe's one-rank decode step on `hw`, beside
    busy neighbours, written out."""
    ranks = len(os.sched_getaffinity(0))
    return simulate_inference(LOAD_MODEL, DECODE_PLAN, Cluster(1, 1), per_rank_profile(hw, ranks)).tpot_s


def stub(gemm: float, memory: float, overhead: float, collective: float | None, step: float | None = None,
         decode: float | None = None):
    """A measurement `gemm` x, `memory` x, ... what the local profile compares it with: the
    probe's reading kept with it where it has one, else what its fits predict; the one-rank
    step (if given) `step` x its prediction, and the decode step, where asked for, `decode` x
    its."""
    then = reference(LOCAL)
    step_s = step * one_rank_step_s(LOCAL) if step is not None else None

    def measured(with_collective: bool, decode_step: bool = False) -> Measurement:
        decode_s = decode * one_rank_decode_s(LOCAL) if decode_step and decode is not None else None
        if then is not None:
            return Measurement(gemm * then.gemm_s, memory * then.add_s, then.add_bytes,
                               overhead * then.layer_forward_s,
                               collective * then.collective_s if with_collective else None, step_s,
                               decode_s=decode_s)
        return Measurement(
            gemm * float(LOCAL.gemm_time_s(GEMM.m, GEMM.n, GEMM.k, "fp32")),
            memory * float(LOCAL.memory_bound_time_s(FP32_ADD_BYTES, "fp32", "add")), FP32_ADD_BYTES,
            overhead * LOCAL.overhead.layer_forward_s,
            collective * float(LOCAL.collective_time_s("all_reduce", COLLECTIVE_BYTES, 2, 2))
            if with_collective else None, step_s, decode_s=decode_s)
    return measured


def _kept(hw: HardwareProfile, reading: Measurement | None) -> HardwareProfile:
    """hw with `reading` as the probe's reading kept with it (None: without one)."""
    extra = {k: v for k, v in hw.extra.items() if k != REFERENCE_KEY}
    return replace(hw, extra=extra if reading is None else {**extra, REFERENCE_KEY: reading.to_json()})


def test_against_the_kept_reading_like_with_like():
    """Against the probe's own reading kept with the profile, not the fits' prediction: a
    reading equal to it is no drift however far the fits are from it."""
    then = Measurement(gemm_s=1e-4, add_s=2e-3, add_bytes=12e6, layer_forward_s=4e-4, collective_s=1e-3)
    hw = _kept(LOCAL, then)
    same = compare(hw, then)
    assert (same.gemm, same.memory, same.overhead, same.collective) == (1, 1, 1, 1)
    assert same.against == "reference" and same.drifted == []
    # twice the GEMM time, the same add over twice the bytes (twice the bandwidth), 3x the
    # host overhead, no collective probed
    now = Measurement(gemm_s=2e-4, add_s=2e-3, add_bytes=24e6, layer_forward_s=12e-4, collective_s=None)
    drift = check_drift(hw, "cpu", rescale=True, collective=False, measured=lambda _c, **_decode: now)
    probe = drift.probe
    assert (probe.gemm, probe.memory, probe.overhead, probe.collective) == pytest.approx((2, 0.5, 3, None))
    assert "against its reading when profiled" in drift.text() and drift.to_json()["against"] == "reference"
    assert drift.rescaled.peak_flops["fp32"] == pytest.approx(LOCAL.peak_flops["fp32"] / 2)
    fits = compare(_kept(LOCAL, None), then)
    assert fits.against == "fits" and "against the profile's fits" in fits.text()


def test_a_profile_of_another_cpu_is_named_as_such():
    """The probe says when the profile was measured on another CPU model than this machine's
    (its device_name), and not when it was measured on this one."""
    reading = Measurement(gemm_s=1e-4, add_s=2e-3, add_bytes=12e6, layer_forward_s=4e-4, collective_s=None)
    mine = replace(_kept(LOCAL, reading), device_name=cpu_device_name(this_cpu_model()))
    assert compare(mine, reading).other_cpu is None and "another CPU" not in compare(mine, reading).text()
    theirs = compare(replace(mine, device_name=cpu_device_name("Another CPU")), reading)
    assert theirs.other_cpu == this_cpu_model() and theirs.to_json()["other_cpu"] == this_cpu_model()
    assert f"another CPU than this {this_cpu_model()}" in theirs.text()


def test_a_damaged_kept_reading_names_its_fields():
    hw = replace(LOCAL, extra={**LOCAL.extra, REFERENCE_KEY: {"gemm_s": "fast", "add_s": 1.0, "add_bytes": 8,
                                                              "collective_s": None, "when": "x"}})
    with pytest.raises(ProfileError) as raised:
        compare(hw, Measurement(1.0, 1.0, 8.0, 1.0, None))
    text = str(raised.value)
    for field in ("gemm_s", "layer_forward_s", "when"):
        assert f"extra.{REFERENCE_KEY}.{field}" in text
    assert f"extra.{REFERENCE_KEY}.add_s" not in text and f"extra.{REFERENCE_KEY}.collective_s" not in text


def test_ratios_verdict_and_rescaled_profile_by_hand():
    drift = check_drift(LOCAL, "cpu", rescale=True, collective=True,
                        measured=stub(gemm=2.0, memory=1.7, overhead=3.0, collective=0.3))
    probe, hw = drift.probe, drift.rescaled
    assert (probe.gemm, probe.memory, probe.overhead, probe.collective) == pytest.approx((2, 1.7, 3, 0.3))
    assert probe.band == LOCAL.relative_error_band()[1]  # p95 0.61: each ratio is beyond it
    assert probe.drifted == ["gemm", "memory-bound", "layer overhead", "collective"]
    # a machine twice as slow at GEMMs: half the FLOP/s; 1.7x slower adds: bandwidth / 1.7
    assert hw.peak_flops["fp32"] == pytest.approx(LOCAL.peak_flops["fp32"] / 2)
    assert hw.hbm_bytes_per_s == pytest.approx(LOCAL.hbm_bytes_per_s / 1.7)
    assert hw.overhead.layer_forward_s == pytest.approx(3 * LOCAL.overhead.layer_forward_s)
    assert hw.overhead.decode_layer_s == pytest.approx(3 * LOCAL.overhead.decode_layer_s)
    # collectives at 0.3x the time: latency x0.3 and bandwidth x1/0.3, so every time x0.3
    for size in (1 << 10, COLLECTIVE_BYTES, 1 << 26):
        assert float(hw.collective_time_s("all_reduce", size, 2, 2)) == pytest.approx(
            0.3 * float(LOCAL.collective_time_s("all_reduce", size, 2, 2)))
    assert hw.memory_bytes == LOCAL.memory_bytes
    assert hw.name.startswith(LOCAL.name + "[") and drift.to_json()["rescaled_profile"] == hw.name
    assert drift.to_json()["gemm"] == pytest.approx(2.0) and drift.note == ""
    assert "drifted beyond the profile's" in drift.text()


def _all_reduce_by_hand(size: int, latency: float, per_byte: float) -> float:
    """The local profile's two-rank all-reduce of `size` bytes with its per-call latency
    times `latency` and its bytes / bus bandwidth times `per_byte`, on the cheaper of its two
    alpha-beta lines once scaled, as the model prices a curve (bus bytes = size x 2(n-1)/n =
    size for two ranks)."""
    curve = LOCAL.collectives.intra_curve("all_reduce", 2)
    return min(latency * ln.alpha_s + per_byte * size / ln.busbw_bytes_per_s for ln in (curve.small, curve.large))


def test_collective_sizes_split_latency_from_bandwidth():
    """A machine whose collectives pay 3x the profiled per-call latency but move bytes in
    half the time: the 64 KiB, 1 MiB and 16 MiB readings give back 3 and 0.5, the rescaled
    profile prices each size as measured, and the one ratio at 1 MiB alone would have
    mispriced the small one (by more than 15%, either way: which depends on the profile's
    two alpha-beta lines)."""
    hw = _kept(LOCAL, None)
    small, large, huge = (_all_reduce_by_hand(s, 3.0, 0.5)
                          for s in (COLLECTIVE_SMALL_BYTES, COLLECTIVE_BYTES, COLLECTIVE_LARGE_BYTES))
    now = Measurement(1e-4, 2e-3, 12e6, 4e-4, collective_s=large, collective_small_s=small,
                      collective_large_s=huge)
    drift = check_drift(hw, "cpu", rescale=True, collective=True, measured=lambda _c, **_decode: now)
    probe = drift.probe
    assert (probe.collective_latency, probe.collective_per_byte) == pytest.approx((3.0, 0.5))
    assert probe.collective == pytest.approx(large / float(LOCAL.collective_time_s("all_reduce", COLLECTIVE_BYTES,
                                                                                      2, 2)))
    assert "(latency x3.00, per byte x0.50)" in drift.text()
    for size, measured in ((COLLECTIVE_SMALL_BYTES, small), (COLLECTIVE_BYTES, large),
                           (COLLECTIVE_LARGE_BYTES, huge)):
        assert float(drift.rescaled.collective_time_s("all_reduce", size, 2, 2)) == pytest.approx(measured)
    one_ratio = replace(probe, collective_latency=None, collective_per_byte=None).rescaled(hw)
    assert abs(float(one_ratio.collective_time_s("all_reduce", COLLECTIVE_SMALL_BYTES, 2, 2)) / small - 1) > 0.15
    # against a kept reading: the split is relative to the profile's own reading then, which
    # here read 1.3x the fits at 1 MiB
    then = replace(now, collective_s=1.3 * float(LOCAL.collective_time_s("all_reduce", COLLECTIVE_BYTES, 2, 2)),
                   collective_small_s=None)
    kept = compare(_kept(LOCAL, then), replace(now, collective_s=1.3 * large, collective_small_s=1.3 * small,
                                               collective_large_s=1.3 * huge))
    assert (kept.collective_latency, kept.collective_per_byte) == pytest.approx((3.0, 0.5))
    # readings no positive latency and per-byte pair explains, or one size alone: the one
    # ratio, as before
    assert compare(hw, replace(now, collective_small_s=None, collective_large_s=None)).collective_latency is None
    odd = compare(hw, replace(now, collective_small_s=10 * huge, collective_s=10 * huge))  # falls with size
    assert odd.collective_latency is None and "latency x" not in odd.text()
    assert float(odd.rescaled(hw).collective_time_s("all_reduce", COLLECTIVE_BYTES, 2, 2)) == pytest.approx(10 * huge)


def test_the_one_rank_step_sets_the_compute_speed():
    """With the one-rank step probed, compute, memory and host terms all take its ratio
    (against the model's own prediction of it), whatever the single GEMM and add read; the
    rescaled profile then predicts that step as measured."""
    drift = check_drift(LOCAL, "cpu", rescale=True, collective=True,
                        measured=stub(gemm=2.0, memory=1.0, overhead=1.0, collective=0.4, step=1.3))
    probe, hw = drift.probe, drift.rescaled
    assert probe.step == pytest.approx(1.3) and probe.gemm == pytest.approx(2.0)
    assert probe.drifted == ["gemm", "collective"]  # 1.3 is within the p95 band, 2.0 and 0.4 not
    assert "one-rank step x1.30 (against its prediction)" in drift.text()
    assert drift.to_json()["step"] == pytest.approx(1.3)
    assert hw.peak_flops["fp32"] == pytest.approx(LOCAL.peak_flops["fp32"] / 1.3)
    assert hw.hbm_bytes_per_s == pytest.approx(LOCAL.hbm_bytes_per_s / 1.3)
    assert hw.overhead.layer_backward_s == pytest.approx(1.3 * LOCAL.overhead.layer_backward_s)
    assert float(hw.collective_time_s("all_reduce", COLLECTIVE_BYTES, 2, 2)) == pytest.approx(
        0.4 * float(LOCAL.collective_time_s("all_reduce", COLLECTIVE_BYTES, 2, 2)))
    assert one_rank_step_s(hw) == pytest.approx(1.3 * one_rank_step_s(LOCAL), rel=0.01)


def test_the_decode_step_sets_the_costs_only_decode_pays():
    """Probed for a serving run, the one-rank decode step's ratio takes the place of the
    step's in a decode step's own costs (its host time per layer, the cached reads, the
    decode attention kernel); the rescaled profile then predicts that decode step as
    measured, to the share of its time in operators the step's ratio sets (elementwise)."""
    drift = check_drift(LOCAL, "cpu", rescale=True, collective=False, decode=True,
                        measured=stub(gemm=1.0, memory=1.0, overhead=1.0, collective=None, step=1.1, decode=1.5))
    probe, hw = drift.probe, drift.rescaled
    assert probe.decode == pytest.approx(1.5) and "one-rank decode step x1.50" in drift.text()
    assert hw.overhead.decode_layer_s == pytest.approx(1.5 * LOCAL.overhead.decode_layer_s)
    assert hw.overhead.layer_forward_s == pytest.approx(1.1 * LOCAL.overhead.layer_forward_s)
    assert hw.attention.decode_bytes_per_s == pytest.approx(LOCAL.attention.decode_bytes_per_s / 1.5)
    assert hw.attention.decode_latency_s == pytest.approx(1.5 * LOCAL.attention.decode_latency_s)
    assert hw.cached_reads.latency_s == pytest.approx(1.5 * LOCAL.cached_reads.latency_s)
    assert hw.cached_reads.seconds_per_byte[0][0] == pytest.approx(1.5 * LOCAL.cached_reads.seconds_per_byte[0][0])
    assert hw.peak_flops["fp32"] == pytest.approx(LOCAL.peak_flops["fp32"] / 1.1)
    assert one_rank_decode_s(hw) == pytest.approx(1.5 * one_rank_decode_s(LOCAL), rel=0.05)
    assert one_rank_step_s(hw) == pytest.approx(1.1 * one_rank_step_s(LOCAL), rel=0.01)  # training untouched
    again = drift.with_step_readings(LOCAL, [1.2], [1.3])
    assert again.probe.decode_readings == (1.5, 1.3) and again.probe.decode == pytest.approx(1.4)
    assert again.rescaled.overhead.decode_layer_s == pytest.approx(1.4 * LOCAL.overhead.decode_layer_s)
    # a training run's probe does not time it
    assert check_drift(LOCAL, "cpu", rescale=True, collective=False,
                       measured=stub(gemm=1.0, memory=1.0, overhead=1.0, collective=None, step=1.1,
                                     decode=1.5)).probe.decode is None


def test_later_step_readings_rescale_by_their_median():
    drift = check_drift(LOCAL, "cpu", rescale=True, collective=False,
                        measured=stub(gemm=1.0, memory=1.0, overhead=1.0, collective=None, step=1.1))
    again = drift.with_step_readings(LOCAL, [1.3, 1.2, 1.25, 1.4])
    assert again.probe.step == pytest.approx(1.25) and again.probe.step_readings == (1.1, 1.3, 1.2, 1.25, 1.4)
    assert again.rescaled.peak_flops["fp32"] == pytest.approx(LOCAL.peak_flops["fp32"] / 1.25)
    assert "median of 5 readings, x1.10-1.40" in again.text()
    assert drift.timed_step and drift.with_step_readings(LOCAL, []) is drift
    untimed = check_drift(LOCAL, "cpu", rescale=True, collective=False,
                          measured=stub(gemm=1.0, memory=1.0, overhead=1.0, collective=None))
    assert not untimed.timed_step and untimed.with_step_readings(LOCAL, [1.3]) is untimed
    unscaled = check_drift(LOCAL, "cpu", rescale=False, collective=False,
                           measured=stub(gemm=1.0, memory=1.0, overhead=1.0, collective=None, step=1.1))
    assert unscaled.with_step_readings(LOCAL, [1.3]).rescaled is None


def test_a_kept_reading_without_the_step_still_loads():
    """Profiles measured before the probe timed the step keep readings without step_s."""
    kept = {"gemm_s": 1e-4, "add_s": 2e-3, "add_bytes": 12e6, "layer_forward_s": 4e-4, "collective_s": None}
    assert reference(replace(LOCAL, extra={**LOCAL.extra, REFERENCE_KEY: kept})).step_s is None
    with pytest.raises(ProfileError, match=f"extra.{REFERENCE_KEY}.step_s"):
        reference(replace(LOCAL, extra={**LOCAL.extra, REFERENCE_KEY: {**kept, "step_s": -1.0}}))


def test_within_the_band_and_no_collective_without_rescale():
    drift = check_drift(LOCAL, "cpu", rescale=False, collective=False,
                        measured=stub(gemm=1.0, memory=1.0, overhead=1.0, collective=None))
    assert drift.rescaled is None and drift.probe.collective is None
    assert drift.probe.drifted == [] and "within the profile's" in drift.text()
    assert drift.to_json()["collective"] is None and drift.to_json()["rescaled_profile"] is None


def test_band_edge():
    probe = Probe(gemm=1.25, memory=0.85, overhead=1.0, collective=None, band=0.2)
    assert probe.drifted == ["gemm"]


def _never(_collective: bool) -> Measurement:
    raise AssertionError("the probe measured where it cannot speak for the ranks")


@pytest.mark.parametrize("hw, device, why", [
    (LOCAL, "cuda", "the ranks run on cuda"),
    (load_profile("a100-80gb"), "cpu", "profile a100-80gb was not measured on CPU ranks"),
])
def test_skipped_with_a_note(hw, device, why):
    drift = check_drift(hw, device, rescale=True, collective=True, measured=_never)
    assert drift.probe is None and drift.rescaled is None
    assert drift.text().startswith(f"probe skipped: {why}")
    assert drift.to_json() == {"note": drift.note, "rescaled_profile": None}


def test_repredicted_keeps_the_measurement():
    model = ModelSpec("tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, vocab_size=256, max_seq_len=64)
    plan = Plan(dp=2, global_batch=4, micro_batch=1, seq_len=32, dtype="fp32")
    cluster = Cluster(2, 2)
    record = RunRecord(model=model, plan=plan, dtype_requested="fp32", device="cpu", world_size=2,
                       profile="local", prediction=simulate(model, plan, cluster, LOCAL).to_json(),
                       prediction_note="", losses=(5.0, 4.0), step_times_s=(0.2, 0.1), warmup=1,
                       memory_by_rank=({"peak_bytes": 1},) * 2, seed=0, lr=1e-3, data=None)
    slower = check_drift(LOCAL, "cpu", rescale=True, collective=False,
                         measured=stub(gemm=2.0, memory=2.0, overhead=2.0, collective=None)).rescaled
    again = repredicted(record, cluster, slower)
    assert again.profile == slower.name and again.step_times_s == record.step_times_s
    assert again.predicted_step_time_s == pytest.approx(simulate(model, plan, cluster, slower).step_time_s)
    # compute and host overhead twice as slow, gloo collectives as profiled: between 1x and 2x
    assert record.predicted_step_time_s < again.predicted_step_time_s < 2 * record.predicted_step_time_s
    assert again.predicted_peak_memory_bytes == record.predicted_peak_memory_bytes


def test_validate_reports_the_probe_and_the_rescaled_suite(monkeypatch, tmp_path, capsys):
    """`meshplan validate --rescale --json` through the same check_drift / repredicted as
    `meshplan run`: a stub measurement, two recorded runs instead of the suite."""
    import json

    from meshplan.calibration import probe as probe_module
    from meshplan.cli import main
    from meshplan.executor import launch
    from meshplan.validation import suite
    from meshplan.validation.suite import VALIDATION_MODEL, ValidationRun

    def recorded(name: str, plan: Plan, step_s: float) -> ValidationRun:
        prediction = simulate(VALIDATION_MODEL, plan, Cluster(2, 2), LOCAL).to_json()
        return ValidationRun(name, RunRecord(
            model=VALIDATION_MODEL, plan=plan, dtype_requested="fp32", device="cpu", world_size=2,
            profile="local", prediction=prediction, prediction_note="", losses=(8.0,),
            step_times_s=(step_s, step_s), warmup=1,
            memory_by_rank=({"peak_bytes": prediction["peak_memory_bytes"]},) * 2, seed=0, lr=1e-3,
            data=None))

    runs = [recorded(name, plan, 0.3) for name, plan in suite.SUITE[:2]]

    def two_launches(*_args, after_launch=None, **_kwargs):
        after_launch()
        after_launch()
        return runs
    monkeypatch.setattr(suite, "run_suite", two_launches)
    monkeypatch.setattr(probe_module, "measure", stub(gemm=2.0, memory=2.0, overhead=2.0, collective=1.0,
                                                      step=2.0))
    later = iter([1.5, 1.6])
    monkeypatch.setattr(probe_module, "step_ratio", lambda hw: next(later))
    monkeypatch.setattr(launch, "device_type", lambda: "cpu")
    code = main(["validate", "--hardware", XEON, "--plans", "dp2,dp2 zero1", "--rescale", "--json",
                 "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.startswith("meshplan validate: probe (measured / profiled, against ") and "GEMM x2.00" in err
    result = json.loads(out)
    assert result["probe"]["gemm"] == pytest.approx(2.0) and result["probe"]["collective"] == pytest.approx(1.0)
    # the one-rank step read before the runs and after each launch: their median rescales
    assert result["probe"]["step_readings"] == pytest.approx([2.0, 1.5, 1.6])
    assert result["probe"]["step"] == pytest.approx(1.6)
    assert "after the runs, probe" in err and "one-rank step x1.60 (against its prediction; median of 3" in err
    again = result["rescaled"]["runs"]
    assert [r["profile"] for r in again] == [result["probe"]["rescaled_profile"]] * 2
    for stock, rescaled in zip(result["runs"], again):
        assert rescaled["measured_step_time_s"] == stock["measured_step_time_s"] == pytest.approx(0.3)
        assert rescaled["predicted_step_time_s"] > stock["predicted_step_time_s"]
    # the CSV carries both predictions of each run
    import pandas as pd
    table = pd.read_csv(tmp_path / "validate.csv")
    assert table["rescaled_predicted_step_time_s"].tolist() == pytest.approx([r["predicted_step_time_s"] for r in again])
    assert table["rescaled_error_pct"].tolist() == pytest.approx(
        [100 * (r["predicted_step_time_s"] / 0.3 - 1) for r in again])
    # the table, written to a pipe (capsys), keeps every column whole
    later = iter([1.5, 1.6])
    assert main(["validate", "--hardware", XEON, "--plans", "dp2,dp2 zero1", "--rescale",
                 "--out-dir", str(tmp_path)]) == 0
    rows = {cells[1].strip(): cells for cells in (line.split("│") for line in capsys.readouterr().out.splitlines())
            if len(cells) > 2}
    for stock, rescaled in zip(result["runs"], again):
        cells = [c.strip() for c in rows[stock["name"]]]
        assert f"{stock['error']:+.1%}" in cells and f"{rescaled['error']:+.1%}" in cells


def test_each_reading_is_the_median_of_its_rounds(monkeypatch):
    """A swing of the machine in one round moves one reading of each operation, not the
    probe's: each is the median of the rounds taken in turn."""
    import pandas as pd
    from meshplan.calibration import probe
    gemm, add, layer = iter([3e-3, 1e-3, 2e-3]), iter([9e-3, 5e-3, 7e-3]), iter([4e-4, 6e-4, 5e-4])
    monkeypatch.setattr(probe, "measure_gemms", lambda *a, **k: pd.DataFrame({"time_s": [next(gemm)]}))
    monkeypatch.setattr(probe, "measure_memory_bound",
                        lambda *a, **k: pd.DataFrame({"time_s": [next(add)], "bytes": [FP32_ADD_BYTES]}))
    monkeypatch.setattr(probe, "measure_host_overhead",
                        lambda **k: replace(LOCAL.overhead, layer_forward_s=next(layer)))
    monkeypatch.setattr(probe, "step_s", lambda: 0.08)
    m = probe.measure(collective=False, rounds=3)
    assert (m.gemm_s, m.add_s, m.layer_forward_s, m.collective_s, m.step_s) == (2e-3, 7e-3, 5e-4, None, 0.08)
    assert m.add_bytes == FP32_ADD_BYTES
    # the profile keeps its reading without the step, which is only ever set against the model
    gemm, add, layer = iter([3e-3, 1e-3, 2e-3]), iter([9e-3, 5e-3, 7e-3]), iter([4e-4, 6e-4, 5e-4])
    monkeypatch.setattr(probe, "step_s", lambda: pytest.fail("the step was timed"))
    assert probe.measure(collective=False, rounds=3, step=False).step_s is None


def test_a_machine_load_worker_that_dies_fails_the_probe_at_once(monkeypatch):
    """A worker that exits without its reading (here: a target that cannot take the
    arguments) fails with the exit codes, instead of waiting out the reading's timeout."""
    import time
    from meshplan.calibration.measure import machine_load
    from meshplan.executor.launch import RunFailed
    monkeypatch.setattr(machine_load, "READY_TIMEOUT_S", 3600)
    with pytest.raises(RunFailed, match=r"exit codes \[1\]"):
        with machine_load._processes_on([sorted(os.sched_getaffinity(0))[0]], time.sleep) as gather:
            gather()


def test_serving_validate_reports_the_probe_and_the_rescaled_suite(monkeypatch, tmp_path, capsys):
    """`meshplan validate --mode inference --rescale --json` probes as the training suite does:
    the step read again after each launch, and TTFT and TPOT predicted again on the rescaled
    profile beside the stock ones (a stub measurement, two recorded runs instead of the suite)."""
    import json

    from meshplan.calibration import probe as probe_module
    from meshplan.cli import main
    from meshplan.executor import launch
    from meshplan.executor.records import ServeRecord
    from meshplan.simulator.serve import simulate_inference
    from meshplan.validation import serve_suite
    from meshplan.validation.serve_suite import SERVE_MODEL, ServeValidationRun

    def recorded(name, plan) -> ServeValidationRun:
        prediction = simulate_inference(SERVE_MODEL, plan, Cluster(plan.num_gpus, plan.num_gpus), LOCAL).to_json()
        return ServeValidationRun(name, ServeRecord(
            model=SERVE_MODEL, plan=plan, dtype_requested="fp32", kv_dtype_requested="fp32", device="cpu",
            world_size=plan.num_gpus, profile="local", prediction=prediction, prediction_note="",
            ttft_s=(0.05, 0.05), decode_s=(0.2, 0.2), warmup=1,
            memory_by_rank=({"peak_bytes": 2 ** 20, "weights_bytes": 2 ** 19, "kv_cache_bytes": 2 ** 18},),
            tokens=((1,),), seed=0))

    runs = [recorded(name, plan) for name, plan in serve_suite.SUITE[:2]]

    def one_launch(*_args, after_launch=None, **_kwargs):
        after_launch()
        return runs
    monkeypatch.setattr(serve_suite, "run_suite", one_launch)
    monkeypatch.setattr(probe_module, "measure", stub(gemm=2.0, memory=2.0, overhead=2.0, collective=1.0,
                                                      step=2.0, decode=1.6))
    monkeypatch.setattr(probe_module, "step_ratio", lambda hw: 1.8)
    monkeypatch.setattr(probe_module, "decode_ratio", lambda hw: 1.2)
    monkeypatch.setattr(launch, "device_type", lambda: "cpu")
    names = ",".join(name for name, _ in serve_suite.SUITE[:2])
    code = main(["validate", "--hardware", XEON, "--mode", "inference", "--plans", names, "--rescale", "--json",
                 "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.startswith("meshplan validate: probe (measured / profiled, against ")
    assert "after the runs, probe" in err and "one-rank step x1.90 (against its prediction; median of 2" in err
    result = json.loads(out)
    assert result["probe"]["step_readings"] == pytest.approx([2.0, 1.8])
    # the decode step too, its readings' median setting the decode costs
    assert result["probe"]["decode_readings"] == pytest.approx([1.6, 1.2])
    assert "one-rank decode step x1.40 (against its prediction; median of 2" in err
    again = result["rescaled"]["runs"]
    assert [r["profile"] for r in again] == [result["probe"]["rescaled_profile"]] * 2
    for stock, rescaled in zip(result["runs"], again):
        assert rescaled["measured_ttft_s"] == stock["measured_ttft_s"] == pytest.approx(0.05)
        assert rescaled["predicted_ttft_s"] > stock["predicted_ttft_s"]
        assert rescaled["predicted_tpot_s"] > stock["predicted_tpot_s"]
    assert set(result["rescaled"]) == {"runs", "ttft", "tpot"}
    # the table shows each plan's error on the rescaled profile beside the stock one's
    assert main(["validate", "--hardware", XEON, "--mode", "inference", "--plans", names, "--rescale",
                 "--out-dir", str(tmp_path)]) == 0
    rows = {cells[1].strip(): [c.strip() for c in cells]
            for cells in (line.split("│") for line in capsys.readouterr().out.splitlines()) if len(cells) > 2}
    for stock, rescaled in zip(result["runs"], again):
        cells = rows[stock["name"]]
        assert f"{rescaled['ttft_error']:+.1%}" in cells and f"{rescaled['tpot_error']:+.1%}" in cells
