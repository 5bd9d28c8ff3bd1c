"""The operators of one transformer layer (and the embedding / LM head) on one device for
one micro-batch, with their GEMM shapes, FLOPs and bytes moved.

Shapes are per device: TP shards heads and the MLP width (Megatron-LM, Shoeybi et al. 2019
sec 3), sequence parallelism shards the norm/dropout/residual regions over TP (Korthikanti
et al. 2022 sec 4.2.2), context parallelism shards the sequence (ring attention, Liu et al.
2023). A GEMM [m,k] x [k,n] repeated `batch` times costs 2*batch*m*n*k FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshplan.simulator.model_spec import ModelSpec

GEMM, MEMORY = "gemm", "memory"
# Memory-bound operators -> the class of measured operators whose efficiency they run at
# (hw_profiles.gemm_model.OP_CLASSES); copies and gathers stream like an add.
MEMORY_CLASS = {"input_norm": "norm", "post_attention_norm": "norm", "final_norm": "norm",
                "rope": "rope", "softmax": "softmax", "cross_entropy": "softmax",
                "residual_add": "add", "embedding": "add", "kv_write": "add",
                "mlp_act": "activation"}


@dataclass(frozen=True)
class Op:
    """One forward operator. For GEMMs m,n,k,batch give the shape; `weight` marks GEMMs
    with a weight (they get a weight-gradient GEMM in backward). Memory-bound ops carry
    `bytes_moved` (reads + writes)."""

    name: str
    kind: str
    flops: float
    m: int = 0
    n: int = 0
    k: int = 0
    batch: int = 1
    bytes_moved: float = 0.0
    weight: bool = False
    attention_core: bool = False

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


def layer_ops(model: ModelSpec, shard: Shard) -> tuple[Op, ...]:
    """Forward operators of one decoder layer, in execution order."""
    h, hd, t, d = model.hidden_size, model.head_dim, shard.tp, shard.dtype_bytes
    heads, kv_heads = model.num_heads // t, model.num_kv_heads // t
    tok, ntok, s, b = shard.tokens, shard.norm_tokens, shard.local_seq, shard.micro_batch
    ffn = model.ffn_hidden_size // t
    ops = [_mem("input_norm", ntok * h, 2, d),
           _gemm("qkv_proj", tok, (heads + 2 * kv_heads) * hd, h)]
    if model.position_embedding == "rope":
        ops.append(_mem("rope", tok * (heads + kv_heads) * hd, 2, d))
    # Queries of the local chunk attend to all seq_len keys (ring attention visits every chunk).
    scores = b * heads * s * shard.seq_len
    ops.append(_gemm("attn_scores", s, shard.seq_len, hd, batch=b * heads, weight=False, core=True))
    if not shard.flash:
        ops.append(_mem("softmax", scores, 2 + (1 if model.dropout else 0), d, core=True))
    ops += [_gemm("attn_values", s, hd, shard.seq_len, batch=b * heads, weight=False, core=True),
            _gemm("out_proj", tok, h, heads * hd),
            _mem("residual_add", ntok * h, 3, d),
            _mem("post_attention_norm", ntok * h, 2, d)]
    gated = 2 if model.gated_mlp else 1
    ops += [_gemm("mlp_up", tok, gated * ffn, h),
            _mem("mlp_act", tok * ffn, gated + 1, d),
            _gemm("mlp_down", tok, h, ffn),
            _mem("residual_add", ntok * h, 3, d)]
    return tuple(ops)


def embedding_ops(model: ModelSpec, shard: Shard) -> tuple[Op, ...]:
    """Token (+ learned position) embedding lookup: a gather, memory bound."""
    passes = 3 if model.position_embedding == "learned" else 2
    return (_mem("embedding", shard.tokens * model.hidden_size, passes, shard.dtype_bytes),)


def head_ops(model: ModelSpec, shard: Shard) -> tuple[Op, ...]:
    """Final norm, LM head GEMM (vocab sharded over TP) and the cross-entropy over logits
    (fp32 softmax: read logits, write probabilities, read again for the loss)."""
    tok, v = shard.tokens, model.vocab_size // shard.tp
    return (_mem("final_norm", shard.norm_tokens * model.hidden_size, 2, shard.dtype_bytes),
            _gemm("lm_head", tok, v, model.hidden_size),
            _mem("cross_entropy", tok * v, 3, 4))


def total_flops(ops: tuple[Op, ...]) -> float:
    return sum(op.flops for op in ops if op.kind == GEMM)


def model_flops_per_step(model: ModelSpec, global_batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward GEMM FLOPs, no
    recompute), the numerator of MFU (Chowdhery et al. 2022 appendix B)."""
    shard = Shard(global_batch, seq_len)
    fwd = model.num_layers * total_flops(layer_ops(model, shard)) + total_flops(head_ops(model, shard))
    return 3.0 * fwd
