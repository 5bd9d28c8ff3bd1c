"""simulate(model, plan, cluster, hw): predicted step time, throughput, per-device memory
and the pipeline timeline of one training plan.

Order of the step (Megatron-LM / torchtitan): each pipeline rank runs its forward and
backward micro-batch ops in the schedule's order (discrete-event simulation in
pipeline_sim), then synchronises gradients over its data-parallel group (bucketed, the part
not hidden behind the last micro-batch's backward is exposed) and steps the optimizer.
Every term comes from simulator/step.py, the functions the planner evaluates its
candidates with, for this one plan and each of its pipeline ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from meshplan.hw_profiles.fabric import training_groups
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator import step
from meshplan.simulator.cost import per_rank_profile, tp_overlapped
from meshplan.simulator.memory import StageMemory, usable_bytes
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import masked_attention_flops_per_step, model_flops_per_step
from meshplan.simulator.partition import balanced_partition, rank_chunks
from meshplan.simulator.pipeline_sim import PipelineResult, SharedCores, simulate_pipeline
from meshplan.simulator.plan import EXPERT_AXES, PLAN_WIDE, RECOMPUTE, Cluster, Plan
from meshplan.simulator.rules import HARDWARE, violations
from meshplan.core.errors import PlanError
from meshplan.simulator.schedule import (SPLIT_BACKWARD, in_flight, stage_index, stage_op_tuples,
                                         warmup_ops)

MFU_DEFINITION = ("model FLOPs per step (3 x the forward GEMM FLOPs, attention included, recompute "
                  "not counted; Chowdhery et al. 2022 app. B) / (step time x GPUs x the dtype's "
                  "dense peak FLOP/s)")


def mfu_text(mfu: float, mfu_causal: float) -> str:
    """MFU with its definition, and beside it the same over the attention a causal mask keeps
    (at long sequences the masked half of the square is much of the model FLOPs)."""
    return (f"MFU {mfu:.1%} = {MFU_DEFINITION}; {mfu_causal:.1%} with attention counted over the "
            "query-key pairs the causal mask keeps (as Dao 2023, FlashAttention-2 sec 4.1)")


BREAKDOWN_KEYS = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm", "dp_comm",
                  "contention", "stragglers", "host_gap", "bubble", "optimizer")


@dataclass(frozen=True)
class StageReport:
    """One pipeline rank: its layers, memory and busy time, and the layers of each of its
    (virtual) stages in the order it runs them (stage j of the split sits on rank j % pp)."""

    layers: int
    memory: StageMemory
    compute_s: float
    chunk_layers: tuple[int, ...]

    def to_json(self) -> dict:
        return {"layers": self.layers, "chunk_layers": list(self.chunk_layers),
                "memory_bytes": self.memory.to_json(), "compute_s": self.compute_s}


@dataclass(frozen=True)
class SimulationResult:
    model: ModelSpec
    plan: Plan
    cluster: Cluster
    hardware: str
    step_time_s: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    mfu: float
    mfu_causal: float  # without the attention the causal mask drops (masked_attention_flops_per_step)
    peak_memory_bytes: float
    memory_limit_bytes: float
    fits: bool
    breakdown_s: dict
    stages: tuple[StageReport, ...]
    pipeline: PipelineResult = field(repr=False)
    error_band: tuple[float, float] = (0.0, 0.0)
    communication: dict = field(default_factory=dict)
    op_comm: dict = field(default_factory=dict)   # share of F / B ops that is exposed TP, CP

    @property
    def layer_split(self) -> tuple[int, ...]:
        """Layers per (virtual) stage in pipeline order, as simulated (schedule.stage_index
        places them on the ranks)."""
        p, v = len(self.stages), len(self.stages[0].chunk_layers)
        split = [0] * (p * v)
        for (s, c), j in np.ndenumerate(stage_index(self.plan.schedule == "zb-v" and p > 1, p, *np.indices((p, v)))):
            split[j] = self.stages[s].chunk_layers[c]
        return tuple(split)

    @property
    def label(self) -> str:
        """The plan in one line, as timelines and tables title it."""
        return (f"{self.model.name} on {self.cluster.num_gpus}x {self.hardware}: "
                f"{self.plan.summary(bool(self.model.num_experts))}, {self.step_time_s:.3f} s/step")

    def to_json(self) -> dict:
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "params": self.model.num_params(), "active_params": self.model.num_params(active=True),
            "model_tflops_per_gpu": self.model_tflops_per_gpu, "mfu": self.mfu,
            "mfu_causal": self.mfu_causal,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes, "fits": self.fits,
            "breakdown_s": dict(self.breakdown_s),
            "stages": [s.to_json() for s in self.stages],
            "error_band": {"median_rel": self.error_band[0], "p95_rel": self.error_band[1]},
            "communication": self.communication, "mfu_definition": MFU_DEFINITION,
            "plan": self.plan.to_dict(), "model": self.model.to_dict(),
            "cluster": {"num_gpus": self.cluster.num_gpus,
                        "gpus_per_node": self.cluster.gpus_per_node},
            "hardware": self.hardware,
        }


def plan_rows(model: ModelSpec, plan: Plan, cluster: Cluster, hw: HardwareProfile) -> dict:
    """The plan as one row of step.rows, with its times (step.add_times)."""
    return plans_rows(model, [plan], cluster, hw)


def plans_rows(model: ModelSpec, plans: list[Plan], cluster: Cluster, hw: HardwareProfile) -> dict:
    """Plans that share the plan-wide fields (PLAN_WIDE) as rows of step.rows, in their
    order, with their times (step.add_times): one pass over all of them."""
    knobs = [_knobs(plan, cluster, hw) for plan in plans]
    r = step.rows(model, {k: np.array([row[k] for row in knobs]) for k in knobs[0]},
                  {k: getattr(plans[0], k) for k in PLAN_WIDE})
    return step.add_times(r, model, hw)


def _knobs(plan: Plan, cluster: Cluster, hw: HardwareProfile) -> dict:
    """The plan's knobs as step.rows reads them."""
    # tp, cp, dp (gradients reduce over DP x CP) and pp groups, placed on the profile's fabric
    groups = training_groups(hw.fabric, hw.nics_per_node, plan.mesh(cluster.gpus_per_node))
    experts = plan.expert_mesh(cluster.gpus_per_node)
    p = plan.pp
    return {"dp": plan.dp, "tp": plan.tp, "pp": p, "cp": plan.cp, "sp": plan.sp,
            "zero": plan.zero, "rc": RECOMPUTE.index(plan.recompute),
            "micro_batch": plan.micro_batch,
            "sched": step.schedule_codes(plan.schedule if p > 1 else "1f1b")[0],
            "virtual_stages": plan.virtual_stages, "num_microbatches": plan.num_microbatches,
            "tp_overlap": plan.tp_overlap, "a2a_overlap": plan.moe_a2a_overlap,
            "reshard": plan.reshard_after_forward,
            **{f"{k}_rpn": g.ranks_per_node for k, g in groups.items()},
            **{f"{k}_share": g.link_share for k, g in groups.items()},
            "ep": plan.ep, "etp": plan.etp, **expert_rpn(experts)}


