"""Run plans on real processes: refuse what cannot run before anything starts, start one
rank per device through torchrun (torch.distributed.run, in a subprocess), and turn what
the ranks report into run records with the simulator's prediction beside the measurement.

    from meshplan.executor.launch import launch_train, launch_serve
    record = launch_train(model, plan, cluster, RunOptions(steps=20))      # -> RunRecord
    record = launch_serve(model, serve_plan, cluster, ServeOptions())       # -> ServeRecord

`torchrun` is the one launcher: training and serving ranks (executor/ranks/) and the
collective measurement (calibration/measure/) all start through it. A rank that dies makes
torchrun stop the others; the launcher then raises RunFailed naming the rank torchrun saw
fail first. Ctrl-C (or SIGTERM) stops torchrun and every rank.
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
from pathlib import Path
from typing import Callable

from meshplan.core.errors import MeshplanError
from meshplan.core.io import write_json
from meshplan.core.requirements import check_torch
from meshplan.executor.data import check_token_file
from meshplan.executor.options import RunOptions, ServeOptions, refuse
from meshplan.executor.records import RunRecord, ServeRecord, ServeResult, TrainResult
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.train import pipeline_partition, simulate

STOP_GRACE_S = 20  # after Ctrl-C, how long torchrun gets to stop its ranks before SIGKILL
TRAIN_RANK, SERVE_RANK = "meshplan.executor.ranks.train", "meshplan.executor.ranks.serve"


class RunFailed(Exception):
    """The ranks started but the run did not finish (a rank died, a collective timed out)."""


# ---- checks before anything starts ----

def check_train(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions) -> Plan:
    """The plan as it will run (pipeline partition filled in: the split `simulate` prices
    it with), or one PlanError naming everything that makes it illegal (rules.TRAINING) or
    that this executor cannot run (rules.EXECUTOR_TRAINING, the options)."""
    plan.validate(model, cluster)
    issues = rules.violations(rules.EXECUTOR_TRAINING, plan.fields(), model, cluster)
    if plan.world_size % max(options.nnodes, 1):
        issues.append(("run.nnodes", f"{plan.world_size} ranks do not split over {options.nnodes} "
                       "nodes", "use a node count that divides the GPU count"))
    refuse(issues + options.issues())
    if options.data is not None:
        check_token_file(options.data, plan.seq_len, model.vocab_size)
    if plan.pp > 1 and plan.layer_partition is None:
        hw = load_profile(options.profile)
        plan = dataclasses.replace(plan, layer_partition=pipeline_partition(model, plan, cluster, hw))
    return plan


def check_serve(model: ModelSpec, plan: InferencePlan, cluster: Cluster, options: ServeOptions) -> None:
    """One PlanError for a serving plan that is illegal (rules.SERVING) or that this
    executor cannot run (rules.EXECUTOR_SERVING, the options)."""
    plan.validate(model, cluster)
    issues = rules.violations(rules.EXECUTOR_SERVING, plan, model, cluster)
    if plan.num_gpus % max(options.nnodes, 1):
        issues.append(("run.nnodes", f"{plan.num_gpus} ranks do not split over {options.nnodes} "
                       "nodes", "use a node count that divides the GPU count"))
    refuse(issues + options.issues())


# ---- launching ----

def launch_train(model: ModelSpec, plan: Plan, cluster: Cluster,
                 options: RunOptions = RunOptions()) -> RunRecord:
    """Run one training plan; see launch_train_many."""
    return launch_train_many([(model, plan)], cluster, options)[0]


def launch_train_many(jobs: list[tuple[ModelSpec, Plan]], cluster: Cluster,
                      options: RunOptions = RunOptions()) -> list[RunRecord]:
    """Run several (model, plan) jobs of the same world size one after the other in one
    torchrun launch (one process group), and return one record per job. Every job is
    checked before anything starts."""
    runnable = [(m, check_train(m, p, cluster, options)) for m, p in jobs]
    sizes = {p.world_size for _, p in runnable}
    if len(sizes) != 1:
        refuse([("plan", f"jobs of world sizes {sorted(sizes)} in one launch",
                 "launch plans of one world size together")])
    nproc = sizes.pop() // options.nnodes
    results, world = run_jobs(TRAIN_RANK, runnable, options.rank_options().to_json(), nproc, options)
    return [_train_record(m, p, cluster, options, TrainResult.from_json(r), world)
            for (m, p), r in zip(runnable, results)]


def launch_serve(model: ModelSpec, plan: InferencePlan, cluster: Cluster,
                 options: ServeOptions = ServeOptions()) -> ServeRecord:
    """Run one serving plan; see launch_serve_many."""
    return launch_serve_many([(model, plan)], cluster, options)[0]


def launch_serve_many(jobs: list[tuple[ModelSpec, InferencePlan]], cluster: Cluster,
                      options: ServeOptions = ServeOptions()) -> list[ServeRecord]:
    """Run several serving jobs of the same world size in one torchrun launch."""
    for model, plan in jobs:
        check_serve(model, plan, cluster, options)
    nproc = cluster.num_gpus // options.nnodes
    results, world = run_jobs(SERVE_RANK, jobs, options.rank_options().to_json(), nproc, options)
    return [_serve_record(m, p, cluster, options, ServeResult.from_json(r), world)
            for (m, p), r in zip(jobs, results)]


def run_jobs(module: str, jobs: list, rank_options: dict, nproc_per_node: int,
             options: RunOptions | ServeOptions) -> tuple[list[dict], int]:
    """Write run.json (the (model, plan) jobs and the ranks' options) into options.run_dir
    (default: a temporary folder, removed), start the ranks of `module` on it, and return
    the per-job results and the world size from the result.json that each node's local
    rank 0 writes; RunFailed if the ranks exit without one. Files a previous run left in
    run_dir are removed first."""
    check_torch()
    with tempfile.TemporaryDirectory(prefix="meshplan-run-") as tmp:
        folder = Path(options.run_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (folder / "result.json", *folder.glob("grads*_rank*.pt")):
            stale.unlink(missing_ok=True)
        run_file = folder / "run.json"
        write_json(run_file, {"jobs": [{"model": m.to_dict(), "plan": p.to_dict()} for m, p in jobs],
                              "options": rank_options})
        torchrun(module, [str(run_file)], nproc_per_node, options.nnodes, options.node_rank,
                 options.rdzv_endpoint)
        result_file = folder / "result.json"
        if not result_file.is_file():
            raise RunFailed(f"the ranks exited without writing {result_file}")
        result = json.loads(result_file.read_text())
        return result["results"], result["world_size"]


def torchrun(module: str, args: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
             rdzv_endpoint: str | None = None, on_line: Callable[[str], None] | None = None,
             timeout_s: float | None = None) -> None:
    """Run `python -m module *args` on nproc_per_node ranks of this machine through torchrun
    (--standalone on one machine, a c10d rendezvous across several), in its own process
    group. Its output (and the ranks') is relayed to our stderr, or line by line to
    `on_line`. RunFailed if it fails or runs past `timeout_s`; every rank is stopped on
    Ctrl-C, SIGTERM or any error."""
    if nnodes == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", "meshplan"]
    command = [sys.executable, "-m", "torch.distributed.run", *where,
               "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
               "--monitor-interval", "0.2", "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    tail: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stdout, tail, on_line), daemon=True)
    relay.start()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main else None
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise RunFailed(f"torchrun ran past {timeout_s:g} s and was stopped") from None
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


def _relay(stream, tail: list[str], on_line, keep_chars: int = 20000) -> None:
    pending = ""
    for chunk in iter(lambda: stream.read1(4096), b""):
        text = chunk.decode(errors="replace")
        tail.append(text)
        while len(tail) > 1 and sum(map(len, tail)) > keep_chars:
            tail.pop(0)
        if on_line is None:
            sys.stderr.write(text)
            sys.stderr.flush()
            continue
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            on_line(line)
    if on_line is not None and pending:
        on_line(pending)


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


# ---- records ----

def _train_record(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions,
                  result: TrainResult, world_size: int) -> RunRecord:
    ran = dataclasses.replace(plan, dtype=result.dtype)
    prediction, note = prediction_or_why(
        lambda: simulate(model, ran, cluster, load_profile(options.profile)).to_json())
    return RunRecord(model=model, plan=ran, dtype_requested=plan.dtype, device=result.device,
                     world_size=world_size, profile=options.profile, prediction=prediction,
                     prediction_note=note, losses=result.losses, step_times_s=result.step_times_s,
                     warmup=options.warmup, memory_by_rank=result.memory_by_rank, seed=options.seed,
                     lr=options.lr, data=options.data)


def _serve_record(model: ModelSpec, plan: InferencePlan, cluster: Cluster, options: ServeOptions,
                  result: ServeResult, world_size: int) -> ServeRecord:
    ran = dataclasses.replace(plan, dtype=result.dtype, kv_dtype=result.dtype)
    prediction, note = prediction_or_why(
        lambda: simulate_inference(model, ran, cluster, load_profile(options.profile)).to_json())
    return ServeRecord(model=model, plan=ran, dtype_requested=plan.dtype,
                       kv_dtype_requested=plan.kv_dtype, device=result.device,
                       world_size=world_size, profile=options.profile, prediction=prediction,
                       prediction_note=note, ttft_s=result.ttft_s, decode_s=result.decode_s,
                       warmup=options.warmup, memory_by_rank=result.memory_by_rank,
                       tokens=result.tokens, seed=options.seed)


def prediction_or_why(simulated: Callable[[], dict]) -> tuple[dict | None, str]:
    """(simulated(), "") or (None, why): a profile that cannot be loaded, or a plan the
    simulator refuses, must not throw away a measured run. Anything else is a bug and
    propagates."""
    try:
        return simulated(), ""
    except MeshplanError as exc:
        return None, f"no prediction: {exc}"
