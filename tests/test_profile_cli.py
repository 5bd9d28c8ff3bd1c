"""`meshplan profile` as a user runs it: nccl-tests import against the logs' own numbers, the
calibration report, the committed local profile, one-line errors that leave no output."""
from functools import partial
import json
import re
from pathlib import Path

import pytest

from meshplan.calibration.build_stock import fit_table
from meshplan.calibration.local_base import cpu_base, cuda_base, known_gpu
from meshplan.calibration.probe import compare, reference
from meshplan.hw_profiles.profile import (DATA_DIR, available_profiles, cpu_device_name, load_profile,
                                         local_profile_name, profile_path, samples_path)
from meshplan.calibration.samples import Samples
from tests import cli

NCCL = Path(__file__).parent / "data" / "nccl"
US = 1e-6


meshplan = partial(cli.meshplan, timeout=120)  # this file's hang guard, seconds


def log_rows(path: Path) -> list[tuple[int, float]]:
    """(size bytes, out-of-place time s) of each result row, read straight from the log: the
    first column and the sixth (nccl-tests' out-of-place time in us)."""
    rows = []
    for line in path.read_text().splitlines():
        tokens = re.sub(r"^\[\d+,\d+\]<stdout>:", "", line).split()
        if len(tokens) in (9, 13) and tokens[0].isdigit():
            rows.append((int(tokens[0]), float(tokens[5]) * US))
    return rows


@pytest.mark.parametrize("log,base,kind,group,per_node,quantity", [
    ("all_reduce_perf_8xA100.txt", "a100-80gb", "all_reduce", 8, 8, "collective/intra/all_reduce/n8"),
    ("all_gather_perf_2x8xH100.txt", "h100-80gb", "all_gather", 16, 8, "collective/inter/all_gather/r8"),
])
def test_import_matches_the_logs_times_within_the_fit_residual(tmp_path, log, base, kind, group,
                                                               per_node, quantity):
    out = tmp_path / "cluster.json"
    run = meshplan("profile", "--import-nccl-tests", NCCL / log, "--base", base, "--out", out)
    assert run.returncode == 0, run.stderr
    assert quantity in run.stdout  # the fit table is printed
    hw, stock = load_profile(str(out)), load_profile(base)
    assert hw.name == "cluster" and hw.gemm == stock.gemm and hw.peak_flops == stock.peak_flops
    assert any(log in s for s in hw.sources)
    q = hw.fit_report[quantity]
    worst = max(q["fitted"]["max"], q["held_out"].get("max", 0.0))
    rows = log_rows(NCCL / log)
    assert len(rows) == q["fitted"]["points"] + q["held_out"]["points"]
    for size, measured_s in rows:
        predicted_s = hw.collective_time_s(kind, size, group, per_node)
        assert abs(predicted_s / measured_s - 1) <= worst + 1e-9, size
    assert worst < 0.1  # nccl-tests curves are smooth: the alpha-beta fit follows them closely
    assert samples_path(out).is_file()


def test_intra_only_log_keeps_the_base_inter_node_level(tmp_path):
    out = tmp_path / "a.json"
    assert meshplan("profile", "--import-nccl-tests", NCCL / "all_reduce_perf_8xA100.txt",
                    "--base", "a100-80gb", "--out", out).returncode == 0
    hw, stock = load_profile(str(out)), load_profile("a100-80gb")
    assert hw.collectives.inter == stock.collectives.inter
    assert hw.collectives.intra["all_reduce"][2] == stock.collectives.intra["all_reduce"][2]
    assert hw.collectives.intra["all_reduce"][8] != stock.collectives.intra["all_reduce"][8]


def test_corrupt_log_is_one_line_naming_the_file_and_writes_nothing(tmp_path):
    lines = (NCCL / "all_reduce_perf_8xA100.txt").read_text().splitlines()
    bad_line = next(i for i, line in enumerate(lines) if line.strip().startswith("1048576"))
    lines[bad_line] = lines[bad_line].replace("32.96", "3x.96")
    log = tmp_path / "broken_all_reduce_perf.txt"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "p.json"
    run = meshplan("profile", "--import-nccl-tests", log, "--base", "a100-80gb", "--out", out)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert f"{log}:{bad_line + 1}" in run.stderr
    assert not out.exists() and not samples_path(out).exists()
    assert list(tmp_path.iterdir()) == [log]  # no temp files either


