"""Measuring this machine: GEMM shapes and byte counts by hand, tiny in-process timings, the
machine description, the samples file, a real torchrun launch of 2 gloo ranks, and the
launch started again when a rank dies."""
import json
import socket

import numpy as np
import pandas as pd
import pytest

from meshplan.hw_profiles.collective_model import KINDS
from meshplan.calibration.measure.compute import MIN_REPEATS, GemmShape, cache_flush, \
    last_level_cache_bytes, measure_gemms, measure_memory_bound, time_call_s, torch_threads, \
    transformer_gemm_shapes
from meshplan.calibration.measure.machine import describe_machine, memory_bytes
from meshplan.core.cpus import cpu_model
from meshplan.calibration.measure.run import MeasurePlan, collectives_launch, launch_rows, load_samples, \
    measurement_plan, save_samples
from meshplan.calibration.samples import COLLECTIVE_COLUMNS, GEMM_COLUMNS, MEMORY_BOUND_COLUMNS, Samples
from meshplan.core.errors import ProfileError

KIB, MIB = 1024, 1024 ** 2


def test_transformer_gemm_shapes():
    shapes = transformer_gemm_shapes(hidden=512, heads=8, ffn_hidden=1408, token_counts=[128],
                                     seq_lens=[256])
    assert shapes == [GemmShape("qkv_proj", 128, 1536, 512),
                      GemmShape("attn_out_proj", 128, 512, 512),
                      GemmShape("mlp_up_proj", 128, 2048, 512),
                      GemmShape("mlp_down_proj", 128, 512, 2048),
                      GemmShape("gated_mlp_up_proj", 128, 2816, 512),
                      GemmShape("lm_head", 128, 16 * 512, 512),
                      GemmShape("attn_score", 256, 256, 64, 8),
                      GemmShape("attn_value", 256, 64, 256, 8)]


def test_measure_tiny_gemms():
    with torch_threads(1):
        df = measure_gemms([GemmShape("tiny", 16, 16, 16), GemmShape("small", 256, 256, 256, 2)],
                           ["fp32"], "cpu", repeats=5, warmup=1, budget_s=0.05)
    assert list(df.columns) == list(GEMM_COLUMNS)
    assert df["time_s"].gt(0).all() and df["time_std_s"].ge(0).all()
    assert df["repeats"].between(MIN_REPEATS, 5).all()
    assert df[["op", "m", "n", "k", "batch", "dtype"]].values.tolist() == [
        ["tiny", 16, 16, 16, 1, "fp32"], ["small", 256, 256, 256, 2, "fp32"]]
    # 8192 times the FLOPs cannot run faster.
    assert df["time_s"].iloc[1] > df["time_s"].iloc[0]


def test_gemms_are_timed_with_the_cache_swept_before_each_call():
    import torch
    order = []
    _, _, n = time_call_s(lambda: order.append("call"), torch.device("cpu"), repeats=4, warmup=2,
                          budget_s=1.0, before=lambda: order.append("sweep"))
    # warm-up and sizing calls unswept, then a sweep before each of the n timed calls
    assert order == ["call"] * 3 + ["sweep", "call"] * n and n == 4
    size = last_level_cache_bytes(torch.device("cpu"))
    if size:  # the sweep covers the whole last-level cache
        flush = cache_flush(torch.device("cpu"))
        assert flush.__self__.numel() * 4 == size
        # one buffer for every call: a fresh one per GEMM shape grew the kept heap by the
        # cache's size each time
        assert cache_flush(torch.device("cpu")).__self__ is flush.__self__


def test_memory_bound_bytes_and_dtypes():
    df = measure_memory_bound(["layer_norm", "add", "adam"], [2048], ["fp32", "bf16"], "cpu",
                              repeats=3, warmup=1, budget_s=0.01)
    assert list(df.columns) == list(MEMORY_BOUND_COLUMNS)
    got = {(r.op, r.dtype): r.bytes for r in df.itertuples()}
    # 2048 elements as [2, 1024]: layer norm reads x, weight, bias and writes y; add reads 2
    # tensors and writes 1; Adam reads p, g, m, v and writes p, m, v; adam only in fp32.
    assert got == {("layer_norm", "fp32"): (2 * 2048 + 2 * 1024) * 4,
                   ("add", "fp32"): 3 * 2048 * 4, ("adam", "fp32"): 7 * 2048 * 4,
                   ("layer_norm", "bf16"): (2 * 2048 + 2 * 1024) * 2,
                   ("add", "bf16"): 3 * 2048 * 2}
    assert df["time_s"].gt(0).all()


