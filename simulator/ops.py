"""The operators of one transformer layer (and the embedding / LM head) on one device for
one micro-batch, with their GEMM shapes, FLOPs and bytes moved.

Shapes are per device: TP shards heads and the MLP width (Megatron-LM, Shoeybi et al. 2019
sec 3), sequence parallelism shards the norm/dropout/residual regions over TP (Korthikanti
et al. 2022 sec 4.2.2), context parallelism shards the sequence (ring attention, Liu et al.
2023). A GEMM [m,k] x [k,n] repeated `batch` times costs 2*batch*m*n*k FLOPs.

Layers of one model may differ (ModelSpec.layer_kinds): `layer_kind_ops` lists one kind's
operators; `layer_ops` lists the mean layer, each kind's operators counted by the kind's
share of the layers, so that num_layers x the mean layer is the whole stack.

Mixture-of-experts layers run on the expert mesh of Megatron-Core's parallel folding
(rules.EXPERT_AXES): each device holds num_experts / ep experts, each sharded over etp, and
runs them on the routed rows that reach it (`_moe_ops`).

With dtype fp8 the weight GEMMs of the decoder layers run in FP8 (`Op.fp8`) behind a cast
of their inputs (`fp8_cast`); the attention core, norms, router, LM head and everything
memory-bound stay in bf16, as torchtitan's Float8 (torchao float8 Linear, the output layer
left out) and Megatron-Core with Transformer Engine (TE Linear layers only) run them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from meshplan.hw_profiles.gemm_model import causal_tile_share
from meshplan.simulator.model_spec import LayerKind, ModelSpec

GEMM, MEMORY = "gemm", "memory"
# Memory-bound operators -> the class of measured operators whose efficiency they run at
# (hw_profiles.gemm_model.OP_CLASSES); copies and gathers stream like an add.
MEMORY_CLASS = {"input_norm": "norm", "post_attention_norm": "norm", "final_norm": "norm",
                "attention_out_norm": "norm", "mlp_out_norm": "norm", "qk_norm": "norm",
                "latent_norm": "norm", "rope": "rope", "softmax": "softmax",
                "cross_entropy": "softmax", "router_softmax": "softmax", "residual_add": "add",
                "embedding": "add", "kv_write": "add", "kv_repeat": "add", "cp_merge": "add",
                "moe_permute": "add", "moe_unpermute": "add",
                "mlp_act": "activation", "softcap": "activation", "logit_softcap": "activation",
                "router_sigmoid": "activation", "fp8_cast": "add", "act_quant": "add", "attn_mask": "add"}
# The class an eager op's kernels run at: each is one plain elementwise (or row-reduction)
# kernel, as the measured activation kernel is (SiLU and the product in one pass), not the
# fused norm or RoPE kernel its class was measured on
EAGER_CLASS = "activation"
# Bytes per element of casting one GEMM operand to FP8 in both layouts the forward and
# backward GEMMs read (row-major and transposed), from bf16: Transformer Engine's fused
# cast-transpose with delayed scaling (scale from the amax history: read 2, write 1 + 1;
# TE docs, "Using FP8 with Transformer Engine", delayed scaling); torchao's dynamic
# tensorwise scaling adds a pass computing the amax (read 2 more; torchao float8 README,
# torchtitan docs/float8.md); rowwise scales along each layout's rows, so amax and cast run
# once per layout (2 x (2 + 2 + 1)).
FP8_CAST_BYTES = {"delayed": 4.0, "tensorwise": 6.0, "rowwise": 10.0}


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
    fp8: bool = False                  # a GEMM run in FP8 (forward and both backward GEMMs)
    bwd_bytes: float | None = None     # memory-bound backward bytes, when not 2 x bytes_moved
    weight_bytes: float | None = None  # bytes per weight element when stored quantized (serving)
    dequant_flops: float = 0.0         # CUDA-core work dequantizing them (quantize.py)
    # (sequence, attended keys) of a matmul inside a fused causal attention kernel: it runs
    # the share of `flops` the profile's kernel tiles compute (FusedAttention.causal_share) at
    # the kernel's scales (cost._op_arrays); times only. None: every flop at the GEMM fits'.
    causal: tuple[int, int] | None = None
    routed: bool = False               # runs between the MoE dispatch and combine (routed experts)
    sac_redo: float = 1.0              # share of its forward per-op selective AC redoes (op_sac)
    module_redo: bool = False          # redone under recompute norm_act (MODULE_REDO)
    # the fused attention kernel's backward runs this matmul's forward again: Q K^T, not
    # P V (5 matmuls against the forward's 2; Dao 2023, FlashAttention-2, Algorithm 2)
    kernel_redo: bool = False
    eager: bool = False                # run as eager PyTorch, one plain kernel per op (_eager)

    @property
    def op_class(self) -> str | None:
        return EAGER_CLASS if self.eager else MEMORY_CLASS.get(self.name)


# Megatron-LM's --recompute-modules layernorm moe_act (recompute norm_act): the two norms
# before the attention and MLP blocks, and the routed experts' activation, redone in backward
# from the inputs they keep (megatron/core/transformer/transformer_layer.py and
# moe/experts.py, CheckpointWithoutOutput)
MODULE_REDO = ("input_norm", "post_attention_norm")


# The norm operators (eager_bytes_per_element: an eager RMSNorm runs as several kernels).
NORM_OPS = tuple(name for name, cls in MEMORY_CLASS.items() if cls == "norm")


def eager_bytes_per_element(model: ModelSpec, name: str, dtype_bytes: int) -> tuple[float, float] | None:
    """(forward, backward) bytes moved per element by an elementwise op run as eager PyTorch,
    one kernel per op (plan.elementwise eager), as torchtitan wrote them in 2024 (models/
    norms.py RMSNorm, models/llama/model.py apply_rotary_emb and FeedForward);
    None where eager runs the op as one kernel too (F.layer_norm, GELU, adds). With d-byte
    activations (fp32 upcasts where d < 4: u = d + 4 bytes for each cast, else none):
    RMSNorm forward x.float(), pow, mean, x * rsqrt, type_as, * weight: 2u + 20 + 2d; its
    backward the weight's two products, the casts back, the product's two, mean's expand,
    pow's product and the two paths' sum: 4d + 2u + 44 (fused: 2d and 4d). RoPE through
    complex numbers: float cast, complex product, cast back, forward and backward alike:
    2u + 8 (fused: 2d). SwiGLU silu(x W1) * (x W3): silu then the product, 5d; backward the
    product's two and silu's, 9d (fused: 3d and 6d)."""
    d = dtype_bytes
    up = d + 4 if d < 4 else 0
    if name in NORM_OPS and model.norm == "rmsnorm":
        return 2 * up + 20 + 2 * d, 4 * d + 2 * up + 44
    if name == "rope":
        return 2 * up + 8, 2 * up + 8
    if name == "mlp_act" and model.gated_mlp:
        return 5 * d, 9 * d
    return None


def _eager(model: ModelSpec, shard: Shard, ops: list[Op]) -> list[Op]:
    """`ops` as run under shard.eager (eager_bytes_per_element), at the eager kernels' class
    (EAGER_CLASS); a memory-bound op's flops count its elements."""
    if not shard.eager:
        return ops
    out = []
    for op in ops:
        per = eager_bytes_per_element(model, op.name, shard.dtype_bytes)
        out.append(op if per is None else changed(op, bytes_moved=op.flops * per[0], bwd_bytes=op.flops * per[1],
                                                  eager=True))
    return out


