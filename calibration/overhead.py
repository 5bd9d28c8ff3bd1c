"""Framework overhead of the executor's decoder layer: the host time eager PyTorch spends per
layer (Python modules, operator dispatch, autograd bookkeeping, DTensor sharding
propagation and redistribution) beside the operators' own work and the collectives, which
isolated operator and collective timings do not see.

Measured on a layer so small that its operators' work is negligible: the time of a model of
3 layers minus that of 1 layer, halved, is one layer's overhead, with embedding, head and
loss cancelled out. In this process: plain layers, mixture-of-experts layers (top-2 of 4
experts in place of the MLP; the 3-layer MoE model less the 3-layer plain one, per layer,
is what the MoE block adds), and the inference forwards (prompt, and one-token decode over a
KV cache, whose time beyond its priced operators grows with its layer's weights:
measure_decode_overhead, run once the profile prices those operators), and what splitting
a pipeline stage's backward into torch.distributed.pipelining's input-gradient and
weight-gradient passes (the zero-bubble schedules) adds over its single backward, per layer
and per byte of its activations, timed on the layers alone as a stage between the first and
the last runs them (hidden states in, their gradient out). Tensor parallelism (with and without SP), FSDP2's ZeRO-2 and ZeRO-3 and expert
parallelism on two real ranks (measure/parallel_overhead.py), since a one-rank mesh skips the redistributions
and collectives. Under TP a layer's overhead is its time less its TP collectives as the
fitted profile prices them, and what the 1-layer model takes beyond one layer, less the
plain model's and less the embedding's, head's and loss's collectives, is the overhead of
TP's vocab-parallel edges per micro-batch. Under FSDP2 what a layer adds to the plain
layer's step, less the gathers and reduce-scatters priced, is the host work of those calls
(unsharding and resharding the parameters, the copies in and out): one gather and one
reduce-scatter per layer under ZeRO-2, a second gather under ZeRO-3, solved for the cost of
each call (non-negative least squares). Under expert parallelism what an MoE layer adds to
the same layer on one rank, less its all-to-alls priced, is the exchange's host work. The
simulator adds these per layer, per
micro-batch and per FSDP call (hw_profiles.profile.FrameworkOverhead); on a GPU, host
overhead hides behind queued kernels and is not used.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.optimize import nnls
from torch.distributed.pipelining._backward import stage_backward, stage_backward_input, stage_backward_weight

from meshplan.core.errors import ProfileError
from meshplan.calibration.measure.compute import torch_threads
from meshplan.calibration.measure.run import launch_rows
from meshplan.executor.generate import greedy
from meshplan.executor.loss import fused_cross_entropy
from meshplan.executor.model import build_model
from meshplan.executor.options import training_fields
from meshplan.executor.parallelize import apply_recompute
from meshplan.hw_profiles.profile import FrameworkOverhead, HardwareProfile
from meshplan.simulator.cost import cp_comm_s, ep_comm_s, ep_counts_s, tp_comm_s, tp_edge_comm_s
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import (InferencePlan, decode_edge_weight_bytes, decode_layer_weight_bytes,
                                      simulate_inference)
from meshplan.simulator.train import plans_rows, simulate
from meshplan.simulator.step import fsdp_gather_copies_s, fsdp_reduce_copy_s

PROBE_TOKENS = 8
# the split backward's larger token count (its activation bytes span the executor's small models')
SPLIT_TOKENS = 1024
LAYERS = (1, 3)
# The larger decoder layer of the decode probe (measure_decode_overhead): 9 MiB of fp32
# weights, where the probe model's layer has 0.14
DECODE_LARGE = dict(hidden_size=512, ffn_hidden_size=1408, num_heads=8, num_kv_heads=4)
VARIANTS = ("plain", "tp", "sp", "zero2", "zero3", "cp", "moe", "moe_ep")  # of the two-rank probe
TWO_RANK_REPEATS = 3  # times the one-process probe's


def probe_model(num_layers: int, moe: bool = False) -> ModelSpec:
    dense = ModelSpec(name="overhead-probe", num_layers=num_layers, hidden_size=64, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=128, vocab_size=128, max_seq_len=64)
    # the MLP's FLOPs in top-2 of 4 experts of half its width, in every layer
    return replace(dense, num_experts=4, experts_per_token=2, moe_ffn_hidden_size=64,
                   dense_layers=()) if moe else dense


def _median_s(fns, repeats: int, warmup: int) -> list[float]:
    """Median seconds of each of `fns`, run in turn within every repeat, so that the
    machine's drift over the measurement falls on all of them alike."""
    def timed(fn):
        def call() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return call
    return _median_timed_s([timed(fn) for fn in fns], repeats, warmup)