def expert_rpn(experts) -> dict:
    """The link levels (ranks per node) of the expert mesh's groups (Plan.expert_mesh)."""
    return {f"{axis}_rpn": experts.group((axis,)).ranks_per_node for axis in EXPERT_AXES}


def layer_partition(model: ModelSpec, plan: Plan, r: dict) -> tuple[int, ...]:
    """The plan's layers per (virtual) stage: as given, or the balanced partition."""
    return plan.layer_partition or balanced_partition(
        model.num_layers, plan.num_virtual, float(r["layer"][0]),
        float(r["emb_fwd"][0] + r["emb_bwd"][0]), float(r["head_fwd"][0] + r["head_bwd"][0]))


def pipeline_partition(model: ModelSpec, plan: Plan, cluster: Cluster,
                       hw: HardwareProfile) -> tuple[int, ...]:
    """The layers per (virtual) stage that `simulate` prices the plan with, for the executor
    to run the same split."""
    rank_hw = per_rank_profile(hw, cluster.ranks_per_node)
    return layer_partition(model, plan, plan_rows(model, plan, cluster, rank_hw))


def check_hardware(fields, model: ModelSpec, hw: HardwareProfile) -> None:
    """What the plan asks of the device that its profile lacks (rules.HARDWARE)."""
    issues = violations(HARDWARE, fields, model, hw)
    if issues:
        raise PlanError.of(issues)


