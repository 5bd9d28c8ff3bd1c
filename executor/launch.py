"""Run plans on real processes: refuse what cannot run before anything starts, start one
rank per device through torchrun (torch.distributed.run, in a subprocess), and turn what
the ranks wrote into run records with the simulator's prediction beside the measurement.

    from meshplan.executor.launch import RunOptions, launch
    record = launch(model, plan, cluster, RunOptions(steps=20))   # -> RunRecord

A rank that dies makes torchrun stop the others; `launch` then raises RunFailed naming the
rank torchrun saw fail first. Ctrl-C stops torchrun and every rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meshplan.core.requirements import check_torch
from meshplan.executor.data import check_token_file
from meshplan.executor.records import RunRecord
from meshplan.core.errors import MeshplanError, PlanError
from meshplan.simulator.model_spec import ModelSpec
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import pipeline_partition, simulate

STOP_GRACE_S = 20  # after Ctrl-C, how long torchrun gets to stop its ranks before SIGKILL


@dataclass(frozen=True)
class RunOptions:
    """How to run. `run_dir`: folder for the run's files, kept (default: a temporary
    folder, removed). `save_grads`: each rank saves the first step's gradients there."""

    steps: int = 20
    warmup: int = 3
    seed: int = 0
    lr: float = 1e-3
    data: str | None = None
    profile: str = "local"
    timeout_s: float = 60.0
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    progress: bool = False
    run_dir: str | None = None
    save_grads: bool = False


class RunFailed(Exception):
    """The ranks started but the run did not finish (a rank died, a collective timed out)."""


def executable_plan(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions) -> Plan:
    """The plan as it will run (pipeline partition filled in), or PlanError for a plan that
    is illegal (Plan.validate) or that this executor cannot run."""
    plan.validate(model, cluster)
    if plan.cp > 1:
        raise PlanError("--cp", "context parallel cannot run here: torch's ring attention has no "
                        "DTensor rule for the CPU attention kernel", "use --cp 1")
    if model.tied_embeddings and plan.pp > 1:
        raise PlanError("--pp", "tied embeddings would sit on the first and last pipeline stages",
                        "use --pp 1 for a model with tie_word_embeddings")
    if plan.zero == 1 and plan.dp > 1 and (plan.tp > 1 or plan.pp > 1):
        raise PlanError("--zero", "ZeRO 1 runs as DDP + ZeroRedundancyOptimizer, and in torch 2.13 "
                        "DDP takes neither TP's DTensor parameters nor pipeline stages",
                        "use --zero 0, 2 or 3 with --tp or --pp")
    if plan.pp > 1 and plan.schedule in ("1f1b", "zb-h1") and plan.num_microbatches < plan.pp:
        raise PlanError("--global-batch", f"{plan.schedule} needs at least pp = {plan.pp} "
                        f"micro-batches, got {plan.num_microbatches}",
                        "raise global batch or lower micro-batch")
    if plan.world_size % options.nnodes:
        raise PlanError("--nnodes", f"{plan.world_size} ranks do not split over {options.nnodes} "
                        "nodes", "use a node count that divides the GPU count")
    if options.nnodes > 1 and not options.rdzv_endpoint:
        raise PlanError("--rdzv-endpoint", "missing for a run on several nodes",
                        "pass --rdzv-endpoint HOST:PORT, the same on every node")
    if not 0 <= options.warmup < options.steps:
        raise PlanError("--warmup", f"{options.warmup} warm-up steps leave no timed step of "
                        f"{options.steps}", "use --warmup smaller than --steps")
    if options.data is not None:
        check_token_file(options.data, plan.seq_len, model.vocab_size)
    if plan.pp > 1 and plan.layer_partition is None:
        # the split simulate prices the plan with (the balanced partition)
        hw = load_profile(options.profile)
        plan = dataclasses.replace(plan, layer_partition=pipeline_partition(model, plan, cluster, hw))
    return plan


def launch(model: ModelSpec, plan: Plan, cluster: Cluster,
           options: RunOptions = RunOptions()) -> RunRecord:
    """Run one plan; see launch_many."""
    return launch_many([(model, plan)], cluster, options)[0]


def launch_many(jobs: list[tuple[ModelSpec, Plan]], cluster: Cluster,
                options: RunOptions = RunOptions()) -> list[RunRecord]:
    """Run several (model, plan) jobs of the same world size one after the other in one
    torchrun launch (one process group), and return one record per job. Every job is
    checked before anything starts."""
    runnable = [(m, executable_plan(m, p, cluster, options)) for m, p in jobs]
    sizes = {p.world_size for _, p in runnable}
    if len(sizes) != 1:
        raise PlanError("plan", f"jobs of world sizes {sorted(sizes)} in one launch",
                        "launch plans of one world size together")
    nproc = sizes.pop() // options.nnodes
    result = run_in_ranks(
        runnable, {"steps": options.steps, "seed": options.seed, "lr": options.lr,
                   "data": options.data, "timeout_s": options.timeout_s,
                   "progress": options.progress, "grads": options.save_grads},
        options.run_dir, lambda run_file: _run_torchrun(torchrun_command(run_file, nproc, options)))
    return [_record(m, p, cluster, options, r, result["world_size"])
            for (m, p), r in zip(runnable, result["results"])]


