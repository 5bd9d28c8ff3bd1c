"""simulate(model, plan, cluster, hw): predicted step time, throughput, per-device memory
and the pipeline timeline of one training plan.

Order of the step (Megatron-LM / torchtitan): each pipeline rank runs its forward and
backward micro-batch ops in the schedule's order (discrete-event simulation in
pipeline_sim), then synchronises gradients over its data-parallel group (bucketed, the part
not hidden behind the last micro-batch's backward is exposed) and steps the optimizer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from hw_profiles.profile import HardwareProfile
from simulator.cost import BlockCosts, edge_costs, layer_costs, overlapped_exposed_s
from simulator.memory import (ADAM_STEP_BYTES_PER_PARAM, StageMemory, layer_activation_bytes,
                              memory_reserve_bytes, model_state_bytes)
from simulator.model_spec import ModelSpec
from simulator.ops import Shard, model_flops_per_step
from simulator.partition import balanced_partition
from simulator.pipeline_sim import PipelineResult, simulate_pipeline
from simulator.placement import group_of, pp_neighbour_group
from simulator.plan import Cluster, Plan

BREAKDOWN_KEYS = ("compute", "recompute", "tp_comm", "cp_comm", "pp_comm", "dp_comm",
                  "bubble", "optimizer")


@dataclass(frozen=True)
class StageReport:
    layers: int
    memory: StageMemory
    compute_s: float

    def to_json(self) -> dict:
        return {"layers": self.layers, "memory_bytes": self.memory.to_json(),
                "compute_s": self.compute_s}


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
    peak_memory_bytes: float
    memory_limit_bytes: float
    fits: bool
    breakdown_s: dict
    stages: tuple[StageReport, ...]
    pipeline: PipelineResult = field(repr=False)
    error_band: tuple[float, float] = (0.0, 0.0)

    def to_json(self) -> dict:
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "model_tflops_per_gpu": self.model_tflops_per_gpu, "mfu": self.mfu,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes, "fits": self.fits,
            "breakdown_s": dict(self.breakdown_s),
            "stages": [s.to_json() for s in self.stages],
            "error_band": {"median_rel": self.error_band[0], "p95_rel": self.error_band[1]},
            "plan": self.plan.to_dict(), "model": self.model.to_dict(),
            "cluster": {"num_gpus": self.cluster.num_gpus,
                        "gpus_per_node": self.cluster.gpus_per_node},
            "hardware": self.hardware,
        }


def _stage_params(model: ModelSpec, plan: Plan, layers: int, first: bool, last: bool) -> float:
    """Parameters held by one device of a stage: TP shards the attention and MLP weights and
    the vocab; norms are replicated (Megatron-LM)."""
    t = plan.tp
    per_layer = (model.attention_params() + model.mlp_params()) / t + 2 * model.norm_params()
    params = layers * per_layer
    if first:
        params += model.embedding_params() / t
    if last:
        params += model.norm_params()
        if not model.tied_embeddings or plan.pp > 1:
            params += model.vocab_size * model.hidden_size / t  # tied under PP: a synced copy
    return params


def compute_share(hw: HardwareProfile, cluster: Cluster) -> HardwareProfile:
    """The profile as one rank sees it when more ranks than cores share a node (CPU runs):
    each rank gets cores/ranks of a core's compute and memory throughput, and its host
    overhead stretches by ranks/cores. Collectives are CPU work too: a group of n ranks was
    measured with n ranks on the cores (max(1, n/cores) to a core), so its curve stretches
    by the ratio of the run's sharing to that."""
    cores = hw.extra.get("cores_per_node")
    ranks = min(cluster.num_gpus, cluster.gpus_per_node)
    if not cores or ranks <= cores:
        return hw
    share = ranks / cores

    def stretched(table: dict) -> dict:
        return {kind: {n: c.scaled(alpha=share / max(1.0, n / cores), bandwidth=max(1.0, n / cores) / share)
                       for n, c in by_n.items()} for kind, by_n in table.items()}
    return replace(hw.scaled(flops=1 / share, hbm_bw=1 / share), overhead=hw.overhead.scaled(share),
                   collectives=replace(hw.collectives, intra=stretched(hw.collectives.intra)))


