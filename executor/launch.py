"""Run plans on real processes: refuse what cannot run before anything starts, start one
rank per device through torchrun (torch.distributed.run, in a subprocess), and turn what
the ranks report into run records with the simulator's prediction beside the measurement.

    from meshplan.executor.launch import launch_train, launch_serve
    record = launch_train(model, plan, cluster, RunOptions(steps=20))      # -> RunRecord
    record = launch_serve(model, serve_plan, cluster, ServeOptions())       # -> ServeRecord

Before any rank starts, check_train / check_serve refuse (one MeshplanError naming each
cause) what cannot run: an illegal plan, one whose simulated peak memory exceeds the
device's (the profile's memory per rank on CPU) less the reserve, more ranks per node than
the node has GPUs, a rendezvous endpoint that node 0 cannot host, a token file that does not
fit the model and plan, a checkpoint folder that does not fit the run (executor/checkpoint.py).

`torchrun` is the one launcher: training and serving ranks (executor/ranks/) and the
collective measurement (calibration/measure/) all start through it. A rank that dies makes
torchrun stop the others (and restart them all, up to max_restarts times); the launcher
then raises RunFailed naming the rank torchrun saw fail first. Ctrl-C or SIGTERM stops
torchrun and every rank, and so does the launcher's own death (Linux's parent-death signal).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from meshplan.core.cpus import usable_cpus
from meshplan.core.errors import Issue, MeshplanError
from meshplan.core.io import write_json
from meshplan.core.requirements import check_torch
from meshplan.core.units import GIB
from meshplan.executor import checkpoint
from meshplan.executor.data import check_token_file
from meshplan.executor.options import (LaunchOptions, RunOptions, ServeOptions, refuse, serving_dtype,
                                       training_fields)
from meshplan.executor.records import RunRecord, ServeRecord, ServeResult, TrainResult
from meshplan.hw_profiles.profile import HardwareProfile, load_profile
from meshplan.simulator import rules
from meshplan.simulator.memory import usable_bytes
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.train import pipeline_partition, simulate

STOP_GRACE_S = 20  # after Ctrl-C, how long torchrun gets to stop its ranks before SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
TRAIN_RANK, SERVE_RANK = "meshplan.executor.ranks.train", "meshplan.executor.ranks.serve"
# the most CPU ranks a core that `meshplan validate` runs (its 4-rank plans on the 2-core VM)
VALIDATED_RANKS_PER_CORE = 2


class RunFailed(Exception):
    """The ranks started but the run did not finish (a rank died, a collective timed out)."""


# ---- checks before anything starts ----

def check_train(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions) -> Plan:
    """The plan as it will run (pipeline partition filled in: the split `simulate` prices
    it with; eager elementwise ops, MLP kernels and cross-entropy; ZeRO-1 by all-reduce), or
    one PlanError naming everything that makes it illegal (rules.TRAINING), that this
    executor cannot run (rules.EXECUTOR_TRAINING, the options, this machine), that would not
    fit in memory, or that does not fit the token file or checkpoint folder."""
    plan.validate(model, cluster)
    issues = rules.violations(rules.EXECUTOR_TRAINING, plan.fields(), model, cluster)
    if plan.attention == "cudnn" and device_type() != "cuda":
        issues.append(("plan.attention", "cuDNN's fused attention runs on CUDA devices only, and this "
                       "machine's ranks run on the CPU", "use --attention flash or naive"))
    if plan.cp > 1 and plan.cp_comm in ("p2p", "alltoall") and plan.attention != "naive" and device_type() == "cuda":
        issues.append(("plan.cp_comm", f"the executor's {plan.cp_comm} ring attends block by block with CPU flash "
                       "attention's kernel (the one whose log-sum-exp it merges), and these ranks run on CUDA",
                       "use --cp-comm a2a or allgather, or --attention naive"))
    if model.attn_sinks and plan.attention != "naive" and device_type() == "cuda":
        issues.append(("plan.attention", "the executor's attention sinks rescale CPU flash attention's output by its "
                       "log-sum-exp, and these ranks run on CUDA", "use --attention naive"))
    refuse(issues + launch_issues(plan.world_size, options) + options.issues())
    if options.data is not None:
        check_token_file(options.data, plan.seq_len, model.vocab_size, plan.global_batch)
    hw = load_profile(options.profile)
    ran = dataclasses.replace(plan, **training_fields(plan.dtype, device_type(), plan.cross_entropy))
    if ran.pp > 1 and ran.layer_partition is None:  # split as priced in the dtype it computes in
        ran = dataclasses.replace(ran, layer_partition=pipeline_partition(model, ran, cluster, hw))
    plan = dataclasses.replace(ran, dtype=plan.dtype)
    issues, resumed = memory_issues(simulate(model, ran, cluster, hw).peak_memory_bytes, hw), None
    if options.checkpoint_dir is not None:
        found, resumed = checkpoint.check_resume(
            options.checkpoint_dir, model.to_dict(), plan.to_dict(), options.resume, options.seed,
            options.data, options.steps, options.warmup)
        issues += found
    refuse(issues)
    if resumed is not None:
        change = checkpoint.relayout(resumed, plan.to_dict())
        print(f"meshplan: resuming from step {resumed.step} of {options.checkpoint_dir}"
              + (f" (DCP reshards it: {change})" if change else ""), file=sys.stderr)
    return plan


def check_serve(model: ModelSpec, plan: InferencePlan, cluster: Cluster, options: ServeOptions) -> None:
    """One PlanError for a serving plan that is illegal (rules.SERVING), that this executor
    cannot run (rules.EXECUTOR_SERVING, the options, this machine) or that would not fit in
    memory."""
    plan.validate(model, cluster)
    issues = rules.violations(rules.EXECUTOR_SERVING, plan, model, cluster)
    refuse(issues + launch_issues(plan.num_gpus, options) + options.issues())
    hw = load_profile(options.profile)
    dtype = serving_dtype(plan.dtype, device_type())
    ran = dataclasses.replace(plan, dtype=dtype, kv_dtype=dtype)
    refuse(memory_issues(simulate_inference(model, ran, cluster, hw).peak_memory_bytes, hw))


def device_type() -> str:
    """Where the ranks will run: "cuda" when this machine has a CUDA device, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def crowding_note(ranks_per_node: int) -> str | None:
    """Where more CPU ranks share this machine's cores than `meshplan validate` runs a core,
    a note that the prediction, which divides the cores among them, is less certain."""
    cores = usable_cpus()
    if device_type() == "cuda" or ranks_per_node <= VALIDATED_RANKS_PER_CORE * cores:
        return None
    return (f"{ranks_per_node} ranks share this machine's {cores} cores ({ranks_per_node / cores:g} a core); "
            f"the prediction divides the cores among them, which `meshplan validate` checks up to "
            f"{VALIDATED_RANKS_PER_CORE} ranks a core: expect it further off")