def _median_timed_s(fns, repeats: int, warmup: int) -> list[float]:
    """Median of the seconds each of `fns` returns, run in turn within every repeat (as
    _median_s, for calls that time only part of themselves): the 1- and 3-layer inference
    forwards take turns, as the training ones do, so that a drift between the two depths
    cannot read as a layer's overhead (they were timed one depth after the other)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[fn() for fn in fns] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*times)]


def _training(num_layers: int, moe: bool = False, recompute: str | None = None) -> tuple:
    """The probe model's (forward, forward + backward) as functions to time, under
    `recompute` (parallelize.apply_recompute's modes; None: none)."""
    model = build_model(probe_model(num_layers, moe), seed=0)
    if recompute is not None:
        apply_recompute(model, recompute)
    tokens = torch.randint(0, 128, (1, PROBE_TOKENS + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def forward():
        return fused_cross_entropy(model(x), y)

    def step():
        forward().backward()
    return forward, step


def _prompt(spec: ModelSpec) -> tuple:
    """The model built and the probe's prompt."""
    return build_model(spec, seed=0), torch.randint(0, 128, (1, PROBE_TOKENS),
                                                    generator=torch.Generator().manual_seed(0))


def _prefill(spec: ModelSpec):
    """The model's prompt forward, its cache made first (as the executor makes one per
    generation), as a function to time."""
    model, prompt = _prompt(spec)

    @torch.no_grad()
    def prefill():
        model(prompt, model.new_cache(PROBE_TOKENS + 1))
    return prefill


def _decode(spec: ModelSpec):
    """The model's one-token decode forward over the cache of its prompt with the greedy
    pick of the next token (executor/generate.py), as a function returning the seconds it
    timed (the prompt's forward untimed)."""
    model, prompt = _prompt(spec)

    @torch.no_grad()
    def decode():
        cache = model.new_cache(PROBE_TOKENS + 1)
        model(prompt, cache)
        start = time.perf_counter()
        greedy(model(prompt[:, :1], cache))
        return time.perf_counter() - start
    return decode


def _stage(spec: ModelSpec, tokens: int) -> tuple:
    """`spec`'s layers as a stage past the first and before the last: (its forward and
    single backward, its forward and the split backward of the zero-bubble schedules) on
    `tokens` tokens, as functions to time."""
    layers = list(build_model(spec, seed=0).layers.values())
    params = [p for layer in layers for p in layer.parameters()]
    hidden = torch.randn(1, tokens, spec.hidden_size, generator=torch.Generator().manual_seed(0))

    def forward():
        x = hidden.clone().requires_grad_(True)
        out = x
        for layer in layers:
            out = layer(out)
        return x, out

    def single():
        x, out = forward()
        stage_backward([out], [torch.ones_like(out)], [x])

    def split():
        x, out = forward()
        _, groups = stage_backward_input([out], [torch.ones_like(out)], [x], iter(params))
        stage_backward_weight(iter(params), groups)
    return single, split


def _forward_backward(forward_s: float, step_s: float, layers: int) -> tuple[float, float]:
    """Per layer (forward, backward) seconds from the time differences of forward and of
    forward + backward over `layers` layers; noise below zero reads as none."""
    forward = max(0.0, forward_s / layers)
    return forward, max(0.0, step_s / layers - forward)


def measure_host_overhead(repeats: int = 40, warmup: int = 5) -> FrameworkOverhead:
    """Per-layer overhead of this machine's executor (one thread), in this process: all but
    the fields measured on two ranks (TP, SP, FSDP, EP), the split backward's
    (measure_split_backward) and the decode's (measure_decode_overhead)."""
    with torch_threads(1):
        # the dense model at both depths, the MoE one at the larger only (see below)
        fns = [fn for n in LAYERS for fn in _training(n)] + list(_training(LAYERS[1], moe=True))
        df1, dt1, df3, dt3, mf3, mt3 = _median_s(fns, repeats, warmup)
        span = LAYERS[1] - LAYERS[0]
        dense = _forward_backward(df3 - df1, dt3 - dt1, span)
        p1, p3 = _median_s([_prefill(probe_model(n)) for n in LAYERS], repeats, warmup)
        # the MoE block's surcharge from the two 3-layer models, whose other parts are alike:
        # one difference over 3 layers, steadier than two per-layer differences apart
        moe = _forward_backward(mf3 - df3, mt3 - dt3, LAYERS[1])
    return FrameworkOverhead(
        layer_forward_s=dense[0], layer_backward_s=dense[1],
        prefill_layer_s=max(0.0, (p3 - p1) / span),
        moe_forward_s=moe[0], moe_backward_s=moe[1],
        source=f"calibration/overhead.py: eager PyTorch {torch.__version__}, 1 thread, "
               f"{LAYERS[1]}-layer minus {LAYERS[0]}-layer probe, median of {repeats} interleaved")


def split_probes() -> list[tuple[ModelSpec, int]]:
    """The (layers, tokens) the split backward is timed on: the probe's layer at
    PROBE_TOKENS and at SPLIT_TOKENS."""
    return [(replace(probe_model(1), max_seq_len=tokens), tokens) for tokens in (PROBE_TOKENS, SPLIT_TOKENS)]


def _one_rank_plan(tokens: int, **fields) -> Plan:
    """A one-sequence plan of `tokens` tokens as the executor runs it on one CPU rank
    (options.training_fields: fp32, eager elementwise and MLP, the fused loss)."""
    return Plan(global_batch=1, seq_len=tokens, micro_batch=1, **training_fields("fp32", "cpu", "fused"), **fields)


def split_layer_activation_bytes(spec: ModelSpec, tokens: int, hw: HardwareProfile) -> float:
    """Activation bytes (without recompute) of one of `spec`'s layers in the executor's
    fp32 training step over `tokens` tokens, as the simulator counts them."""
    return float(plans_rows(spec, [_one_rank_plan(tokens)], Cluster(1, 1), hw)["act_none"][0])


def _median_added_s(base, variant, repeats: int, warmup: int) -> float:
    """Median over repeats of what `variant` takes beyond `base`, the two run back to back
    in each (steadier than the difference of two medians where the added time is a small
    share of either)."""
    added = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        base()
        middle = time.perf_counter()
        variant()
        if i >= warmup:
            added.append(time.perf_counter() - middle - (middle - start))
    return statistics.median(added)


def measure_split_backward(hw: HardwareProfile, repeats: int = 40, warmup: int = 5) -> tuple[float, float]:
    """(split_backward_layer_s, split_backward_per_activation_byte_s) of this machine's
    executor, one thread: what the zero-bubble schedules' split backward adds over a single
    one per layer (from the 1- and 3-layer stages' difference) on each of split_probes,
    joined by a line in the layer's activation bytes (split_layer_activation_bytes): it
    grows with them (2026-12-05 here: 0.66 ms a layer at 0.03 MB, 1.2 at 2.0 MB, 2.6 at
    3.9 MB). The drift probe, which reads the layer overhead alone, does not pay for it."""
    span, added, sizes = LAYERS[1] - LAYERS[0], [], []
    with torch_threads(1):
        for spec, tokens in split_probes():
            one, three = (_median_added_s(*_stage(replace(spec, num_layers=n), tokens), repeats, warmup)
                          for n in LAYERS)
            added.append((three - one) / span)
            sizes.append(split_layer_activation_bytes(spec, tokens, hw))
    per_byte = max(0.0, (added[1] - added[0]) / (sizes[1] - sizes[0]))
    return max(0.0, added[0] - per_byte * sizes[0]), per_byte


RECOMPUTE_MODES = ("selective", "full", "op", "norm_act")


def _priced_added_s(hw: HardwareProfile, mode: str) -> float:
    """What `hw` prices recompute `mode` to add to the probe model's step, per layer (its
    1- and 3-layer steps' difference), with the profile's recompute overhead left out."""
    bare = replace(hw, overhead=replace(hw.overhead, **{f"{m}_recompute_layer_s": 0.0 for m in RECOMPUTE_MODES}))
    added = []
    for n in LAYERS:
        none, redone = (simulate(probe_model(n), _one_rank_plan(PROBE_TOKENS, recompute=r), Cluster(1, 1),
                                 bare).step_time_s for r in ("none", mode))
        added.append(redone - none)
    return (added[1] - added[0]) / (LAYERS[1] - LAYERS[0])


def measure_recompute_overhead(hw: HardwareProfile, repeats: int = 40, warmup: int = 5) -> dict[str, float]:
    """FrameworkOverhead's {mode}_recompute_layer_s of this machine's executor, one thread:
    per recompute mode, what it adds to a layer over recompute none (the 1- and 3-layer
    probe's difference, each mode timed back to back with none, _median_added_s) beyond what
    `hw` prices it to add, the work it redoes. Four runs here (2026-12-06), per layer:
    selective 0.29-0.36 ms, norm_act 0.34-0.41, full 0.60-0.74 (beyond the forward's own
    host work, which the redone forward is priced with), op 2.6-2.7 (its recompute
    dispatches every operator again, the policy deciding each in both passes)."""
    out = {}
    with torch_threads(1):
        for mode in RECOMPUTE_MODES:
            one, three = (_median_added_s(_training(n)[1], _training(n, recompute=mode)[1], repeats, warmup)
                          for n in LAYERS)
            measured = (three - one) / (LAYERS[1] - LAYERS[0])
            out[f"{mode}_recompute_layer_s"] = max(0.0, measured - _priced_added_s(hw, mode))
    return out


def measure_decode_overhead(hw: HardwareProfile, repeats: int = 40,
                            warmup: int = 5) -> tuple[float, float, float]:
    """(decode_layer_s, decode_layer_per_byte_s, decode_edge_s) of this machine's executor,
    one thread: a decode layer's time beyond its operators as `hw` prices them (its
    weights' cached reads, the attention over the cache, the elementwise operators), which
    grows with the weights it streams (the host's dispatch of every operator slows as they
    evict its code and data from the core's caches: 153 us beyond the priced operators at
    0.14 MiB of fp32 weights a layer, 306 at 2.4 MiB, 555 at 9.0 MiB here, 2026-12-04), and
    what the step takes beyond its layers and priced edge operators. Timed on the probe
    model and on DECODE_LARGE, 1 and 3 layers each, in turn; each per-layer time less its
    priced operators, the two joined by a line in the layer's weight bytes; the 1-layer
    model less its layer and its priced operators, less the line's share of its embedding's
    and head's weights, is the edge's (the mean of the two sizes)."""
    specs = [probe_model(n) for n in LAYERS] + [replace(probe_model(n), **DECODE_LARGE) for n in LAYERS]
    with torch_threads(1):
        times = _median_timed_s([_decode(spec) for spec in specs], repeats, warmup)
    dtype = "fp32" if "fp32" in hw.gemm else "bf16"
    plan = InferencePlan(batch=1, prompt_len=PROBE_TOKENS, gen_len=2, dtype=dtype)
    bare = replace(hw, overhead=hw.overhead.decode_scaled(0.0))
    span = LAYERS[1] - LAYERS[0]
    beyond, weights, one_layer = [], [], []
    for i in (0, 2):
        priced = [simulate_inference(spec, plan, Cluster(1, 1), bare).tpot_s for spec in specs[i:i + 2]]
        beyond.append(max(0.0, (times[i + 1] - times[i] - (priced[1] - priced[0])) / span))
        weights.append(decode_layer_weight_bytes(specs[i], plan))
        one_layer.append(times[i] - priced[0] - beyond[-1])
    per_byte = max(0.0, (beyond[1] - beyond[0]) / (weights[1] - weights[0]))
    edge = statistics.mean(t - per_byte * decode_edge_weight_bytes(spec, plan)
                           for t, spec in zip(one_layer, specs[::2]))
    return max(0.0, beyond[0] - per_byte * weights[0]), per_byte, max(0.0, edge)


def _per_layer(t: dict, variant: str) -> tuple[float, float, float, float]:
    """(forward, backward) per layer, then (forward, backward) of the rest of the model, of
    `variant`'s rows."""
    (f1, s1), (f3, s3) = t[variant, LAYERS[0]], t[variant, LAYERS[1]]
    span = LAYERS[1] - LAYERS[0]
    fwd, bwd = (f3 - f1) / span, (s3 - s1 - f3 + f1) / span
    return fwd, bwd, f1 - LAYERS[0] * fwd, s1 - f1 - LAYERS[0] * bwd


def parallel_overhead(rows: list[dict], hw: HardwareProfile) -> dict[str, float]:
    """FrameworkOverhead's TP, SP, FSDP, CP and EP fields from measure/parallel_overhead.py's
    rows (the VARIANTS of models of LAYERS layers on 2 ranks), less the collectives `hw`
    prices for them: per layer and per micro-batch at the edges (beyond the plain model's)
    under TP, per gather and reduce-scatter under FSDP, per layer under CP (beyond the plain
    model's), per MoE layer under EP (beyond the MoE model's)."""
    t = {(r["variant"], r["layers"]): (r["forward_s"], r["step_s"]) for r in rows}
    missing = [f"{v} x{n}" for v in VARIANTS for n in LAYERS if (v, n) not in t]
    if missing:
        raise ProfileError("overhead.parallel", f"the two-rank probe has no rows for {', '.join(missing)}",
                           "run `meshplan profile` again")
    plain = _per_layer(t, "plain")
    model, out = probe_model(LAYERS[0]), {}
    for v in ("tp", "sp"):
        fwd, bwd, edge_f, edge_b = _per_layer(t, v)
        comm = float(tp_comm_s(model, PROBE_TOKENS, v == "sp", 4, hw, 2, 2))  # each direction alike
        emb_f, emb_b, head_f, head_b = (float(x) for x in
                                        tp_edge_comm_s(model, PROBE_TOKENS, v == "sp", 4, hw, 2, 2))
        out[f"{v}_layer_forward_s"] = max(0.0, fwd - comm)
        out[f"{v}_layer_backward_s"] = max(0.0, bwd - comm)
        out[f"{v}_edge_forward_s"] = max(0.0, edge_f - plain[2] - emb_f - head_f)
        out[f"{v}_edge_backward_s"] = max(0.0, edge_b - plain[3] - emb_b - head_b)
    layer_params = model.layer_params(model.layer_kinds()[0][0])
    layer_bytes = layer_params * 4
    # FSDP2's calls with their copies: the shard in and the layer out, the fp32 gradients in
    gather = float(hw.collective_time_s("all_gather", layer_bytes, 2, 2)
                   + sum(fsdp_gather_copies_s(hw, layer_bytes, layer_bytes / 2)))
    scatter = float(hw.collective_time_s("reduce_scatter", layer_bytes, 2, 2)
                    + fsdp_reduce_copy_s(hw, layer_params, 4, 4))
    step = {v: sum(_per_layer(t, v)[:2]) - sum(plain[:2]) for v in ("zero2", "zero3")}
    # a layer's step: ZeRO-2 one gather and one reduce-scatter, ZeRO-3 two gathers and one
    calls, _ = nnls(np.array([[1.0, 1.0], [2.0, 1.0]]),
                    np.array([step["zero2"] - gather - scatter, step["zero3"] - 2 * gather - scatter]))
    out["fsdp_gather_s"], out["fsdp_reduce_s"] = (float(x) for x in calls)
    # an MoE layer's exchange over EP: its all-to-all each way, the counts before the forward's
    moe, moe_ep = _per_layer(t, "moe"), _per_layer(t, "moe_ep")
    moe_model = probe_model(LAYERS[0], moe=True)
    exchange = float(ep_comm_s(moe_model, PROBE_TOKENS, 4, 1.0, hw, 2, 2, 1, 1))
    counts = float(ep_counts_s(moe_model, hw, 2, 2))
    out["ep_forward_s"] = max(0.0, moe_ep[0] - moe[0] - exchange - counts)
    out["ep_backward_s"] = max(0.0, moe_ep[1] - moe[1] - exchange)
    # a layer's Ulysses exchange: Q, K, V to head shards and the output back each way
    cp = _per_layer(t, "cp")
    a2a = cp_comm_s(model, PROBE_TOKENS, 1, 4, hw, 2, 2, method="a2a")
    out["cp_a2a_forward_s"] = max(0.0, cp[0] - plain[0] - float(a2a.fwd_s))
    out["cp_a2a_backward_s"] = max(0.0, cp[1] - plain[1] - float(a2a.bwd_s))
    return out


def _two_rank_rows(repeats: int, warmup: int) -> list[dict]:
    """measure/parallel_overhead.py's rows, through torchrun on 2 ranks."""
    return launch_rows("meshplan.calibration.measure.parallel_overhead",
                       ["--repeats", str(repeats), "--warmup", str(warmup)], 2, "overhead.parallel",
                       "the two-rank probe", timeout_s=600)


def measure_overhead(hw: HardwareProfile, repeats: int = 40, warmup: int = 5) -> FrameworkOverhead:
    """Every field of this machine's executor overhead; `hw` (the machine's fitted profile)
    prices the collectives inside the two-rank probe."""
    host = measure_host_overhead(repeats, warmup)
    split_layer_s, per_activation_byte_s = measure_split_backward(hw, repeats, warmup)
    # means over heavy-tailed collectives inside: more calls than the medians of one process
    return replace(host, split_backward_layer_s=split_layer_s,
                   split_backward_per_activation_byte_s=per_activation_byte_s,
                   **measure_recompute_overhead(hw, repeats, warmup),
                   **parallel_overhead(_two_rank_rows(TWO_RANK_REPEATS * repeats, warmup), hw),
                   source=f"{host.source}; TP, SP, FSDP and EP on 2 ranks (measure/parallel_overhead.py), "
                          f"mean of {TWO_RANK_REPEATS * repeats}, "
                          f"less the collectives {hw.name} prices")
