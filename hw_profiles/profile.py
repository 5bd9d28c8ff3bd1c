"""HardwareProfile: one device type and its node, as data (nominal figures with their
sources) plus fitted cost curves; JSON round-trip; what-if scaling."""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np

from meshplan.hw_profiles import collective_model, gemm_model
from meshplan.hw_profiles.collective_model import CollectiveFit, Curve, Line
from meshplan.hw_profiles.fabric import Fabric
from meshplan.hw_profiles.gemm_model import (DTYPE_BYTES, ELEMENT_BYTES, OPTIONAL_DTYPE_BYTES, GemmFit,
                                             MemoryBoundFit)
from meshplan.hw_profiles.variants import VARIANTS
from meshplan.core.cpus import this_cpu_model
from meshplan.core.errors import ProfileError
from meshplan.core.io import read_json, write_atomic

DATA_DIR = Path(__file__).resolve().parent / "data"
LOCAL = "local"  # this machine's CPU profile (local_profile_name)
# benchmarks/published.py's end-to-end figures (hw_profiles/accuracy.py), beside the profiles
END_TO_END = DATA_DIR / "end_to_end.json"
SAMPLES_SUFFIX = ".samples.json"
VARIANT_KEY = "variant_of"  # extra's entry marking a datasheet variant (HardwareProfile.variant_of)
DTYPES = tuple(DTYPE_BYTES)
# Physical ranges of a profile's figures: FLOP/s and bytes/s (1 M to 1e20), fractions of
# nominal (up to 2: small memory-bound operators beat nominal HBM bandwidth from L2, e.g.
# the H100's "add" at 1.2, and a CPU's GEMMs beat its base-clock peak at turbo clocks, this
# machine's bf16 fit at 1.11), device memory of at least 1 MiB.
# A collective's fitted bus bandwidth may be far lower (gloo's small messages: ~3 MB/s) and
# its latency up to seconds.
RATE, EFFICIENCY, MIN_MEMORY_BYTES = (1e6, 1e20), (1e-6, 2.0), 2 ** 20
BUS_RATE, LATENCY_S = (1e3, 1e20), (0.0, 10.0)
# fused attention against the GEMM fits: beyond this range, a broken measurement; its tiles
# at most this many queries or keys a side (kernels tile in the hundreds)
ATTENTION_SCALE, MAX_TILE = (0.05, 50.0), 2 ** 16
REGENERATE = ("regenerate it with `meshplan profile --out FILE` (this machine) or "
              "`python -m meshplan.calibration.build_stock` (stock profiles)")