def launch_issues(world_size: int, options: LaunchOptions) -> list[Issue]:
    """The world size against the nodes and this machine's devices, and the rendezvous
    (a node count below 1 is options.issues()'s to report)."""
    if options.nnodes < 1:
        return []
    if world_size % options.nnodes:
        return [("run.nnodes", f"{world_size} ranks do not split over {options.nnodes} nodes",
                 "use a node count that divides the GPU count")]
    per_node, issues = world_size // options.nnodes, []
    if device_type() == "cuda" and per_node > torch.cuda.device_count():
        issues.append(("cluster.gpus_per_node", f"{per_node} ranks per node, but this machine has "
                       f"{torch.cuda.device_count()} CUDA devices", "run one rank per GPU: use "
                       "more nodes or a plan of fewer ranks"))
    if options.nnodes > 1 and options.rdzv_endpoint:
        issues += rendezvous_issues(options.rdzv_endpoint, options.node_rank == 0)
    return issues


def rendezvous_issues(endpoint: str, hosts_it: bool) -> list[Issue]:
    """HOST:PORT must parse; on node 0, which hosts the c10d store, HOST must be an address
    of this machine and PORT free (torchrun would otherwise connect to whatever holds the
    port, and wait there)."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        return [("run.rdzv_endpoint", f"{endpoint!r} is not HOST:PORT",
                 "give node 0's address and a free port, e.g. node0:29500")]
    if not hosts_it:
        return []
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as exc:
        return [("run.rdzv_endpoint", f"{host} does not resolve ({exc.strerror})",
                 "give node 0's address or host name")]
    if not any(_bind_error(address, 0) is None for address in addresses):
        return [("run.rdzv_endpoint", f"{host} is not an address of this machine, and node 0 hosts "
                 "the rendezvous", "start node 0 on that host, or give node 0's own address")]
    if any(_bind_error(address, int(port)) == errno.EADDRINUSE for address in ("0.0.0.0", "::")):
        return [("run.rdzv_endpoint", f"port {port} on this machine is in use (by another "
                 "rendezvous or program)", "choose a free port, the same on every node")]
    return []


def _bind_error(address: str, port: int) -> int | None:
    """The errno of binding a TCP socket to (address, port) as torchrun's store would
    (SO_REUSEADDR, as libuv sets), or None if it binds."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
    except OSError as exc:
        return exc.errno
    return None


