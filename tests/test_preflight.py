"""Pre-flight: what `meshplan run` refuses before any rank starts, each cause one line naming
its field (exit 2, torchrun never called): memory over the device's less the reserve, more
ranks than devices, a rendezvous node 0 cannot host, a token file that does not fit, a
checkpoint folder that does not fit the run, bad numbers in the run options."""
from __future__ import annotations

import json
import math
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from meshplan.cli import main
from meshplan.core.errors import PlanError
from meshplan.core.units import GIB
from meshplan.executor import checkpoint
from meshplan.executor import launch as launch_module
from meshplan.executor.launch import check_serve, check_train
from meshplan.executor.options import RunOptions, ServeOptions, training_fields
from meshplan.hw_profiles.profile import load_profile, profile_path
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import InferencePlan
from meshplan.simulator.train import simulate

MODEL = ModelSpec("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=64, vocab_size=128, max_seq_len=64)
PLAN = Plan(global_batch=8, seq_len=16, dp=2, dtype="fp32")
CLUSTER = Cluster(2, 2)


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("torchrun was started although pre-flight refused the run")
    monkeypatch.setattr(launch_module, "torchrun", fail)


@pytest.fixture()
def config_json(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MODEL.to_dict()))
    return str(path)


def refused(*options, **fields) -> PlanError:
    with pytest.raises(PlanError) as err:
        check_train(MODEL, PLAN, CLUSTER, RunOptions(*options, **fields))
    return err.value


