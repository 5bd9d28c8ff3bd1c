"""Checkpoints on real ranks (torchrun, gloo, CPU): a run killed at a step and resumed from
its newest checkpoint gives the loss curve of the uninterrupted run bit for bit, for every
plan kind (DDP, ZeRO-1, FSDP2, TP+SP, PP interleaved with two stages per rank); a crash in
the middle of a save leaves the previous checkpoint in use; torchrun's restarts resume by
themselves; and a checkpoint loads into another parallel layout (DCP reshards it), where
the losses then agree to fp32 rounding (rtol 1e-5, as tests/test_executor_numerics.py).

The reference is the same plan run without interruption (and without checkpoints) in the
same launch as the other plans of its world size."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from meshplan.core.errors import PlanError
from meshplan.executor.checkpoint import INFO, LATEST, latest
from meshplan.executor.launch import RunFailed, launch_train, launch_train_many
from meshplan.executor.options import RunOptions
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan

pytestmark = pytest.mark.slow

STEPS = 6
LLAMA = ModelSpec("tiny-llama", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=64, vocab_size=128, max_seq_len=32)


def config_json(folder: Path) -> str:
    path = folder / "config.json"
    path.write_text(json.dumps(LLAMA.to_dict()))
    return str(path)


def plan(**fields) -> Plan:
    return Plan(**{"global_batch": 8, "seq_len": 16, "dtype": "fp32", "micro_batch": 2, **fields})


PLANS = {
    "ddp": plan(dp=2),
    "zero1": plan(dp=2, zero=1),
    "fsdp2": plan(dp=2, zero=3),
    "tp-sp": plan(tp=2, sp=True),
    "pp-interleaved": plan(pp=2, schedule="interleaved", virtual_stages=2, micro_batch=1),
    "cp-a2a": plan(cp=2, cp_comm="a2a"),
}


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[float, ...]]:
    """Each plan's losses, run uninterrupted without checkpoints (one launch)."""
    records = launch_train_many([(LLAMA, p) for p in PLANS.values()], Cluster(2, 2),
                                RunOptions(steps=STEPS, warmup=0))
    return {name: r.losses for name, r in zip(PLANS, records)}


def options(folder: Path, **fields) -> RunOptions:
    return RunOptions(**{"steps": STEPS, "warmup": 0, "checkpoint_dir": str(folder),
                         "checkpoint_every": 2, **fields})


@pytest.mark.parametrize("name, fault, resumed_at", [
    ("ddp", "1:2", 2),                # rank 1 dies after step 2: step 2 is lost, rerun
    ("zero1", "0:4", 4),              # after step 4: the checkpoint of steps 0-3 stays
    ("fsdp2", "1:0", 0),              # before any checkpoint: resume starts over
    ("tp-sp", "0:3", 4),              # right after the checkpoint of step 4 (steps 0-3)
    ("pp-interleaved", "0:3:save", 2),  # rank 0 dies mid-save: the checkpoint of 2 stays
])
def test_kill_and_resume_gives_the_uninterrupted_losses(reference, tmp_path, monkeypatch, name,
                                                        fault, resumed_at):
    monkeypatch.setenv("MESHPLAN_FAULT", fault)
    with pytest.raises(RunFailed):  # naming rank 0 or 1: torchrun sees both fail at once
        launch_train(LLAMA, PLANS[name], Cluster(2, 2), options(tmp_path))
    found = latest(tmp_path)
    assert (found[1].step if found else 0) == resumed_at
    monkeypatch.delenv("MESHPLAN_FAULT")
    record = launch_train(LLAMA, PLANS[name], Cluster(2, 2), options(tmp_path, resume=True))
    assert record.losses == reference[name]
    assert len(record.step_times_s) == STEPS - resumed_at
    assert not list(tmp_path.glob("*.tmp"))  # the cut-short save was cleared
    assert latest(tmp_path)[1].losses == reference[name]


def test_torchrun_restarts_resume_from_the_newest_checkpoint(reference, tmp_path, monkeypatch):
    """MESHPLAN_FAULT fires in the first attempt only: the restart resumes and finishes."""
    monkeypatch.setenv("MESHPLAN_FAULT", "1:2")
    record = launch_train(LLAMA, PLANS["fsdp2"], Cluster(2, 2), options(tmp_path, max_restarts=1))
    assert record.losses == reference["fsdp2"]
    assert len(record.step_times_s) == STEPS - 2