def simulate(model: ModelSpec, plan: Plan, cluster: Cluster, hw: HardwareProfile) -> SimulationResult:
    plan.validate(model, cluster)
    peak_flops, hardware = hw.peak_flops[plan.dtype], hw.name
    hw = compute_share(hw, cluster)
    p, v, m = plan.pp, plan.virtual_stages, plan.num_microbatches
    tp, cp = group_of(plan, cluster, ("tp",)), group_of(plan, cluster, ("cp",))
    dp = group_of(plan, cluster, ("dp", "cp"))  # gradients are reduced over DP x CP
    shard = Shard(plan.micro_batch, plan.seq_len, plan.tp, plan.cp, plan.sp, plan.dtype_bytes,
                  plan.attention == "flash")
    layer = layer_costs(model, shard, hw, plan.dtype, plan.recompute, tp, cp)
    emb = edge_costs(model, shard, hw, plan.dtype, "embedding")
    head = edge_costs(model, shard, hw, plan.dtype, "head")

    partition = plan.layer_partition or balanced_partition(
        model.num_layers, plan.num_virtual, layer.fwd_s + layer.bwd_s,
        emb.fwd_s + emb.bwd_s, head.fwd_s + head.bwd_s)
    layers = np.zeros((p, v), dtype=int)
    for j, n in enumerate(partition):
        layers[j % p, j // p] = n  # virtual stage j = chunk j//p of rank j%p (Megatron-LM)

    # ZeRO-3 gathers each layer's weights before its forward and again before its backward.
    layer_param_bytes = _stage_params(model, plan, 1, False, False) * plan.dtype_bytes
    ag_s = hw.collective_time_s("all_gather", layer_param_bytes, dp.size, dp.ranks_per_node) \
        if plan.zero == 3 else 0.0
    overlap = hw.comm_overlaps_compute
    fwd = np.zeros((p, v))
    bwd = np.zeros((p, v))
    wgrad = np.zeros((p, v))
    for s, c in itertools.product(range(p), range(v)):
        n = int(layers[s, c])
        blocks: list[tuple[BlockCosts, int]] = [(layer, n)]
        if s == 0 and c == 0:
            blocks.append((emb, 1))
        if s == p - 1 and c == v - 1:
            blocks.append((head, 1))
        fwd[s, c] = (sum(b.fwd_s * k for b, k in blocks)
                     + overlapped_exposed_s(ag_s, layer.fwd_compute_s, n, overlap))
        bwd[s, c] = (sum(b.bwd_s * k for b, k in blocks)
                     + overlapped_exposed_s(ag_s, layer.bwd_input_s, n, overlap))
        wgrad[s, c] = sum(b.bwd_weight_s * k for b, k in blocks)
    if plan.schedule != "zb-h1" or p == 1:
        wgrad_arg, bwd_arg = None, bwd
    else:
        wgrad_arg, bwd_arg = wgrad, bwd - wgrad

    tokens_mb = plan.micro_batch * shard.local_seq
    p2p_bytes = tokens_mb * model.hidden_size * plan.dtype_bytes / (plan.tp if plan.sp else 1)
    pp_pair = pp_neighbour_group(plan, cluster)
    p2p_s = hw.collective_time_s("send_recv", p2p_bytes, 2, pp_pair.ranks_per_node) if p > 1 else 0.0

    stage_layers = layers.sum(axis=1)
    dp_exposed = np.zeros(p)
    opt_s = np.zeros(p)
    stage_params = np.array([_stage_params(model, plan, int(stage_layers[s]), s == 0, s == p - 1)
                             for s in range(p)])
    for s in range(p):
        n = int(stage_layers[s])
        grad_bytes = stage_params[s] * plan.dtype_bytes
        if dp.size > 1:
            kind = "all_reduce" if plan.zero == 0 else "reduce_scatter"
            bucket_s = hw.collective_time_s(kind, grad_bytes / n, dp.size, dp.ranks_per_node)
            dp_exposed[s] = overlapped_exposed_s(bucket_s, layer.bwd_s, n, overlap)
            if plan.zero in (1, 2):  # updated weights all-gathered after the step (ZeRO sec 5.2)
                dp_exposed[s] += hw.collective_time_s("all_gather", grad_bytes, dp.size, dp.ranks_per_node)
        if model.tied_embeddings and p > 1 and s in (0, p - 1):
            # Megatron-LM all-reduces the tied embedding's gradient between first and last stage.
            emb_bytes = model.vocab_size * model.hidden_size / plan.tp * plan.dtype_bytes
            dp_exposed[s] += hw.collective_time_s("all_reduce", emb_bytes, 2, pp_pair.ranks_per_node)
        opt_params = stage_params[s] / (dp.size if plan.zero >= 1 else 1)
        opt_s[s] = hw.memory_bound_time_s(ADAM_STEP_BYTES_PER_PARAM[plan.dtype] * opt_params, "fp32",
                                         "optimizer")

    schedule = plan.schedule if p > 1 else "1f1b"
    tails = dp_exposed + opt_s
    pipe = simulate_pipeline(schedule, m, fwd, bwd_arg, p2p_s, wgrad_s=wgrad_arg, tail_s=tails)
    no_p2p = simulate_pipeline(schedule, m, fwd, bwd_arg, 0.0, wgrad_s=wgrad_arg, tail_s=tails,
                               record_events=False) if p > 1 else pipe
    step_s = float(pipe.step_time_s)

    # Memory per stage.
    capacity = float(hw.memory_bytes)
    limit = capacity - memory_reserve_bytes(capacity)
    act_layer = layer_activation_bytes(model, shard, plan.recompute)
    stages = []
    for s in range(p):
        n = int(stage_layers[s])
        weights, grads, opt = model_state_bytes(stage_params[s], plan.dtype, plan.dtype_bytes,
                                                plan.zero, dp.size)
        chunk_layers = n / v
        activations = float(pipe.max_in_flight[s]) * chunk_layers * act_layer
        buffers = 0.0
        if s == p - 1:  # fp32 logits and their gradient for one micro-batch
            buffers += 2 * 4 * tokens_mb * model.vocab_size / plan.tp
        if plan.recompute == "full":  # one layer's activations rebuilt during its backward
            buffers += layer_activation_bytes(model, shard, "none")
        if plan.zero == 3:  # the gathered weights of the current and the prefetched layer
            buffers += 2 * layer_param_bytes
        stage_compute = m * float(np.sum(fwd[s] + bwd[s]))
        stages.append(StageReport(n, StageMemory(weights, grads, opt, activations, buffers), stage_compute))
    peak = max(st.memory.total_bytes for st in stages)

    breakdown = _breakdown(pipe, no_p2p, layer, emb, head, layers, m, dp_exposed, opt_s, p, v)
    tokens = plan.global_batch * plan.seq_len
    model_flops = model_flops_per_step(model, plan.global_batch, plan.seq_len)
    tflops_per_gpu = model_flops / step_s / cluster.num_gpus / 1e12
    return SimulationResult(
        model=model, plan=plan, cluster=cluster, hardware=hardware, step_time_s=step_s,
        tokens_per_s=tokens / step_s, model_tflops_per_gpu=tflops_per_gpu,
        mfu=tflops_per_gpu * 1e12 / peak_flops, peak_memory_bytes=peak,
        memory_limit_bytes=limit, fits=bool(peak <= limit), breakdown_s=breakdown,
        stages=tuple(stages), pipeline=pipe, error_band=hw.relative_error_band())


def _breakdown(pipe: PipelineResult, no_p2p: PipelineResult, layer: BlockCosts, emb: BlockCosts,
               head: BlockCosts, layers: np.ndarray, m: int, dp_exposed: np.ndarray,
               opt_s: np.ndarray, p: int, v: int) -> dict:
    """Where the step time goes on the critical stage (the one that finishes last); the
    terms add up to the step time."""
    s = int(np.argmax(pipe.stage_busy_s + pipe.stage_idle_s + dp_exposed + opt_s))
    n = int(layers[s].sum())
    has_emb, has_head = s == 0, s == p - 1
    parts = [(layer, n)] + ([(emb, 1)] if has_emb else []) + ([(head, 1)] if has_head else [])
    compute = m * sum(k * (b.fwd_compute_s + b.bwd_input_s + b.bwd_weight_s) for b, k in parts)
    recompute = m * sum(k * b.recompute_s for b, k in parts)
    tp_comm = m * sum(k * (b.tp_comm_fwd_s + b.tp_comm_bwd_s) for b, k in parts)
    cp_comm = m * sum(k * (b.cp_comm_fwd_s + b.cp_comm_bwd_s) for b, k in parts)
    busy = float(pipe.stage_busy_s[s])
    pp_comm = max(0.0, pipe.step_time_s - no_p2p.step_time_s)
    other = pipe.step_time_s - dp_exposed[s] - opt_s[s] - busy
    # ZeRO-3 gathers ride inside the op durations: count them as data-parallel communication.
    zero3_s = max(0.0, busy - compute - recompute - tp_comm - cp_comm)
    return {"compute": compute, "recompute": recompute, "tp_comm": tp_comm, "cp_comm": cp_comm,
            "pp_comm": min(pp_comm, max(other, 0.0)), "dp_comm": float(dp_exposed[s]) + zero3_s,
            "bubble": float(max(0.0, other - pp_comm)), "optimizer": float(opt_s[s])}
