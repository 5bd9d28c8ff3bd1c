"""The fabric model against an emulated cluster on this machine.

Builds `nodes` "nodes" as Linux network namespaces, each with one NIC (a veth pair) into a
leaf switch (a bridge in a switch namespace); `nodes_per_leaf` nodes per leaf and the leaves
joined through a spine bridge, each leaf's uplink shaped to its downlink capacity /
oversubscription. Every NIC is shaped with tc tbf to `nic_mbit` in each direction (and netem
delay where the kernel has it), so the network, not the cores, bounds the collectives.
Then, with one torchrun node per namespace (c10d rendezvous over the emulated network):

1. measures collectives over groups of two nodes inside one leaf, one group at a time, and
   fits the profile's inter-node level from them (calibration.fit.refit_collectives on the
   local profile: the figures come from the shaped links, none is typed in);
2. measures groups placed as a training mesh places them, every group of a kind at once,
   some sharing a NIC, some crossing the oversubscribed uplinks, and prints predicted
   (collective model x link share from the fabric graph) against measured times, beside the
   prediction without the fabric;
3. runs `meshplan run` for one plan in the two placements the planner weighs against each
   other (data-parallel groups inside a leaf or across the uplinks) and prints the predicted
   and measured step times, and which placement the planner prefers.

Needs root, `ip` and `tc` (iproute2) with the tbf qdisc, `taskset` and `unshare`. Every
namespace, veth and bridge it makes (and the /etc/netns/<namespace>/hosts files that name
the nodes inside them) is removed at the end, also on failure, Ctrl-C or SIGTERM, and every
process left in the namespaces is stopped; traffic stays inside them. What a run killed
outright (SIGKILL, a restart) left is removed by the next run.

    sudo python benchmarks/emulated_cluster.py [--nodes 4] [--nodes-per-leaf 2]
        [--oversubscription 2] [--nic-mbit 200] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from meshplan.calibration.fit import refit_collectives
from meshplan.calibration.samples import Samples, empty_samples
from meshplan.core.mesh import Mesh
from meshplan.core.processes import running
from meshplan.hw_profiles.fabric import Fabric, link_share
from meshplan.hw_profiles.profile import HardwareProfile, load_profile
from meshplan.planner.search import search
from meshplan.simulator.model_spec import from_hf_config
from meshplan.simulator.plan import Cluster

SUBNET = "10.77.{leaf}.{host}"
ETC_NETNS = Path("/etc/netns")
PORT = 29455
MIB = 2**20
# gloo runs the two directions of a two-rank send_recv one after the other (NCCL runs them at
# once), so point-to-point is left out here: the profile derives it from all_reduce.
KINDS = ("all_reduce", "all_gather", "reduce_scatter")
SIZES = (64 * 1024, 256 * 1024, MIB, 4 * MIB)
BANDWIDTH_REGIME_BYTES = MIB  # above this the links' rate, not the software path, sets the time
TARGET_ERROR = 0.15  # issue 12's figure for held-out inter-node collectives, bandwidth regime
# The model `meshplan run` trains: small enough that the gradients' all-reduce, not the two
# cores, dominates a step (about 20 M parameters, 32 tokens per micro-batch).
RUN_MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
             "intermediate_size": 1408, "vocab_size": 8192, "max_position_embeddings": 256,
             "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
RUN_PLAN = {"global_batch": 4, "seq_len": 32, "dp": 2, "pp": 2, "zero": 0, "micro_batch": 1,
            "schedule": "1f1b", "dtype": "fp32", "recompute": "none"}


@dataclass(frozen=True)
class Effort:
    """How much is timed: calls per collective configuration (after one warm-up), whether
    the all-node groups are measured (shown, not checked), and the runs' steps."""

    repeats: int
    scaling: bool
    steps: int
    warmup: int


# --quick (the test's): the checked figures at about two thirds of the time
FULL = Effort(repeats=5, scaling=True, steps=6, warmup=2)
QUICK = Effort(repeats=3, scaling=False, steps=3, warmup=1)


class Unavailable(Exception):
    """Why the emulated cluster cannot be built here."""


