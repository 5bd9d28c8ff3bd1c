"""The operators of one transformer layer (and the embedding / LM head) on one device for
one micro-batch, with their GEMM shapes, FLOPs and bytes moved.

Shapes are per device: TP shards heads and the MLP width (Megatron-LM, Shoeybi et al. 2019
sec 3), sequence parallelism shards the norm/dropout/residual regions over TP (Korthikanti
et al. 2022 sec 4.2.2), context parallelism shards the sequence (ring attention, Liu et al.
2023). A GEMM [m,k] x [k,n] repeated `batch` times costs 2*batch*m*n*k FLOPs.

Layers of one model may differ (ModelSpec.layer_kinds): `layer_kind_ops` lists one kind's
operators; `layer_ops` lists the mean layer, each kind's operators counted by the kind's
share of the layers, so that num_layers x the mean layer is the whole stack.

Mixture-of-experts layers run at one expert-parallel rank: every device holds every
expert and runs the router and the experts its tokens are routed to, each expert sharded
over TP like the dense MLP (Megatron-Core with expert TP = TP).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from meshplan.simulator.model_spec import LayerKind, ModelSpec

GEMM, MEMORY = "gemm", "memory"
# Memory-bound operators -> the class of measured operators whose efficiency they run at
# (hw_profiles.gemm_model.OP_CLASSES); copies and gathers stream like an add.
MEMORY_CLASS = {"input_norm": "norm", "post_attention_norm": "norm", "final_norm": "norm",
                "attention_out_norm": "norm", "mlp_out_norm": "norm", "qk_norm": "norm",
                "latent_norm": "norm", "rope": "rope", "softmax": "softmax",
                "cross_entropy": "softmax", "router_softmax": "softmax", "residual_add": "add",
                "embedding": "add", "kv_write": "add", "moe_permute": "add", "moe_unpermute": "add",
                "mlp_act": "activation", "softcap": "activation", "logit_softcap": "activation",
                "router_sigmoid": "activation"}


@dataclass(frozen=True)
class Op:
    """One forward operator. For GEMMs m,n,k,batch give the shape; `weight` marks GEMMs
    with a weight (they get a weight-gradient GEMM in backward). Memory-bound ops carry
    `bytes_moved` (reads + writes). `count` is how many times the op runs per layer: a
    layer kind's share of the layers in the mean layer (layer_ops), else 1; flops and
    bytes are those of one run."""

    name: str
    kind: str
    flops: float
    m: float = 0
    n: int = 0
    k: int = 0
    batch: int = 1
    bytes_moved: float = 0.0
    weight: bool = False
    attention_core: bool = False
    count: float = 1.0

    @property
    def op_class(self) -> str | None:
        return MEMORY_CLASS.get(self.name)


def _gemm(name, m, n, k, batch=1, weight=True, core=False) -> Op:
    return Op(name, GEMM, 2.0 * batch * m * n * k, m, n, k, batch, weight=weight, attention_core=core)


def _mem(name, elements, passes, dtype_bytes, core=False) -> Op:
    """`passes` = tensors of `elements` read or written by the op (e.g. add: 2 reads, 1 write)."""
    return Op(name, MEMORY, float(elements), bytes_moved=float(elements) * passes * dtype_bytes,
              attention_core=core)


@dataclass(frozen=True)
class Shard:
    """The per-device share of one micro-batch: tokens, TP degree, sequence parallel, and
    the local / full sequence length seen by attention."""

    micro_batch: int
    seq_len: int
    tp: int = 1
    cp: int = 1
    sp: bool = False
    dtype_bytes: int = 2
    flash: bool = True

    @property
    def local_seq(self) -> int:
        return self.seq_len // self.cp

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.local_seq

    @property
    def norm_tokens(self) -> int:
        """Tokens of the regions that sequence parallelism shards over TP."""
        return self.tokens // self.tp if self.sp else self.tokens


def attended_keys(model: ModelSpec, shard: Shard, local: bool) -> int:
    """Keys each query's attention core computes over: the whole sequence (ring attention
    visits every chunk), or the last sliding_window keys in a local layer when the kernel
    skips the masked blocks (fused attention with a window, FlashAttention-2's
    window_size); unfused attention computes the full score matrix and masks it."""
    if local and shard.flash:
        return min(model.sliding_window, shard.seq_len)
    return shard.seq_len


def _attention_ops(model: ModelSpec, shard: Shard, local: bool) -> list[Op]:
    """Input projections, RoPE, the attention core and the output projection. Latent
    attention (DeepSeek-V2 sec 2.1) projects queries and keys/values down to a low rank
    (replicated over TP, as Megatron-Core and vLLM keep them) and up per head, then attends
    as multi-head attention with separate query/key and value head sizes."""
    h, hd, t, d = model.hidden_size, model.head_dim, shard.tp, shard.dtype_bytes
    heads, kv_heads = model.num_heads // t, model.num_kv_heads // t
    tok, s, b = shard.tokens, shard.local_seq, shard.micro_batch
    if model.kv_lora_rank:
        q, kv, rope = model.q_lora_rank, model.kv_lora_rank, model.qk_rope_head_dim
        nope_v = model.qk_nope_head_dim + model.v_head_dim
        query = ([_gemm("q_down", tok, q, h), _mem("latent_norm", tok * q, 2, d),
                  _gemm("q_up", tok, heads * hd, q)] if q else [_gemm("q_proj", tok, heads * hd, h)])
        ops = query + [_gemm("kv_down", tok, kv + rope, h), _mem("latent_norm", tok * kv, 2, d),
                       _gemm("kv_up", tok, heads * nope_v, kv),
                       _mem("rope", tok * (heads + 1) * rope, 2, d)]
    else:
        ops = [_gemm("qkv_proj", tok, (heads + 2 * kv_heads) * hd, h)]
        if model.qk_norm:
            ops.append(_mem("qk_norm", tok * (heads + kv_heads) * hd, 2, d))
        if model.position_embedding == "rope":
            ops.append(_mem("rope", tok * (heads + kv_heads) * hd * model.rotary_pct, 2, d))
    keys, vd = attended_keys(model, shard, local), model.value_head_dim
    scores = b * heads * s * keys
    ops.append(_gemm("attn_scores", s, keys, hd, batch=b * heads, weight=False, core=True))
    if not shard.flash:  # fused kernels cap and normalise the scores in registers
        if model.attn_softcap:
            ops.append(_mem("softcap", scores, 2, d, core=True))
        ops.append(_mem("softmax", scores, 2 + (1 if model.dropout else 0), d, core=True))
    return ops + [_gemm("attn_values", s, vd, keys, batch=b * heads, weight=False, core=True),
                  _gemm("out_proj", tok, h, heads * vd)]


def _mlp_ops(model: ModelSpec, shard: Shard, ffn: int, prefix: str = "mlp") -> list[Op]:
    """A (gated) MLP of width ffn on every token: up (and gate), activation, down."""
    h, tok, d = model.hidden_size, shard.tokens, shard.dtype_bytes
    f, gated = ffn // shard.tp, 2 if model.gated_mlp else 1
    return [_gemm(f"{prefix}_up", tok, gated * f, h), _mem("mlp_act", tok * f, gated + 1, d),
            _gemm(f"{prefix}_down", tok, h, f)]


def _moe_ops(model: ModelSpec, shard: Shard) -> list[Op]:
    """Router, token permutation, the routed experts as one grouped GEMM, the weighted
    combine, and the shared experts (Fedus et al. 2022 Switch Transformer sec 2; DeepSeekMoE,
    Dai et al. 2024 sec 3). The router reads the layer input where SP leaves it sharded.
    With balanced routing the tokens x experts_per_token routed rows spread evenly over
    min(experts, routed rows) experts."""
    h, d, ntok, tok = model.hidden_size, shard.dtype_bytes, shard.norm_tokens, shard.tokens
    e, f, gated = model.num_experts, model.moe_ffn_hidden_size // shard.tp, 2 if model.gated_mlp else 1
    routed = tok * model.experts_per_token
    active = min(e, routed)
    ops = [_gemm("router", ntok, e, h), _mem(f"router_{model.router}", ntok * e, 2, d),
           _mem("moe_permute", routed * h, 2, d),
           _gemm("expert_up", routed / active, gated * f, h, batch=active),
           _mem("mlp_act", routed * f, gated + 1, d),
           _gemm("expert_down", routed / active, h, f, batch=active),
           _mem("moe_unpermute", routed * h, 2, d)]
    if model.num_shared_experts:
        ops += _mlp_ops(model, shard, model.shared_ffn_size, "shared")
    if model.shared_expert_gate:
        ops.append(_gemm("shared_gate", ntok, 1, h))
    return ops


def layer_kind_ops(model: ModelSpec, shard: Shard, kind: LayerKind) -> tuple[Op, ...]:
    """Forward operators of one decoder layer of `kind`, in execution order. Gemma's
    sandwich norms normalise each block's output before its residual add; a parallel
    residual (GPT-NeoX) adds both blocks' outputs to the layer input, the same two adds."""
    h, d, ntok = model.hidden_size, shard.dtype_bytes, shard.norm_tokens
    ops = [_mem("input_norm", ntok * h, 2, d)] + _attention_ops(model, shard, kind.local)
    if model.sandwich_norm:
        ops.append(_mem("attention_out_norm", ntok * h, 2, d))
    ops += [_mem("residual_add", ntok * h, 3, d), _mem("post_attention_norm", ntok * h, 2, d)]
    ops += _moe_ops(model, shard) if kind.moe else _mlp_ops(model, shard, model.ffn_hidden_size)
    if model.sandwich_norm:
        ops.append(_mem("mlp_out_norm", ntok * h, 2, d))
    return tuple(ops + [_mem("residual_add", ntok * h, 3, d)])