def memory_issues(peak_bytes: float, hw: HardwareProfile) -> list[Issue]:
    """The simulated peak per rank against the device's memory (each rank's CUDA device;
    on CPU the profile's memory per rank) less memory_reserve_bytes."""
    cuda = device_type() == "cuda"
    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else hw.memory_bytes
    limit = usable_bytes(capacity)
    if peak_bytes <= limit:
        return []
    where = torch.cuda.get_device_name(0) if cuda else f"a rank in profile {hw.name}"
    return [("plan", f"needs {peak_bytes / GIB:.2f} GiB per rank at its peak (simulated), over "
             f"the {max(limit, 0) / GIB:.2f} GiB usable of the {capacity / GIB:.2f} GiB of {where} "
             "(less the reserve for the runtime and fragmentation)",
             "use more ranks, ZeRO, recompute or a smaller micro batch")]


# ---- launching ----

def launch_train(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions = RunOptions(),
                 checked: Callable[[], None] | None = None) -> RunRecord:
    """Run one training plan; see launch_train_many."""
    return launch_train_many([(model, plan)], cluster, options, checked)[0]


def launch_train_many(jobs: list[tuple[ModelSpec, Plan]], cluster: Cluster,
                      options: RunOptions = RunOptions(),
                      checked: Callable[[], None] | None = None) -> list[RunRecord]:
    """Run several (model, plan) jobs of the same world size one after the other in one
    torchrun launch (one process group), and return one record per job. Every job is
    checked before anything starts; `checked` is called once every check has passed, just
    before the ranks start (a probe of the machine)."""
    if options.checkpoint_dir is not None and len(jobs) > 1:
        refuse([("run.checkpoint_dir", f"one checkpoint folder for {len(jobs)} jobs",
                 "checkpoint one job per launch")])
    runnable = [(m, check_train(m, p, cluster, options)) for m, p in jobs]
    sizes = {p.world_size for _, p in runnable}
    if len(sizes) != 1:
        refuse([("plan", f"jobs of world sizes {sorted(sizes)} in one launch",
                 "launch plans of one world size together")])
    nproc = sizes.pop() // options.nnodes
    results, world = run_jobs(TRAIN_RANK, runnable, options.rank_options().to_json(), nproc, options,
                              checked)
    if any(not r["step_times_s"] for r in results):
        raise RunFailed(f"every step had run before the last restart, so none was measured; the "
                        f"losses are in the newest checkpoint of {options.checkpoint_dir}")
    return [_train_record(m, p, cluster, options, TrainResult.from_json(r), world)
            for (m, p), r in zip(runnable, results)]


def launch_serve(model: ModelSpec, plan: InferencePlan, cluster: Cluster,
                 options: ServeOptions = ServeOptions(),
                 checked: Callable[[], None] | None = None) -> ServeRecord:
    """Run one serving plan; see launch_serve_many."""
    return launch_serve_many([(model, plan)], cluster, options, checked)[0]


def launch_serve_many(jobs: list[tuple[ModelSpec, InferencePlan]], cluster: Cluster,
                      options: ServeOptions = ServeOptions(),
                      checked: Callable[[], None] | None = None) -> list[ServeRecord]:
    """Run several serving jobs of the same world size in one torchrun launch; `checked`
    as in launch_train_many."""
    for model, plan in jobs:
        check_serve(model, plan, cluster, options)
    nproc = cluster.num_gpus // options.nnodes
    results, world = run_jobs(SERVE_RANK, jobs, options.rank_options().to_json(), nproc, options,
                              checked)
    return [_serve_record(m, p, cluster, options, ServeResult.from_json(r), world)
            for (m, p), r in zip(jobs, results)]