@pytest.fixture(scope="module")
def dp2_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of the DDP plan after 3 of its steps (each test resumes a copy)."""
    folder = tmp_path_factory.mktemp("dp2")
    launch_train(LLAMA, PLANS["ddp"], Cluster(2, 2), options(folder, steps=3))
    assert latest(folder)[1].step == 3
    return folder


@pytest.mark.parametrize("into", ["tp-sp", "fsdp2", "pp-interleaved", "cp-a2a"])
def test_a_dp2_checkpoint_resumes_in_another_layout(reference, dp2_checkpoint, tmp_path, into):
    shutil.copytree(dp2_checkpoint, tmp_path, dirs_exist_ok=True)
    record = launch_train(LLAMA, PLANS[into], Cluster(2, 2), options(tmp_path, resume=True))
    assert record.losses[:3] == reference["ddp"][:3]
    assert record.losses == pytest.approx(reference["ddp"], rel=1e-5, abs=0)
    saved = json.loads((tmp_path / (tmp_path / LATEST).read_text().strip() / INFO).read_text())
    assert Plan.from_dict(saved["plan"]).tp == PLANS[into].tp  # it records the plan it ran


def test_the_newest_two_checkpoints_are_kept(tmp_path):
    launch_train(LLAMA, PLANS["ddp"], Cluster(2, 2), options(tmp_path, checkpoint_every=1))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000005", "step-00000006"]


def test_a_run_does_not_overwrite_a_checkpoint_it_was_not_asked_to_resume(tmp_path):
    launch_train(LLAMA, PLANS["ddp"], Cluster(2, 2), options(tmp_path, steps=2))
    with pytest.raises(PlanError) as err:
        launch_train(LLAMA, PLANS["ddp"], Cluster(2, 2), options(tmp_path))
    assert err.value.field == "run.checkpoint_dir"


def _rank_pids(tag: str) -> list[int]:
    """Training ranks (not torchrun, not the launcher) whose environment carries `tag`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and tag.encode() in (proc / "environ").read_bytes()
                    and b"meshplan.executor.ranks.train" in (proc / "cmdline").read_bytes()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def test_sigkill_of_a_rank_mid_run_restarts_and_resumes(tmp_path):
    """kill -9 of one rank at whatever step it has reached once a checkpoint exists: torchrun
    restarts the ranks, which resume from the newest checkpoint; the losses are those of the
    uninterrupted run."""
    steps = 40
    reference = launch_train(LLAMA, PLANS["ddp"], Cluster(2, 2), RunOptions(steps=steps, warmup=0))
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshplan.cli", "run", "--model", config_json(tmp_path),
         "--gpus", "2", "--dp", "2", "--global-batch", "8", "--micro-batch", "2", "--seq-len", "16",
         "--dtype", "fp32", "--steps", str(steps), "--warmup", "0", "--checkpoint-dir",
         str(tmp_path / "ck"), "--checkpoint-every", "3", "--max-restarts", "1", "--json", "--no-probe"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, MESHPLAN_TEST_TAG=tag))
    deadline = time.monotonic() + 120
    while not (tmp_path / "ck" / LATEST).exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint was written"
        time.sleep(0.05)
    os.kill(_rank_pids(tag)[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["losses"] == list(reference.losses)
    assert len(result["measured_step_times_s"]) < steps  # the restart resumed, not restarted


TIED = ModelSpec("tiny-tied", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=64, vocab_size=128, max_seq_len=32, tied_embeddings=True)
TIED_PLANS = {"ddp": plan(dp=2), "pp-1f1b": plan(pp=2, schedule="1f1b", micro_batch=1),
              "pp-zb-v": plan(pp=2, schedule="zb-v", virtual_stages=2, micro_batch=1)}


@pytest.fixture(scope="module")
def tied_reference() -> dict[str, tuple[float, ...]]:
    """Each tied plan's losses, run uninterrupted (one launch)."""
    records = launch_train_many([(TIED, p) for p in TIED_PLANS.values()], Cluster(2, 2),
                                RunOptions(steps=STEPS, warmup=0))
    return {name: r.losses for name, r in zip(TIED_PLANS, records)}


@pytest.mark.parametrize("saved, into", [("ddp", "pp-1f1b"), ("pp-1f1b", "pp-zb-v"), ("pp-zb-v", "ddp")])
def test_a_tied_embedding_resumes_across_pipeline_layouts(tied_reference, tmp_path, saved, into):
    """The head's copy of a tied embedding on the last stage (or beside it, zb-v) takes the
    embedding's weights and optimizer state from any checkpoint: the resumed losses are the
    uninterrupted run's."""
    launch_train(TIED, TIED_PLANS[saved], Cluster(2, 2), options(tmp_path, steps=3))
    record = launch_train(TIED, TIED_PLANS[into], Cluster(2, 2), options(tmp_path, resume=True))
    assert record.losses[:3] == tied_reference[saved][:3]
    assert record.losses == pytest.approx(tied_reference[saved], rel=1e-5, abs=0)


def test_a_zero1_checkpoint_with_tp_resumes_under_a_pipeline(tmp_path):
    """ZeRO-1 beside TP or PP (executor/zero_one.py) saves each rank's owned parameters'
    optimizer state by name, so it reloads into another split of the parameters over dp."""
    saved = plan(dp=2, tp=2, sp=True, zero=1)
    uninterrupted = launch_train(LLAMA, saved, Cluster(4, 4), RunOptions(steps=STEPS, warmup=0))
    launch_train(LLAMA, saved, Cluster(4, 4), options(tmp_path, steps=3))
    record = launch_train(LLAMA, plan(dp=2, pp=2, zero=1, micro_batch=1), Cluster(4, 4),
                          options(tmp_path, resume=True))
    assert record.losses[:3] == uninterrupted.losses[:3]
    assert record.losses == pytest.approx(uninterrupted.losses, rel=1e-5, abs=0)


# DeepSeek-V3's router: its choice bias is saved with the model and resumed; biases (as
# gpt-oss's experts have) split with the experts' width under expert TP, or whole
MOE = ModelSpec("tiny-moe", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, vocab_size=128, max_seq_len=32, num_experts=4,
                experts_per_token=2, moe_ffn_hidden_size=48, dense_layers=(0,), router="sigmoid",
                router_choice_bias=True, bias=True)


EP_SAVED = {"ep2": plan(dp=2, ep=2), "ep2-zero1": plan(dp=2, ep=2, zero=1),
            "etp2": plan(tp=2, sp=True, etp=2)}


@pytest.fixture(scope="module")
def ep_reference() -> dict[str, tuple[float, ...]]:
    """The saved EP plans' losses at world size 2, run uninterrupted (one launch)."""
    records = launch_train_many([(MOE, p) for p in EP_SAVED.values()], Cluster(2, 2),
                                RunOptions(steps=STEPS, warmup=0))
    return {name: r.losses for name, r in zip(EP_SAVED, records)}


@pytest.mark.parametrize("saved, into", [
    ("ep2", plan(dp=2)),                            # split experts into whole ones
    ("ep2-zero1", plan(dp=2, ep=2, zero=3)),        # owned shards into FSDP2 beside EP
    ("etp2", plan(dp=2, ep=2)),                     # width shards (expert TP) into whole experts
], ids=["ep2-to-ep1", "zero1-to-zero3", "etp2-to-ep2"])
def test_expert_parallel_checkpoints_reshard_into_another_ep(ep_reference, tmp_path, saved, into):
    """Experts split over EP (and their width over expert TP) are saved as DTensors sharded
    over ep (and etp) and replicated over edp, so each is written once and loads into any
    other expert layout."""
    launch_train(MOE, EP_SAVED[saved], Cluster(2, 2), options(tmp_path, steps=3))
    keys = dcp.FileSystemReader(latest(tmp_path)[0]).read_metadata().state_dict_metadata
    assert {f"model.layers.{i}.feed_forward.expert_bias" for i in (1, 2)} <= set(keys)
    record = launch_train(MOE, into, Cluster(2, 2), options(tmp_path, resume=True))
    assert record.losses[:3] == ep_reference[saved][:3]
    assert record.losses == pytest.approx(ep_reference[saved], rel=1e-5, abs=0)


def test_experts_replicated_over_edp_reshard_into_a_wider_ep(tmp_path):
    """dp4 ep2 (each expert on two ranks) into ep4: the replicas are written once."""
    saved = plan(dp=4, ep=2)
    uninterrupted = launch_train(MOE, saved, Cluster(4, 4), RunOptions(steps=STEPS, warmup=0))
    launch_train(MOE, saved, Cluster(4, 4), options(tmp_path, steps=3))
    record = launch_train(MOE, plan(dp=4, ep=4), Cluster(4, 4), options(tmp_path, resume=True))
    assert record.losses == pytest.approx(uninterrupted.losses, rel=1e-5, abs=0)