def test_flag_errors_are_one_line():
    for args, field in ((["--import-nccl-tests", NCCL / "all_reduce_perf_8xA100.txt", "--out", "x.json"],
                         "--base"),
                        (["--out", "x.txt"], "--out"),
                        (["--report", "local", "--quick", "--out", "x.html"], "--quick")):
        run = meshplan("profile", *args)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
        assert field in run.stderr


def test_every_conflicting_profile_flag_is_named_at_once():
    run = meshplan("profile", "--list", "--out", "x.json", "--quick", "--holdout", "0.9")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    for field in ("--out", "--quick", "--holdout"):
        assert f"{field}:" in run.stderr


def test_report_of_the_committed_local_profile(tmp_path):
    out = tmp_path / "calib.html"
    run = meshplan("profile", "--report", "local", "--out", out)
    assert run.returncode == 0, run.stderr
    page = out.read_text()
    hw = load_profile("local")
    quantities = list(fit_table(hw).index)
    assert {"gemm/fp32", "memory_bound/fp32", "collective/intra/all_reduce/n2"} <= set(quantities)
    for q in quantities:
        anchor = "q-" + re.sub(r"[^A-Za-z0-9]+", "-", q)
        assert f'id="{anchor}"' in page and f'id="{anchor}-plot"' in page, q
    assert page.count("plotly.js v") >= 1  # the library is inlined: the page opens offline
    assert '"name":"held-out' in page.replace(" ", "") and '"name":"fitted' in page.replace(" ", "")
    # the decode GEMMs' cached reads, one line per row count measured
    assert 'id="cached-reads"' in page and 'id="cached-reads-plot"' in page
    assert all(f'"name":"{rows:g}-row GEMMs"' in page for rows in hw.cached_reads.rows)


def test_report_without_samples_names_the_missing_file(tmp_path):
    profile = tmp_path / "mine.json"
    profile.write_text((DATA_DIR / "local.json").read_text())
    run = meshplan("profile", "--report", profile, "--out", tmp_path / "r.html")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert str(samples_path(profile)) in run.stderr and "meshplan profile --out" in run.stderr
    assert "error: --report:" in run.stderr
    assert not (tmp_path / "r.html").exists()

    derived = meshplan("profile", "--report", "h200-141gb", "--out", tmp_path / "r.html")
    assert derived.returncode == 2 and "--report h100-80gb" in derived.stderr  # a datasheet variant
    assert not (tmp_path / "r.html").exists()


def test_a_bad_profile_argument_names_its_own_flag(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x"')
    for args, flag in ((["--report", broken, "--out", tmp_path / "r.html"], "--report"),
                       (["--report", "nosuch", "--out", tmp_path / "r.html"], "--report"),
                       (["--import-nccl-tests", NCCL / "all_reduce_perf_8xA100.txt", "--base", "nosuch",
                         "--out", tmp_path / "p.json"], "--base")):
        run = meshplan("profile", *args)
        assert run.returncode == 2 and f"error: {flag}:" in run.stderr and "--hardware" not in run.stderr


@pytest.mark.parametrize("name", [n for n in available_profiles() if n == "local" or n.startswith("local-")])
def test_committed_local_profile_describes_this_kind_of_machine(name):
    hw = load_profile(str(DATA_DIR / f"{name}.json"))  # by path: `local` is this machine's
    machine = hw.extra["machine"]
    assert hw.device_name == cpu_device_name(machine["cpu_model"])
    assert hw.intra_node_link == "shared-memory" and hw.nics_per_node == 1
    assert hw.extra["cores_per_node"] >= 1 and hw.gpus_per_node >= 2
    assert hw.memory_bytes == machine["memory_bytes"] // hw.gpus_per_node
    assert hw.extra["measurement"]["quick"] is False
    samples = json.loads(samples_path(DATA_DIR / f"{name}.json").read_text())
    best_fp32 = max(2 * r["m"] * r["n"] * r["k"] * r["batch"] / r["time_s"]
                    for r in samples["gemm"] if r["dtype"] == "fp32")
    assert hw.peak_flops["fp32"] == pytest.approx(best_fp32) == hw.peak_flops["tf32"]
    median, p95 = hw.relative_error_band()
    assert 0 < median < p95
    assert f"{name}.samples" not in available_profiles()


def test_local_is_the_profile_of_this_machines_cpu():
    """Each committed CPU profile stands for `local` on the CPU it was measured on; an
    unprofiled CPU gets local.json (and the probe's drift report)."""
    committed = [n for n in available_profiles() if n.startswith("local-")]
    assert committed  # beside local.json, at least one other CPU's
    for name in ["local", *committed]:
        machine = load_profile(str(DATA_DIR / f"{name}.json")).extra["machine"]
        assert local_profile_name(machine["cpu_model"]) == name
    assert local_profile_name("No Such CPU") == "local"
    assert profile_path("local") == DATA_DIR / f"{local_profile_name()}.json"


@pytest.mark.parametrize("damage,field", [
    (lambda d: d.pop("gemm"), "gemm"),
    (lambda d: d["gemm"].pop("bf16"), "gemm.bf16"),
    (lambda d: d["collectives"]["intra"].update(all_reduce={"eight": {}}), "collectives.intra.all_reduce"),
    (lambda d: d["peak_flops"].update(fp16="fast"), "peak_flops.fp16"),
])
def test_damaged_profile_given_to_simulate_is_one_line(tmp_path, damage, field):
    data = json.loads((DATA_DIR / "a100-80gb.json").read_text())
    damage(data)
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(data))
    run = meshplan("simulate", "--model", "llama-2-7b", "--hardware", path, "--gpus", "8",
                   "--global-batch", "8", "--seq-len", "512")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert str(path) in run.stderr and field in run.stderr


