"""`meshplan run`: plans refused before anything launches (one stderr line, exit 2), the
--json keys of a real run, and the run record."""
from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from meshplan.executor import launch as launch_module
from meshplan.executor.launch import check_train, root_cause
from meshplan.executor.options import RunOptions, training_fields
from meshplan.executor.records import RunRecord
from meshplan.cli import main
from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan

MODEL = ModelSpec("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=64, vocab_size=128, max_seq_len=64)
TIED = ModelSpec("tiny-tied", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=4,
                 ffn_hidden_size=64, vocab_size=128, max_seq_len=64, tied_embeddings=True)


@pytest.fixture()
def config_json(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MODEL.to_dict()))
    return str(path)


@pytest.fixture()
def no_launch(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("torchrun was started for a refused plan")
    monkeypatch.setattr(launch_module, "torchrun", fail)


def test_illegal_plan_exits_2_with_one_line_and_launches_nothing(config_json, capsys, no_launch):
    code = main(["run", "--model", config_json, "--gpus", "3", "--tp", "3",
                 "--global-batch", "8", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("meshplan run: error: --tp: 3 does not divide the 4 attention heads")


@pytest.mark.parametrize("model, fields, options, field", [
    (MODEL, dict(pp=2, global_batch=2, micro_batch=2), {}, "plan.global_batch"),
    (MODEL, dict(dp=2), dict(nnodes=3), "run.nnodes"),
    (MODEL, dict(dp=2), dict(nnodes=2), "run.rdzv_endpoint"),
    (MODEL, dict(dp=2), dict(steps=3, warmup=3), "run.warmup"),
    (MODEL, dict(dp=2, attention="cudnn"), {}, "plan.attention"),  # this machine has no CUDA device
    (MODEL, dict(dp=2, zero=3, fsdp_layout="flat"), {}, "plan.fsdp_layout"),  # its ZeRO-3 is FSDP2's
])
def test_executor_refusals_name_the_field(model, fields, options, field):
    plan = Plan(**{"global_batch": 8, "seq_len": 32, **fields})
    with pytest.raises(PlanError) as err:
        check_train(model, plan, Cluster(plan.world_size, plan.world_size),
                        RunOptions(**options))
    assert err.value.field == field


def test_token_file_is_checked(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(1000) % 300)  # ids beyond the 128-token vocab
    plan = Plan(global_batch=8, seq_len=32, dp=2)
    with pytest.raises(PlanError, match="outside the vocab"):
        check_train(MODEL, plan, Cluster(2, 2), RunOptions(data=str(path)))


def test_pipeline_partition_is_filled_in_evenly():
    plan = Plan(global_batch=8, seq_len=32, pp=2, micro_batch=2)
    big = ModelSpec("odd", 5, 32, 4, 4, 64, 128, 64)
    assert check_train(big, plan, Cluster(2, 2), RunOptions()).layer_partition == (3, 2)


def test_pipeline_partition_is_priced_as_the_ranks_compute():
    """The split check_train fills in is the one the simulator picks for the plan as it runs
    (fp32 on CPU ranks, whatever dtype the plan asked), not for the asked dtype. tiny-llama's
    4 layers under zb-h1 on the Xeon VM's profile (local.json, named by path: `local` is the
    profile of the CPU the test runs on, and the EPYC's prices (3, 1) in both): (3, 1) in
    fp32, where bf16 prices (2, 2); interleaved runs of both measured 170-173 ms against
    198-208 ms (2026-12-05)."""
    import dataclasses

    from meshplan.hw_profiles.profile import DATA_DIR
    from meshplan.simulator.model_spec import load_model
    from meshplan.simulator.train import pipeline_partition

    tiny = load_model("examples/tiny-llama/config.json")
    plan = Plan(global_batch=8, seq_len=128, pp=2, schedule="zb-h1")
    xeon = str(DATA_DIR / "local.json")
    cluster, hw = Cluster(2, 2), load_profile(xeon)
    chosen = check_train(tiny, plan, cluster, RunOptions(profile=xeon)).layer_partition
    ran = dataclasses.replace(plan, **training_fields(plan.dtype, "cpu", plan.cross_entropy))
    assert chosen == pipeline_partition(tiny, ran, cluster, hw)
    assert chosen != pipeline_partition(tiny, dataclasses.replace(ran, dtype="bf16"), cluster, hw)


def test_root_cause_names_the_first_failed_rank():
    report = """Root Cause (first observed failure):
[0]:
  time      : 2025-01-01_00:00:00
  host      : node7
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
============================================================"""
    assert root_cause(report).startswith(
        "rank 3 (local rank 1 on node7) failed first, with killed by signal SIGKILL")
    assert root_cause("no report here") is None


def test_root_cause_passes_over_a_rank_torchrun_stopped():
    """torchrun timestamps rank 0's broken collective (it then SIGTERMs it) before it sees
    rank 1's exit: rank 1's exit is the cause."""
    report = """Failures:
[1]:
  time      : 2025-01-01_00:00:01
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 17 (pid: 4243)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2025-01-01_00:00:01
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 4242)  (SIGTERM)
  error_file: /tmp/error.json
  traceback : Traceback (most recent call last):
  RuntimeError: [pair.cc:537] Read error [127.0.0.1]:20904: Connection reset by peer.
============================================================"""
    assert root_cause(report) == ("rank 1 (local rank 1 on localhost) failed first, with exit "
                                  "code 17; torchrun stopped the other ranks")


@pytest.mark.slow
def test_json_keys_and_record(config_json, tmp_path):
    record_path = tmp_path / "out" / "record.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meshplan.cli", "run", "--model", config_json, "--gpus", "2",
         "--dp", "2", "--global-batch", "4", "--micro-batch", "1", "--seq-len", "16",
         "--steps", "4", "--warmup", "1", "--json", "--record", str(record_path), "--no-probe"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run dp2" not in proc.stderr  # no progress bar with --json or off a terminal
    assert "probe" not in proc.stderr
    out = json.loads(proc.stdout)
    assert "probe" not in out and "rescaled" not in out
    assert out["plan"]["dp"] == 2 and out["world_size"] == 2
    assert out["profile"] == "local"
    assert out["dtype"] == "fp32"  # a bf16 plan runs its compute in fp32 on CPU
    assert isinstance(out["measured_step_time_s"], float) and out["measured_step_time_s"] > 0
    assert len(out["measured_step_times_s"]) == 3
    assert isinstance(out["step_time_spread_s"], float) and out["step_time_spread_s"] >= 0
    assert out["tokens_per_s"] == pytest.approx(4 * 16 / out["measured_step_time_s"])
    assert len(out["losses"]) == 4 and all(isinstance(x, float) for x in out["losses"])
    assert len(out["measured_peak_memory_by_rank_bytes"]) == 2
    assert out["measured_peak_memory_bytes"] == max(out["measured_peak_memory_by_rank_bytes"])
    assert out["memory_method"].startswith("counted: ")  # CPU ranks: no allocator statistics
    for key in ("predicted_step_time_s", "predicted_peak_memory_bytes"):
        assert key in out and (out[key] is None or isinstance(out[key], float))
    if out["predicted_step_time_s"] is None:
        assert out["prediction_note"].startswith("no prediction")
    record = RunRecord.from_json(json.loads(record_path.read_text()))
    assert record.losses == tuple(out["losses"])
    assert record.dtype_requested == "bf16"
    assert record.summary_json() == out


@pytest.mark.slow
def test_probe_and_rescaled_prediction(config_json):
    """The probe (GEMM, add, layer overhead, one-rank step; no collective for one rank)
    against the local profile before the run, and with --rescale the prediction on the
    rescaled profile beside the stock one."""
    proc = subprocess.run(
        [sys.executable, "-m", "meshplan.cli", "run", "--model", config_json, "--gpus", "1",
         "--global-batch", "2", "--seq-len", "16", "--steps", "3", "--warmup", "1", "--json",
         "--rescale"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "meshplan run: probe (measured / profiled, against " in proc.stderr
    out = json.loads(proc.stdout)
    probe = out["probe"]
    assert all(probe[k] > 0 for k in ("gemm", "memory", "overhead", "step")) and probe["collective"] is None
    # the step read before and after the run; the rescale takes their median
    assert len(probe["step_readings"]) == 2 and probe["step"] == pytest.approx(sum(probe["step_readings"]) / 2)
    assert "meshplan run: after the run, probe" in proc.stderr
    assert probe["band"] == pytest.approx(load_profile("local").relative_error_band()[1])
    rescaled = out["rescaled"]
    assert rescaled["profile"] == probe["rescaled_profile"] and rescaled["profile"].startswith(load_profile("local").name + "[")
    assert out["profile"] == "local" and out["predicted_step_time_s"] > 0
    assert rescaled["predicted_step_time_s"] > 0
    assert rescaled["predicted_step_time_s"] != out["predicted_step_time_s"]
    assert rescaled["predicted_peak_memory_bytes"] == out["predicted_peak_memory_bytes"]


def _drain(fd: int) -> None:
    """Read a pseudo-terminal until its writers are gone, so they never block on it."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def _tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (the run's torchrun and ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and tag.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_ctrl_c_stops_every_rank(config_json):
    """On a terminal the run draws its progress bar (rich, on stderr); Ctrl-C while it runs
    stops torchrun and every rank and exits 130."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, MESHPLAN_TEST_TAG=tag)
    # A shell-less child may inherit SIGINT ignored; restore Python's handler as a terminal has it.
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from meshplan.cli import main; sys.exit(main(sys.argv[1:]))")
    terminal, stderr = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script, "run", "--model", config_json,
                             "--gpus", "2", "--dp", "2", "--global-batch", "4", "--seq-len", "16",
                             "--steps", "100000", "--warmup", "1", "--no-probe"],
                            stderr=stderr, env=env)
    os.close(stderr)
    seen, deadline = b"", time.monotonic() + 120
    while b"run dp2" not in seen and time.monotonic() < deadline:
        seen += os.read(terminal, 4096)
    assert b"run dp2" in seen, seen[-2000:]
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    drain = threading.Thread(target=_drain, args=(terminal,), daemon=True)
    drain.start()
    proc.wait(timeout=60)
    assert proc.returncode == 130
    assert time.monotonic() - start < 30
    assert _tagged_processes(tag) == []


def _start_long_run(config_json: str, tag: str) -> subprocess.Popen:
    """A run of many steps, its stderr in a pipe, every process it starts tagged."""
    return subprocess.Popen(
        [sys.executable, "-m", "meshplan.cli", "run", "--model", config_json, "--gpus", "2",
         "--dp", "2", "--global-batch", "4", "--seq-len", "16", "--steps", "100000",
         "--warmup", "1", "--no-probe"], stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, MESHPLAN_TEST_TAG=tag))


def _wait_for_ranks(tag: str, launcher: int, count: int = 2, timeout_s: float = 120) -> None:
    """Until `count` ranks (tagged processes besides the launcher and torchrun) run."""
    deadline = time.monotonic() + timeout_s
    while len(set(_tagged_processes(tag)) - {launcher}) < count + 1:
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.5)
    time.sleep(3)  # past process-group set-up, into the steps


@pytest.mark.slow
def test_sigterm_stops_every_rank_like_ctrl_c(config_json):
    """SIGTERM ends the run as Ctrl-C does: exit 130, one `interrupted` line, no traceback
    from torchrun or the ranks, no process left."""
    tag = uuid.uuid4().hex
    proc = _start_long_run(config_json, tag)
    _wait_for_ranks(tag, proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "meshplan run: interrupted"
    assert "Traceback" not in err
    assert _tagged_processes(tag) == []


def test_stop_kills_ranks_in_their_own_session_when_torchrun_lingers(monkeypatch):
    """torchrun starts each rank in a session of its own; when torchrun does not stop within
    the grace, the SIGKILL to its group alone would leave such a rank running."""
    monkeypatch.setattr(launch_module, "STOP_GRACE_S", 1)
    tag = uuid.uuid4().hex
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {stubborn + 'time.sleep(600)'!r}], start_new_session=True); "
    parent = subprocess.Popen([sys.executable, "-c", stubborn + child + "time.sleep(600)"],
                              start_new_session=True, env=dict(os.environ, MESHPLAN_TEST_TAG=tag))
    deadline = time.monotonic() + 30
    while len(_tagged_processes(tag)) < 2:
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.1)
    launch_module._stop(parent)
    assert parent.returncode == -signal.SIGKILL
    assert _tagged_processes(tag) == []


@pytest.mark.slow
def test_torchrun_does_not_outlive_a_killed_launcher(config_json):
    tag = uuid.uuid4().hex
    proc = _start_long_run(config_json, tag)
    _wait_for_ranks(tag, proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while _tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _tagged_processes(tag) == []


@pytest.mark.slow
def test_a_node_that_finds_no_rendezvous_fails_with_a_message(config_json):
    """Node 1 started alone: the run ends within the rendezvous timeout (plus torchrun's
    start) with one line saying what to do, instead of waiting for ever."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meshplan.cli", "run", "--model", config_json, "--gpus", "2",
         "--dp", "2", "--global-batch", "4", "--seq-len", "16", "--nnodes", "2", "--node-rank", "1",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout-s", "3", "--no-probe"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert time.monotonic() - start < 60
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"meshplan run: run failed: could not reach the rendezvous at 127.0.0.1:{port} within 3 s")