def unavailable() -> str | None:
    """Why this machine cannot build the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    missing = [tool for tool in ("ip", "tc", "taskset", "unshare") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found (iproute2, util-linux)" if missing else None


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@dataclass(frozen=True)
class Shape:
    nodes: int = 4
    nodes_per_leaf: int = 2
    oversubscription: float = 2.0
    nic_mbit: float = 200.0
    delay_ms: float = 0.0

    @property
    def leaves(self) -> int:
        return math.ceil(self.nodes / self.nodes_per_leaf)

    def fabric(self) -> Fabric:
        return Fabric("fat-tree", self.nodes_per_leaf, self.oversubscription,
                      f"emulated: {self.nodes} network namespaces, {self.nodes_per_leaf} per leaf "
                      f"bridge, one {self.nic_mbit:g} Mbit/s NIC each, leaf uplinks "
                      f"{self.oversubscription:g}:1 (tc tbf)")


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process in `namespace`."""
    for pid in map(int, _sh("ip", "netns", "pids", namespace).stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class EmulatedCluster:
    """The namespaces, veths, bridges and qdiscs of one emulated cluster; `close` removes them."""

    def __init__(self, shape: Shape):
        self.shape = shape
        self.prefix = f"mpf{os.getpid()}"
        self.switch = f"{self.prefix}sw"
        self.namespaces: list[str] = []
        self.made_etc_netns = not ETC_NETNS.exists()

    def node(self, k: int) -> str:
        return f"{self.prefix}n{k}"

    def address(self, k: int) -> str:
        return SUBNET.format(leaf=0, host=k + 1)

    def _run(self, *args: str) -> None:
        done = _sh(*args)
        if done.returncode != 0:
            raise Unavailable(f"`{' '.join(args)}` failed: {done.stderr.strip()}")

    def _shape(self, namespace: str, device: str, mbit: float) -> None:
        # tbf: the rate in each direction of a link is its egress qdisc's (a full-duplex NIC);
        # a 32 KiB bucket (a small message does not slip through unshaped), 50 ms of queue.
        burst = 32 * 1024
        if self.shape.delay_ms:
            self._run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "handle", "1:",
                      "netem", "delay", f"{self.shape.delay_ms}ms")
            parent = ("parent", "1:1")
        else:
            parent = ("root",)
        self._run("tc", "-n", namespace, "qdisc", "add", "dev", device, *parent, "tbf",
                  "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms")

    def build(self) -> EmulatedCluster:
        s = self.shape
        self._run("ip", "netns", "add", self.switch)
        self.namespaces.append(self.switch)
        self._run("ip", "-n", self.switch, "link", "add", "spine", "type", "bridge")
        self._run("ip", "-n", self.switch, "link", "set", "spine", "up")
        for leaf in range(s.leaves):
            self._run("ip", "-n", self.switch, "link", "add", f"leaf{leaf}", "type", "bridge")
            self._run("ip", "-n", self.switch, "link", "set", f"leaf{leaf}", "up")
            if s.leaves > 1:
                nodes = min(s.nodes_per_leaf, s.nodes - leaf * s.nodes_per_leaf)
                up, down = f"up{leaf}", f"dn{leaf}"
                self._run("ip", "-n", self.switch, "link", "add", up, "type", "veth", "peer", "name", down)
                self._run("ip", "-n", self.switch, "link", "set", up, "master", f"leaf{leaf}", "up")
                self._run("ip", "-n", self.switch, "link", "set", down, "master", "spine", "up")
                uplink_mbit = nodes * s.nic_mbit / s.oversubscription
                self._shape(self.switch, up, uplink_mbit)
                self._shape(self.switch, down, uplink_mbit)
        for k in range(s.nodes):
            ns = self.node(k)
            self._run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: there every node's
            # host name (set in its own UTS namespace by `launch`) resolves to its address, as
            # c10d needs to find its store host and the workers' master.
            (ETC_NETNS / ns).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / ns / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{self.address(j)} {self.node(j)}\n" for j in range(s.nodes)))
            self._run("ip", "-n", self.switch, "link", "add", f"n{k}", "type", "veth", "peer",
                      "name", "eth0", "netns", ns)
            self._run("ip", "-n", self.switch, "link", "set", f"n{k}", "master",
                      f"leaf{k // s.nodes_per_leaf}", "up")
            self._run("ip", "-n", ns, "addr", "add", f"{self.address(k)}/16", "dev", "eth0")
            self._run("ip", "-n", ns, "link", "set", "eth0", "up")
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
            # An RDMA NIC does not slow-start; TCP would, after each idle gap between two
            # collectives, and a lone flow would then fall short of the link (netns sysctl).
            self._run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0")
            self._shape(ns, "eth0", s.nic_mbit)
            self._shape(self.switch, f"n{k}", s.nic_mbit)
        return self

    def stop_processes(self) -> None:
        """SIGKILL every process left in the nodes' namespaces (all of them started here)."""
        for ns in self.namespaces:
            _kill_inside(ns)

    def close(self) -> None:
        self.stop_processes()
        for ns in reversed(self.namespaces):
            _sh("ip", "netns", "del", ns)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self.namespaces.clear()
        if self.made_etc_netns and ETC_NETNS.is_dir() and not any(ETC_NETNS.iterdir()):
            ETC_NETNS.rmdir()

    def launch(self, commands: list[list[str]], log: Path, timeout_s: float) -> list[str]:
        """Run commands[k] in node k's namespace (host name its namespace's, pinned to core k
        mod cores, gloo on eth0), all at once; their outputs. Raises RuntimeError naming the
        node that failed; every process left in the namespaces is stopped."""
        cores = sorted(os.sched_getaffinity(0))
        env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1")
        procs = []
        for k, cmd in enumerate(commands):
            out = open(log.with_name(f"{log.name}.node{k}.log"), "w")
            procs.append((subprocess.Popen(
                ["ip", "netns", "exec", self.node(k), "unshare", "--uts", "sh", "-c",
                 'hostname "$0" && exec "$@"', self.node(k),
                 "taskset", "-c", str(cores[k % len(cores)]), *cmd],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True), out))
        deadline = time.monotonic() + timeout_s
        try:
            for k, (proc, _) in enumerate(procs):
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"node {k} exited with {code}: see {log.name}.node{k}.log")
        finally:
            self.stop_processes()
            for proc, out in procs:
                proc.wait()
                out.close()
        return [log.with_name(f"{log.name}.node{k}.log").read_text() for k in range(len(commands))]