def test_cpu_model_and_memory_parsing():
    x86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
           "model name\t: AMD EPYC 7763 64-Core Processor\n")
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nModel\t: Raspberry Pi 4 Model B Rev 1.4\n"
    assert cpu_model(x86) == "AMD EPYC 7763 64-Core Processor"
    assert cpu_model(arm) == "Raspberry Pi 4 Model B Rev 1.4"
    assert memory_bytes("MemTotal:       24576000 kB\nMemFree: 1 kB\n") == 24576000 * 1024
    assert memory_bytes("") is None


def test_describe_machine_has_no_hostname():
    desc = describe_machine()
    assert desc["usable_cpus"] >= 1 and desc["logical_cpus"] >= desc["usable_cpus"]
    assert desc["gpu_count"] == len(desc["gpus"])
    assert desc["date_utc"].endswith("+00:00")
    host = socket.gethostname()
    text = json.dumps(desc)
    assert len(host) < 4 or host not in text


def test_quick_cpu_plan_covers_the_brief():
    plan = measurement_plan(quick=True, cuda=False, cpus=2, gpus=0)
    assert plan.device == "cpu"
    assert [w for w, _ in plan.launches] == [2, 3, 4]  # up to 2 ranks per core, at most 4
    assert plan.collective_sizes_bytes[0] == KIB and plan.collective_sizes_bytes[-1] == 64 * MIB
    assert set(plan.gemm_shapes) == {"fp32", "bf16"}
    assert [w for w, _ in measurement_plan(True, False, 1, 0).launches] == [2]


def test_samples_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    samples = Samples(
        gemm=pd.DataFrame([["x", 1, 2, 3, 1, "fp32", 1.234567890123e-7, 0.0, 5]],
                          columns=list(GEMM_COLUMNS)),
        memory_bound=pd.DataFrame(columns=list(MEMORY_BOUND_COLUMNS)),
        collectives=pd.DataFrame({"collective": "all_reduce", "group_size": 2, "ranks_per_node": 2,
                                  "message_bytes": [1024, 2048], "time_s": rng.random(2),
                                  "time_std_s": [float("nan"), 0.5], "repeats": 3}))
    path = tmp_path / "sub" / "samples.json"
    save_samples(samples, path, {"cpu_model": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["samples.json"]  # no temp file left
    back = load_samples(path)
    assert back.gemm["time_s"].iloc[0] == 1.234567890123e-7
    pd.testing.assert_frame_equal(back.collectives, samples.collectives, check_dtype=False)
    assert back.memory_bound.empty and list(back.memory_bound.columns) == list(MEMORY_BOUND_COLUMNS)
    assert json.loads(path.read_text())["machine"] == {"cpu_model": "test"}


def test_load_samples_errors(tmp_path):
    with pytest.raises(ProfileError, match="no such"):
        load_samples(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ProfileError, match="not JSON"):
        load_samples(bad)
    bad.write_text('{"format": "meshplan-samples/1", "gemm": []}')
    with pytest.raises(ProfileError, match="malformed"):
        load_samples(bad)


@pytest.mark.slow
def test_torchrun_collectives_two_ranks():
    plan = MeasurePlan("cpu", {}, (), (), (KIB, 4 * MIB), ((2, (2,)),), repeats=5, warmup=1,
                       budget_s=0.05, collective_repeats=5)
    progress = []
    df = collectives_launch(2, (2,), plan, lambda: progress.append(1))
    assert list(df.columns) == list(COLLECTIVE_COLUMNS)
    assert len(df) == len(progress) == len(KINDS) * 2
    assert set(df["collective"]) == set(KINDS)
    assert set(df["group_size"]) == {2} and set(df["ranks_per_node"]) == {2}
    assert df["time_s"].gt(0).all() and df["repeats"].ge(3).all()
    assert set(df["message_bytes"]) == {KIB, 4 * MIB}  # both divide evenly over 2 ranks


# a measurement module whose rank 0 dies as glibc's heap check kills it (SIGABRT) in the
# launches listed in $ABORT_IN (torchrun's restart counts), and otherwise writes its rows
FLAKY = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--out")
args = p.parse_args()
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
if os.environ["RANK"] == "0":
    if attempt in os.environ["ABORT_IN"].split(","):
        os.abort()
    with open(args.out, "w") as f:
        json.dump([{"attempt": int(attempt)}], f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("abort_in, rows", [("0", [{"attempt": 1}]), ("0,1", None)])
def test_a_measurement_launch_that_dies_is_started_again_once(tmp_path, monkeypatch, abort_in, rows):
    (tmp_path / "flaky_rows.py").write_text(FLAKY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("ABORT_IN", abort_in)
    if rows is not None:
        assert launch_rows("flaky_rows", [], 2, "overhead.parallel", "the probe") == rows
        return
    with pytest.raises(ProfileError, match=r"overhead.parallel: the probe failed: rank 0 .* SIGABRT"):
        launch_rows("flaky_rows", [], 2, "overhead.parallel", "the probe")