@dataclass(frozen=True)
class FrameworkOverhead:
    """Host time per decoder layer of the executor's eager PyTorch beside its operators' work
    (module calls, dispatch, autograd, DTensor sharding propagation), per micro-batch:
    measured by calibration/overhead.py on CPU, where the host *is* the device. Zero where
    the host runs ahead of a GPU's kernel queue (stock profiles), so it is not on the path,
    except in a GPU trainer's MoE blocks (moe_host_gap_s)."""

    layer_forward_s: float = 0.0
    layer_backward_s: float = 0.0
    tp_layer_forward_s: float = 0.0       # layers under DTensor tensor parallelism
    tp_layer_backward_s: float = 0.0
    sp_layer_forward_s: float = 0.0       # ... with sequence parallelism
    sp_layer_backward_s: float = 0.0
    # per micro-batch beyond the layers under TP (the vocab-parallel embedding, head and
    # loss_parallel cross-entropy on DTensors), and with SP; their collectives not included
    tp_edge_forward_s: float = 0.0
    tp_edge_backward_s: float = 0.0
    sp_edge_forward_s: float = 0.0
    sp_edge_backward_s: float = 0.0
    # per FSDP2 gather and reduce-scatter of a module's parameters (ZeRO-2/3): unsharding and
    # resharding them, the copies in and out; the collective itself not included
    fsdp_gather_s: float = 0.0
    fsdp_reduce_s: float = 0.0
    prefill_layer_s: float = 0.0          # inference forward of a prompt, KV cache filled
    decode_layer_s: float = 0.0           # inference forward of one token over the cache
    # ... and what it adds per byte of the layer's weights read in that forward: the host's
    # dispatch of every operator slows as the weights it streams evict its own code and data
    # from the core's caches (calibration/overhead.py measure_decode_overhead)
    decode_layer_per_byte_s: float = 0.0
    # a decode step's host time beyond its layers and its priced operators: the embedding,
    # final norm and head's calls and the sampler's pick of the next tokens (its weights'
    # share per byte as the layers')
    decode_edge_s: float = 0.0
    # what splitting a pipeline stage's backward into torch's input-gradient and
    # weight-gradient passes (zb-h1, zb-v) adds over its single backward, per layer: a fixed
    # part (the second autograd pass over the graph the first kept, its parameter groups
    # found by walking that graph), and per byte of the layer's activations (the gradients
    # of the intermediates that the first pass keeps for the second; the head's at that
    # rate for what the loss keeps of its logits)
    split_backward_layer_s: float = 0.0
    split_backward_per_activation_byte_s: float = 0.0
    moe_forward_s: float = 0.0            # what an MoE block adds over the dense MLP it replaces
    moe_backward_s: float = 0.0           # (router, top-k, permutation, grouped GEMM calls)
    ep_forward_s: float = 0.0             # what expert parallelism adds to an MoE block (the
    ep_backward_s: float = 0.0            # exchange's bookkeeping), its all-to-alls not included
    # what each recompute mode adds to a layer's micro-batch beyond the work the cost model
    # says it redoes: torch.utils.checkpoint's saved-tensor hooks and bookkeeping, the
    # per-op policy's call on every operator of the forward and of the recompute (which
    # dispatches every operator again, keeping what it cached), the rebuilt norms' second
    # run through autograd.grad (calibration/overhead.py measure_recompute_overhead)
    selective_recompute_layer_s: float = 0.0
    full_recompute_layer_s: float = 0.0
    op_recompute_layer_s: float = 0.0
    norm_act_recompute_layer_s: float = 0.0
    cp_a2a_forward_s: float = 0.0         # what Ulysses' context parallelism adds to a layer (the
    cp_a2a_backward_s: float = 0.0        # head/sequence reshapes and the exchange's host work),
                                          # its all-to-alls not included
    # A GPU trainer's MoE block leaves its GPU idle while the host catches up: the dispatcher
    # syncs on the routing counts unless it pads to capacity (Megatron-Core token_dispatcher.py
    # cuda_sync_point; DeepEP's normal dispatch waits on its receive counts), and the block
    # launches many small kernels ("gaps between GPU kernels where CPU cannot launch kernels
    # fast enough", Megatron-Core MoE README, CPU Overhead Bottleneck). Per MoE block
    # forward, training only (servers capture routing in CUDA graphs); nothing runs in the
    # gap, so no communication hides in it (cost.layer_times).
    moe_host_gap_s: float = 0.0
    source: str = "not on the critical path: the host queues kernels ahead of the GPU"

    def training_layer_s(self, tp: int, sp: bool, moe_share: float = 0.0,
                         ep: int = 1, cp_a2a: bool = False) -> tuple[float, float]:
        """(forward, backward) overhead of one layer, `moe_share` of the layers being MoE,
        their experts split over `ep` ranks, its attention under Ulysses' CP if `cp_a2a`."""
        if tp == 1:
            fwd, bwd = self.layer_forward_s, self.layer_backward_s
        elif sp:
            fwd, bwd = self.sp_layer_forward_s, self.sp_layer_backward_s
        else:
            fwd, bwd = self.tp_layer_forward_s, self.tp_layer_backward_s
        ep_fwd, ep_bwd = (self.ep_forward_s, self.ep_backward_s) if ep > 1 else (0.0, 0.0)
        cp_fwd, cp_bwd = (self.cp_a2a_forward_s, self.cp_a2a_backward_s) if cp_a2a else (0.0, 0.0)
        return (fwd + cp_fwd + moe_share * (self.moe_forward_s + ep_fwd),
                bwd + cp_bwd + moe_share * (self.moe_backward_s + ep_bwd))

    def training_edge_s(self, tp: int, sp: bool) -> tuple[float, float]:
        """(forward, backward) overhead of a micro-batch's embedding, head and loss under TP
        beyond what they cost without it."""
        if tp == 1:
            return 0.0, 0.0
        return ((self.sp_edge_forward_s, self.sp_edge_backward_s) if sp
                else (self.tp_edge_forward_s, self.tp_edge_backward_s))

    def inference_layer_s(self, tp: int, decode: bool, moe_share: float = 0.0,
                          weight_bytes: float = 0.0) -> float:
        """One layer's prompt (or one-token decode, reading `weight_bytes` of weights on the
        rank) forward; under TP plus the DTensor surcharge that the training forward
        measured, and in MoE layers the MoE block's (measured in the training forward:
        autograd's recording included)."""
        base = (self.decode_layer_s + self.decode_layer_per_byte_s * weight_bytes if decode
                else self.prefill_layer_s)
        return (base + (max(0.0, self.tp_layer_forward_s - self.layer_forward_s) if tp > 1 else 0.0)
                + moe_share * self.moe_forward_s)

    def split_backward_s(self, activation_bytes):
        """What a layer holding `activation_bytes` of activations (without recompute) adds
        to a stage's backward when it is split."""
        return self.split_backward_layer_s + self.split_backward_per_activation_byte_s * activation_bytes

    def scaled(self, factor: float) -> FrameworkOverhead:
        return replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)
                                if f.name != "source"})

    def decode_scaled(self, factor: float) -> FrameworkOverhead:
        """With what only a decode step pays (its layers' host time, fixed and per byte, and
        its edge's) multiplied by `factor`."""
        return replace(self, decode_layer_s=self.decode_layer_s * factor,
                       decode_layer_per_byte_s=self.decode_layer_per_byte_s * factor,
                       decode_edge_s=self.decode_edge_s * factor)


@dataclass(frozen=True)
class Contention:
    """What communication running beside compute costs the compute: the fraction of GEMM
    and elementwise throughput lost while a collective kernel overlaps it (NCCL kernels hold
    SMs and HBM bandwidth: e.g. 24 of an H100's 132 SMs for an all-gather). Zero where
    collectives cannot overlap at all (gloo on CPU ranks: all exposed instead)."""

    compute_slowdown: float = 0.0
    source: str = "no overlap measured"


@dataclass(frozen=True)
class Stragglers:
    """How far the slowest of a group of devices that synchronise every layer runs behind
    the mean: each device's time for a layer varies with relative standard deviation
    `spread` (devices of one SKU differ by 8% on average, up to 22%, in a fleet: Sinha et al.
    2022, arXiv 2208.11035), and the group waits for the slowest, E[max of n standard
    normals] standard deviations behind (Blom 1958's approximation of the expected order
    statistic). Zero: not fitted (profiles measured on one machine)."""

    spread: float = 0.0
    source: str = "not fitted"

    def wait_share(self, ranks):
        """The slowest of `ranks` devices' lag, as a share of a layer's time; numpy-vectorised."""
        sizes, at = np.unique(np.asarray(ranks, dtype=float), return_inverse=True)
        z = [NormalDist().inv_cdf((n - 0.375) / (n + 0.25)) if n > 1 else 0.0 for n in sizes]
        return (self.spread * np.asarray(z))[at].reshape(np.shape(ranks))