def run_jobs(module: str, jobs: list, rank_options: dict, nproc_per_node: int,
             options: RunOptions | ServeOptions,
             checked: Callable[[], None] | None = None) -> tuple[list[dict], int]:
    """Write run.json (the (model, plan) jobs and the ranks' options) into options.run_dir
    (default: a temporary folder, removed), start the ranks of `module` on it, and return
    the per-job results and the world size from the result.json that each node's local
    rank 0 writes; RunFailed if the ranks exit without one. Files a previous run left in
    run_dir are removed first. `checked` runs after the torch check, before the ranks."""
    check_torch()
    if checked is not None:
        checked()
    with tempfile.TemporaryDirectory(prefix="meshplan-run-") as tmp:
        folder = Path(options.run_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (folder / "result.json", *folder.glob("grads*_rank*.pt")):
            stale.unlink(missing_ok=True)
        run_file = folder / "run.json"
        write_json(run_file, {"jobs": [{"model": m.to_dict(), "plan": p.to_dict()} for m, p in jobs],
                              "options": rank_options})
        torchrun(module, [str(run_file)], nproc_per_node, options.nnodes, options.node_rank,
                 options.rdzv_endpoint, max_restarts=options.max_restarts,
                 rdzv_timeout_s=options.rdzv_timeout_s)
        result_file = folder / "result.json"
        if not result_file.is_file():
            raise RunFailed(f"the ranks exited without writing {result_file}")
        result = json.loads(result_file.read_text())
        return result["results"], result["world_size"]


def torchrun(module: str, args: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
             rdzv_endpoint: str | None = None, on_line: Callable[[str], None] | None = None,
             timeout_s: float | None = None, max_restarts: int = 0,
             rdzv_timeout_s: float = 600.0) -> None:
    """Run `python -m module *args` on nproc_per_node ranks of this machine through torchrun
    (--standalone on one machine; across several, a c10d rendezvous that node 0 hosts and
    every node must join within rdzv_timeout_s), in its own process group, restarting every
    rank up to max_restarts times after a failure. Its output (and the ranks') is relayed to
    our stderr, or line by line to `on_line`. RunFailed if it fails or runs past
    `timeout_s`; every rank is stopped on Ctrl-C, SIGTERM (raised as KeyboardInterrupt) or
    any error, with their output from then on dropped."""
    if nnodes == 1:
        where = ["--standalone"]
    else:
        wait_s = math.ceil(rdzv_timeout_s)
        where = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", "meshplan", "--rdzv-conf",
                 f"join_timeout={wait_s},read_timeout={wait_s},is_host={str(node_rank == 0).lower()}"]
    command = [sys.executable, "-m", "torch.distributed.run", *where,
               "--nproc-per-node", str(nproc_per_node), "--max-restarts", str(max_restarts),
               "--monitor-interval", "0.2", "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if max_restarts:
        # Restarted ranks sharing the agent's store read the previous attempt's keys (gloo's
        # and NCCL's addresses) and fail to connect (pytorch/pytorch#135712): one store each.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=_die_with(os.getpid()))
    tail: list[str] = []
    quiet = threading.Event()
    relay = threading.Thread(target=_relay, args=(proc.stdout, tail, on_line, quiet), daemon=True)
    relay.start()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main else None
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        quiet.set()
        _stop(proc)
        raise RunFailed(f"torchrun ran past {timeout_s:g} s and was stopped") from None
    except BaseException:
        quiet.set()
        _stop(proc)
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    relay.join(timeout=5)
    if code != 0:
        output = "".join(tail)
        raise RunFailed(root_cause(output) or rendezvous_failure(output, rdzv_endpoint, rdzv_timeout_s)
                        or f"torchrun exited with code {code}")


def _die_with(parent_pid: int) -> Callable[[], None] | None:
    """For Popen's preexec_fn: the child gets SIGTERM when the launcher dies (even by
    SIGKILL), so that torchrun, which stops its ranks on SIGTERM, never outlives it. Linux
    only (prctl); elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)
    return in_child


def _terminated(signum, _frame):
    """SIGTERM while the ranks run: stop them as Ctrl-C does."""
    raise KeyboardInterrupt


def _relay(stream, tail: list[str], on_line, quiet: threading.Event, keep_chars: int = 20000) -> None:
    pending = ""
    for chunk in iter(lambda: stream.read1(4096), b""):
        if quiet.is_set():  # stopping: torchrun's and the ranks' tracebacks are noise
            continue
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
    """SIGINT to torchrun and the ranks (its process group), and wait for all of them:
    torchrun may exit before a rank it signalled has, so its exit alone does not say the
    ranks are gone. torchrun starts each rank in a session of its own, so the ranks are
    found as its descendants, not in its group. SIGKILL to whatever lingers past the grace."""
    tree = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    if not _all_gone(proc.pid, tree, deadline):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        _all_gone(proc.pid, tree, time.monotonic() + STOP_GRACE_S)


def _all_gone(pgid: int, pids: set[int], deadline: float) -> bool:
    """Whether every process of group `pgid` and every one of `pids` has ended, polling
    until `deadline` (time.monotonic())."""
    while any(pgid == group or pid in pids for pid, _, group in _processes()):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _descendants(root: int) -> set[int]:
    """The live processes below `root` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid, parent, _ in _processes():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process (zombies aside: they hold
    nothing, and their reaping is not ours)."""
    rows = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
            state, parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if state != "Z":
            rows.append((int(stat.parent.name), int(parent), int(group)))
    return rows


def rendezvous_failure(torchrun_output: str, endpoint: str | None, timeout_s: float) -> str | None:
    """One line for a rendezvous that did not complete, from torchrun's output."""
    if "RendezvousConnectionError" in torchrun_output:
        return (f"could not reach the rendezvous at {endpoint} within {timeout_s:g} s; start node 0 "
                "(which hosts it) and check that its host and port are reachable from here")
    if "RendezvousTimeoutError" in torchrun_output:
        return (f"not every node joined the rendezvous at {endpoint} within {timeout_s:g} s; start "
                "every node with the same --nnodes and --rdzv-endpoint")
    return None


def root_cause(torchrun_output: str) -> str | None:
    """One line from torchrun's failure report: which rank failed first, and how. torchrun
    names the failure it timestamped first; when that is a rank it stopped itself (SIGTERM,
    after the rank's collective broke on the dead peer), the other failure it lists is the
    cause."""
    report = torchrun_output.rpartition("Failures:")[2]
    others, found, root = report.partition("Root Cause (first observed failure)")
    if not found:
        return None
    blocks = [root, *re.split(r"^\[\d+\]:\s*$", others, flags=re.MULTILINE)[1:]]
    described = [d for d in map(_failure, blocks) if d is not None]
    if not described:
        return None
    cause = next((d for d in described if d[0] != -signal.SIGTERM), described[0])
    return f"{cause[1]}; torchrun stopped the other ranks"


def _failure(block: str) -> tuple[int | None, str] | None:
    """(exit code, "rank R (local rank L on HOST) failed first, with HOW: ERROR") of one
    failure in torchrun's report."""
    rank = re.search(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)", block)
    if not rank:
        return None
    host = re.search(r"host\s*:\s*(\S+)", block)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
    exit_code = int(code.group(1)) if code else None
    how = f"exit code {exit_code}" if code else "an error"
    if exit_code is not None and exit_code < 0:
        how = f"killed by signal {signal.Signals(-exit_code).name}"
    error = re.findall(r"^\s*(\w+(?:Error|Exception)\b.*)$", block, re.MULTILINE)
    detail = f": {error[-1].strip()}" if error else ""
    return exit_code, (f"rank {rank.group(1)} (local rank {rank.group(2)}"
                       f"{' on ' + host.group(1) if host else ''}) failed first, with {how}{detail}")


# ---- records ----

def _train_record(model: ModelSpec, plan: Plan, cluster: Cluster, options: RunOptions,
                  result: TrainResult, world_size: int) -> RunRecord:
    # the executor routes without a capacity: the plan as executed has the imbalance it ran
    measured = ({} if result.routing_imbalance is None
                else {"moe_capacity_factor": max(1.0, result.routing_imbalance)})
    ran = dataclasses.replace(plan, dtype=result.dtype, **measured)
    prediction, note = prediction_or_why(
        lambda: simulate(model, ran, cluster, load_profile(options.profile)).to_json())
    return RunRecord(model=model, plan=ran, dtype_requested=plan.dtype, device=result.device,
                     world_size=world_size, profile=options.profile, prediction=prediction,
                     prediction_note=note, losses=result.losses, step_times_s=result.step_times_s,
                     # a restart may leave fewer steps than the warm-up: keep one timed
                     warmup=min(options.warmup, len(result.step_times_s) - 1),
                     memory_by_rank=result.memory_by_rank, seed=options.seed,
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