def _gemm(name, m, n, k, batch=1, weight=True, core=False, fp8=False, causal=None) -> Op:
    return Op(name, GEMM, 2.0 * batch * m * n * k, m, n, k, batch, weight=weight, attention_core=core,
              fp8=fp8, causal=causal)


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
    ep: int = 1
    etp: int | None = None        # None: tp
    capacity: float = 1.0         # the busiest expert-parallel rank's rows over the balanced share
    fp8: str | None = None        # the FP8 recipe (plan.FP8_RECIPES) when the GEMMs run in FP8
    expert_load: tuple[float, float] | None = None  # (routed rows, distinct experts) this device's
    # experts run, where the caller knows them (serving); None: from expert_tokens (_moe_ops)
    fused_mlp: bool = True        # plan.mlp_kernel == "fused"
    eager: bool = False           # plan.elementwise == "eager" (eager_bytes_per_element)
    fp8_saved: bool = True        # FP8 linears keep their input in FP8 (plan.fp8_saved_dtype)
    kv_repeat: bool = False       # K,V repeated to the query heads before the kernel (plan.kv_repeat)
    cp_comm: str = "p2p"          # how CP exchanges K,V (plan.cp_comm; cp_merge_op)

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)

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

    @property
    def expert_tokens(self) -> int:
        """Tokens whose routed rows this device's experts may receive from its own expert TP
        group: its TP ranks' distinct tokens (sequence-parallel shards, or the replicated
        tokens without SP, where etp = tp) gathered over etp."""
        return self.norm_tokens * self.etp if (self.sp or self.tp == 1) else self.tokens

    @property
    def moe_comm(self) -> bool:
        """Whether an MoE block exchanges its tokens over the expert mesh (dispatch and
        combine), rather than reducing over TP as a dense MLP (tp > 1 without SP)."""
        return self.sp or self.tp == 1


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
    as multi-head attention with separate query/key and value head sizes. gpt-oss's
    attention sinks add one logit per query row to the softmax: no GEMM, nothing counted."""
    h, hd, t, d = model.hidden_size, model.head_dim, shard.tp, shard.dtype_bytes
    heads, kv_heads = model.num_heads // t, model.num_kv_heads // t
    tok, s, b, f8 = shard.tokens, shard.local_seq, shard.micro_batch, shard.fp8 is not None
    if model.kv_lora_rank:
        q, kv, rope = model.q_lora_rank, model.kv_lora_rank, model.qk_rope_head_dim
        nope_v = model.qk_nope_head_dim + model.v_head_dim
        query = ([_gemm("q_down", tok, q, h, fp8=f8), _mem("latent_norm", tok * q, 2, d),
                  _gemm("q_up", tok, heads * hd, q, fp8=f8)] if q
                 else [_gemm("q_proj", tok, heads * hd, h, fp8=f8)])
        ops = query + [_gemm("kv_down", tok, kv + rope, h, fp8=f8), _mem("latent_norm", tok * kv, 2, d),
                       _gemm("kv_up", tok, heads * nope_v, kv, fp8=f8),
                       _mem("rope", tok * (heads + 1) * rope, 2, d)]
    else:
        ops = [_gemm("qkv_proj", tok, (heads + 2 * kv_heads) * hd, h, fp8=f8)]
        if model.qk_norm:
            ops.append(_mem("qk_norm", tok * (heads + kv_heads) * hd, 2, d))
        if model.position_embedding == "rope":
            ops.append(_mem("rope", tok * (heads + kv_heads) * hd * model.rotary_pct, 2, d))
        if shard.kv_repeat and heads > kv_heads:
            # K and V copied to every query head (torchtitan's repeat_kv: expand and reshape);
            # its backward sums each group's gradients back: read the wide, write the narrow
            moved = 2 * tok * (heads + kv_heads) * hd * d
            ops.append(changed(_mem("kv_repeat", 2 * tok * heads * hd, 1, d), bytes_moved=moved,
                               bwd_bytes=moved))
    keys, vd = attended_keys(model, shard, local), model.value_head_dim
    scores = b * heads * s * keys
    causal = (shard.seq_len, keys) if shard.flash else None
    scores_op, values_op = attention_core(s, keys, hd, vd, b * heads, causal)
    ops.append(scores_op)
    if not shard.flash:  # fused kernels cap and normalise the scores in registers
        if model.attn_softcap:
            ops.append(_mem("softcap", scores, 2, d, core=True))
        if shard.eager:  # eager PyTorch masks the scores in a kernel of their own (masked_fill_,
            # reading the boolean mask too), and its backward zeroes the masked gradients alike
            ops.append(changed(_mem("attn_mask", scores, 2, d, core=True), bytes_moved=scores * (2 * d + 1),
                               bwd_bytes=scores * (2 * d + 1)))
        ops.append(_mem("softmax", scores, 2 + (1 if model.dropout else 0), d, core=True))
    ops.append(values_op)
    # torch's ring joins its blocks in eager fp32 ops, and so does an eager p2p ring (the
    # executor's); Transformer Engine's fuses the join into its kernels
    if shard.cp > 1 and (shard.cp_comm in ("alltoall", "allgather") or (shard.cp_comm == "p2p" and shard.eager)):
        exchanged = heads if shard.kv_repeat else kv_heads
        ops.append(cp_merge_op(tok * heads * vd, tok * exchanged * hd, shard.cp))
    return ops + [_gemm("out_proj", tok, h, heads * vd, fp8=f8)]


def cp_merge_op(out_elements: float, kv_elements: float, cp: int) -> Op:
    """torch's ring attention joins its cp blocks in eager fp32 ops on the busiest rank (the
    last, whose blocks all take the whole local query): forward, each block's output cast to
    fp32 (read 2 bytes, write 4) and merged into the running one by its log-sum-exp (out -
    sigmoid(lse_b - lse) * (out - out_b): 32 bytes), the result cast back (6); backward, the
    gradients zeroed and accumulated in fp32 (+= of the kernel's bf16: 10 bytes; a half-chunk
    add and a concatenation for K,V past the first block: 5 + 8), K,V's packed for the next
    rank (8 each), cast back at the end (6). torch _SDPAMerger and
    _templated_ring_attention_backward (_cp_options.convert_to_f32)."""
    fwd = (12 + 38 * (cp - 1)) * out_elements
    bwd = (10 * cp + 10) * out_elements + (42 * cp + 14) * kv_elements
    return Op("cp_merge", MEMORY, float(out_elements), bytes_moved=float(fwd), bwd_bytes=float(bwd))


def attention_core(queries: int, keys: int, head_dim: int, value_dim: int, batch_heads: int,
                   causal: tuple[int, int] | None) -> tuple[Op, Op]:
    """The attention core's two matmuls, Q K^T and softmax(Q K^T) V, over `batch_heads`
    (sequences x heads). `causal`: (sequence, attended keys) of one fused kernel under the
    causal mask, which skips the key blocks above the diagonal (FlashAttention-2, Dao 2023
    sec 3.1.1; load-balanced ring attention gives each CP rank the same share, Liu et al.
    2023); None: unfused, every score computed and masked. Model FLOPs (MFU) count the full
    square either way, as Megatron-LM's and PaLM's formulas do."""
    scores = _gemm("attn_scores", queries, keys, head_dim, batch=batch_heads, weight=False, core=True,
                   causal=causal)
    return (changed(scores, kernel_redo=causal is not None),
            _gemm("attn_values", queries, value_dim, keys, batch=batch_heads, weight=False, core=True,
                  causal=causal))


def _mlp_ops(model: ModelSpec, shard: Shard, ffn: int, prefix: str = "mlp") -> list[Op]:
    """A (gated) MLP of width ffn on every token: up (and gate), activation, down."""
    h, tok, d, f8 = model.hidden_size, shard.tokens, shard.dtype_bytes, shard.fp8 is not None
    f, gated = ffn // shard.tp, 2 if model.gated_mlp else 1
    return [_gemm(f"{prefix}_up", tok, gated * f, h, fp8=f8), _mem("mlp_act", tok * f, gated + 1, d),
            _gemm(f"{prefix}_down", tok, h, f, fp8=f8)]


def active_experts(num_experts: int, per_token: int, tokens) -> float:
    """Expected number of distinct experts that `tokens` tokens, each routed to `per_token`
    of `num_experts` uniformly, hit: E (1 - (1 - k/E)^T), each expert missed by a token with
    probability 1 - k/E (the occupancy expectation, Feller 1968 vol. I sec II.11)."""
    return num_experts * (1.0 - (1.0 - per_token / num_experts) ** tokens)


def _moe_ops(model: ModelSpec, shard: Shard) -> list[Op]:
    """Router, token permutation, the local experts as one grouped GEMM, the weighted
    combine, and the shared experts (Fedus et al. 2022 Switch Transformer sec 2; DeepSeekMoE,
    Dai et al. 2024 sec 3). The router reads the layer input where SP leaves it sharded.
    The device holds num_experts / ep experts of width moe_ffn / etp and runs them on the
    rows routed to them from the tokens of its expert-parallel group (expert_tokens x ep
    tokens): experts_per_token rows per token, 1/ep of them its own on balanced routing,
    times the capacity factor on the busiest rank, spread over the expected number of
    distinct local experts those tokens hit (all of them in training, a few in decode);
    `shard.expert_load` gives both instead where the caller routes otherwise (serving).
    The routed experts and the unpermute run between the dispatch and the combine (`routed`;
    Megatron-Core's fine-grained "mlp" node), the rest before the dispatch.
    gpt-oss's clamped SwiGLU is the same one elementwise pass (read gate and up, write their
    product; its clamps fuse into it), and biases, the router's and the experts', are added
    in the GEMM epilogues: memory-bound work of no GEMM FLOPs, as SiLU's is."""
    h, d, ntok = model.hidden_size, shard.dtype_bytes, shard.norm_tokens
    e, k, f8 = model.num_experts, model.experts_per_token, shard.fp8 is not None
    f, gated = model.moe_ffn_hidden_size // shard.etp, 2 if model.gated_mlp else 1
    routed, active = shard.expert_load or (shard.expert_tokens * k * shard.capacity,
                                           active_experts(e, k, shard.expert_tokens * shard.ep) / shard.ep)
    experts = [_gemm("expert_up", routed / active, gated * f, h, batch=active, fp8=f8),
               _mem("mlp_act", routed * f, gated + 1, d),
               _gemm("expert_down", routed / active, h, f, batch=active, fp8=f8),
               _mem("moe_unpermute", routed * h, 2, d)]
    ops = [_gemm("router", ntok, e, h), _mem(f"router_{model.router}", ntok * e, 2, d),
           _mem("moe_permute", routed * h, 2, d), *(changed(op, routed=True) for op in experts)]
    if model.num_shared_experts:
        ops += _mlp_ops(model, shard, model.shared_ffn_size, "shared")
    if model.shared_expert_gate:
        ops.append(_gemm("shared_gate", ntok, 1, h))
    return ops