@dataclass(frozen=True)
class Sustained:
    """The share of the fitted GEMM rate a training step loses against the kernels' own
    timing: the stock fits come from kernels timed in short runs (vidur's profiling), while a
    training run holds the GPU at its power limit for hours, where the clock, and with it the
    tensor cores' rate, settles lower (dynamic power ~ C V^2 f); fitted on published training
    runs (benchmarks/published.py --fit-sustained), it takes in whatever else slows a step's
    GEMMs against the microbenchmark. Zero: not fitted (a profile measured in place)."""

    gemm_loss: float = 0.0
    source: str = "not fitted"


@dataclass(frozen=True)
class FusedAttention:
    """The fused attention kernel (FlashAttention; scaled_dot_product_attention's fused
    backends) against the GEMM fits' price of the two matmuls it fuses (ops.attention_core):
    its forward, and its backward beyond the Q K^T it redoes (Op.kernel_redo), take
    `forward_scale` and `backward_scale` times that price plus a fixed cost per call
    (`*_latency_s`). Measured by `meshplan profile` (calibration/measure/attention.py); 1 and
    0 where not measured: on the stock profiles the fits' price of causal head-dim-128
    attention on H100 at 4K-16K is 317-331 TFLOPS forward and 318-332 backward, against
    FlashAttention-2's published 319-335 and 310-322 (Shah et al. 2024, FlashAttention-3,
    Figs. 5-6)."""

    forward_scale: float = 1.0
    backward_scale: float = 1.0
    source: str = "not measured: the GEMM fits' price"
    forward_latency_s: float = 0.0
    backward_latency_s: float = 0.0
    # The kernel's tile (queries x keys): it computes every tile holding a needed query-key
    # pair (gemm_model.causal_tile_share); 1 x 1: the exact causal share.
    query_block: int = 1
    key_block: int = 1
    # One decode step's attention (one query per sequence over its cached keys and values):
    # a fixed cost per call plus the cache's bytes at this rate; 0: not measured, priced
    # as its matmuls or its cache read, whichever is longer (simulator/serve.py).
    decode_latency_s: float = 0.0
    decode_bytes_per_s: float = 0.0

    def causal_share(self, seq_len: int, keys: int) -> float:
        """Share of the seq_len x keys pairs of a causal attention core this kernel computes."""
        return gemm_model.causal_tile_share(seq_len, keys, self.query_block, self.key_block)


@dataclass(frozen=True)
class CachedReads:
    """GEMMs whose weights the device read moments before, as a decode step finds them: it
    re-reads its stage's weights every step and writes little, so a small model's weights
    come back from the caches, while the GEMM fits timed them with the cache swept.
    Measured by `meshplan profile` (calibration/measure/cached_reads.py): seconds per weight
    byte of a GEMM with `rows` rows, by the bytes touched between two reads of one weight
    (the working set), in `dtype`; empty where not measured (the stock profiles, whose
    decode streams gigabytes of weights from HBM at the GEMM fits' roofline). A working set
    between two measured ones takes the larger's row, one beyond the table the last's; rows
    between two measured ones interpolate, beyond the last the time grows with the rows as
    the compute does. `step_bytes` is the working set of the step being priced (set by
    HardwareProfile.cached, never stored)."""

    working_set_bytes: tuple = ()
    rows: tuple = ()
    seconds_per_byte: tuple = ()   # [working set][rows]
    latency_s: float = 0.0         # fixed cost per GEMM call
    dtype: str = "fp32"
    source: str = "not measured"
    step_bytes: float | None = None

    @property
    def measured(self) -> bool:
        return bool(self.working_set_bytes)

    def prices(self, dtype: str, weight_bytes=None) -> bool:
        """Whether this table prices GEMMs in `dtype` with weights stored at `weight_bytes`
        (None: unquantized): measured, in its dtype, weights as measured."""
        return self.measured and dtype == self.dtype and weight_bytes is None

    def to_dict(self) -> dict:
        return {"working_set_bytes": list(self.working_set_bytes), "rows": list(self.rows),
                "seconds_per_byte": [list(r) for r in self.seconds_per_byte],
                "latency_s": self.latency_s, "dtype": self.dtype, "source": self.source}

    def gemm_time_s(self, m, n, k, batch, dtype_bytes: int):
        """Time (s) of batch x ([m,k] @ [k,n]) within the working set step_bytes."""
        i = int(np.searchsorted(np.asarray(self.working_set_bytes, dtype=float), self.step_bytes))
        per_byte = np.asarray(self.seconds_per_byte[min(i, len(self.working_set_bytes) - 1)], dtype=float)
        m = np.asarray(m, dtype=float)
        last = self.rows[-1]
        per_byte = np.where(m > last, per_byte[-1] * m / last, np.interp(m, self.rows, per_byte))
        return self.latency_s + np.asarray(batch, dtype=float) * k * n * dtype_bytes * per_byte

    def scaled(self, bandwidth: float, latency_s: float, latency: float = 1.0) -> CachedReads:
        return replace(self, latency_s=self.latency_s * latency + latency_s,
                       seconds_per_byte=tuple(tuple(t / bandwidth for t in r) for r in self.seconds_per_byte))


