"""benchmarks/gpu_check.py, as far as a machine without a GPU can take it: without CUDA it
says so and exits 0; with --device cpu it runs every step of the GPU path at tiny sizes
(measure, fit, `meshplan run` training and serving, predicted vs measured, outputs); and
the checks it will run on a GPU are legal plans that fit an 80 GB device."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshplan.executor.launch import check_serve, check_train
from meshplan.executor.options import RunOptions, ServeOptions
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import InferencePlan

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
from gpu_check import GPU_CHECKS  # noqa: E402


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stderr.startswith("gpu_check: no CUDA device on this machine")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_cpu_dry_run_writes_profile_records_and_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_profile(str(out / "profile.json")).name == "gpu-check-cpu"
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    rows = {(r["check"], r["quantity"]): r for r in results["rows"]}
    assert set(rows) == {("train tiny", "step_time_s"), ("train tiny", "peak_memory_bytes"),
                         ("serve tiny", "ttft_s"), ("serve tiny", "tpot_s"),
                         ("serve tiny", "peak_memory_bytes")}
    assert all(r["measured"] > 0 and r["predicted"] > 0 and r["predicted_stock"] > 0
               for r in rows.values())
    record = json.loads((out / "records" / "train-tiny.json").read_text())
    assert record["measurement"]["step_time_s"] == rows[("train tiny", "step_time_s")]["measured"]
    assert proc.stdout == (out / "results.txt").read_text()
    assert proc.stdout.splitlines()[0].split()[:3] == ["check", "quantity", "measured"]


def _flags(check) -> dict:
    flags, it = {}, iter(check.flags)
    for flag in it:
        flags[flag] = next(it)
    return flags


@pytest.mark.parametrize("check", GPU_CHECKS, ids=lambda c: c.name)
def test_the_gpu_checks_pass_pre_flight_on_an_80_gb_gpu(check):
    """On a CPU machine pre-flight compares memory with the profile's: a100-80gb's 80 GB."""
    f = _flags(check)
    if check.serving:
        plan = InferencePlan(tp=1, pp=1, replicas=1, batch=int(f["--batch"]),
                             prompt_len=int(f["--prompt-len"]), gen_len=int(f["--gen-len"]),
                             dtype=f["--dtype"], kv_dtype=f["--dtype"])
        check_serve(check.model, plan, Cluster(1, 1), ServeOptions(profile="a100-80gb"))
    else:
        plan = Plan(global_batch=int(f["--global-batch"]), micro_batch=int(f["--micro-batch"]),
                    seq_len=int(f["--seq-len"]), dtype=f["--dtype"],
                    recompute=f.get("--recompute", "none"))
        check_train(check.model, plan, Cluster(1, 1),
                    RunOptions(profile="a100-80gb", steps=int(f["--steps"]), warmup=int(f["--warmup"])))
