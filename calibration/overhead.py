"""Framework overhead of the executor's decoder layer: the host time eager PyTorch spends per
layer (Python modules, operator dispatch, autograd bookkeeping, DTensor sharding
propagation) beside the operators' own work, which isolated operator timings do not see.

Measured on a layer so small that its operators' work is negligible: the time of a model of
3 layers minus that of 1 layer, halved, is one layer's overhead, with embedding, head and
loss cancelled out. Five variants: plain, tensor parallel through DTensor (on a one-rank
mesh, so that sharding propagation runs but no data moves: the collectives are costed from
their own fits), TP with sequence parallelism, mixture-of-experts layers (top-2 of 4
experts in place of the MLP; the 3-layer MoE model less the 3-layer plain one, per layer,
is what the MoE block adds), and the inference forwards (prompt and one-token decode over a
KV cache). The simulator adds these per layer (hw_profiles.profile.FrameworkOverhead); on a
GPU, host overhead hides behind queued kernels and is not used.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from meshplan.executor.model import build_model, loss_fn
from meshplan.executor.parallelize import apply_tp
from meshplan.hw_profiles.profile import FrameworkOverhead
from meshplan.simulator.model_spec import ModelSpec

PROBE_TOKENS = 8
LAYERS = (1, 3)


def _probe(num_layers: int, moe: bool = False) -> ModelSpec:
    dense = ModelSpec(name="overhead-probe", num_layers=num_layers, hidden_size=64, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=128, vocab_size=128, max_seq_len=64)
    # the MLP's FLOPs in top-2 of 4 experts of half its width, in every layer
    return replace(dense, num_experts=4, experts_per_token=2, moe_ffn_hidden_size=64,
                   dense_layers=()) if moe else dense


def _median_s(fns, repeats: int, warmup: int) -> list[float]:
    """Median seconds of each of `fns`, run in turn within every repeat, so that the
    machine's drift over the measurement falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@contextmanager
def _one_rank_group():
    """A one-rank gloo process group for DTensor, unless one exists already."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model(num_layers: int, tp: str | None, moe: bool = False):
    model = build_model(_probe(num_layers, moe), seed=0)
    if tp is not None:
        apply_tp(model, init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))["tp"],
                 sequence_parallel=tp == "sp")
    return model


def _training(num_layers: int, tp: str | None, moe: bool = False) -> tuple:
    """The probe model's (forward, forward + backward) as functions to time."""
    model = _model(num_layers, tp, moe)
    tokens = torch.randint(0, 128, (1, PROBE_TOKENS + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def forward():
        return loss_fn(model(x), y)

    def step():
        forward().backward()
    return forward, step


@torch.no_grad()
def _inference_s(num_layers: int, repeats: int, warmup: int) -> tuple[float, float]:
    """(prompt forward, one-token decode forward over the cache) seconds."""
    model = _model(num_layers, None)
    prompt = torch.randint(0, 128, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    prefill = _median_s([lambda: model(prompt, model.new_cache(PROBE_TOKENS + 1))], repeats, warmup)[0]

    def decode():
        cache = model.new_cache(PROBE_TOKENS + 1)
        model(prompt, cache)
        start = time.perf_counter()
        model(prompt[:, :1], cache)
        return time.perf_counter() - start
    return prefill, statistics.median(decode() for _ in range(repeats + warmup))


def _forward_backward(forward_s: float, step_s: float, layers: int) -> tuple[float, float]:
    """Per layer (forward, backward) seconds from the time differences of forward and of
    forward + backward over `layers` layers; noise below zero reads as none."""
    forward = max(0.0, forward_s / layers)
    return forward, max(0.0, step_s / layers - forward)


def measure_overhead(repeats: int = 40, warmup: int = 5) -> FrameworkOverhead:
    """Per-layer framework overhead of this machine's executor (one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_layer, per_model = {}, {}
        variants = ((None, False), ("tp", False), ("sp", False), (None, True))
        with _one_rank_group():
            fns = [fn for tp, moe in variants for n in LAYERS for fn in _training(n, tp, moe)]
            times = iter(_median_s(fns, repeats, warmup))
            for variant in variants:
                f1, t1, f3, t3 = (next(times) for _ in range(4))
                per_layer[variant] = _forward_backward(f3 - f1, t3 - t1, LAYERS[1] - LAYERS[0])
                per_model[variant] = (f3, t3)
        (p1, d1), (p3, d3) = (_inference_s(n, repeats, warmup) for n in LAYERS)
        # the MoE block's surcharge from the two 3-layer models, whose other parts are alike:
        # one difference over 3 layers, steadier than two per-layer differences apart
        (mf, mt), (df, dt) = per_model[None, True], per_model[None, False]
        moe = _forward_backward(mf - df, mt - dt, LAYERS[1])
    finally:
        torch.set_num_threads(before)
    return FrameworkOverhead(
        layer_forward_s=per_layer[None, False][0], layer_backward_s=per_layer[None, False][1],
        tp_layer_forward_s=per_layer["tp", False][0], tp_layer_backward_s=per_layer["tp", False][1],
        sp_layer_forward_s=per_layer["sp", False][0], sp_layer_backward_s=per_layer["sp", False][1],
        prefill_layer_s=max(0.0, (p3 - p1) / 2), decode_layer_s=max(0.0, (d3 - d1) / 2),
        moe_forward_s=moe[0], moe_backward_s=moe[1],
        source=f"calibration/overhead.py: eager PyTorch {torch.__version__}, 1 thread, "
               f"{LAYERS[1]}-layer minus {LAYERS[0]}-layer probe, median of {repeats} interleaved")