# this module's namespaces: mpf<pid of the run that made it>sw, ...n<k> or mpfprobe<pid>
OWN_NAMESPACE = re.compile(r"mpf(?:probe)?(\d+)(?:sw|n\d+)?")


def remove_stale() -> list[str]:
    """Remove the namespaces and /etc/netns entries that a run killed outright (SIGKILL, a
    machine restart) left behind: those named for a process no longer running. Their names."""
    listed = {line.split()[0] for line in _sh("ip", "netns", "list").stdout.splitlines() if line.strip()}
    files = {d.name for d in ETC_NETNS.iterdir()} if ETC_NETNS.is_dir() else set()
    stale = sorted(n for n in listed | files
                   if (m := OWN_NAMESPACE.fullmatch(n)) and not running(int(m.group(1))))
    for name in stale:
        _kill_inside(name)
        _sh("ip", "netns", "del", name)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    return stale


@contextmanager
def emulated_cluster(shape: Shape):
    """The built cluster; removed on exit, also when building fails half way or on SIGTERM.
    What earlier runs that were killed outright left behind is removed first."""
    stale = remove_stale()
    if stale:
        print(f"removed namespaces left by killed runs: {', '.join(stale)}", file=sys.stderr)
    cluster = EmulatedCluster(shape)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield cluster.build()
    finally:
        cluster.close()
        signal.signal(signal.SIGTERM, previous)


# ---- measuring collectives across the namespaces ----

def torchrun_command(cluster: EmulatedCluster, module: str, args: list[str], nproc: int, k: int) -> list[str]:
    code = ("import sys; from meshplan.executor.launch import torchrun; "
            f"torchrun({module!r}, sys.argv[1:], {nproc}, {cluster.shape.nodes}, {k}, "
            f"{cluster.address(0) + ':' + str(PORT)!r})")
    return [sys.executable, "-c", code, *args]