def simulate(model: ModelSpec, plan: Plan, cluster: Cluster, hw: HardwareProfile) -> SimulationResult:
    return simulate_many(model, [plan], cluster, hw)[0]


def simulate_many(model: ModelSpec, plans: list[Plan], cluster: Cluster,
                  hw: HardwareProfile) -> list[SimulationResult]:
    """simulate() of each plan, the rows of those that share the plan-wide fields built in
    one pass (a search re-ranks its best 24 plans: Mixtral 8x7B's took 0.52 s one by one
    and 0.30 s so here, its terms' numpy calls paid once instead of per one-row plan)."""
    for plan in plans:
        plan.validate(model, cluster)
        check_hardware(plan.fields(), model, hw)
    rank_hw = per_rank_profile(hw, cluster.ranks_per_node)
    batches: dict[tuple, list[int]] = {}
    for i, plan in enumerate(plans):
        batches.setdefault(tuple(getattr(plan, k) for k in PLAN_WIDE), []).append(i)
    out: list[SimulationResult | None] = [None] * len(plans)
    for rows in batches.values():
        r = plans_rows(model, [plans[i] for i in rows], cluster, rank_hw)
        for j, i in enumerate(rows):
            out[i] = _simulate_row(model, plans[i], cluster, hw, rank_hw, step.take(r, [j]))
    return out


def _simulate_row(model: ModelSpec, plan: Plan, cluster: Cluster, device_hw: HardwareProfile,
                  hw: HardwareProfile, r: dict) -> SimulationResult:
    """simulate() of a valid plan from its row `r` (plans_rows), on `hw`, the profile as one
    of a node's ranks sees it (per_rank_profile of `device_hw`)."""
    peak_flops, hardware = device_hw.peak_flops[plan.dtype], device_hw.name
    p, v, m = plan.pp, plan.virtual_stages, plan.num_microbatches
    v_shaped = plan.schedule == "zb-v" and p > 1
    chunks = rank_chunks(layer_partition(model, plan, r), p, v_shaped)  # (p, v) layers
    stage = stage_index(v_shaped, p, *np.indices((p, v)))
    first, last = stage == 0, stage == p * v - 1
    chunk_args = (r, chunks.reshape(1, -1), 1, first.reshape(1, -1), last.reshape(1, -1))
    fwd, bwd, wgrad = (x.reshape(p, v) for x in step.chunk_s(*chunk_args))
    paired = tuple(x.reshape(p, v) for x in step.chunk_s(*chunk_args, paired=True)[:2]) \
        if plan.moe_a2a_overlap else None
    if plan.schedule not in SPLIT_BACKWARD or p == 1:
        wgrad_arg, bwd_arg = None, bwd
    else:
        wgrad_arg, bwd_arg = wgrad, bwd - wgrad

    s, n = np.arange(p)[None, :], chunks.sum(axis=1)[None, :]
    params = step.rank_params(r, model, s, n)
    tail = step.rank_tail_s(r, model, hw, s, n, params)
    hop_s = float(r["hop"][0])
    schedule = plan.schedule if p > 1 else "1f1b"
    tails = tail.total_s[0]
    shared = _shared_cores(plan, cluster, device_hw)
    pipe = simulate_pipeline(schedule, m, fwd, bwd_arg, hop_s, wgrad_s=wgrad_arg, tail_s=tails,
                             paired_s=paired, shared=shared)
    # the breakdown's terms are the ops' durations: taken from the pipeline with every
    # device busy, then scaled to the step the shared cores give
    even = pipe if shared is None else simulate_pipeline(
        schedule, m, fwd, bwd_arg, hop_s, wgrad_s=wgrad_arg, tail_s=tails, record_events=False,
        paired_s=paired)
    no_p2p = simulate_pipeline(schedule, m, fwd, bwd_arg, 0.0, wgrad_s=wgrad_arg, tail_s=tails,
                               record_events=False, paired_s=paired) if p > 1 else even
    step_s = float(pipe.step_time_s)

    limit = usable_bytes(float(hw.memory_bytes))
    held = in_flight(r["sched"][:, None], p, v, m, s, plan.moe_a2a_overlap)
    memory = step.rank_memory(r, model, s, n, params, held)
    stages = tuple(StageReport(int(n[0, k]), StageMemory(*(float(memory[key][0, k]) for key in (
        "weights", "gradients", "optimizer", "activations", "buffers"))),
        float(pipe.stage_busy_s[k]), tuple(int(x) for x in chunks[k])) for k in range(p))
    peak = max(st.memory.total_bytes for st in stages)

    breakdown, critical = _breakdown(r, even, no_p2p, chunks, stage, m, tail,
                                     _paired_layers(plan, schedule, chunks))
    if shared is not None:
        breakdown = {k: t * step_s / even.step_time_s for k, t in breakdown.items()}
    communication = _communication(r, breakdown, chunks[critical], stage, m, tail, critical, hw)
    tokens = plan.global_batch * plan.seq_len
    model_flops = model_flops_per_step(model, plan.global_batch, plan.seq_len)
    tflops_per_gpu = model_flops / step_s / cluster.num_gpus / 1e12
    return SimulationResult(
        model=model, plan=plan, cluster=cluster, hardware=hardware, step_time_s=step_s,
        tokens_per_s=tokens / step_s, model_tflops_per_gpu=tflops_per_gpu,
        mfu=tflops_per_gpu * 1e12 / peak_flops,
        mfu_causal=(model_flops - masked_attention_flops_per_step(model, plan.global_batch, plan.seq_len))
        / step_s / cluster.num_gpus / peak_flops, peak_memory_bytes=peak,
        memory_limit_bytes=limit, fits=bool(peak <= limit), breakdown_s=breakdown,
        stages=stages, pipeline=pipe, error_band=hw.relative_error_band(),
        communication=communication, op_comm=_op_comm(r))