def test_truncated_profile_given_to_simulate_is_one_line(tmp_path):
    path = tmp_path / "half.json"
    text = (DATA_DIR / "a100-80gb.json").read_text()
    path.write_text(text[: len(text) // 2])
    run = meshplan("simulate", "--model", "llama-2-7b", "--hardware", path, "--gpus", "8",
                   "--global-batch", "8", "--seq-len", "512")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert str(path) in run.stderr and "hardware" in run.stderr


def _samples(gemm, memory, collectives) -> Samples:
    import pandas as pd

    from meshplan.calibration.samples import COLLECTIVE_COLUMNS, GEMM_COLUMNS, MEMORY_BOUND_COLUMNS
    return Samples(pd.DataFrame(gemm, columns=list(GEMM_COLUMNS)),
                   pd.DataFrame(memory, columns=list(MEMORY_BOUND_COLUMNS)),
                   pd.DataFrame(collectives, columns=list(COLLECTIVE_COLUMNS)))


HAND = _samples(
    # 2*64*64*64 = 524288 FLOP in 1 ms, 2*128^3 = 4194304 FLOP in 2 ms: best 2.097 GFLOP/s
    [("a", 64, 64, 64, 1, "fp32", 1e-3, 0, 3), ("b", 128, 128, 128, 1, "fp32", 2e-3, 0, 3),
     ("c", 64, 64, 64, 1, "bf16", 4e-3, 0, 3)],
    [("add", 3000, "fp32", 1e-6, 0, 3), ("add", 8000, "fp32", 2e-6, 0, 3)],  # best 4 GB/s
    # send_recv busbw = bytes / time: 1e6 B / 1 ms = 1 GB/s; all_reduce n=4 would be faster but
    # the point-to-point figure is the network stand-in
    [("send_recv", 2, 2, 10**6, 1e-3, 0, 3), ("all_reduce", 4, 4, 10**7, 1e-3, 0, 3)])
MACHINE = {"cpu_model": "Test CPU", "usable_cpus": 2, "memory_bytes": 16 * 2**30, "gpu_count": 0,
           "gpus": [], "torch": "x", "date_utc": "d", "measurement": {"device": "cpu", "quick": True}}


def test_cpu_base_from_hand_computed_samples():
    base = cpu_base(HAND, MACHINE, "t")
    assert base["peak_flops"]["fp32"] == pytest.approx(4194304 / 2e-3)
    assert base["peak_flops"]["tf32"] == base["peak_flops"]["fp32"]
    assert base["peak_flops"]["bf16"] == base["peak_flops"]["fp16"] == pytest.approx(524288 / 4e-3)
    assert base["hbm_bytes_per_s"] == pytest.approx(4e9)
    assert base["nic_bytes_per_s"] == pytest.approx(1e9)
    assert base["gpus_per_node"] == 4 and base["memory_bytes"] == 4 * 2**30
    assert base["extra"]["cores_per_node"] == 2 and "measurement" in base["extra"]
    assert "measurement" not in base["extra"]["machine"]


def test_cuda_base_uses_datasheet_peaks_for_known_gpus():
    machine = {**MACHINE, "gpu_count": 8, "cuda": "12.4", "measurement": {"device": "cuda"},
               "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85 * 10**9}] * 8}
    base = cuda_base(HAND, machine, "h")
    assert base["peak_flops"]["bf16"] == pytest.approx(989.5e12)  # H100 SXM, dense
    assert base["hbm_bytes_per_s"] == pytest.approx(3.35e12) and base["gpus_per_node"] == 8
    assert base["memory_bytes"] == 85 * 10**9 and "cores_per_node" not in base["extra"]
    assert known_gpu("NVIDIA H100 PCIe").hbm_bytes_per_s == pytest.approx(2.0e12)
    assert known_gpu("NVIDIA A100-SXM4-40GB").hbm_bytes_per_s == pytest.approx(1.555e12)
    assert known_gpu("NVIDIA A100 80GB PCIe").hbm_bytes_per_s == pytest.approx(1.935e12)
    assert known_gpu("NVIDIA L40S").peak_flops["fp32"] == pytest.approx(91.6e12)
    assert known_gpu("NVIDIA L4").peak_flops["fp32"] == pytest.approx(30.3e12)
    assert known_gpu("NVIDIA A10").hbm_bytes_per_s == pytest.approx(0.6e12)
    assert known_gpu("Some Future GPU") is None
    unknown = {**machine, "gpus": [{"name": "Some Future GPU", "memory_bytes": 1}]}
    assert cuda_base(HAND, unknown, "u")["peak_flops"]["fp32"] == pytest.approx(4194304 / 2e-3)


@pytest.mark.slow
def test_quick_measurement_end_to_end(tmp_path, monkeypatch):
    """The whole path (measure, torchrun collectives, fit, the probe's reading, save) with the
    quick plan trimmed to one 2-rank launch, fewer overhead calls and one neighbour round, so
    that it stays under a minute on a 2-core machine."""
    from dataclasses import replace

    import meshplan.calibration.measure.run as measure_run
    from meshplan.cli import main

    import meshplan.calibration.local_profile as local_profile
    import meshplan.calibration.overhead as overhead

    quick = measure_run.measurement_plan
    monkeypatch.setattr(measure_run, "measurement_plan", lambda *a: replace(
        quick(*a), launches=((2, (2,)),), collective_sizes_bytes=(1024, 2**16, 2**20, 2**22)))
    # the two-rank overhead probe at a third of its calls, the neighbour reading in one round
    monkeypatch.setattr(overhead, "TWO_RANK_REPEATS", 1)
    slowdown = local_profile.neighbour_slowdown
    monkeypatch.setattr(local_profile, "neighbour_slowdown", lambda ranks, rounds: slowdown(ranks, rounds=1))
    out = tmp_path / "p.json"
    assert main(["profile", "--quick", "--out", str(out)]) == 0
    hw = load_profile(str(out))
    assert hw.name == "p" and hw.gpus_per_node == 2 and hw.extra["measurement"]["quick"]
    # the drift probe's reading kept with it: a probe reading the same finds no drift
    then = reference(hw)
    assert then.collective_s > 0 and then.step_s is None  # the step is set against the model, never kept
    probe = compare(hw, then)
    assert (probe.gemm, probe.memory, probe.overhead, probe.collective, probe.against) == (1, 1, 1, 1, "reference")
    # decode's cached reads and attention kernel measured with it
    assert hw.cached_reads.working_set_bytes[-1] <= 2 ** 28 and hw.attention.decode_bytes_per_s > 0
    assert samples_path(out).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.samples.json"]


def test_list_names_every_stock_profile_and_what_its_figures_rest_on():
    out = meshplan("profile", "--list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert set(rows) == set(available_profiles())
    assert rows["h100-80gb"]["basis"] == "measured" and rows["h200-141gb"]["basis"] == "h100-80gb x datasheet"
    assert rows["h200-141gb"]["memory_gib"] == pytest.approx(80 * 141 / 80)
    assert rows["h200-141gb"]["bf16_tflops"] == rows["h100-80gb"]["bf16_tflops"]
    for flags, field in ((["--list", "--out", "x.json"], "--out"), (["--json", "--out", "x.json"], "--json"),
                         ([], "--out")):
        refused = meshplan("profile", *flags)
        assert refused.returncode == 2 and f"error: {field}:" in refused.stderr
