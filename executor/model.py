"""The executor's decoder: a GPT- or Llama-style transformer built from a ModelSpec, kept as
small and plain as nanoGPT's model.py.

Module names follow torchtitan's Llama (tok_embeddings, layers.<i>.attention.wq, ...,
feed_forward.w1/w2/w3, norm, output) so the parallel plans in parallelize.py read the same.
`layers` is a ModuleDict keyed by the global layer index, so a pipeline stage that keeps only
some layers (and drops the embedding or the head: those attributes become None) keeps the
parameter names of the full model.

A layer's MLP is dense, or with experts (ModelSpec.num_experts, outside dense_layers) the
routed and shared experts of moe.py under the same `feed_forward` name.

Generation passes a KV cache (executor/kv_cache.py) through `forward(x, cache)`; without one
(training) every call is the plain causal forward. Under context parallelism (`cp`, set on
the model, its attention modules and their cores by set_context_parallel; context_parallel.py)
each rank holds a part of every sequence, its positions those of the tokens it holds, and
attention reaches the rest of the sequence by the plan's exchange.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.nn.attention import SDPBackend, sdpa_kernel

from meshplan.executor.context_parallel import (ContextParallel, additive_mask, cpu_flash, cpu_flash_backward,
                                                 heads_from_sequence, sequence_from_heads, sink_gradient, with_sinks)
from meshplan.executor.kv_cache import KVCache, LayerCache
from meshplan.executor.measure import local_part
from meshplan.executor.moe import MoE, activation
from meshplan.executor.rebuild import Rebuilt
from meshplan.simulator.model_spec import ModelSpec

INIT_STD = 0.02  # GPT-2 / nanoGPT initialisation


def rope_frequencies(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """exp(i * angle) of the rotary angles at `positions` [seq_len], complex [seq_len, 1,
    head_dim/2] (Su et al. 2021, eq. 34; Meta's Llama precompute_freqs_cis)."""
    device = positions.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)[:, None, :]


def _rotate(x: torch.Tensor, frequencies: torch.Tensor, dims: int) -> torch.Tensor:
    """apply_rope on the first `dims` of each head's dimensions, the rest as they are."""
    if dims == x.shape[-1]:
        return apply_rope(x, frequencies)
    return torch.cat((apply_rope(x[..., :dims], frequencies), x[..., dims:]), dim=-1)


def apply_rope(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [batch, seq, heads, head_dim] as one complex product in
    fp32, as Meta's Llama and torchtitan's apply_rotary_emb do: the kernels the cost model
    prices for eager RoPE (simulator/ops.eager_bytes_per_element)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * frequencies).flatten(-2).type_as(x)


# scaled_dot_product_attention's backends for the fused kernels plan.attention names: flash is
# FlashAttention-2 (on CPU torch's flash kernel), the memory-efficient kernel where a mask rules
# it out on CUDA (fused too: no s x s tensor kept); cudnn is cuDNN's fused attention
SDPA_BACKENDS = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                 "cudnn": [SDPBackend.CUDNN_ATTENTION]}


class CausalCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v with a causal mask; its own module so that selective
    recompute can checkpoint exactly this part. k and v may start with `offset` cached
    positions before the queries' own: query i then sees keys up to offset + i, and with a
    sliding `window` only the last `window` of them (Mistral's sliding-window attention,
    Jiang et al. 2023 sec 2). `kernel` is plan.attention: a fused kernel (SDPA_BACKENDS) or
    naive (unfused_attention). Under the ring's or the gather's context parallelism (`cp`)
    the queries attend to the whole sequence through it."""

    def __init__(self, window: int | None = None, kernel: str = "flash", softcap: float | None = None):
        super().__init__()
        # soft-capping runs in the unfused core only: its default there (serving's, and
        # training's where the plan says naive, rules.EXECUTOR_TRAINING)
        self.window, self.softcap = window, softcap
        self.kernel = "naive" if softcap is not None else kernel
        self.cp: ContextParallel | None = None

    def forward(self, q, k, v, sinks=None):  # [batch, seq, heads, head_dim]; sinks [heads]
        if self.cp is not None:
            return self.cp.attend(q, k, v, self.masked, self.kernel, self.window, sinks, self.softcap)
        offset = k.shape[1] - q.shape[1]
        windowed = self.window is not None and k.shape[1] > self.window
        if windowed and self.kernel != "naive":
            if offset == 0 and q.device.type == "cpu":
                width = v.shape[-1]  # a narrower V (latent attention's) padded to the kernel's width
                v = F.pad(v, (0, q.shape[-1] - width)) if width != q.shape[-1] else v
                return _BandedAttention.apply(q, k, v, sinks, self.window)[..., :width]
            if q.shape[1] == 1:  # a decode step sees the last `window` keys alone
                k, v, offset, windowed = k[:, -self.window:], v[:, -self.window:], self.window - 1, False
        causal = not windowed and offset == 0
        masked = windowed or (offset and q.shape[1] > 1) or (causal and self.kernel == "naive")
        shape = (q.shape[1], k.shape[1], self.window if windowed else None, q.device)
        if self.kernel == "naive":
            return self._unfused(q, k, v, hidden_keys(*shape) if masked else None, sinks)
        if self.softcap is not None:  # refused before a run (rules.EXECUTOR_TRAINING)
            raise ValueError("soft-capped attention runs in the unfused core only: attention naive")
        if sinks is not None:
            return _SinkAttention.apply(q, k, v, sinks, key_mask(*shape) if masked else None, causal)
        return self._fused(q, k, v, key_mask(*shape) if masked else None, causal)

    def masked(self, q, k, v, visible: torch.Tensor, sinks=None):
        """The core under a [queries, keys] mask, True where a query sees a key."""
        if self.kernel == "naive":
            return self._unfused(q, k, v, ~visible, sinks)
        if sinks is not None:
            return _SinkAttention.apply(q, k, v, sinks, visible, False)
        return self._fused(q, k, v, visible, False)

    def _unfused(self, q, k, v, hidden, sinks=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return unfused_attention(q, k, v, hidden, sinks, self.softcap).transpose(1, 2)

    def _fused(self, q, k, v, mask, causal: bool):
        # FlashAttention takes one head width for Q, K and V: a narrower V (latent
        # attention's) is padded with zeros to it, and the output cut back
        width = v.shape[-1]
        if width != q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - width))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPA_BACKENDS[self.kernel]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)[..., :width]


@functools.lru_cache(maxsize=8)
def _bands(seq: int, window: int, dtype: torch.dtype, device: torch.device) -> list[tuple[slice, slice, torch.Tensor]]:
    """(query rows, key rows, additive mask) of each block of _BandedAttention: half a window
    of queries, over the keys from the window's start for its first row to its last row, the
    keys outside each row's window masked; built once per shape."""
    rows = max(window // 2, 1)
    bands = []
    for start in range(0, seq, rows):
        stop, first = min(start + rows, seq), max(start - window + 1, 0)
        hidden = ~key_mask(stop - start, stop - first, window, device)
        bands.append((slice(start, stop), slice(first, stop), additive_mask(hidden, dtype)))
    return bands


class _BandedAttention(torch.autograd.Function):
    """A sliding window on CPU by blocks of half a window of queries, each through CPU flash
    attention's kernel over only the keys its rows see (_bands): at most 1.5 windows of keys
    per query, where a kernel that skips the tiles a window hides computes about one
    (FlashAttention-2's window_size; ops.attended_keys prices one), not the whole sequence
    masked. The blocks write one output and one log-sum-exp, kept for backward as the whole
    kernel's are; each head's sink logit joins its rows' log-sum-exp as in _SinkAttention.
    KV heads repeated to the query heads block by block, their gradients summed back."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, window: int):
        batch, seq, heads, _ = q.shape
        group = heads // k.shape[2]
        with torch.autocast(q.device.type, enabled=False):
            # laid out [batch, seq, heads, dim], as the kernel's own, so that the heads' join is a view
            out = q.new_empty(batch, seq, heads, v.shape[-1]).transpose(1, 2)
            lse = q.new_empty(batch, heads, seq, dtype=torch.float32)
            for rows, keys, mask in _bands(seq, window, q.dtype, q.device):
                k_, v_ = (t[:, keys].transpose(1, 2).repeat_interleave(group, dim=1) for t in (k, v))
                out[:, :, rows], lse[:, :, rows] = cpu_flash(q[:, rows].transpose(1, 2), k_, v_, 0.0, False,
                                                             attn_mask=mask)
            if sinks is not None:
                total = with_sinks(lse, sinks)
                out.copy_(out.float() * torch.exp(lse - total)[..., None])
                lse = total
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.window = window
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group = q.shape[2] // k.shape[2]
        with torch.autocast(q.device.type, enabled=False):
            grad = grad.transpose(1, 2).to(q.dtype)
            dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
            for rows, keys, mask in _bands(q.shape[1], ctx.window, q.dtype, q.device):
                k_, v_ = (t[:, keys].transpose(1, 2).repeat_interleave(group, dim=1) for t in (k, v))
                dq_, dk_, dv_ = cpu_flash_backward(grad[:, :, rows].contiguous(), q[:, rows].transpose(1, 2), k_, v_,
                                                   out[:, :, rows], lse[:, :, rows], 0.0, False, attn_mask=mask)
                dq[:, rows] = dq_.transpose(1, 2)
                dk[:, keys] += dk_.unflatten(1, (-1, group)).sum(2).transpose(1, 2)
                dv[:, keys] += dv_.unflatten(1, (-1, group)).sum(2).transpose(1, 2)
            dsinks = None if sinks is None else sink_gradient(sinks, lse, grad, out)
        return dq, dk, dv, dsinks, None


class _SinkAttention(torch.autograd.Function):
    """Attention with a sink logit per head (gpt-oss) by CPU flash attention's kernel, which
    has none: its output rescaled by the share its keys keep beside the sink, exp(lse) /
    (exp(lse) + exp(sink)). Backward is the kernel's, given that output and the log-sum-exp
    over keys and sink (the sink a key with no value, as a ring's block is); the sink's
    gradient -p_sink <dO, O> summed over the rows of its head. KV heads repeated to the
    query heads for the kernel and their gradients summed back, as SDPA's enable_gqa does."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, visible, causal: bool):
        group = q.shape[2] // k.shape[2]
        mask = None if visible is None else additive_mask(~visible, q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            k_, v_ = (t.repeat_interleave(group, dim=1) for t in (k_, v_))
            out, lse = cpu_flash(q_, k_, v_, 0.0, causal, attn_mask=mask)
            total = with_sinks(lse, sinks)
            out = (out.float() * torch.exp(lse - total)[..., None]).to(q.dtype)
        ctx.save_for_backward(q_, k_, v_, out, total, sinks, mask)
        ctx.causal, ctx.group = causal, group
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad):
        q_, k_, v_, out, total, sinks, mask = ctx.saved_tensors
        with torch.autocast(q_.device.type, enabled=False):
            grad = grad.transpose(1, 2).to(q_.dtype).contiguous()
            dq, dk, dv = cpu_flash_backward(grad, q_, k_, v_, out, total, 0.0, ctx.causal, attn_mask=mask)
            dsinks = sink_gradient(sinks, total, grad, out)
            dk, dv = (t.unflatten(1, (-1, ctx.group)).sum(2) for t in (dk, dv))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dsinks, None, None


@functools.lru_cache(maxsize=8)
def key_mask(queries: int, keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys], True where a query sees a key: the last `queries` of `keys` positions,
    each seeing the keys up to its own (the last `window` of them with a window); built once
    per shape, not in every layer's forward."""
    offset = keys - queries
    mask = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(offset)
    return mask.triu(offset - window + 1) if window is not None else mask


@functools.lru_cache(maxsize=8)
def hidden_keys(queries: int, keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """key_mask inverted, True where a query must not see a key (what the unfused core fills),
    cached alike so that no layer inverts it again."""
    return ~key_mask(queries, keys, window, device)


def unfused_attention(q, k, v, hidden: torch.Tensor | None, sinks: torch.Tensor | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Attention as separate kernels (q, k, v [batch, heads, seq, head_dim]; `hidden` as
    hidden_keys'): the queries' matmul with the keys, scaled in its epilogue; the hidden keys
    filled in place; softmax; the matmul with the values. The scores and probabilities stay in the
    activations' dtype, autocast left out (it would run softmax in fp32), so that the
    probabilities are the one queries x keys tensor backward keeps (the simulator's naive
    attention, memory.py; its eager kernels, ops.eager_bytes_per_element). Grouped KV heads
    serve their query heads by broadcasting, not by copies. `sinks` [heads]: a logit per head
    in each softmax, no value (gpt-oss); `softcap`: the scores soft-capped before the mask
    (Gemma 2 report sec 2.2)."""
    batch, heads, seq, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    rows = heads // kv_heads * seq
    with torch.autocast(q.device.type, enabled=False):
        grouped = q.reshape(batch * kv_heads, rows, dim)
        scores = torch.baddbmm(q.new_empty(batch * kv_heads, rows, keys), grouped,
                               k.reshape(batch * kv_heads, keys, dim).transpose(1, 2), beta=0, alpha=dim ** -0.5)
        scores = scores.view(batch, heads, seq, keys)
        if softcap is not None:  # Gemma 2's soft-capping: softcap * tanh(scores / softcap)
            scores = torch.tanh(scores / softcap) * softcap
        if hidden is not None:
            scores.masked_fill_(hidden, float("-inf"))
        if sinks is None:
            probs = torch.softmax(scores, dim=-1)
        else:  # each head's sink logit joins its softmax as a key with no value (gpt-oss)
            column = sinks.to(scores.dtype).view(1, heads, 1, 1).expand(batch, heads, seq, 1)
            probs = torch.softmax(torch.cat((scores, column), dim=-1), dim=-1)[..., :keys]
        probs = probs.reshape(batch * kv_heads, rows, keys)
        return (probs @ v.reshape(batch * kv_heads, keys, -1)).view(batch, heads, seq, -1)


def token_positions(seq: int, cache: KVCache | LayerCache | None, cp: ContextParallel | None,
                    device) -> torch.Tensor:
    """The sequence positions of `seq` tokens: past the cached ones, those this rank holds
    under context parallelism, or from 0."""
    if cache is not None:
        return torch.arange(cache.length, cache.length + seq, device=device)
    if cp is not None:
        return cp.positions(seq, device)
    return torch.arange(seq, device=device)


def set_context_parallel(model: Transformer, cp: ContextParallel | None) -> None:
    """Context parallelism on `model` (or a stage of it): its positions, and each layer's
    exchange, Ulysses' around the attention core, the ring or the gather inside it."""
    model.cp = cp
    for layer in model.layers.values():
        layer.attention.cp = cp
        layer.attention.core.cp = cp if cp is not None and cp.balanced else None


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, of the model's head width, its biases
    (every linear's, or Q/K/V's and the output's apart: Qwen2), QK-norm (Dehghani et al. 2023
    sec 3.1; Qwen3, Gemma 3) and RoPE over all or part of each head. The head counts are
    read from the weight shapes at run time, so the same code runs on a tensor-parallel
    shard of the heads."""

    def __init__(self, spec: ModelSpec, window: int | None = None):
        super().__init__()
        h, hd = spec.hidden_size, spec.head_dim
        qkv_bias, out_bias = spec.bias or spec.qkv_bias, spec.bias or spec.out_bias
        self.head_dim = hd
        # RoPE turns the first rotary_pct of each head's dimensions (GPT-NeoX's rotary_ndims)
        self.rotary_dims = (int(hd * spec.rotary_pct) // 2 * 2) if spec.position_embedding == "rope" else 0
        self.wq = nn.Linear(h, spec.num_heads * hd, bias=qkv_bias)
        self.wk = nn.Linear(h, spec.kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(h, spec.kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(spec.num_heads * hd, h, bias=out_bias)
        # QK-norm: one norm over each query head and one over each key head, before RoPE
        self.q_norm = make_norm(spec, hd) if spec.qk_norm else None
        self.k_norm = make_norm(spec, hd) if spec.qk_norm else None
        # gpt-oss's sink logit per head (split by head under TP: apply_tp)
        self.sinks = nn.Parameter(torch.zeros(spec.num_heads)) if spec.attn_sinks else None
        self.core = CausalCore(window, softcap=spec.attn_softcap)
        self.cp: ContextParallel | None = None  # context parallelism (training)

    def forward(self, x, cache: LayerCache | None = None):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_dims:
            frequencies = rope_frequencies(token_positions(seq, cache, self.cp, x.device), self.rotary_dims)
            q, k = (_rotate(t, frequencies, self.rotary_dims) for t in (q, k))
        if cache is not None:
            k, v = cache.append(k, v)
        sinks = None if self.sinks is None else local_part(self.sinks)  # this rank's heads'
        if self.cp is None or self.cp.balanced:  # the ring and the gather run in the core
            return self.wo(self.core(q, k, v, sinks).flatten(2))
        q, k, v = heads_from_sequence((q, k, v), self.cp.group)
        if sinks is not None:  # Ulysses' head shard of this CP rank
            sinks = sinks.chunk(self.cp.size)[self.cp.rank]
        return self.wo(sequence_from_heads(self.core(q, k, v, sinks), self.cp.group).flatten(2))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 report sec 2.1; DeepSeek-V3's): the queries
    projected directly or through a normed low rank (wq_a, q_norm, wq_b); the keys' and
    values' shared latent (wkv_a, with one RoPE key part for every head, k_pe) normed and
    projected up to each head's unrotated key part and value (wkv_b). RoPE turns the
    queries' and k_pe's rotary parts. Module names are torchtitan's DeepSeek-V3's. Under
    tensor parallelism the up-projections and wo split by head; the down-projections and
    latent norms stay whole on every rank (apply_tp). Serving caches the normed latent and
    the RoPE key (kv_lora_rank + qk_rope_head_dim a token, as vLLM's MLA and
    serve.kv_elements_per_token count them), decodes absorbed, prefills by decompressing."""

    def __init__(self, spec: ModelSpec, window: int | None = None):
        super().__init__()
        h, heads = spec.hidden_size, spec.num_heads
        self.nope, self.rope, self.value = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        self.latent, self.q_low_rank = spec.kv_lora_rank, spec.q_lora_rank > 0
        width = self.nope + self.rope
        if self.q_low_rank:
            self.wq_a = nn.Linear(h, spec.q_lora_rank, bias=False)
            self.q_norm = make_norm(spec, spec.q_lora_rank)
            self.wq_b = nn.Linear(spec.q_lora_rank, heads * width, bias=False)
        else:
            self.wq = nn.Linear(h, heads * width, bias=False)
        self.wkv_a = nn.Linear(h, self.latent + self.rope, bias=False)
        self.kv_norm = make_norm(spec, self.latent)
        self.wkv_b = nn.Linear(self.latent, heads * (self.nope + self.value), bias=False)
        self.wo = nn.Linear(heads * self.value, h, bias=False)
        self.core = CausalCore(window)
        self.cp: ContextParallel | None = None

    def forward(self, x, cache: LayerCache | None = None):
        batch, seq, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_low_rank else self.wq(x)
        q = q.view(batch, seq, -1, self.nope + self.rope)
        latent, k_pe = self.wkv_a(x).split([self.latent, self.rope], dim=-1)
        latent = self.kv_norm(latent)
        if isinstance(k_pe, DTensor):  # replicated over TP ranks whose heads each add a part of its gradient
            k_pe = k_pe.to_local(grad_placements=[Partial()])
        frequencies = rope_frequencies(token_positions(seq, cache, self.cp, x.device), self.rope)
        q = torch.cat((q[..., :self.nope], apply_rope(q[..., self.nope:], frequencies)), dim=-1)
        k_pe = apply_rope(k_pe.view(batch, seq, 1, self.rope), frequencies)
        if cache is not None:  # the latent and the RoPE key are what the cache keeps (vLLM's MLA)
            latent = local_part(latent)
            kept, _ = cache.append(torch.cat((latent[:, :, None], k_pe), dim=-1), k_pe[..., :0])
            latent, k_pe = kept.split([self.latent, self.rope], dim=-1)
            if seq == 1:
                return self.wo(self._absorbed(q, latent[:, :, 0], k_pe[:, :, 0]).flatten(2))
        kv = self.wkv_b(latent).view(batch, latent.shape[1], -1, self.nope + self.value)
        k_nope, v = kv.split([self.nope, self.value], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, -1, k_nope.shape[2], -1)), dim=-1)
        return self.wo(self.core(q, k, v).flatten(2))

    def _absorbed(self, q, latent, k_pe):
        """One decode step with the key and value up-projections absorbed into the query and
        the output (DeepSeek-V2 report sec 2.1.2; vLLM's MLA decode, which the serving
        simulator prices): each head scores the cached latent and RoPE key and reads its
        values from the latent. q [batch, 1, heads, nope + rope]; latent [batch, keys,
        kv_lora_rank]; k_pe [batch, keys, rope] -> [batch, 1, heads, v_head_dim]."""
        up = local_part(self.wkv_b.weight).view(-1, self.nope + self.value, self.latent)  # this rank's heads
        q_latent = torch.einsum("bshn,hnc->bshc", q[..., :self.nope], up[:, :self.nope])
        scores = (torch.einsum("bshc,bkc->bhsk", q_latent, latent)
                  + torch.einsum("bshr,bkr->bhsk", q[..., self.nope:], k_pe)) * (self.nope + self.rope) ** -0.5
        read = torch.einsum("bhsk,bkc->bshc", scores.softmax(-1), latent)
        return torch.einsum("bshc,hvc->bshv", read, up[:, self.nope:])


class FeedForward(nn.Module):
    """Gated (w2(act(w1 x) * w3 x), Shazeer 2020) or plain (w2(act(w1 x))) MLP of width
    `ffn` (default: the model's dense MLP width)."""

    def __init__(self, spec: ModelSpec, ffn: int | None = None):
        super().__init__()
        h, f = spec.hidden_size, ffn or spec.ffn_hidden_size
        self.w1 = nn.Linear(h, f, bias=spec.bias)
        self.w2 = nn.Linear(f, h, bias=spec.bias)
        self.w3 = nn.Linear(h, f, bias=spec.bias) if spec.gated_mlp else None
        self.act = activation(spec)

    def forward(self, x):
        return self.w2(self.act(self.w1(x), self.w3(x) if self.w3 is not None else None))


def make_norm(spec: ModelSpec, width: int | None = None) -> nn.Module:
    """The model's norm over `width` features (default: the hidden size)."""
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(width or spec.hidden_size, eps=1e-5)
    return nn.LayerNorm(width or spec.hidden_size, eps=1e-5)  # weight and bias, as ModelSpec counts


def make_mlp(spec: ModelSpec, index: int) -> nn.Module:
    """Layer `index`'s MLP: the dense one, or routed experts (moe.py) with the shared experts."""
    if not spec.layer_kind(index).moe:
        return FeedForward(spec)
    return MoE(spec, FeedForward(spec, spec.shared_ffn_size) if spec.num_shared_experts else None)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h)) (or + mlp(norm(x))
    with a parallel residual, GPT-NeoX-20B paper sec 2.1); each block's output normed before
    its add with sandwich norms (Gemma 2 report sec 2.2); the attention over a sliding window
    in the model's local layers."""

    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.attention_norm = make_norm(spec)
        window = spec.sliding_window if spec.layer_kind(index).local else None
        self.attention = LatentAttention(spec, window) if spec.kv_lora_rank else Attention(spec, window)
        self.ffn_norm = make_norm(spec)
        self.feed_forward = make_mlp(spec, index)
        # Gemma's sandwich norms on each block's output, before its residual add
        self.attention_out_norm = make_norm(spec) if spec.sandwich_norm else None
        self.mlp_out_norm = make_norm(spec) if spec.sandwich_norm else None
        self.parallel_residual = spec.parallel_residual
        # recompute norm_act: the two norms' outputs freed once their consumers have run
        # and rebuilt in backward (rebuild.Rebuilt; parallelize.apply_recompute sets it)
        self.rebuild_norms = False
        # under sequence parallelism, whether the attention and the MLP gather the norms'
        # sequence shards before their column-parallel linears (parallelize.apply_tp; routed
        # experts take the shards)
        self.sp_gathers = (False, False)

    def forward(self, x, cache: LayerCache | None = None):
        attended = self._normed(self.attention_norm, x, lambda normed: self.attention(normed, cache=cache),
                                self.sp_gathers[0])
        if self.attention_out_norm is not None:
            attended = self.attention_out_norm(attended)
        h = x + attended
        # GPT-NeoX's parallel residual: the MLP reads the layer input, not the attention's sum
        out = self._normed(self.ffn_norm, x if self.parallel_residual else h, self.feed_forward,
                           self.sp_gathers[1])
        if self.mlp_out_norm is not None:
            out = self.mlp_out_norm(out)
        return h + out

    def _normed(self, norm: nn.Module, x, consumer, gathers: bool = False):
        """consumer(norm(x)), the normed input rebuilt in backward under rebuild_norms. Where
        the consumer `gathers` the sequence shards (SP), the gather is rebuilt with the
        norm, so that its linears keep no gathered copy: the norm's input alone stays, the
        norm and the all-gather run again in backward (Megatron-LM's column-parallel
        linears under SP keep the shard and gather it again in backward)."""
        if not self.rebuild_norms:
            return consumer(norm(x))
        fn = (lambda t: norm(t).redistribute(placements=[Replicate()])) if gathers else norm
        normed = Rebuilt(fn, x, params=tuple(norm.parameters()))
        out = consumer(normed.output)
        normed.discard(out)
        return out


class Transformer(nn.Module):
    """Tokens [batch, seq] -> logits [batch, seq, vocab]. A pipeline stage without the
    embedding takes hidden states instead, one without the head returns hidden states.
    With a KV cache, x continues the cached positions and the head runs on the last
    position only (logits [batch, 1, vocab]): generation needs no other."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.pos_embeddings = (nn.Embedding(spec.max_seq_len, spec.hidden_size)
                               if spec.position_embedding == "learned" else None)
        self.layers = nn.ModuleDict({str(i): Block(spec, i) for i in range(spec.num_layers)})
        self.norm = make_norm(spec)
        self.output = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.cp: ContextParallel | None = None  # context parallelism (training)

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache of up to max_len positions for this model's (or stage's) layers."""
        return KVCache({key: layer.attention.core.window for key, layer in self.layers.items()}, max_len)

    def forward(self, x, cache: KVCache | None = None):
        if self.tok_embeddings is not None:
            tokens = x
            x = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                positions = token_positions(tokens.shape[1], cache, self.cp, tokens.device)
                x = x + self.pos_embeddings(positions.expand_as(tokens))
        for key, layer in self.layers.items():
            x = layer(x) if cache is None else layer(x, cache=cache.layers[key])
        if cache is not None and self.output is not None:
            x = x[:, -1:]
        if self.norm is not None:
            x = self.norm(x)
        if self.output is None:
            return x
        logits = self.output(x)
        cap = self.spec.final_softcap  # Gemma 2's: the logits soft-capped as the scores are
        return logits if cap is None else torch.tanh(logits / cap) * cap


def init_weights(model: Transformer, seed: int) -> None:
    """Deterministic initialisation from `seed`, the same whatever the plan: N(0, 0.02) for
    matrices and embeddings, residual output projections scaled by 1/sqrt(2L) (GPT-2,
    Radford et al. 2019 sec 2.3), norms to one, biases to zero. Parameters are visited in
    name order, so the weights do not depend on construction order. Stacked expert weights
    [E, in, out] are drawn whole, so every expert-parallel split cuts the same experts."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = INIT_STD / math.sqrt(2 * model.spec.num_layers)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight", "experts.w2")) else INIT_STD
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_model(spec: ModelSpec, seed: int) -> Transformer:
    model = Transformer(spec)
    init_weights(model, seed)
    return model
