"""Serving simulator: time to first token, time per output token, throughput and per-device
memory of serving a decoder-only model with tensor parallelism, pipeline parallelism and
replicas, from the same hardware profile (and operator list, simulator/ops.py) as training.

Workload: a static batch of `batch` requests per replica, each with a `prompt_len`-token
prompt and `gen_len` generated tokens. With pp stages the batch streams through the pipeline
as min(pp, batch) micro-batches, as vLLM's pipeline-parallel engine keeps pp batches in
flight. Definitions:
- TTFT: prompt in, first token out: prefill of every layer, then the final norm, LM head and
  sampler on the last position only (the other positions' logits are never computed).
- TPOT: mean time of the gen_len - 1 decode steps; step j attends over prompt_len + j tokens.
- latency = TTFT + (gen_len - 1) x TPOT; throughput = replicas x batch x gen_len / latency
  (generated tokens per second over whole requests, prefill included, as the issue asks);
  decode_tokens_per_s is the steady-state decode rate without prefill.
Mixture-of-experts layers read the weights of the experts the step's tokens hit
(ops.active_experts), latent attention caches its compressed latent (kv_elements_per_token),
sliding-window layers keep and read only their window (kv_tokens_per_sequence, as vLLM's
hybrid KV cache manager and windowed attention kernels do),
and the weights may be quantized (quantize.py). The experts run over the tp x replicas ranks
of a stage, sharded or whole (expert_parallel, vLLM's --enable-expert-parallel), with the
replicas' tokens gathered for them (serve_experts.py).
A decode step re-reads its stage's weights and caches every step: where the profile measured
reads from the device's caches (HardwareProfile.cached) its GEMMs cost what they measured at
the step's working set, and where it measured the decode attention kernel, that kernel's
fixed cost and rate (FusedAttention.decode_bytes_per_s) price the cache read.
Not modelled: sampling beyond a softmax over the logits, CPU scheduling, CUDA-graph launch
savings, chunked prefill, prefix caching, continuous batching of prefill with decode.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.core.fields import from_fields
from meshplan.core.errors import PlanError
from meshplan.core.mesh import Group, Mesh
from meshplan.simulator.cost import forward_s, moe_layer_share, per_rank_profile, tp_comm_s
from meshplan.simulator.memory import stage_params, usable_bytes
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import GEMM, Op, Shard, embedding_ops, head_ops, layer_ops
from meshplan.simulator.partition import even_partition
from meshplan.simulator.plan import DTYPE_BYTES, Cluster, count_issue, knob
from meshplan.simulator.quantize import QUANTIZATIONS, quantized, quantized_weights, weight_bytes
from meshplan.simulator.serve_experts import dispatch_s, expert_degrees, expert_load

# Serving dtypes of weights and activations; FP8 serving is a quantization (quantize.py).
DTYPES = ("fp32", "bf16", "fp16")
# KV caches may be stored in fp8 (vLLM --kv-cache-dtype fp8) while weights stay 16-bit.
KV_DTYPE_BYTES = {**{d: DTYPE_BYTES[d] for d in DTYPES}, "fp8": 1}
# Tokens per KV-cache block: vLLM's default --block-size (vllm/config/cache.py, DEFAULT_BLOCK_SIZE).
KV_BLOCK_TOKENS = 16
DECODE_KEYS = ("weights_read", "kv_read", "compute", "elementwise", "host_overhead", "tp_comm",
               "moe_dispatch", "pp_handoff", "pp_bubble")


@dataclass(frozen=True)
class InferencePlan:
    """How one deployment serves: `batch` concurrent sequences per replica, tp x pp GPUs per
    replica, `replicas` independent copies (data parallel serving)."""

    batch: int = knob(help="concurrent sequences per replica")
    prompt_len: int = knob(help="prompt tokens per sequence")
    gen_len: int = knob(help="generated tokens per sequence")
    tp: int = knob(1, "tensor-parallel degree")
    pp: int = knob(1, "pipeline-parallel degree")
    replicas: int = knob(1, "model replicas (data parallel serving; default: GPUs / (tp*pp))")
    dtype: str = knob("fp16", "weights and activations dtype", choices=DTYPES)
    kv_dtype: str | None = knob(None, "KV cache dtype (default: dtype)",
                                choices=tuple(KV_DTYPE_BYTES))
    quantization: str = knob("none", "weights: int8 / int4 weight-only (AWQ/GPTQ-style groups) or fp8 "
                             "weights and activations", choices=QUANTIZATIONS)
    quant_group_size: int = knob(128, "weights per scale of int8 / int4 quantization")
    expert_parallel: bool = knob(False, "MoE: whole experts spread over the tp x replicas ranks instead of "
                                 "every expert sharded over them (vLLM --enable-expert-parallel)",
                                 aliases=("--enable-expert-parallel",))

    def __post_init__(self):
        issues = [count_issue("plan", f, getattr(self, f))
                  for f in ("batch", "prompt_len", "gen_len", "tp", "pp", "replicas", "quant_group_size")]
        if any(issues):
            raise PlanError.of([i for i in issues if i])
        if self.dtype not in DTYPES:
            raise PlanError("plan.dtype", f"unknown {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.dtype)
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise PlanError("plan.kv_dtype", f"unknown {self.kv_dtype!r}",
                            f"use one of {', '.join(KV_DTYPE_BYTES)}")
        if self.quantization not in QUANTIZATIONS:
            raise PlanError("plan.quantization", f"unknown {self.quantization!r}",
                            f"use one of {', '.join(QUANTIZATIONS)}")
        if not isinstance(self.expert_parallel, bool):
            raise PlanError("plan.expert_parallel", f"{self.expert_parallel!r} is not true or false",
                            "give true or false")

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.replicas

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.gen_len

    @property
    def num_microbatches(self) -> int:
        return min(self.pp, self.batch)

    @property
    def micro_batch(self) -> int:
        """Sequences in the largest micro-batch (it sets each stage's time)."""
        return math.ceil(self.batch / self.pp)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_dtype_bytes(self) -> int:
        return KV_DTYPE_BYTES[self.kv_dtype]

    @property
    def weight_bytes(self) -> float:
        """Bytes per element of the quantized weights (quantize.weight_bytes)."""
        return weight_bytes(self.quantization, self.quant_group_size, self.dtype_bytes)

    def validate(self, model: ModelSpec, cluster: Cluster, hw: HardwareProfile | None = None) -> None:
        """Legality of this plan for this model on this cluster (rules.SERVING), and on this
        hardware (rules.SERVING_HARDWARE) when given; one PlanError naming every rule it breaks."""
        issues = rules.violations(rules.SERVING, self, model, cluster)
        if hw is not None:
            issues += rules.violations(rules.SERVING_HARDWARE, self, model, hw)
        if issues:
            raise PlanError.of(issues)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InferencePlan:
        return from_fields(cls, data, "plan.", PlanError, "inference plan")


def kv_elements_per_token(model: ModelSpec, tp: int = 1) -> int:
    """KV-cache elements one token adds per layer on one device: K and V of each KV head
    (GQA/MQA: num_kv_heads, not num_heads), max(1, kv/tp) heads per device; with latent
    attention the compressed latent and the shared RoPE key, kv_lora_rank +
    qk_rope_head_dim, whole on every TP rank (DeepSeek-V2 sec 2.1.2; vLLM's MLA cache holds
    [kv_lora_rank + qk_rope_head_dim] per token, replicated over TP)."""
    if model.kv_lora_rank:
        return model.kv_lora_rank + model.qk_rope_head_dim
    return 2 * max(1, model.num_kv_heads // tp) * model.head_dim


def window_kept_tokens(window: int) -> int:
    """Token slots a sliding-window layer keeps per sequence: vLLM's SlidingWindowManager frees
    the blocks wholly before the last window - 1 tokens (remove_skipped_blocks), keeping at
    most ceil((window - 1) / block) + 1 blocks (SlidingWindowSpec.max_memory_usage_bytes: the
    window need not start at a block boundary)."""
    return KV_BLOCK_TOKENS * (math.ceil((window - 1) / KV_BLOCK_TOKENS) + 1)


def kv_tokens_per_sequence(model: ModelSpec, prompt_len: int, context_len: int,
                           layers: range | None = None) -> int:
    """Cached (token, layer) pairs of one sequence at its peak over `layers` (default all): the
    larger of its prefill, where every layer holds the whole prompt (vLLM allocates the slots
    of every scheduled token before the step and frees a window's old blocks only at the next
    step; one prefill pass, no chunked prefill, as the timing assumes), and its last decode
    step, where full-attention layers hold the context and sliding-window layers
    min(context, window_kept_tokens)."""
    layers = range(model.num_layers) if layers is None else layers
    local = sum(1 for i in model.local_layers if i in layers)
    kept = min(context_len, window_kept_tokens(model.sliding_window)) if local else 0
    return max(len(layers) * prompt_len, (len(layers) - local) * context_len + local * kept)


def kv_bytes_per_sequence(model: ModelSpec, plan: InferencePlan, layers: range | None = None) -> int:
    """KV-cache bytes one sequence of the plan holds on one device at its peak over `layers`."""
    return (kv_tokens_per_sequence(model, plan.prompt_len, plan.context_len, layers)
            * kv_elements_per_token(model, plan.tp) * plan.kv_dtype_bytes)


@dataclass(frozen=True)
class InferenceResult:
    plan: InferencePlan
    model: ModelSpec
    cluster: Cluster
    hardware: str
    ttft_s: float
    tpot_s: float
    latency_s: float
    throughput_tokens_per_s: float
    decode_tokens_per_s: float
    kv_cache_bytes: float
    weights_bytes: float
    peak_memory_bytes: float
    memory_limit_bytes: float
    max_batch: int
    fits: bool
    breakdown: dict
    error_band: tuple[float, float] = (0.0, 0.0)
    # bytes a decode step touches on its busiest device (weights and caches), and whether its
    # GEMMs were priced as read back from the device's caches (HardwareProfile.cached)
    decode_working_set_bytes: float = 0.0
    decode_cached: bool = False

    def to_json(self) -> dict:
        return {
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "latency_s": self.latency_s,
            "params": self.model.num_params(), "active_params": self.model.num_params(active=True),
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "throughput_tokens_per_s_per_gpu": self.throughput_tokens_per_s / self.plan.num_gpus,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "kv_cache_bytes": self.kv_cache_bytes, "weights_bytes": self.weights_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes, "max_batch": self.max_batch,
            "fits": self.fits, "breakdown": {k: dict(v) for k, v in self.breakdown.items()},
            "error_band": {"median_rel": self.error_band[0], "p95_rel": self.error_band[1]},
            "decode_working_set_bytes": self.decode_working_set_bytes, "decode_cached": self.decode_cached,
            "plan": self.plan.to_dict(), "model": self.model.to_dict(),
            "cluster": {"num_gpus": self.cluster.num_gpus,
                        "gpus_per_node": self.cluster.gpus_per_node},
            "hardware": self.hardware,
        }


def _served(model: ModelSpec, tp: int) -> ModelSpec:
    """The model as each TP rank sees it: with tp > KV heads, every rank holds one (replicated)
    KV head and its K/V projection, i.e. tp KV heads in total."""
    return dataclasses.replace(model, num_kv_heads=max(model.num_kv_heads, tp))


def _activation_bytes_per_seq(model: ModelSpec, plan: InferencePlan, last: bool) -> float:
    """Transient bytes of one sequence's prefill on one device: one layer's live tensors
    (hidden state and residual, QKV, attention output, MLP up and activation outputs; layers run
    one at a time and keep nothing for a backward) plus fp32 logits of its last position on the
    last stage (vLLM sizes this working set with a profiling forward pass)."""
    h, hd, t = model.hidden_size, model.head_dim, plan.tp
    heads, kv, ffn = model.num_heads // t, model.num_kv_heads // t, model.ffn_hidden_size // t
    if model.num_experts:  # the rows this rank's experts run per token, and the shared experts
        tokens = plan.micro_batch * plan.prompt_len
        rows, _ = expert_load(model, t, plan.replicas, plan.expert_parallel, tokens)
        etp = expert_degrees(model, t, plan.replicas, plan.expert_parallel)[1]
        ffn = max(ffn, rows / tokens * model.moe_ffn_hidden_size / etp + model.shared_ffn_size / t)
    gated = 2 if model.gated_mlp else 1
    per_token = plan.dtype_bytes * (2 * h + (heads + 2 * kv) * hd + heads * hd + (gated + 1) * ffn)
    return plan.prompt_len * per_token + (4.0 * model.vocab_size if last else 0.0)


def _max_batch(room_bytes: float, kv_per_seq: float, act_per_seq: float, pp: int) -> int:
    """Largest B with B*kv + ceil(B/pp)*act <= room. B_hi = room/(kv + act/pp) bounds it; with
    q = ceil(B_hi/pp) the answer is B_hi trimmed to (room - q*act)/kv, or failing that pp*(q-1),
    the largest B with one micro-batch row fewer (its room covers pp*(q-1) sequences)."""
    if room_bytes <= 0:
        return 0
    hi = int(room_bytes // (kv_per_seq + act_per_seq / pp))
    q = math.ceil(hi / pp)
    return max(0, pp * (q - 1), min(hi, int((room_bytes - q * act_per_seq) // kv_per_seq)))


def _ops_s(ops: list[Op], hw: HardwareProfile, dtype: str) -> np.ndarray:
    """Each op's time (cost.forward_s, one call for the list)."""
    return forward_s(ops, hw, dtype) if ops else np.zeros(0)


def _kv_write(model: ModelSpec, plan: InferencePlan, tokens: int) -> Op:
    """Appending the new tokens' K and V (or latent) to the cache: read at dtype, written at
    kv_dtype."""
    elements = tokens * kv_elements_per_token(model, plan.tp)
    return Op("kv_write", "memory", float(elements),
              bytes_moved=float(elements) * (plan.dtype_bytes + plan.kv_dtype_bytes))


def _edge_ops(model: ModelSpec, plan: InferencePlan, tokens: int, first: bool,
              last: bool) -> list[Op]:
    """Embedding of all `tokens` (first stage); final norm, LM head and a softmax over the
    logits standing for the sampler, for the last position of each sequence (last stage)."""
    d = plan.dtype_bytes
    ops = list(embedding_ops(model, Shard(tokens, 1, tp=plan.tp, dtype_bytes=d))) if first else []
    return ops + (list(head_ops(model, Shard(plan.micro_batch, 1, tp=plan.tp, dtype_bytes=d)))
                  if last else [])


def _edge_comm_s(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile, tp: Group,
                 tokens: int, first: bool, last: bool) -> float:
    """vLLM's vocab-parallel embedding all-reduces its output over TP; the LM head's sharded
    logits are gathered over TP."""
    if tp.size == 1:
        return 0.0
    d = plan.dtype_bytes
    comm = hw.collective_time_s("all_reduce", tokens * model.hidden_size * d, tp.size,
                                tp.ranks_per_node) if first else 0.0
    return comm + (hw.collective_time_s("all_gather", plan.micro_batch * model.vocab_size * d,
                                        tp.size, tp.ranks_per_node) if last else 0.0)


def _shard(model: ModelSpec, plan: InferencePlan, micro_batch: int, seq_len: int) -> Shard:
    """One device's share of a micro-batch: attention and the shared experts over TP, the
    routed experts as vLLM lays them out and loads them (serve_experts.py)."""
    ep, etp = expert_degrees(model, plan.tp, plan.replicas, plan.expert_parallel)
    load = (expert_load(model, plan.tp, plan.replicas, plan.expert_parallel, micro_batch * seq_len)
            if model.num_experts else None)
    return Shard(micro_batch, seq_len, tp=plan.tp, dtype_bytes=plan.dtype_bytes, ep=ep, etp=etp,
                 expert_load=load)


def _prefill_layer_s(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile) -> float:
    """One layer's prefill of one micro-batch on one device (the attention core at the
    causal share its kernel computes, FusedAttention.causal_share)."""
    s = plan.prompt_len
    ops = _layer_ops(model, plan, _shard(model, plan, plan.micro_batch, s))
    return (float(_ops_s(ops + [_kv_write(model, plan, plan.micro_batch * s)], hw, plan.dtype).sum())
            + hw.overhead.inference_layer_s(plan.tp, decode=False, moe_share=moe_layer_share(model)))


def _layer_ops(model: ModelSpec, plan: InferencePlan, shard: Shard) -> list[Op]:
    """One layer's operators with the plan's weight quantization (quantize.quantized)."""
    return quantized(layer_ops(model, shard), plan.quantization, plan.quant_group_size, plan.dtype_bytes)


def _classified_s(ops, hw: HardwareProfile, compute_hw: HardwareProfile, dtype: str) -> dict:
    """Decode time of ops by what bounds them: weight GEMMs whose roofline time exceeds their
    compute time on a profile with unbounded bandwidth read their weights; the rest compute;
    memory-bound operators are elementwise."""
    t = _ops_s(ops, hw, dtype)
    gemm = np.array([op.kind == GEMM for op in ops], dtype=bool)
    compute_bound = t <= _ops_s(ops, compute_hw, dtype) * (1 + 1e-9)
    return {"weights_read": float(t[gemm & ~compute_bound].sum()),
            "compute": float(t[gemm & compute_bound].sum()), "elementwise": float(t[~gemm].sum())}


def _weights_read(ops: list[Op], plan: InferencePlan) -> float:
    """Bytes of weights `ops` read: every weight GEMM's [k, n] per batch entry, at its
    stored width."""
    return float(sum(op.count * op.batch * op.n * op.k * (op.weight_bytes or plan.dtype_bytes)
                     for op in ops if op.kind == GEMM and op.weight))


def decode_layer_weight_bytes(model: ModelSpec, plan: InferencePlan) -> float:
    """Bytes of weights a rank reads in one layer's one-token decode forward (the mean layer)."""
    return _weights_read(_layer_ops(model, plan, _shard(model, plan, plan.micro_batch, 1)), plan)


def decode_edge_weight_bytes(model: ModelSpec, plan: InferencePlan) -> float:
    """... and in the embedding, final norm and head of one decode step (the last stage's)."""
    return _weights_read(_edge_ops(model, plan, plan.micro_batch, True, True), plan)


def _decode_layer_parts(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile,
                        compute_hw: HardwareProfile, contexts: np.ndarray) -> dict:
    """One layer's decode step of one micro-batch on one device by category, arrays over the
    step's context length. Weight GEMMs have m = micro-batch, so the profile's roofline makes
    them weight-read bound at small batch and compute bound at large. Attention reads
    micro x keys x 2 x kv_heads/tp x head_dim KV elements at the memory-bound rate, unless
    its FLOPs take longer: scores and values of one fused kernel, counted as one [g, d] x
    [d, 2 keys] GEMM per KV head and sequence (g query heads share a KV head, as GQA decode
    kernels group them). Keys are the context, or in a sliding-window layer the last
    min(context, window) (FlashAttention's window_size skips the key blocks before it); the
    mean layer weighs each kind by its share of the layers."""
    b, d = plan.micro_batch, plan.dtype
    ops = [op for op in _layer_ops(model, plan, _shard(model, plan, b, 1))
           if not op.attention_core] + [_kv_write(model, plan, b)]
    parts = _classified_s(ops, hw, compute_hw, d)
    kv_read, attention = np.zeros_like(contexts), np.zeros_like(contexts)
    for kind, n in model.layer_kinds():
        keys = np.minimum(contexts, model.sliding_window) if kind.local else contexts
        read_s, flops_s = _decode_attention_s(model, plan, hw, compute_hw, keys)
        kv_read = kv_read + n / model.num_layers * np.where(read_s >= flops_s, read_s, 0.0)
        attention = attention + n / model.num_layers * np.where(read_s >= flops_s, 0.0, flops_s)
    parts["kv_read"] = kv_read
    parts["host_overhead"] = hw.overhead.inference_layer_s(plan.tp, decode=True,
                                                           moe_share=moe_layer_share(model),
                                                           weight_bytes=_weights_read(ops, plan))
    parts["compute"] = parts["compute"] + attention
    return parts


def _decode_attention_s(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile,
                        compute_hw: HardwareProfile, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KV read time, FLOP time) of one layer's decode attention over `keys` cached tokens of
    each sequence of the micro-batch; where the profile measured its decode attention kernel
    (FusedAttention.decode_bytes_per_s), that kernel's fixed cost plus the cache's bytes at
    its rate, as the read time."""
    b, d = plan.micro_batch, plan.dtype
    cache_bytes = b * keys * kv_elements_per_token(model, plan.tp) * plan.kv_dtype_bytes
    kernel = hw.attention
    if kernel.decode_bytes_per_s:
        return kernel.decode_latency_s + cache_bytes / kernel.decode_bytes_per_s, np.zeros_like(keys)
    if model.kv_lora_rank:
        # latent attention decodes with the up-projections absorbed into the query and the
        # output (DeepSeek-V2 sec 2.1.2; vLLM's MLA decode): every local head scores the
        # latent and RoPE key ([heads, c + r] x [c + r, ctx]) and reads values from the
        # latent ([heads, ctx] x [ctx, c]) per sequence
        heads, c, r = model.num_heads // plan.tp, model.kv_lora_rank, model.qk_rope_head_dim
        flops_s = (compute_hw.gemm_time_s(heads, keys, c + r, d, batch=b)
                   + compute_hw.gemm_time_s(heads, c, keys, d, batch=b))
    else:
        kv, hd = model.num_kv_heads // plan.tp, model.head_dim
        g = model.num_heads // model.num_kv_heads
        flops_s = compute_hw.gemm_time_s(g, 2 * keys, hd, d, batch=b * kv)
    return hw.memory_bound_time_s(cache_bytes, d), flops_s


@dataclass(frozen=True)
class _Layout:
    """Where a replica runs: layers per pipeline stage, the TP group, the link between
    adjacent stages and between the last and the first, the replicas' group that the MoE
    layers gather tokens over."""

    layers: tuple[int, ...]
    tp: Group
    pair: Group
    dp: Group
    loop: Group

    @property
    def ranges(self) -> list[range]:
        """The layer indices of each stage (contiguous, in order)."""
        ends = np.cumsum(self.layers).tolist()
        return [range(end - n, end) for n, end in zip(self.layers, ends)]

    @property
    def stages(self) -> list[tuple[int, bool, bool]]:
        """(layers, is first, is last) of each stage."""
        p = len(self.layers)
        return [(n, s == 0, s == p - 1) for s, n in enumerate(self.layers)]

    def handoff_s(self, model: ModelSpec, plan: InferencePlan, hw: HardwareProfile,
                  tokens: int) -> float:
        """One stage boundary: vLLM passes the hidden states and the residual
        (IntermediateTensors) of `tokens` tokens."""
        if plan.pp == 1:
            return 0.0
        message = 2 * tokens * model.hidden_size * plan.dtype_bytes
        return hw.collective_time_s("send_recv", message, 2, self.pair.ranks_per_node)

    def token_return_s(self, plan: InferencePlan, hw: HardwareProfile, sequences: int) -> float:
        """The last stage sends each sequence's new token id (int64) back to the first, which
        embeds it for the next decode step (vLLM's sampled tokens return through its
        scheduler; executor/generate.py sends them rank to rank)."""
        if plan.pp == 1:
            return 0.0
        return hw.collective_time_s("send_recv", 8 * sequences, 2, self.loop.ranks_per_node)


def _layout(plan: InferencePlan, model: ModelSpec, cluster: Cluster) -> _Layout:
    """Rank placement: TP innermost, then pipeline stages, replicas outermost (each replica
    a contiguous block of tp x pp GPUs); layers split as vLLM splits them."""
    mesh = Mesh.of({"tp": plan.tp, "pp": plan.pp, "dp": plan.replicas}, ("tp", "pp", "dp"),
                   cluster.gpus_per_node)
    return _Layout(even_partition(model.num_layers, plan.pp), mesh.group(("tp",)),
                   mesh.neighbour_pair("pp"), mesh.group(("dp",)), mesh.end_pair("pp"))


def _stage_prefill_s(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile,
                     at: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(compute, TP communication, MoE dispatch) of one prefill micro-batch on each stage."""
    b, tokens = plan.micro_batch, plan.micro_batch * plan.prompt_len
    layer_s = _prefill_layer_s(model, plan, hw)
    layer_comm_s = float(tp_comm_s(model, b * plan.prompt_len, False, plan.dtype_bytes, hw,
                                   at.tp.size, at.tp.ranks_per_node))
    layer_dispatch_s = moe_layer_share(model) * dispatch_s(model, hw, at.dp, tokens, plan.dtype_bytes)
    compute = np.array([n * layer_s + _ops_s(_edge_ops(model, plan, tokens, f, la), hw, plan.dtype).sum()
                        for n, f, la in at.stages])
    comm = np.array([n * layer_comm_s + _edge_comm_s(model, plan, hw, at.tp, tokens, f, la)
                     for n, f, la in at.stages])
    return compute, comm, np.array([n * layer_dispatch_s for n in at.layers])


def _prefill_s(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile, at: _Layout,
               busy: Callable[[int], HardwareProfile]) -> dict:
    """TTFT by part. The micro-batches stream through the stages: the last one's first token
    is out after one pass through every stage plus (m - 1) slowest-stage times. In time slot
    t of the m + p - 1 only the stages holding a micro-batch compute (min(t + 1, p, m,
    m + p - 1 - t) of them), each priced on `busy(k)`, the profile of a rank beside the
    ranks of k busy stages (CPU ranks sharing cores: cost.per_rank_profile), where the
    others wait; the hand-offs on `hw`."""
    p, m = plan.pp, plan.num_microbatches
    slots = m + p - 1
    active = [min(t + 1, p, m, slots - t) for t in range(slots)]
    parts = {k: _stage_prefill_s(model, plan, busy(k), at) for k in set(active)}
    compute, comm, dispatch = (sum(parts[active[s]][i][s] for s in range(p)) for i in range(3))
    # each later slot: the slowest stage (compute + communication + dispatch) at its k
    later = sum(float(np.max(np.sum(parts[active[t]], axis=0))) for t in range(p, slots))
    return {"compute": float(compute), "tp_comm": float(comm), "moe_dispatch": float(dispatch),
            "pp_handoff": (p - 1) * at.handoff_s(model, plan, hw, plan.micro_batch * plan.prompt_len),
            "other_microbatches": later}


def _decode_s(model: ModelSpec, plan: InferencePlan, hw: HardwareProfile,
              at: _Layout) -> tuple[float, dict]:
    """(TPOT, its parts). A micro-batch's step passes every stage and its new tokens return
    to the first; each stage serves all m micro-batches per step; the step period is the
    longer of the two. Averaged over the gen_len - 1 steps (one step at prompt_len + 1 when
    gen_len is 1)."""
    b = plan.micro_batch
    compute_hw = hw.scaled(hbm_bw=1e9)
    contexts = plan.prompt_len + np.arange(1, max(plan.gen_len, 2), dtype=float)
    layer = _decode_layer_parts(model, plan, hw, compute_hw, contexts)
    layer["tp_comm"] = float(tp_comm_s(model, b, False, plan.dtype_bytes, hw, at.tp.size,
                                       at.tp.ranks_per_node))
    layer["moe_dispatch"] = moe_layer_share(model) * dispatch_s(model, hw, at.dp, b, plan.dtype_bytes)
    totals, stage_s = {k: 0.0 for k in layer}, []
    for n, f, la in at.stages:
        edge_ops = _edge_ops(model, plan, b, f, la)
        edges = _classified_s(edge_ops, hw, compute_hw, plan.dtype)
        # the host's work beyond the layers, on the last stage (with its head's weights' share)
        edges["host_overhead"] = (hw.overhead.decode_edge_s + hw.overhead.decode_layer_per_byte_s
                                  * _weights_read(edge_ops, plan)) if la else 0.0
        edges["tp_comm"] = _edge_comm_s(model, plan, hw, at.tp, b, f, la)
        parts = {k: n * v + edges.get(k, 0.0) for k, v in layer.items()}
        stage_s.append(sum(parts.values()))
        totals = {k: totals[k] + parts[k] for k in totals}
    handoffs = (plan.pp - 1) * at.handoff_s(model, plan, hw, b) + at.token_return_s(plan, hw, b)
    one_pass = np.sum(stage_s, axis=0) + handoffs
    period = np.maximum(one_pass, plan.num_microbatches * np.max(stage_s, axis=0))
    parts = {k: float(np.mean(totals[k])) if k in totals else 0.0 for k in DECODE_KEYS}
    parts["pp_handoff"] = handoffs
    parts["pp_bubble"] = float(np.mean(period - one_pass))
    return float(np.mean(period)), parts


def simulate_inference(model: ModelSpec, plan: InferencePlan, cluster: Cluster,
                       hw: HardwareProfile) -> InferenceResult:
    plan.validate(model, cluster, hw)
    hardware, device_hw = hw.name, hw
    hw = per_rank_profile(hw, cluster.ranks_per_node)
    served = _served(model, plan.tp)
    at = _layout(plan, served, cluster)
    # Memory per stage: weights, the KV cache of every sequence at its peak (full context, or
    # the window in sliding-window layers: kv_bytes_per_sequence), one prefill micro-batch's
    # transient activations.
    limit = usable_bytes(float(hw.memory_bytes))
    ep, etp = expert_degrees(model, plan.tp, plan.replicas, plan.expert_parallel)
    narrowed = quantized_weights(served, plan.tp, ep, etp) * (plan.dtype_bytes - plan.weight_bytes)
    weights = np.array([stage_params(served, plan.tp, plan.pp, n, f, la, ep, etp) * plan.dtype_bytes
                        - n * narrowed for n, f, la in at.stages], dtype=float)
    kv_seq = np.array([kv_bytes_per_sequence(model, plan, layers) for layers in at.ranges], dtype=float)

    prefill = _prefill_s(served, plan, hw, at, lambda k: per_rank_profile(
        device_hw, math.ceil(cluster.ranks_per_node * k / plan.pp)))
    ttft = sum(prefill.values())
    # a decode step reads its stage's weights and its sequences' caches again every step,
    # from the caches where they hold them (HardwareProfile.cached)
    held = weights + plan.batch * kv_seq
    working_set = float(np.max(held))
    tpot, decode = _decode_s(served, plan, hw.cached(working_set), at)
    latency = ttft + (plan.gen_len - 1) * tpot
    act_seq = np.array([_activation_bytes_per_seq(served, plan, la) for _, _, la in at.stages])
    memory = held + plan.micro_batch * act_seq
    peak = int(np.argmax(memory))
    max_batch = min(_max_batch(limit - w, k, a, plan.pp) for w, k, a in zip(weights, kv_seq, act_seq))
    return InferenceResult(
        plan=plan, model=model, cluster=cluster, hardware=hardware, ttft_s=ttft, tpot_s=tpot,
        latency_s=latency, throughput_tokens_per_s=plan.replicas * plan.batch * plan.gen_len / latency,
        decode_tokens_per_s=plan.replicas * plan.batch / tpot,
        kv_cache_bytes=float(plan.batch * kv_seq[peak]), weights_bytes=float(weights[peak]),
        peak_memory_bytes=float(memory[peak]), memory_limit_bytes=limit, max_batch=max_batch,
        fits=bool(memory[peak] <= limit), error_band=hw.relative_error_band(),
        breakdown={"prefill_s": prefill, "decode_step_s": decode}, decode_working_set_bytes=working_set,
        decode_cached=hw.cached_reads.prices(plan.dtype, None if plan.quantization == "none" else plan.weight_bytes))