def _fp8_cast(ops: list[Op], recipe: str) -> Op:
    """Casting the FP8 GEMMs' operands: input and weight in forward, the output gradient in
    backward (FP8_CAST_BYTES per element; the weight cast once per micro-batch, as torchao
    does; Transformer Engine caches it over a step's micro-batches)."""
    fwd = sum(op.batch * (op.m * op.k + op.k * op.n) for op in ops if op.fp8)
    bwd = sum(op.batch * op.m * op.n for op in ops if op.fp8)
    per = FP8_CAST_BYTES[recipe]
    return Op("fp8_cast", MEMORY, float(fwd), bytes_moved=fwd * per, bwd_bytes=bwd * per)


def _linear_widths(model: ModelSpec, shard: Shard, op: Op) -> tuple[int, ...]:
    """Output widths of the nn.Linear matmuls a weight GEMM stands for, in the order they
    run: the fused QKV projection is torchtitan's (and the executor's) wq, wk, wv; a gated
    MLP's up projection is w1 then w3."""
    if op.name == "qkv_proj":
        hd = model.head_dim
        return (model.num_heads // shard.tp * hd,) + 2 * (model.num_kv_heads // shard.tp * hd,)
    if op.name in ("mlp_up", "shared_up") and model.gated_mlp:
        return (op.n // 2, op.n // 2)
    return (op.n,)


def op_sac(model: ModelSpec, shard: Shard, ops: list[Op]) -> tuple[list[float], float]:
    """Per-op selective activation checkpointing as torchtitan runs it (SelectiveAC,
    torchtitan distributed/activation_checkpoint.py): the outputs of matmuls (every second
    one recomputed, counting the layer's nn.Linear matmuls in order), attention (SDPA, and
    under CP torch's ring with its merge, which runs inside that operator), all-to-all and
    reduce-scatter are saved; everything else is recomputed in backward: the
    norms, RoPE, activations and residual adds, the router (its shape is force-recomputed)
    and the routed experts' grouped GEMMs (not in the save list). FP8 linears count as
    matmuls: torchtitan's FP8 run keeps as much as its bf16 one (77.0 and 76.8 GiB, its
    llama3_h100_202412 benchmark, Table 1). torchtitan 0.3 redoes the whole layer (no
    early stop), so the ops after the last one backward needs are redone too. The count
    runs on over the layer's calls, so with an odd number of matmuls the recomputed set
    alternates between calls: each then counts half, and memory keeps the larger set.
    Returns the share of each op's forward it redoes (Op.sac_redo), in the order of `ops`,
    and the output elements of the saved matmuls."""
    counted = [i for i, op in enumerate(ops) if op.kind == GEMM and op.weight and not op.routed
               and op.name != "router"]
    pieces = [(i, w) for i in counted for w in _linear_widths(model, shard, ops[i])]
    redo, saved = {i: 0.0 for i in counted}, [0.0, 0.0]
    alternating = len(pieces) % 2 == 1
    for position, (i, width) in enumerate(pieces, start=1):
        share = width / ops[i].n
        redo[i] += share * (0.5 if alternating else float(position % 2 == 0))
        saved[position % 2] += ops[i].m * ops[i].batch * width
    shares = [0.0 if op.attention_core or op.name == "cp_merge" else redo.get(i, 1.0) for i, op in enumerate(ops)]
    return shares, max(saved) if alternating else saved[1]


def layer_kind_ops(model: ModelSpec, shard: Shard, kind: LayerKind) -> tuple[Op, ...]:
    """Forward operators of one decoder layer of `kind`, in execution order. Gemma's
    sandwich norms normalise each block's output before its residual add; a parallel
    residual (GPT-NeoX) adds both blocks' outputs to the layer input, the same two adds.
    Op.sac_redo is set for per-op selective AC (op_sac), Op.module_redo for recompute
    norm_act."""
    h, d, ntok = model.hidden_size, shard.dtype_bytes, shard.norm_tokens
    ops = [_mem("input_norm", ntok * h, 2, d)] + _attention_ops(model, shard, kind.local)
    if model.sandwich_norm:
        ops.append(_mem("attention_out_norm", ntok * h, 2, d))
    ops += [_mem("residual_add", ntok * h, 3, d), _mem("post_attention_norm", ntok * h, 2, d)]
    ops += _moe_ops(model, shard) if kind.moe else _mlp_ops(model, shard, model.ffn_hidden_size)
    if model.sandwich_norm:
        ops.append(_mem("mlp_out_norm", ntok * h, 2, d))
    if shard.fp8 is not None:
        ops.append(_fp8_cast(ops, shard.fp8))
    ops = _eager(model, shard, ops + [_mem("residual_add", ntok * h, 3, d)])
    return tuple(changed(op, module_redo=op.name in MODULE_REDO or (op.name == "mlp_act" and op.routed),
                         sac_redo=share) for op, share in zip(ops, op_sac(model, shard, ops)[0]))


@functools.lru_cache(maxsize=4096)
def kinds_ops(model: ModelSpec, shard: Shard) -> tuple[tuple[Op, ...], ...]:
    """layer_kind_ops of each of model.layer_kinds(), in that order (kept for the shards a
    search meets again: each block of its table, the simulation of its best rows)."""
    return tuple(layer_kind_ops(model, shard, kind) for kind, _ in model.layer_kinds())


def layer_ops(model: ModelSpec, shard: Shard, kind_ops: tuple | None = None) -> tuple[Op, ...]:
    """Forward operators of the mean decoder layer: each layer kind's operators (kinds_ops,
    or `kind_ops` where the caller has them), run its share of the layers."""
    kinds = model.layer_kinds()
    kind_ops = kinds_ops(model, shard) if kind_ops is None else kind_ops
    if len(kinds) == 1:
        return kind_ops[0]
    return tuple(changed(op, count=n / model.num_layers) for (_, n), ops in zip(kinds, kind_ops)
                 for op in ops)


def changed(op: Op, **fields) -> Op:
    """op with `fields` changed: dataclasses.replace without re-running the constructor
    (the cost model derives such ops for every candidate's shard)."""
    out = object.__new__(Op)
    out.__dict__.update(op.__dict__, **fields)
    return out


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
    return (*_eager(model, shard, [_mem("final_norm", shard.norm_tokens * model.hidden_size, 2, shard.dtype_bytes)]),
            _gemm("lm_head", tok, v, model.hidden_size), *cap, _mem("cross_entropy", tok * v, 3, 4))


def total_flops(ops: tuple[Op, ...]) -> float:
    return sum(op.flops * op.count for op in ops if op.kind == GEMM)


def model_flops_per_step(model: ModelSpec, global_batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward GEMM FLOPs, no
    recompute), the numerator of MFU (Chowdhery et al. 2022 appendix B)."""
    shard = Shard(global_batch, seq_len)
    fwd = model.num_layers * total_flops(layer_ops(model, shard)) + total_flops(head_ops(model, shard))
    return 3.0 * fwd


def masked_attention_flops_per_step(model: ModelSpec, global_batch: int, seq_len: int) -> float:
    """Of model_flops_per_step, the attention matmuls' FLOPs over the query-key pairs the
    causal mask (and a sliding window) drops: without them, the FLOPs a causal model needs, as
    the FlashAttention papers count them (Dao 2023, FlashAttention-2, sec 4.1: causal FLOPs
    halved)."""
    masked = sum(op.flops * op.count * (1.0 - causal_tile_share(*op.causal))
                 for op in layer_ops(model, Shard(global_batch, seq_len)) if op.kind == GEMM and op.causal)
    return 3.0 * model.num_layers * masked