def mesh_patterns(shape: Shape, nproc: int, scaling: bool = True) -> list[dict]:
    """Groups of ranks (numbered node by node, `nproc` to a node) to time, each with the mesh
    and axes it comes from (tp inside a node, dp over the nodes of a leaf, pp over the
    leaves). The fit set: one group alone, inside a node and over two nodes of a leaf (1 and
    `nproc` ranks per node). Held out: every group of a kind side by side, sharing NICs and
    uplinks; and with `scaling`, groups over all nodes (the node-count scaling, which gloo's
    algorithms set here, not the ring of NCCL that the collective model composes)."""
    sizes = {"tp": nproc, "dp": shape.nodes_per_leaf, "pp": shape.leaves, "cp": 1}
    order = ("tp", "dp", "pp", "cp")
    one_per_node = {"tp": 1, "dp": shape.nodes_per_leaf, "pp": shape.leaves, "cp": 1}

    def pattern(name: str, sizes_: dict, gpus_per_node: int, axes: tuple[str, ...], fit: bool,
                alone: bool) -> dict:
        mesh = Mesh.of(sizes_, order, gpus_per_node)
        groups = sorted({tuple(int(r) for r in mesh.ranks(axes, origin)) for origin in range(mesh.world_size)})
        if alone:  # the first group only; as ranks of nodes of `nproc`
            groups = [tuple(r // gpus_per_node * nproc + r % gpus_per_node for r in groups[0])]
        nodes = len({r // nproc for r in groups[0]})
        return {"name": name, "groups": [list(g) for g in groups], "axes": list(axes), "fit": fit,
                "nodes": nodes, "kinds": list(KINDS), "sizes": list(SIZES),
                "mesh": {"sizes": sizes_, "order": order, "gpus_per_node": gpus_per_node if alone else nproc}}
    mesh_name = "-".join(f"{a}{sizes[a]}" for a in order if sizes[a] > 1)
    patterns = [pattern("alone: inside a node", sizes, nproc, ("tp",), True, True),
                pattern("alone: 2 nodes, 1 per node", one_per_node, 1, ("dp",), True, True),
                pattern(f"alone: 2 nodes, {nproc} per node", sizes, nproc, ("tp", "dp"), True, True)]
    patterns += [pattern(f"side by side: {'x'.join(axes)} of {mesh_name}", sizes, nproc, axes, False, False)
                 for axes in (("dp",), ("pp",), ("tp", "dp"), ("tp", "pp"), ("dp", "pp"))]
    if scaling:
        patterns += [pattern("alone: all nodes, 1 per node", one_per_node, 1, ("dp", "pp"), False, True),
                     pattern(f"alone: all nodes, {nproc} per node", sizes, nproc, ("tp", "dp", "pp"), False, True)]
    return patterns


def measure(cluster: EmulatedCluster, patterns: list[dict], nproc: int, work: Path,
            effort: Effort) -> pd.DataFrame:
    spec, out = work / "patterns.json", work / "rows.json"
    spec.write_text(json.dumps([{k: p[k] for k in ("name", "groups", "kinds", "sizes")} for p in patterns]))
    args = ["--patterns", str(spec), "--out", str(out), "--repeats", str(effort.repeats)]
    cluster.launch([torchrun_command(cluster, "meshplan.calibration.measure.groups", args, nproc, k)
                    for k in range(cluster.shape.nodes)], work / "measure", timeout_s=1800)
    return pd.DataFrame(json.loads(out.read_text()))


def fit_profile(rows: pd.DataFrame, patterns: list[dict], shape: Shape, nproc: int) -> HardwareProfile:
    """The local profile with its collectives refitted from the fit patterns' rows and the
    emulated fabric; each namespace node gets its share of the machine's cores."""
    fit_names = {p["name"] for p in patterns if p["fit"]}
    fitted = rows[rows["pattern"].isin(fit_names)].drop(columns="pattern")
    samples = Samples(empty_samples().gemm, empty_samples().memory_bound, fitted)
    base = load_profile("local")
    hw = refit_collectives(samples, base, "emulated-cluster",
                           [f"measured across {shape.nodes} network namespaces ({shape.fabric().source})"],
                           holdout_fraction=0.0)
    cores = len(os.sched_getaffinity(0)) / shape.nodes
    return replace(hw, gpus_per_node=nproc, nics_per_node=1, nic_bytes_per_s=shape.nic_mbit * 1e6 / 8,
                   fabric=shape.fabric(), extra={**hw.extra, "cores_per_node": cores})


def predictions(rows: pd.DataFrame, patterns: list[dict], hw: HardwareProfile) -> pd.DataFrame:
    """Predicted (with and without the fabric's link share) against measured, per held-out row."""
    out = []
    for p in patterns:
        if p["fit"]:
            continue
        mesh = Mesh.of(p["mesh"]["sizes"], tuple(p["mesh"]["order"]), p["mesh"]["gpus_per_node"])
        share = link_share(hw.fabric, hw.nics_per_node, mesh, tuple(p["axes"]))
        for row in rows[rows["pattern"] == p["name"]].itertuples():
            kind, m, n, r = row.collective, row.message_bytes, int(row.group_size), int(row.ranks_per_node)
            predicted = hw.collective_time_s(kind, m, n, r, share)
            out.append({"pattern": p["name"], "nodes": p["nodes"], "kind": kind, "MiB": m / MIB, "group": n,
                        "per_node": r, "link_share": share, "measured_s": row.time_s,
                        "predicted_s": predicted, "error": predicted / row.time_s - 1,
                        "no_fabric_s": hw.collective_time_s(kind, m, n, r),
                        "no_fabric_error": hw.collective_time_s(kind, m, n, r) / row.time_s - 1})
    return pd.DataFrame(out)



# ---- training steps across the namespaces ----

def run_plans(cluster: EmulatedCluster, hw_path: Path, work: Path, effort: Effort) -> pd.DataFrame:
    """`meshplan run` of RUN_PLAN (one rank per node) in the placement the planner prefers
    and the one it rejects (data-parallel groups inside a leaf, or across the uplinks), with
    the planner's verdict and each run's predicted and measured step time."""
    hw = HardwareProfile.from_dict(json.loads(hw_path.read_text()))
    model_file = work / "model.json"
    model_file.write_text(json.dumps(RUN_MODEL))
    model = from_hf_config(RUN_MODEL, "emulated-run-model")
    nodes = cluster.shape.nodes
    cluster_spec = Cluster(num_gpus=nodes, gpus_per_node=1)
    fixed = {**RUN_PLAN, "dp": nodes // 2, "pp": 2}
    ranked = search(model, cluster_spec, hw, fixed).ranked
    preferred = ranked[0].plan.placement
    inner = preferred.index("dp") < preferred.index("pp")
    # the best plan whose data-parallel and pipeline axes nest the other way round
    rejected = next(r.plan.placement for r in ranked
                    if (r.plan.placement.index("dp") < r.plan.placement.index("pp")) != inner)
    rows = []
    for verdict, placement in (("preferred", preferred), ("rejected", rejected)):
        flags = ["--model", str(model_file), "--hardware", str(hw_path), "--gpus", str(nodes),
                 "--gpus-per-node", "1", "--placement", ",".join(placement), "--steps", str(effort.steps),
                 "--warmup", str(effort.warmup), "--timeout-s", "300", "--json", "--nnodes", str(nodes),
                 "--rdzv-endpoint", f"{cluster.address(0)}:{PORT}", "--no-probe"]
        for key, value in fixed.items():
            flags += [f"--{key.replace('_', '-')}", str(value)]
        outputs = cluster.launch([[sys.executable, "-m", "meshplan.cli", "run", *flags,
                                   "--node-rank", str(k)] for k in range(nodes)],
                                 work / f"run-{verdict}", timeout_s=900)
        starts = [m.start() for m in re.finditer(r"^\{$", outputs[0], re.MULTILINE)]
        summary = json.loads(outputs[0][starts[-1]:])
        rows.append({"placement": "-".join(placement), "planner": verdict,
                     "predicted_s": summary["predicted_step_time_s"],
                     "measured_s": summary["measured_step_time_s"],
                     "spread_s": summary["step_time_spread_s"]})
    out = pd.DataFrame(rows)
    out["error"] = out["predicted_s"] / out["measured_s"] - 1
    return out


def run(shape: Shape, nproc: int, work: Path, with_runs: bool = True, effort: Effort = FULL) -> dict:
    """Build the cluster, measure, fit, predict, run; the figures as tables."""
    with emulated_cluster(shape) as cluster:
        patterns = mesh_patterns(shape, nproc, scaling=effort.scaling)
        rows = measure(cluster, patterns, nproc, work, effort)
        hw = fit_profile(rows, patterns, shape, nproc)
        hw_path = work / "emulated-cluster.json"
        hw.save(hw_path)
        table = predictions(rows, patterns, hw)
        runs = run_plans(cluster, hw_path, work, effort) if with_runs else pd.DataFrame()
    inter = hw.collectives.inter
    fitted = {f"{k}/r{r}": (c.large.busbw_bytes_per_s * 8 / 1e6, c.large.alpha_s * 1e3)
              for k in KINDS for r, c in sorted(inter[k].items())}
    return {"collectives": table, "runs": runs, "fitted": fitted, "profile": str(hw_path)}


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (for link latency)."""
    probe = f"mpfprobe{os.getpid()}"
    if _sh("ip", "netns", "add", probe).returncode != 0:
        return False
    try:
        _sh("ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        return _sh("tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "netem",
                   "delay", "1ms").returncode == 0
    finally:
        _sh("ip", "netns", "del", probe)


def _errors(t: pd.DataFrame) -> str:
    return (f"median |error| {t['error'].abs().median():.1%}, max {t['error'].abs().max():.1%} "
            f"(without the fabric's link share: median {t['no_fabric_error'].abs().median():.1%}, "
            f"max {t['no_fabric_error'].abs().max():.1%})")


def report(result: dict, shape: Shape) -> str:
    t = result["collectives"]
    fmt = {"float_format": lambda x: f"{x:.3f}", "index": False}
    lines = [f"emulated cluster: {shape.nodes} nodes, {shape.nodes_per_leaf} per leaf, NIC "
             f"{shape.nic_mbit:g} Mbit/s, leaf uplinks {shape.oversubscription:g}:1"
             + (f", {shape.delay_ms:g} ms per link" if shape.delay_ms else ", no added delay"),
             f"profile: {result['profile']}",
             "inter-node level fitted on two-node groups alone (per-rank busbw Mbit/s / alpha ms): "
             + ", ".join(f"{k} {bw:.0f}/{a:.2f}" for k, (bw, a) in result["fitted"].items()), ""]
    two = t[t["nodes"] == 2]
    lines += ["groups over two nodes side by side, held out of the fit: predicted (collective "
              "model x link share of the fabric graph) vs measured",
              two.drop(columns="nodes").to_string(**fmt)]
    big = two["MiB"] * MIB >= BANDWIDTH_REGIME_BYTES
    median = two[big]["error"].abs().median()
    lines += [f"bandwidth regime (>= {BANDWIDTH_REGIME_BYTES / MIB:g} MiB): {_errors(two[big])}; "
              f"target median within {TARGET_ERROR:.0%}: {'met' if median <= TARGET_ERROR else 'NOT met'}",
              f"all sizes: {_errors(two)}", ""]
    more = t[t["nodes"] > 2]
    if not more.empty:
        lines += [f"groups over {shape.nodes} nodes (node-count scaling: gloo's algorithms here, "
                  "NCCL's ring in the model; shown, not part of the check)",
                  more.drop(columns="nodes").to_string(**fmt), ""]
    if not result["runs"].empty:
        lines += ["meshplan run, one rank per node: predicted vs measured step time",
                  result["runs"].to_string(**fmt)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--nodes-per-leaf", type=int, default=2)
    parser.add_argument("--oversubscription", type=float, default=2.0)
    parser.add_argument("--nic-mbit", type=float, default=200.0)
    parser.add_argument("--ranks-per-node", type=int, default=2, help="ranks per node when measuring collectives")
    parser.add_argument("--delay-ms", type=float, default=0.1, help="netem delay per link where the kernel has netem")
    parser.add_argument("--no-runs", action="store_true", help="collectives only, no `meshplan run`")
    parser.add_argument("--quick", action="store_true",
                        help="3 timed calls per collective (not 5), no all-node groups, 3 steps per run")
    parser.add_argument("--out", type=Path, help="folder for the profile, the rows and the logs (default: temporary)")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"emulated cluster skipped: {why}")
        return 0
    delay = args.delay_ms if netem_available() else 0.0
    shape = Shape(args.nodes, args.nodes_per_leaf, args.oversubscription, args.nic_mbit, delay)
    with tempfile.TemporaryDirectory(prefix="meshplan-emulated-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            result = run(shape, args.ranks_per_node, work, with_runs=not args.no_runs,
                         effort=QUICK if args.quick else FULL)
        except Unavailable as exc:
            print(f"emulated cluster skipped: {exc}")
            return 0
        if not delay:
            print("netem is not in this kernel: links are shaped in rate only (latency as measured)")
        print(report(result, shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