def _shared_cores(plan: Plan, cluster: Cluster, hw: HardwareProfile) -> SharedCores | None:
    """Where the plan's pipeline ranks outnumber a node's CPU cores (the executor on CPU:
    hw.extra["cores_per_node"]), each node's devices of each pipeline rank
    (pipeline_sim.SharedCores); None where every device has a core, or there is one
    pipeline rank (its devices are busy, or wait, together)."""
    cores = hw.extra.get("cores_per_node")
    if not cores or cluster.ranks_per_node <= cores or plan.pp == 1:
        return None
    mesh = plan.mesh(cluster.ranks_per_node)
    ranks = np.arange(mesh.world_size)
    devices = np.zeros((-(-mesh.world_size // cluster.ranks_per_node), plan.pp), dtype=int)
    np.add.at(devices, (ranks // cluster.ranks_per_node, ranks // mesh.stride("pp") % plan.pp), 1)
    return SharedCores(tuple(map(tuple, devices.tolist())), float(cores))


def _paired_layers(plan: Plan, schedule: str, chunks: np.ndarray) -> np.ndarray:
    """Per pipeline rank, the layers its forwards and its backwards run in combined F, B
    pairs of the all-to-all overlap (schedule.warmup_ops: the ops after the warm-up up to
    the cool-down), (p, 2); zeros without the overlap."""
    p, v = chunks.shape
    out = np.zeros((p, 2))
    if plan.moe_a2a_overlap:
        m = plan.num_microbatches
        for s, ops in enumerate(stage_op_tuples(schedule, p, m, v, True)):
            lo = warmup_ops(schedule, p, s, m, v, True)
            for kind, _, c in ops[lo:lo + 2 * (m * v - lo)]:
                out[s, kind == "B"] += chunks[s, c]
    return out


def _breakdown(r: dict, pipe: PipelineResult, no_p2p: PipelineResult, chunks: np.ndarray,
               stages: np.ndarray, m: int, tail: step.Tail, paired: np.ndarray) -> tuple[dict, int]:
    """Where the step time goes on the critical stage (the one that finishes last), and
    which stage that is; the terms add up to the step time. `contention` is compute slowed
    by the communication that overlaps it (HardwareProfile.contention), `stragglers` the
    ZeRO-3 group's wait for its slowest rank at each gather (HardwareProfile.stragglers),
    `host_gap` the GPU's wait for the host in MoE blocks (FrameworkOverhead.moe_host_gap_s); `paired`: per rank,
    the forward and backward layers run in all-to-all overlap pairs (_paired_layers);
    `stages`: the stage index of each rank's chunks (schedule.stage_index)."""
    p, v = chunks.shape
    dp_exposed, dp_contention, opt_s = tail.dp_exposed_s[0], tail.contention_s[0], tail.optimizer_s[0]
    tails = tail.total_s[0]
    s = int(np.argmax(pipe.stage_busy_s + pipe.stage_idle_s + tails))
    n = int(chunks[s].sum())
    x = {k: float(val[0]) for k, val in r.items() if isinstance(val, np.ndarray) and val.dtype.kind == "f"}
    head_at = int(step.head_rank(r)[0, 0])
    emb, head = float(s == 0), float(s == head_at)
    edge_tp = m * _edge_tp(x, s, head_at)
    split = float(step.split_host_s(r, chunks[s], stages[s] == 0, stages[s] == p * v - 1).sum())
    compute = m * (n * (x["l_fwd_compute"] + x["l_bwd_in"] + x["l_bwd_w"]) + split
                   + emb * (x["emb_fwd"] + x["emb_bwd"]) + head * (x["head_fwd"] + x["head_bwd"])) - edge_tp
    recompute = m * n * x["l_recompute"]
    pf, pb = paired[s]
    tp_comm, cp_comm = m * n * x["l_tp"] + edge_tp, m * n * x["l_cp"]
    ep_comm = float(m * n * x["l_ep"] - pf * (x["l_ep_fwd"] - x["l_ep_pair_fwd"])
                    - pb * (x["l_ep_bwd"] - x["l_ep_pair_bwd"]))
    gathers = max(n - v, 0)
    contention = float(m * (n * x["l_contention"] + gathers * (x["cf"] + x["cb"]))
                       + pf * x["l_contention_pair_fwd"] + pb * x["l_contention_pair_bwd"])
    busy = float(pipe.stage_busy_s[s])
    pp_comm = max(0.0, pipe.step_time_s - no_p2p.step_time_s)
    other = pipe.step_time_s - tails[s] - busy
    stragglers = m * n * (x["sync_f"] + x["sync_b"])
    host_gap = m * n * x["l_host_gap"]
    # ZeRO-3 gathers ride inside the op durations: count them as data-parallel communication.
    zero3_s = max(0.0, busy - compute - recompute - tp_comm - cp_comm - ep_comm - contention - stragglers
                  - host_gap)
    return {"compute": compute, "recompute": recompute, "tp_comm": tp_comm, "cp_comm": cp_comm,
            "ep_comm": ep_comm,
            "pp_comm": min(pp_comm, max(other, 0.0)), "dp_comm": float(dp_exposed[s]) + zero3_s,
            "contention": contention + float(dp_contention[s]), "stragglers": stragglers, "host_gap": host_gap,
            "bubble": float(max(0.0, other - pp_comm)), "optimizer": float(opt_s[s])}, s


def _edge_tp(x: dict, s: int, head_at: int) -> float:
    """A micro-batch's TP communication outside the layers on pipeline rank s (the
    embedding's on the first, the head's and the loss's on rank `head_at`, step.head_rank:
    cost.tp_edge_comm_s)."""
    return (float(s == 0) * (x["emb_tp_fwd"] + x["emb_tp_bwd"])
            + float(s == head_at) * (x["head_tp_fwd"] + x["head_tp_bwd"]))


def _op_comm(r: dict) -> dict:
    """The share of a forward (F) and a whole backward (B) op that is exposed TP, CP and EP
    communication, from one layer's times; "F paired", "B paired": the same of the ops run
    in an all-to-all overlap pair (their exchange partly hidden)."""
    x = {k: float(r[k][0]) for k in ("l_fwd", "l_bwd", "l_tp_fwd", "l_tp", "l_cp_fwd", "l_cp",
                                     "l_ep_fwd", "l_ep", "l_fwd_pair", "l_bwd_pair", "l_ep_pair_fwd",
                                     "l_ep_pair_bwd")}
    fwd = {"TP": x["l_tp_fwd"], "CP": x["l_cp_fwd"], "EP": x["l_ep_fwd"]}
    bwd = {"TP": x["l_tp"] - x["l_tp_fwd"], "CP": x["l_cp"] - x["l_cp_fwd"], "EP": x["l_ep"] - x["l_ep_fwd"]}
    return {"F": {k: t / x["l_fwd"] for k, t in fwd.items()},
            "B": {k: t / x["l_bwd"] for k, t in bwd.items()},
            "F paired": {k: t / x["l_fwd_pair"] for k, t in {**fwd, "EP": x["l_ep_pair_fwd"]}.items()},
            "B paired": {k: t / x["l_bwd_pair"] for k, t in {**bwd, "EP": x["l_ep_pair_bwd"]}.items()}}


def _communication(r: dict, breakdown: dict, chunks: np.ndarray, stages: np.ndarray, m: int, tail: step.Tail,
                   s: int, hw: HardwareProfile) -> dict:
    """Per kind, the communication of the critical stage whole (`total_s`) and what of it is
    on the critical path (`exposed_s`, the breakdown's term), with the overlap assumed;
    `stages`: the stage index of each rank's chunks (schedule.stage_index). The pipeline's
    sends are those of every stage: the step waits on the hops before and after the critical
    stage too (the fill and the drain), so its own sends can be fewer than the exposed."""
    x = {k: float(val[0]) for k, val in r.items() if isinstance(val, np.ndarray) and val.dtype.kind == "f"}
    n, v = int(chunks.sum()), len(chunks)
    p, head_at = int(r["pp"][0]), int(step.head_rank(r)[0, 0])
    # each chunk sends its forward's output to the next stage and its backward's input
    # gradient to the one before, where that stage is on another rank
    owner = np.empty(p * v, dtype=int)
    owner[stages] = np.arange(p)[:, None]
    ahead = np.append(owner[1:], s) != s    # stage j + 1 elsewhere (none after the last)
    behind = np.insert(owner[:-1], 0, s) != s
    sends, own = m * int(ahead.sum() + behind.sum()), m * int(ahead[stages[s]].sum() + behind[stages[s]].sum())
    gathers = m * (n * (x["ag"] + x["agb"] + x["agc"] + x["agcb"]) + (s == 0) * x["emb_ag"]
                   + (s == head_at) * x["head_ag"])
    kernel = hw.attention_kernel(r["attention"]).attention
    return {
        "tp": {"total_s": m * (n * x["l_tp_raw"] + _edge_tp(x, s, head_at)), "exposed_s": breakdown["tp_comm"]},
        "cp": {"total_s": m * n * x["l_cp_raw"], "exposed_s": breakdown["cp_comm"]},
        "ep": {"total_s": m * n * x["l_ep"], "exposed_s": breakdown["ep_comm"]},
        "pp": {"total_s": sends * x["hop"], "stage_s": own * x["hop"], "exposed_s": breakdown["pp_comm"]},
        "dp": {"total_s": float(tail.dp_total_s[0, s]) + gathers, "exposed_s": breakdown["dp_comm"]},
        "overlap": {"overlaps_compute": hw.comm_overlaps_compute,
                    "tp_overlap": (("forward and backward" if r["tp_overlap_bwd"] else "forward")
                                   if tp_overlapped(r["tp_overlap"][0], r["tp"][0]) else None),
                    "cp_comm": r["cp_comm"] if r["cp"][0] > 1 else None,
                    "compute_slowdown": hw.contention.compute_slowdown if hw.comm_overlaps_compute else 0.0,
                    "contention_s": breakdown["contention"], "source": hw.contention.source,
                    "straggler_spread": hw.stragglers.spread, "stragglers_s": breakdown["stragglers"],
                    "straggler_source": hw.stragglers.source,
                    "moe_host_gap_s": hw.overhead.moe_host_gap_s, "host_gap_s": breakdown["host_gap"],
                    "moe_gap_source": hw.overhead.source,
                    "gemm_loss": hw.sustained.gemm_loss, "gemm_loss_source": hw.sustained.source,
                    "attention": r["attention"],
                    "attention_scales": (kernel.forward_scale, kernel.backward_scale),
                    "attention_source": kernel.source}}