@dataclass(frozen=True)
class HardwareProfile:
    """A device type in its node. SI units: bytes, seconds, FLOP/s, bytes/s."""

    name: str
    device_name: str
    memory_bytes: int                 # device memory capacity
    peak_flops: dict                  # dense peak FLOP/s per dtype: fp32, tf32, bf16, fp16 (fp8)
    hbm_bytes_per_s: float            # nominal device-memory bandwidth
    gpus_per_node: int
    nics_per_node: int
    nic_bytes_per_s: float            # nominal, per NIC
    intra_node_link: str              # "nvswitch", "pcie", "shared-memory", ...
    gemm: dict                        # dtype -> GemmFit (fp8 only where the device has it)
    memory_bound: dict                # dtype -> MemoryBoundFit
    collectives: CollectiveFit
    sources: tuple = ()               # where each figure came from
    fit_report: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    overhead: FrameworkOverhead = FrameworkOverhead()
    contention: Contention = Contention()
    stragglers: Stragglers = Stragglers()
    attention: FusedAttention = FusedAttention()
    # cuDNN's fused attention (Transformer Engine's FusedAttention, which Megatron-LM runs on
    # Hopper): a plan's attention "cudnn" is priced with it; None: no figures for this device
    cudnn_attention: FusedAttention | None = None
    sustained: Sustained = Sustained()
    cached_reads: CachedReads = CachedReads()
    # How the NICs are switched (hw_profiles/fabric.py). None (no "fabric" in the JSON): not
    # described, every group gets the inter-node bandwidth as measured (link share 1.0).
    fabric: Fabric | None = None

    def _dtype(self, dtype: str) -> str:
        if dtype not in self.gemm or dtype not in self.peak_flops:
            raise ProfileError("dtype", f"{dtype!r} is not in profile {self.name!r}",
                               f"use one of {sorted(self.gemm)}")
        return dtype

    def gemm_time_s(self, m, n, k, dtype: str, batch=1, weight_bytes=None, dequant_flops=0.0):
        """Time (s) of batch x ([m,k] @ [k,n]) in `dtype`; numpy-broadcast over m, n, k, batch;
        `weight_bytes` per element of [k,n] where it is stored narrower, dequantized by
        `dequant_flops` on the CUDA cores (fp32 rate) inside the kernel (gemm_model)."""
        dtype = self._dtype(dtype)
        reads = self.cached_reads
        if reads.step_bytes is not None and reads.prices(dtype, weight_bytes):
            return reads.gemm_time_s(m, n, k, batch, ELEMENT_BYTES[dtype])
        return gemm_model.gemm_time_s(self.gemm[dtype], m, n, k, batch,
                                      self.peak_flops[dtype] * (1.0 - self.sustained.gemm_loss),
                                      self.hbm_bytes_per_s, ELEMENT_BYTES[dtype], weight_bytes,
                                      np.asarray(dequant_flops, dtype=float) / self.peak_flops["fp32"])

    def attention_kernel(self, kernel: str) -> HardwareProfile:
        """This profile as a plan with attention `kernel` prices it: "cudnn" puts the cuDNN
        kernel's figures in place of the fused attention's; a profile without them raises."""
        if kernel != "cudnn":
            return self
        if self.cudnn_attention is None:
            raise ProfileError("cudnn_attention", f"is not in profile {self.name!r}, and a plan with "
                               "attention cudnn is priced by it", "plan with --attention flash, or use a "
                               "profile that has it (the stock h100-80gb)")
        return replace(self, attention=self.cudnn_attention)

    def cached(self, working_set_bytes: float) -> HardwareProfile:
        """This profile as a step that keeps `working_set_bytes` in the device's caches sees
        it: GEMMs in the cached reads' dtype, weights unquantized, cost what CachedReads
        measured there. Itself where the profile has no cached reads."""
        if not self.cached_reads.measured:
            return self
        return replace(self, cached_reads=replace(self.cached_reads, step_bytes=float(working_set_bytes)))

    def memory_bound_time_s(self, num_bytes, dtype: str = "bf16", op_class: str | None = None):
        """Time (s) of a memory-bound operator of `op_class` (gemm_model.OP_CLASSES values;
        None: the overall fit) moving num_bytes (read + write)."""
        if dtype not in self.memory_bound:
            raise ProfileError("dtype", f"{dtype!r} is not in profile {self.name!r}",
                               f"use one of {sorted(self.memory_bound)}")
        return gemm_model.memory_bound_time_s(self.memory_bound[dtype], num_bytes,
                                              self.hbm_bytes_per_s, op_class)

    def collective_time_s(self, kind: str, message_bytes, group_size: int, ranks_per_node: int,
                          link_share: float = 1.0):
        """Time (s) of one collective; message_bytes in nccl-tests' size convention, link_share
        the group's share of the inter-node bandwidth (core.mesh.Group.link_share)."""
        return collective_model.collective_time_s(self.collectives, kind, message_bytes,
                                                  group_size, ranks_per_node, link_share)

    def with_fabric(self, fabric: Fabric) -> HardwareProfile:
        """What-if copy on another fabric (same NICs, curves and compute)."""
        return replace(self, name=f"{self.name}[fabric={fabric.label}]", fabric=fabric,
                       sources=self.sources + (f"what-if copy of {self.name}: fabric {fabric.label}",),
                       extra={**self.extra, "what_if": {"fabric": fabric.label}})

    def relative_error_band(self) -> tuple[float, float]:
        """(median, 95th-percentile) relative residual over all held-out samples."""
        band = self.fit_report.get("error_band")
        if not band:
            raise ProfileError("fit_report.error_band", f"profile {self.name!r} has no fit report",
                               REGENERATE)
        return float(band["median"]), float(band["p95"])

    @property
    def variant_of(self) -> dict | None:
        """For a datasheet variant (variants.VARIANTS, built by load_profile): its measured
        base's name ("base") and the factors it is scaled by; None for a measured profile."""
        return self.extra.get(VARIANT_KEY)

    @property
    def measured_on(self) -> str | None:
        """The device kind the profile's ranks were measured on ("cpu" or "cuda"; None for
        a profile built from published figures)."""
        return self.extra.get("measurement", {}).get("device")

    @property
    def comm_overlaps_compute(self) -> bool:
        """Whether collectives run beside compute. GPUs run NCCL kernels on their own SMs and
        copy engines while other streams compute; gloo on CPU ranks reduces and copies on the
        very cores the ranks compute on, so there every collective is exposed."""
        return self.extra.get("measurement", {}).get("collective_backend") != "gloo"

    def scaled(self, flops: float = 1.0, hbm_bw: float = 1.0, intra_node_bw: float = 1.0,
               inter_node_bw: float = 1.0, memory: float = 1.0, op_latency_s: float = 0.0,
               collective_latency: float = 1.0, overhead: float = 1.0,
               op_latency: float = 1.0, decode: float = 1.0) -> HardwareProfile:
        """What-if (or refitted, or probe-rescaled) copy: peak FLOP/s, HBM bandwidth (GEMM
        memory term, memory-bound ops, cached reads, decode attention's cache read), intra-
        and inter-node bus bandwidth, memory
        capacity, the collectives' latency, the host overhead per layer and the fixed cost
        per call of every GEMM, memory-bound op, cached read and fused attention call
        (`op_latency`) multiplied by the factors; op_latency_s added to every GEMM's and
        memory-bound op's fixed cost (framework dispatch per operator); the costs only a
        decode step pays (its host time per layer, the cached reads, the decode attention
        kernel) multiplied by `decode` on top."""
        factors = {"flops": flops, "hbm_bw": hbm_bw, "intra_node_bw": intra_node_bw,
                   "inter_node_bw": inter_node_bw, "memory": memory,
                   "collective_latency": collective_latency, "overhead": overhead,
                   "op_latency": op_latency, "decode": decode}
        changed = {k: v for k, v in factors.items() if v != 1.0}
        if op_latency_s:
            changed["op_latency_s"] = op_latency_s
        if not changed:
            return self
        tag = ",".join(f"{k}={v:g}" for k, v in changed.items())
        return replace(
            self, name=f"{self.name}[{tag}]",
            memory_bytes=int(self.memory_bytes * memory),
            peak_flops={k: v * flops for k, v in self.peak_flops.items()},
            hbm_bytes_per_s=self.hbm_bytes_per_s * hbm_bw,
            nic_bytes_per_s=self.nic_bytes_per_s * inter_node_bw,
            gemm={d: replace(f, latency_s=f.latency_s * op_latency + op_latency_s) for d, f in self.gemm.items()},
            memory_bound={d: replace(f, latency_s=f.latency_s * op_latency + op_latency_s)
                          for d, f in self.memory_bound.items()},
            cached_reads=self.cached_reads.scaled(hbm_bw / decode, op_latency_s, op_latency * decode),
            attention=replace(self.attention,
                              decode_bytes_per_s=self.attention.decode_bytes_per_s * hbm_bw / decode,
                              forward_latency_s=self.attention.forward_latency_s * op_latency,
                              backward_latency_s=self.attention.backward_latency_s * op_latency,
                              decode_latency_s=self.attention.decode_latency_s * op_latency * decode),
            collectives=self.collectives.scaled(intra_node_bw, inter_node_bw, collective_latency),
            overhead=self.overhead.scaled(overhead).decode_scaled(decode),
            sources=self.sources + (f"what-if copy of {self.name}: {tag}",),
            extra={**self.extra, "what_if": changed})

    def to_dict(self) -> dict:
        def curve(c: Curve) -> dict:
            return {"small": asdict(c.small), "large": asdict(c.large), "source": c.source}

        def table(t: dict) -> dict:
            return {kind: {str(n): curve(c) for n, c in sorted(by_n.items())}
                    for kind, by_n in t.items()}
        return {
            "name": self.name, "device_name": self.device_name, "memory_bytes": self.memory_bytes,
            "peak_flops": dict(self.peak_flops), "hbm_bytes_per_s": self.hbm_bytes_per_s,
            "gpus_per_node": self.gpus_per_node, "nics_per_node": self.nics_per_node,
            "nic_bytes_per_s": self.nic_bytes_per_s, "intra_node_link": self.intra_node_link,
            "gemm": {d: asdict(f) for d, f in self.gemm.items()},
            "memory_bound": {d: asdict(f) for d, f in self.memory_bound.items()},
            "collectives": {"intra": table(self.collectives.intra),
                            "inter": table(self.collectives.inter)},
            "sources": list(self.sources), "fit_report": json.loads(json.dumps(self.fit_report)),
            "extra": json.loads(json.dumps(self.extra)),
            "overhead": asdict(self.overhead),
            "contention": asdict(self.contention),
            "stragglers": asdict(self.stragglers),
            "attention": asdict(self.attention),
            **({"cudnn_attention": asdict(self.cudnn_attention)} if self.cudnn_attention else {}),
            "sustained": asdict(self.sustained),
            **({"cached_reads": self.cached_reads.to_dict()} if self.cached_reads.measured else {}),
            **({"fabric": self.fabric.to_dict()} if self.fabric else {}),
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> HardwareProfile:
        """Build from to_dict()'s output; a missing or ill-typed field raises ProfileError
        naming the field and `where` (the file)."""
        r = _Reader(where)
        nics = r.integer(data, "nics_per_node")
        optional = [d for d in OPTIONAL_DTYPE_BYTES if d in r.get(data, "peak_flops", dict)]
        return cls(
            name=r.get(data, "name", str), device_name=r.get(data, "device_name", str),
            memory_bytes=r.integer(data, "memory_bytes", MIN_MEMORY_BYTES),
            peak_flops={d: r.bounded(r.get(data, "peak_flops", dict), d, *RATE, "peak_flops.")
                        for d in DTYPES + tuple(optional)},
            hbm_bytes_per_s=r.bounded(data, "hbm_bytes_per_s", *RATE),
            gpus_per_node=r.integer(data, "gpus_per_node"), nics_per_node=nics,
            nic_bytes_per_s=r.bounded(data, "nic_bytes_per_s", *RATE),
            intra_node_link=r.get(data, "intra_node_link", str),
            gemm={d: r.gemm(r.get(r.get(data, "gemm", dict), d, dict, "gemm."), f"gemm.{d}.")
                  for d in DTYPES + tuple(optional)},
            memory_bound={d: r.memory_bound(r.get(r.get(data, "memory_bound", dict), d, dict,
                                                  "memory_bound."), f"memory_bound.{d}.")
                          for d in DTYPES},
            collectives=r.collectives(r.get(data, "collectives", dict), nics),
            sources=tuple(r.get(data, "sources", list)),
            fit_report=r.fit_report(r.get(data, "fit_report", dict)),
            extra=r.extra(r.get(data, "extra", dict)),
            overhead=r.overhead(data.get("overhead", {})),
            contention=r.fraction(data.get("contention", {}), "contention", Contention, "compute_slowdown"),
            stragglers=r.fraction(data.get("stragglers", {}), "stragglers", Stragglers, "spread"),
            attention=r.attention(data.get("attention", {})),
            cudnn_attention=r.attention(data["cudnn_attention"], "cudnn_attention")
            if data.get("cudnn_attention") is not None else None,
            sustained=r.fraction(data.get("sustained", {}), "sustained", Sustained, "gemm_loss"),
            cached_reads=r.cached_reads(data.get("cached_reads", {})),
            fabric=Fabric.from_dict(data["fabric"], where) if data.get("fabric") is not None
            else None)

    def save(self, path) -> None:
        """Write the profile's JSON whole or not at all, and only one its reader accepts (a
        fit outside the physical ranges is a ProfileError naming the field, nothing written)."""
        data = self.to_dict()
        HardwareProfile.from_dict(data, f"the profile to be written to {path}")
        write_atomic(path, json.dumps(data, indent=1) + "\n")


class _Reader:
    """Typed field access that names the field and the file in its ProfileError."""

    def __init__(self, where: str):
        self.where = where

    def get(self, data, name: str, kind: type, prefix: str = ""):
        if not isinstance(data, dict) or name not in data:
            raise ProfileError(prefix + name, f"missing in {self.where}", REGENERATE)
        value = data[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProfileError(prefix + name, f"is {type(value).__name__} in {self.where}, "
                               f"expected {kind.__name__}", REGENERATE)
        return value

    def number(self, data, name: str, prefix: str = "") -> float:
        if not isinstance(data, dict) or name not in data:
            raise ProfileError(prefix + name, f"missing in {self.where}", REGENERATE)
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise ProfileError(prefix + name, f"is {value!r} in {self.where}, expected a finite "
                               "non-negative number", REGENERATE)
        return float(value)

    def bounded(self, data, name: str, low: float, high: float, prefix: str = "") -> float:
        """A number in [low, high]: rates, capacities and efficiencies outside their physical
        range would make every time zero, infinite or nonsense."""
        value = self.number(data, name, prefix)
        if not low <= value <= high:
            raise ProfileError(prefix + name, f"is {value!r} in {self.where}, expected a number "
                               f"from {low:g} to {high:g}", REGENERATE)
        return value

    def integer(self, data, name: str, low: int = 1, prefix: str = "", high: int | None = None) -> int:
        value = self.get(data, name, int, prefix)
        if value < low or (high is not None and value > high):
            expected = f"at least {low}" if high is None else f"{low}-{high}"
            raise ProfileError(prefix + name, f"is {value} in {self.where}, expected {expected}",
                               REGENERATE)
        return value

    def extra(self, data: dict) -> dict:
        """The free-form section, with the CPU facts the cost model reads checked
        (cost.per_rank_profile): cores per node, and the slowdown beside busy neighbours."""
        if "cores_per_node" in data:  # a fraction where emulated nodes share a core
            self.bounded(data, "cores_per_node", 1e-3, 1e6, "extra.")
        if "neighbour_slowdown" in data:
            self.bounded(data, "neighbour_slowdown", 1.0, 10.0, "extra.")
        return data

    def numbers(self, data, cls, prefix: str) -> dict:
        return {f: self.number(data, f, prefix) for f in cls.__dataclass_fields__}

    def memory_bound(self, data, prefix: str) -> MemoryBoundFit:
        """latency_s and hbm_eff, and op_eff (operator class -> efficiency) when present."""
        op_eff = data.get("op_eff", {})
        if not isinstance(op_eff, dict):
            raise ProfileError(prefix + "op_eff", f"is not an object in {self.where}", REGENERATE)
        return MemoryBoundFit(self.number(data, "latency_s", prefix),
                              self.bounded(data, "hbm_eff", *EFFICIENCY, prefix),
                              {c: self.bounded(op_eff, c, *EFFICIENCY, prefix + "op_eff.") for c in op_eff})

    def fit_report(self, data: dict) -> dict:
        """The fit report as stored; its error band, where present, checked (the simulator's
        predictions quote it)."""
        if "error_band" in data:
            band = self.get(data, "error_band", dict, "fit_report.")
            for name in ("median", "p95"):
                self.number(band, name, "fit_report.error_band.")
        return data

    def gemm(self, data, prefix: str) -> GemmFit:
        """Non-negative fit parameters; the efficiencies in range."""
        values = self.numbers(data, GemmFit, prefix)
        values["eff_max"] = self.bounded(data, "eff_max", *EFFICIENCY, prefix)
        values["hbm_eff"] = self.bounded(data, "hbm_eff", *EFFICIENCY, prefix)
        return GemmFit(**values)

    def fraction(self, data, name: str, cls, key: str):
        """An optional section of one fraction in [0, 1) and its source, as `cls` (profiles
        from before the section: cls(), zero): contention, stragglers, sustained."""
        if not isinstance(data, dict):
            raise ProfileError(name, f"is not an object in {self.where}", REGENERATE)
        unknown = sorted(set(data) - {key, "source"})
        if unknown:
            raise ProfileError(f"{name}.{unknown[0]}", f"is unknown in {self.where}", REGENERATE)
        if not data:
            return cls()
        value = self.number(data, key, f"{name}.")
        if not 0 <= value < 1:
            raise ProfileError(f"{name}.{key}", f"is {value} in {self.where}, expected a fraction in [0, 1)",
                               REGENERATE)
        return cls(value, self.get(data, "source", str, f"{name}."))

    def attention(self, data, name: str = "attention") -> FusedAttention:
        """Optional section (profiles from before it: the GEMM fits' price, scales 1)."""
        if not isinstance(data, dict):
            raise ProfileError(name, f"is not an object in {self.where}", REGENERATE)
        known = [f.name for f in fields(FusedAttention)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ProfileError(f"{name}.{unknown[0]}", f"is unknown in {self.where}", REGENERATE)
        if not data:
            return FusedAttention()
        p = f"{name}."
        return FusedAttention(
            *(self.bounded(data, k, *ATTENTION_SCALE, p) for k in ("forward_scale", "backward_scale")),
            self.get(data, "source", str, p),
            **{k: self.bounded(data, k, *LATENCY_S, p) for k in ("forward_latency_s", "backward_latency_s")
               if k in data},
            **{k: self.integer(data, k, 1, p, MAX_TILE) for k in ("query_block", "key_block") if k in data},
            **{k: self.bounded(data, k, *LATENCY_S, p) for k in ("decode_latency_s",) if k in data},
            **{k: self.bounded(data, k, *RATE, p) for k in ("decode_bytes_per_s",) if data.get(k)})

    def cached_reads(self, data) -> CachedReads:
        """Optional section (profiles from before it: not measured): working sets and rows
        rising, a time per byte for each pair."""
        p = "cached_reads."
        if not isinstance(data, dict):
            raise ProfileError("cached_reads", f"is not an object in {self.where}", REGENERATE)
        unknown = sorted(set(data) - set(CachedReads().to_dict()))
        if unknown:
            raise ProfileError(p + unknown[0], f"is unknown in {self.where}", REGENERATE)
        if not data:
            return CachedReads()
        sizes, rows = (self.rising(data, name, p) for name in ("working_set_bytes", "rows"))
        table = self.get(data, "seconds_per_byte", list, p)
        if len(table) != len(sizes) or any(not isinstance(r, list) or len(r) != len(rows) for r in table):
            raise ProfileError(p + "seconds_per_byte", f"is not {len(sizes)} rows of {len(rows)} times "
                               f"(one per working set and row count) in {self.where}", REGENERATE)
        times = tuple(tuple(self.bounded({str(j): t}, str(j), 1e-18, 1e-3, f"{p}seconds_per_byte.{i}.")
                            for j, t in enumerate(r)) for i, r in enumerate(table))
        dtype = self.get(data, "dtype", str, p)
        if dtype not in DTYPES:
            raise ProfileError(p + "dtype", f"is {dtype!r} in {self.where}, expected one of {DTYPES}", REGENERATE)
        return CachedReads(sizes, rows, times, self.bounded(data, "latency_s", *LATENCY_S, p), dtype,
                           self.get(data, "source", str, p))

    def rising(self, data, name: str, prefix: str) -> tuple:
        """A non-empty list of positive numbers, each larger than the one before."""
        values = self.get(data, name, list, prefix)
        values = [self.bounded({str(i): v}, str(i), 1.0, 1e15, f"{prefix}{name}.") for i, v in enumerate(values)]
        if not values or any(b <= a for a, b in zip(values, values[1:])):
            raise ProfileError(prefix + name, f"is {values} in {self.where}, expected rising numbers",
                               REGENERATE)
        return tuple(values)

    def overhead(self, data) -> FrameworkOverhead:
        """Optional section (profiles measured before it existed have none: zeros)."""
        if not isinstance(data, dict):
            raise ProfileError("overhead", f"is not an object in {self.where}", REGENERATE)
        known = [f.name for f in fields(FrameworkOverhead) if f.name != "source"]
        unknown = sorted(set(data) - set(known) - {"source"})
        if unknown:
            raise ProfileError(f"overhead.{unknown[0]}", f"is unknown in {self.where}", REGENERATE)
        values = {f: self.number(data, f, "overhead.") for f in known if f in data}
        return FrameworkOverhead(**values, **({"source": self.get(data, "source", str, "overhead.")}
                                              if "source" in data else {}))

    def line(self, data, prefix: str) -> Line:
        return Line(self.bounded(data, "alpha_s", *LATENCY_S, prefix),
                    self.bounded(data, "busbw_bytes_per_s", *BUS_RATE, prefix))

    def curve(self, data, prefix: str) -> Curve:
        return Curve(self.line(self.get(data, "small", dict, prefix), prefix + "small."),
                     self.line(self.get(data, "large", dict, prefix), prefix + "large."),
                     self.get(data, "source", str, prefix))

    def collectives(self, data, nics_per_node: int) -> CollectiveFit:
        tables = {}
        for level in ("intra", "inter"):
            by_kind = self.get(data, level, dict, "collectives.")
            tables[level] = {}
            for kind in collective_model.KINDS:
                prefix = f"collectives.{level}.{kind}."
                by_n = self.get(by_kind, kind, dict, f"collectives.{level}.")
                if not by_n:
                    raise ProfileError(prefix[:-1], f"is empty in {self.where}", REGENERATE)
                if not all(n.isdigit() and int(n) > 0 for n in by_n):
                    raise ProfileError(prefix[:-1], f"has keys {sorted(by_n)} in {self.where}, "
                                       "expected positive integers (group sizes or ranks per node)",
                                       REGENERATE)
                tables[level][kind] = {int(n): self.curve(c, f"{prefix}{n}.")
                                       for n, c in by_n.items()}
        return CollectiveFit(tables["intra"], tables["inter"], nics_per_node)


def available_profiles() -> list[str]:
    """The stock profile names: those measured (hw_profiles/data) and their datasheet
    variants (variants.VARIANTS)."""
    measured = {p.stem for p in DATA_DIR.glob("*.json") if not p.name.endswith(SAMPLES_SUFFIX) and p != END_TO_END}
    return sorted(measured | set(VARIANTS))


def profile_summary(hw: HardwareProfile, name: str) -> dict:
    """A stock profile's headline figures under the `name` it is loaded by, and what they
    rest on: a measurement, or a measured base scaled by datasheet ratios."""
    variant = hw.variant_of
    return {"name": name, "device": hw.device_name, "memory_gib": hw.memory_bytes / 2 ** 30,
            "bf16_tflops": hw.peak_flops.get("bf16", 0.0) / 1e12, "memory_tb_per_s": hw.hbm_bytes_per_s / 1e12,
            "node": f"{hw.gpus_per_node} x {hw.intra_node_link}",
            "network": f"{hw.nics_per_node} x {hw.nic_bytes_per_s * 8 / 1e9:.3g} Gb/s" if hw.nics_per_node else "-",
            "basis": f"{variant['base']} x datasheet" if variant else "measured"}


def samples_path(profile_json) -> Path:
    """Where the samples a profile was fitted on lie: beside it, <stem>.samples.json."""
    path = Path(profile_json)
    return path.with_name(path.name.removesuffix(".json") + SAMPLES_SUFFIX)


def _is_path(text: str) -> bool:
    return text.endswith(".json") or os.sep in text or Path(text).is_file()


def profile_path(name_or_path: str) -> Path:
    """A bare name is hw_profiles/data/<name>.json (`local`: local_profile_name's); anything
    else is a path."""
    text = str(name_or_path)
    if _is_path(text):
        return Path(text)
    return DATA_DIR / f"{local_profile_name() if text == LOCAL else text}.json"


def local_profile_name(cpu: str | None = None) -> str:
    """The committed profile `local` stands for on a machine with `cpu` (default: this one's
    CPU model): the CPU profile local-<model> measured on that model (its device_name), else
    local itself, whose probe in `run` and `validate` then reports the drift. Machines of one
    kind with different CPUs (the VMs this project runs on are Intel Xeon or AMD EPYC) each
    get the profile of their own CPU."""
    cpu = this_cpu_model() if cpu is None else cpu
    for name in available_profiles():
        if name.startswith(LOCAL + "-") and _device_name(DATA_DIR / f"{name}.json") == cpu_device_name(cpu):
            return name
    return LOCAL


def cpu_device_name(cpu: str) -> str:
    """The device_name of a CPU profile measured on a `cpu` (calibration/local_base.py)."""
    return f"{cpu} (one rank = 1 torch thread)"


@functools.lru_cache(maxsize=None)
def _device_name(path: Path):
    return read_json(path).get("device_name")


def load_profile(name_or_path: str) -> HardwareProfile:
    """A bare name loads hw_profiles/data/<name>.json, or builds a datasheet variant from
    its measured base; anything else is a path."""
    text = str(name_or_path)
    if text in VARIANTS and not _is_path(text):
        variant = VARIANTS[text]
        base = load_profile(variant.base)
        return replace(base.scaled(**variant.factors), name=text, device_name=variant.device_name,
                       sources=base.sources + (f"{text}: {base.name} scaled by {variant.source}",),
                       extra={**base.extra, VARIANT_KEY: {"base": base.name, **variant.factors}})
    path, is_path = profile_path(text), _is_path(text)
    if not path.is_file() or (not is_path and text not in available_profiles()):
        if is_path:
            raise ProfileError("hardware", f"profile file {path} does not exist",
                               "pass an existing profile JSON or a stock name: "
                               f"{', '.join(available_profiles())}")
        raise ProfileError("hardware", f"no stock profile named {text!r}",
                           f"use one of {', '.join(available_profiles())} or a path to a JSON file")
    try:
        data = read_json(path)
    except ValueError as e:
        raise ProfileError("hardware", f"{path} cannot be read ({e})", REGENERATE) from None
    if not isinstance(data, dict):
        raise ProfileError("hardware", f"{path} holds a {type(data).__name__}, not an object",
                           REGENERATE)
    return HardwareProfile.from_dict(data, where=str(path))