def layer_ops(model: ModelSpec, shard: Shard) -> tuple[Op, ...]:
    """Forward operators of the mean decoder layer: each layer kind's operators, run its
    share of the layers."""
    kinds = model.layer_kinds()
    if len(kinds) == 1:
        return layer_kind_ops(model, shard, kinds[0][0])
    return tuple(replace(op, count=n / model.num_layers)
                 for kind, n in kinds for op in layer_kind_ops(model, shard, kind))


def embedding_ops(model: ModelSpec, shard: Shard) -> tuple[Op, ...]:
    """Token (+ learned position) embedding lookup: a gather, memory bound."""
    passes = 3 if model.position_embedding == "learned" else 2
    return (_mem("embedding", shard.tokens * model.hidden_size, passes, shard.dtype_bytes),)


def head_ops(model: ModelSpec, shard: Shard) -> tuple[Op, ...]:
    """Final norm, LM head GEMM (vocab sharded over TP), Gemma 2's tanh capping of the
    logits, and the cross-entropy over logits (fp32 softmax: read logits, write
    probabilities, read again for the loss)."""
    tok, v = shard.tokens, model.vocab_size // shard.tp
    cap = (_mem("logit_softcap", tok * v, 2, 4),) if model.final_softcap else ()
    return (_mem("final_norm", shard.norm_tokens * model.hidden_size, 2, shard.dtype_bytes),
            _gemm("lm_head", tok, v, model.hidden_size), *cap, _mem("cross_entropy", tok * v, 3, 4))


def total_flops(ops: tuple[Op, ...]) -> float:
    return sum(op.flops * op.count for op in ops if op.kind == GEMM)


def model_flops_per_step(model: ModelSpec, global_batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward GEMM FLOPs, no
    recompute), the numerator of MFU (Chowdhery et al. 2022 appendix B)."""
    shard = Shard(global_batch, seq_len)
    fwd = model.num_layers * total_flops(layer_ops(model, shard)) + total_flops(head_ops(model, shard))
    return 3.0 * fwd