def run_in_ranks(jobs: list, rank_options: dict, run_dir: str | None,
                 start: Callable[[Path], None]) -> dict:
    """Write RUN.json (the (model, plan) jobs and the ranks' options) into run_dir (default:
    a temporary folder, removed), start the ranks on it, and return the result.json that
    each node's local rank 0 writes; RunFailed if the ranks exit without one. Files a
    previous run left in run_dir are removed first."""
    check_torch()
    with tempfile.TemporaryDirectory(prefix="meshplan-run-") as tmp:
        folder = Path(run_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (folder / "result.json", *folder.glob("grads*_rank*.pt")):
            stale.unlink(missing_ok=True)
        run_file = folder / "run.json"
        run_file.write_text(json.dumps({
            "jobs": [{"model": m.to_dict(), "plan": p.to_dict()} for m, p in jobs],
            "options": rank_options}))
        start(run_file)
        result_file = folder / "result.json"
        if not result_file.is_file():
            raise RunFailed(f"the ranks exited without writing {result_file}")
        return json.loads(result_file.read_text())


def torchrun_command(run_file: Path, nproc_per_node: int, options: RunOptions,
                     module: str = "meshplan.executor.ranks.train") -> list[str]:
    """torchrun running `python -m module RUN.json` on each rank: --standalone on one
    machine, a c10d rendezvous across several."""
    if options.nnodes == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(options.nnodes), "--node-rank", str(options.node_rank),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", options.rdzv_endpoint,
                 "--rdzv-id", "meshplan"]
    return [sys.executable, "-m", "torch.distributed.run", *where,
            "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
            "--monitor-interval", "0.2", "-m", module, str(run_file)]


def run_ranks(module: str, run_file: Path, nproc_per_node: int) -> None:
    """Start another per-rank entry point (meshplan.executor.ranks.serve) on this machine's ranks the way
    launch_many starts meshplan.executor.ranks.train; RunFailed if a rank fails, every rank stopped on
    Ctrl-C."""
    _run_torchrun(torchrun_command(run_file, nproc_per_node, RunOptions(), module))


def _run_torchrun(command: list[str]) -> None:
    """Run torchrun in its own process group, relaying its output (and the ranks') to our
    stderr; raise RunFailed if it fails, and stop every rank on Ctrl-C or any error."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    tail: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stdout, tail), daemon=True)
    relay.start()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main else None
    try:
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    relay.join(timeout=5)
    if code != 0:
        raise RunFailed(root_cause("".join(tail)) or f"torchrun exited with code {code}")


def _terminated(signum, _frame):
    """SIGTERM while the ranks run: unwind through _stop rather than orphan them."""
    raise SystemExit(128 + signum)


def _relay(stream, tail: list[str], keep_chars: int = 20000) -> None:
    for chunk in iter(lambda: stream.read1(4096), b""):
        text = chunk.decode(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        tail.append(text)
        while len(tail) > 1 and sum(map(len, tail)) > keep_chars:
            tail.pop(0)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to torchrun and the ranks (its process group), SIGKILL if they linger."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def root_cause(torchrun_output: str) -> str | None:
    """One line from torchrun's failure report: which rank failed first, and how."""
    _, found, report = torchrun_output.rpartition("Root Cause (first observed failure)")
    if not found:
        return None
    rank = re.search(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)", report)
    host = re.search(r"host\s*:\s*(\S+)", report)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", report)
    if not rank:
        return None
    how = f"exit code {code.group(1)}" if code else "an error"
    if code and int(code.group(1)) < 0:
        how = f"killed by signal {signal.Signals(-int(code.group(1))).name}"
    error = re.findall(r"^\s*(\w+(?:Error|Exception)\b.*)$", report, re.MULTILINE)
    detail = f": {error[-1].strip()}" if error else ""
    return (f"rank {rank.group(1)} (local rank {rank.group(2)}"
            f"{' on ' + host.group(1) if host else ''}) failed first, with {how}{detail}; "
            "torchrun stopped the other ranks")


def _record(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions, result: dict,
            world_size: int) -> RunRecord:
    ran = dataclasses.replace(plan, dtype=result["dtype"])
    prediction, note = predict(model, ran, cluster, options.profile)
    return RunRecord(model=model, plan=ran, dtype_requested=plan.dtype, device=result["device"],
                     world_size=world_size, profile=options.profile, prediction=prediction,
                     prediction_note=note, losses=tuple(result["losses"]),
                     step_times_s=tuple(result["step_times_s"]), warmup=options.warmup,
                     memory_by_rank=tuple(result["memory_by_rank"]), seed=options.seed,
                     lr=options.lr, data=options.data)


def predict(model: ModelSpec, plan: Plan, cluster: Cluster, profile: str) -> tuple[dict | None, str]:
    """simulate(...).to_json() for the plan as run, or None and why."""
    def simulated() -> dict:
        return simulate(model, plan, cluster, load_profile(profile)).to_json()
    return prediction_or_why(simulated)


def prediction_or_why(simulated: Callable[[], dict]) -> tuple[dict | None, str]:
    """(simulated(), "") or (None, why): a profile that cannot be loaded, or a plan the
    simulator refuses, must not throw away a measured run. Anything else is a bug and
    propagates."""
    try:
        return simulated(), ""
    except MeshplanError as exc:
        return None, f"no prediction: {exc}"