def cli(capsys, config_json: str, *flags: str) -> str:
    """The run's one stderr line; exit code 2 asserted."""
    code = main(["run", "--model", config_json, "--gpus", "2", "--dp", "2", "--global-batch", "8",
                 "--seq-len", "16", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    return err


# ---- memory ----

def _profile_with_memory(tmp_path: Path, memory_bytes: int) -> str:
    data = json.loads(profile_path("local").read_text())
    data["memory_bytes"] = memory_bytes
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_memory_is_checked_against_the_profile_less_the_reserve(tmp_path):
    """The reserve is 5% of the device plus 1 GiB (simulator/memory.py): a rank needing P
    bytes fits a device of (P + 1 GiB) / 0.95 bytes and not one a few bytes smaller."""
    ran = replace(PLAN, **training_fields(PLAN.dtype, "cpu", PLAN.cross_entropy))  # the executor's kernels
    peak = simulate(MODEL, ran, CLUSTER, load_profile("local")).peak_memory_bytes
    enough = math.ceil((peak + GIB) / 0.95) + 1
    check_train(MODEL, PLAN, CLUSTER, RunOptions(profile=_profile_with_memory(tmp_path, enough)))
    err = refused(profile=_profile_with_memory(tmp_path, enough - 64))
    assert err.field == "plan"
    assert "GiB per rank at its peak" in err.problem


def test_a_model_too_big_for_the_profile_is_refused_in_one_line(capsys):
    err = cli(capsys, "llama-2-7b")
    assert err.startswith("meshplan run: error: plan: needs ")
    assert "usable of the 5.89 GiB of a rank in profile local" in err


def test_serving_memory_is_checked(tmp_path):
    plan = InferencePlan(tp=1, pp=1, replicas=1, batch=4, prompt_len=16, gen_len=8)
    with pytest.raises(PlanError) as err:
        check_serve(MODEL, plan, Cluster(1, 1),
                    ServeOptions(profile=_profile_with_memory(tmp_path, GIB)))
    assert err.value.field == "plan"


# ---- world size and devices ----

def test_zero_gpus_is_refused_not_run_on_one_rank(capsys, config_json):
    code = main(["run", "--model", config_json, "--gpus", "0", "--global-batch", "8",
                 "--seq-len", "16"])
    assert code == 2
    assert capsys.readouterr().err.startswith("meshplan run: error: --gpus: must be a positive")


def test_more_ranks_per_node_than_cuda_devices_is_refused(monkeypatch):
    monkeypatch.setattr(launch_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch_module.torch.cuda, "device_count", lambda: 1)
    err = refused()
    assert err.field == "cluster.gpus_per_node"
    assert "2 ranks per node, but this machine has 1 CUDA devices" in err.problem


def test_cpu_ranks_crowding_the_cores_beyond_validate_get_a_note(monkeypatch):
    """Up to VALIDATED_RANKS_PER_CORE CPU ranks a core run as validate runs them; beyond, a
    note; CUDA ranks have a device each."""
    monkeypatch.setattr(launch_module.os, "sched_getaffinity", lambda pid: {0, 1})
    assert launch_module.crowding_note(4) is None
    assert launch_module.crowding_note(5).startswith("5 ranks share this machine's 2 cores (2.5 a core)")
    monkeypatch.setattr(launch_module.torch.cuda, "is_available", lambda: True)
    assert launch_module.crowding_note(64) is None


# ---- rendezvous ----

def _endpoint_held() -> tuple[socket.socket, str]:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held, f"127.0.0.1:{held.getsockname()[1]}"


def test_a_busy_rendezvous_port_is_named_on_node_0(capsys, config_json):
    held, endpoint = _endpoint_held()
    with held:
        err = cli(capsys, config_json, "--nnodes", "2", "--rdzv-endpoint", endpoint)
        assert err.startswith(f"meshplan run: error: --rdzv-endpoint: port {endpoint.split(':')[1]} "
                              "on this machine is in use")
        # node 1 only joins: the port being held (by node 0's store) is expected there
        plan = check_train(MODEL, PLAN, CLUSTER, RunOptions(nnodes=2, node_rank=1,
                                                            rdzv_endpoint=endpoint))
        # the executor's MLP, its ZeRO-1 (DDP + ZeroRedundancyOptimizer) and its data
        # parallelism beside TP or PP (FSDP2's replicate); the plan's loss
        assert plan == replace(PLAN, elementwise="eager", mlp_kernel="eager", zero1_sync="all_reduce",
                               ddp_impl="replicate")


@pytest.mark.parametrize("endpoint, problem", [
    ("127.0.0.1", "is not HOST:PORT"),
    ("127.0.0.1:99999", "is not HOST:PORT"),
    ("192.0.2.1:29500", "is not an address of this machine"),   # TEST-NET-1, RFC 5737
    ("no-such-host.invalid:29500", "does not resolve"),
])
def test_node_0_must_be_able_to_host_the_rendezvous(endpoint, problem):
    err = refused(nnodes=2, rdzv_endpoint=endpoint)
    assert err.field == "run.rdzv_endpoint"
    assert problem in err.problem


# ---- token file ----

@pytest.mark.parametrize("tokens, problem", [
    (np.linspace(0, 1, 1000), "holds float64"),
    (np.zeros((10, 100), dtype=np.int32), "of shape (10, 100)"),
    (np.arange(100) % 128, "give 6 windows of seq_len+1 = 17, fewer than the 8 sequences"),
    (np.arange(1000) % 300, "outside the vocab of 128"),
])
def test_token_file_must_fit_model_and_plan(tmp_path, tokens, problem):
    path = tmp_path / "tokens.npy"
    np.save(path, tokens)
    err = refused(data=str(path))
    assert err.field == "run.data"
    assert problem in err.problem


def test_token_dtype_must_hold_the_vocabulary(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, (np.arange(1000) % 100).astype(np.uint8))
    wide = ModelSpec("wide-vocab", 2, 32, 4, 2, 64, 300, 64)
    with pytest.raises(PlanError, match="uint8, which cannot hold the ids of a 300-token"):
        check_train(wide, PLAN, CLUSTER, RunOptions(data=str(path)))
    check_train(MODEL, PLAN, CLUSTER, RunOptions(data=str(path)))  # 128 ids fit in uint8


@pytest.mark.parametrize("make", ["missing", "archive", "directory"])
def test_unreadable_token_files(tmp_path, make):
    path = tmp_path / "tokens.npz"
    if make == "archive":
        np.savez(path, tokens=np.arange(1000))
    elif make == "directory":
        path.mkdir()
    assert refused(data=str(path)).field == "run.data"


# ---- checkpoint folder ----

def _fake_checkpoint(folder: Path, step: int = 4, model: ModelSpec = MODEL, plan: Plan = PLAN,
                     seed: int = 0, data: str | None = None) -> None:
    """A checkpoint folder as the ranks leave it (the DCP files are not read before launch)."""
    info = checkpoint.CheckpointInfo(step=step, model=model.to_dict(), plan=plan.to_dict(),
                                     world_size=plan.world_size, seed=seed, lr=1e-3, data=data,
                                     losses=(5.0,) * step)
    where = folder / checkpoint.step_name(step)
    where.mkdir(parents=True)
    (where / checkpoint.DCP_METADATA).write_bytes(b"")
    (where / checkpoint.INFO).write_text(json.dumps(info.to_json()))
    (folder / checkpoint.LATEST).write_text(where.name + "\n")


def test_an_existing_checkpoint_is_not_overwritten_without_resume(tmp_path, capsys, config_json):
    _fake_checkpoint(tmp_path)
    err = cli(capsys, config_json, "--checkpoint-dir", str(tmp_path))
    assert err.startswith("meshplan run: error: --checkpoint-dir: ")
    assert "holds a checkpoint at step 4; resume from it (--resume)" in err


@pytest.mark.parametrize("saved, field, problem", [
    (dict(model=ModelSpec("other", 2, 64, 4, 2, 64, 128, 64)), "run.checkpoint_dir",
     "hidden_size 64 vs 32"),
    (dict(plan=Plan(global_batch=16, seq_len=16, dp=2)), "plan.global_batch",
     "taken at global_batch 16, not 8"),
    (dict(seed=3), "run.seed", "synthetic tokens of seed 3, not 0"),
    (dict(data="/data/tokens.npy"), "run.data", "trained on /data/tokens.npy"),
    (dict(step=20), "run.steps", "at step 20: a run of 20 steps has nothing left"),
    (dict(step=18), "run.warmup", "3 warm-up steps leave no timed step of the 2 left"),
])
def test_a_checkpoint_must_fit_the_run_it_resumes(tmp_path, saved, field, problem):
    _fake_checkpoint(tmp_path, **saved)
    err = refused(checkpoint_dir=str(tmp_path), resume=True)
    assert err.field == field
    assert problem in err.problem


def test_a_new_layout_resumes_resharded(tmp_path, capsys):
    _fake_checkpoint(tmp_path)
    tp2 = Plan(global_batch=8, seq_len=16, tp=2, dtype="fp32")
    check_train(MODEL, tp2, CLUSTER, RunOptions(checkpoint_dir=str(tmp_path), resume=True))
    assert capsys.readouterr().err == (f"meshplan: resuming from step 4 of {tmp_path} "
                                       "(DCP reshards it: dp2 -> tp2)\n")


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, step=2)
    (tmp_path / "step-00000004.tmp").mkdir()  # a crash mid-save: `latest` was not moved
    assert checkpoint.latest(tmp_path)[1].step == 2


@pytest.mark.parametrize("damage, problem", [
    ("pointer", "cannot be read"), ("json", "cannot be read"), ("types", "is not a complete"),
    ("dcp", "is not a complete")])
def test_a_damaged_checkpoint_is_named(tmp_path, damage, problem):
    _fake_checkpoint(tmp_path)
    info = tmp_path / checkpoint.step_name(4) / checkpoint.INFO
    if damage == "pointer":
        (tmp_path / checkpoint.LATEST).write_text("step-00000099\n")
    elif damage == "json":
        info.write_text("{not json")
    elif damage == "types":
        info.write_text(json.dumps({**json.loads(info.read_text()), "step": "four"}))
    else:
        (info.parent / checkpoint.DCP_METADATA).unlink()
    err = refused(checkpoint_dir=str(tmp_path), resume=True)
    assert err.field == "run.checkpoint_dir"
    assert problem in err.problem


def test_the_same_model_under_another_name_resumes(tmp_path):
    _fake_checkpoint(tmp_path, model=ModelSpec("renamed", 2, 32, 4, 2, 64, 128, 64))
    check_train(MODEL, PLAN, CLUSTER, RunOptions(checkpoint_dir=str(tmp_path), resume=True))


def test_checkpoint_dir_must_be_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    assert "is a file" in refused(checkpoint_dir=str(path)).problem


def test_resume_with_an_empty_folder_starts_at_step_0(tmp_path, capsys):
    check_train(MODEL, PLAN, CLUSTER, RunOptions(checkpoint_dir=str(tmp_path / "new"), resume=True))
    assert capsys.readouterr().err == ""


# ---- run options ----

@pytest.mark.parametrize("flags, problem", [
    (("--timeout-s", "nan"), "--timeout-s: nan seconds"),
    (("--rdzv-timeout-s", "inf"), "--rdzv-timeout-s: inf seconds"),
    (("--checkpoint-dir", "ck", "--checkpoint-every", "0"), "--checkpoint-every: 0 steps"),
    (("--checkpoint-every", "5"), "--checkpoint-every: has no folder to save to"),
    (("--resume",), "--resume: has no folder to resume from"),
    (("--max-restarts", "2"), "--max-restarts: would restart every rank from step 0"),
    (("--max-restarts", "-1", "--checkpoint-dir", "ck"), "--max-restarts: -1 restarts"),
    (("--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:1"),
     "--node-rank: node 2 of 2"),
    (("--timeout-s", "0.01"), "--timeout-s: 0.01 seconds"),
    (("--warmup", "-1"), "--warmup: -1 warm-up steps; use 0 or more"),
    (("--rescale", "--no-probe"), "--rescale: rescales the prediction by the probe"),
    (("--moe-capacity-factor", "1.5"), "--moe-capacity-factor: the executor's experts take every routed row"),
    (("--checkpoint-dir", "/proc/meshplan-ck"), "--checkpoint-dir: /proc is not writable"),
])
def test_bad_run_options_are_one_line(capsys, config_json, tmp_path, monkeypatch, flags, problem):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, config_json, *flags).startswith(f"meshplan run: error: {problem}")


def test_the_plans_and_the_options_mistakes_are_one_line(capsys, config_json, tmp_path, monkeypatch):
    """A plan the rules refuse, one the executor cannot run and bad run options: each named
    in the same line, before any rank starts."""
    monkeypatch.chdir(tmp_path)
    err = cli(capsys, config_json, "--dtype", "fp8", "--fsdp-layout", "flat", "--zero", "2", "--tp-overlap",
              "--steps", "2", "--checkpoint-every", "0")
    for problem in ("--tp-overlap: overlapping TP communication", "--dtype: the executor runs no FP8 GEMMs",
                    "--fsdp-layout: the executor shards", "--warmup: 3 warm-up steps leave no timed step of 2",
                    "--checkpoint-every: 0 steps"):
        assert problem in err, err


def test_serving_refuses_checkpoint_flags(capsys, config_json):
    code = main(["run", "--mode", "inference", "--model", config_json, "--batch", "2",
                 "--prompt-len", "8", "--gen-len", "4", "--checkpoint-dir", "ck"])
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "meshplan run: error: --checkpoint-dir: serving runs keep no state")
