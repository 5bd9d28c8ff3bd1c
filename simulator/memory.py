"""Per-device memory: weights, gradients, optimizer states (ZeRO), activations, buffers.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") sec 4, generalised to GQA, latent attention, gated MLPs, experts,
no-dropout models and fused (flash) attention; for a GPT layer with dropout and naive
attention they reduce exactly to Table 2 (tests check each row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshplan.simulator.model_spec import LayerKind, ModelSpec
from meshplan.simulator.ops import Op, Shard, kinds_ops, op_sac

# Adam's state per parameter: a 4-byte master copy of the weights, unless they are fp32 and
# their own master, and two moments; with fp32 moments 12 bytes beside bf16 weights
# (Rajbhandari et al. 2020, ZeRO sec 3.1, K = 12), 8 beside fp32 ones. FP8 training keeps
# bf16 weights and a fp32 master copy (torchao float8 and Transformer Engine cast to FP8
# only at the GEMMs).
MASTER_BYTES = 4


def _separate_master(dtype: str, master_weights) -> np.ndarray:
    """Whether Adam keeps a master copy apart from the weights (plan.master_weights)."""
    return np.logical_and(master_weights, dtype != "fp32")


def optimizer_bytes_per_param(dtype: str, master_weights, moment_bytes=4) -> np.ndarray:
    """Adam's state per parameter: the master copy, if kept apart from the weights, and the
    two moments in `moment_bytes` each (plan.moments_dtype)."""
    return MASTER_BYTES * _separate_master(dtype, master_weights) + 2 * np.asarray(moment_bytes)


def adam_step_bytes_per_param(dtype: str, dtype_bytes: int, master_weights, moment_bytes=4) -> np.ndarray:
    """Bytes an Adam step reads and writes per parameter of its shard: the gradient read; the
    master copy read and written and the weights written (mixed precision: 2 + 8 + 2), or the
    weights read and written in their dtype; both moments read and written. 28 bytes with
    fp32 moments, in every training dtype."""
    weights = np.where(_separate_master(dtype, master_weights), 2 * MASTER_BYTES + dtype_bytes, 2 * dtype_bytes)
    return dtype_bytes + weights + 4 * np.asarray(moment_bytes)


def mlp_saved_widths(model: ModelSpec, fused: bool = True) -> int:
    """Tensors of the MLP's width that autograd saves per token: the activation's input and
    the down-projection's input (Korthikanti et al. sec 4.1); with a gate also the gate's
    input, and in eager PyTorch the activation's output, the gate product's other operand
    (torchtitan's FeedForward and GroupedExperts without compile: act(x W1) * (x W3)). A fused
    activation (Megatron-LM's bias_swiglu_impl, torch.compile) saves its inputs only."""
    if not model.gated_mlp:
        return 2
    return 3 if fused else 4


def layer_kind_activation_bytes(model: ModelSpec, shard: Shard, recompute: str, kind: LayerKind,
                                ops: tuple[Op, ...] | None) -> float:
    """Bytes one layer of `kind` keeps for backward, for one micro-batch, on one device
    (`ops`: its operators, ops.layer_kind_ops, which recompute op reads).

    Terms of Korthikanti et al. sec 4.1 (2 bytes per element, 1 per dropout mask), each
    sharded over TP where Megatron shards it, and over TP too with sequence parallelism.
    Beyond the paper, by the same rule (what autograd saves for the backward GEMMs and
    norms): QK-norm and sandwich-norm inputs, latent attention's low-rank tensors
    (replicated over TP), and an MoE layer's router scores, permuted token copies, expert
    activations and the expert outputs its weighted combine needs."""
    d, h, hd = shard.dtype_bytes, model.hidden_size, model.head_dim
    t, tok, ntok = shard.tp, shard.tokens, shard.norm_tokens
    if recompute == "full":
        return d * ntok * h  # only the layer input is kept (sec 4.3: 2sbh, /t with SP)
    heads, kv_heads = model.num_heads // t, model.num_kv_heads // t
    if recompute == "op":
        # the layer input, the saved matmul outputs (ops.op_sac), the attention output and
        # its fp32 log-sum-exp, SP's two reduce-scatter outputs, the routed rows the
        # dispatch and combine all-to-alls return, and Ulysses' (cp_comm a2a): Q, K, V in
        # head shards and the core's output back in sequence shards, as large as before
        saved = op_sac(model, shard, list(ops))[1]
        rows = shard.expert_tokens * model.experts_per_token * shard.capacity
        kv = heads if shard.kv_repeat else kv_heads
        ulysses = ((heads + kv) * hd + (kv + heads) * model.value_head_dim
                   if shard.cp > 1 and shard.cp_comm == "a2a" else 0)
        return (d * (ntok * h + saved + tok * heads * model.value_head_dim + tok * ulysses)
                + 4 * shard.micro_batch * heads * shard.local_seq
                + (2 * d * ntok * h if shard.sp else 0.0) + (2 * d * rows * h if kind.moe and shard.ep > 1 else 0.0))
    mask = 1 if model.dropout else 0
    widths = mlp_saved_widths(model, shard.fused_mlp)
    # Norm inputs (2, 4 with sandwich norms, one fewer when both blocks read the layer
    # input), QKV input, MLP input, 2 dropout masks: replicated, or SP-sharded.
    norms = 2 + (2 if model.sandwich_norm else 0) - (1 if model.parallel_residual else 0)
    replicated = (d * (norms + 2) + mask * 2) * ntok * h + eager_norm_bytes(model, shard)
    if model.kv_lora_rank:
        q, kv, vd = model.q_lora_rank, model.kv_lora_rank, model.v_head_dim
        # Q, K, V, attention output (out-proj input); low-rank norm inputs and up-proj inputs
        attention = heads * (2 * hd + 2 * vd)
        replicated += d * tok * (2 * q + 2 * kv + model.qk_rope_head_dim)
    else:
        # Q and K (for QK^T), V, attention output (out-proj input), QK-norm inputs; K and V
        # as wide as the queries where they are repeated before the kernel, which keeps them
        attention = ((heads + kv_heads) * hd * (2 if model.qk_norm else 1) + kv_heads * hd + heads * hd
                     + (2 * (heads - kv_heads) * hd if shard.kv_repeat else 0))
    experts = 0.0
    if kind.moe:
        # per routed row on this device (ops.Shard.expert_tokens x experts_per_token x the
        # capacity factor): its permuted input and its output (for the weighted combine),
        # the MLP tensors (mlp_saved_widths) of an expert of width moe_ffn / etp; the
        # shared experts as a dense MLP; the router's scores
        f = model.moe_ffn_hidden_size // shard.etp
        rows = shard.expert_tokens * model.experts_per_token * shard.capacity
        experts = d * rows * (2 * h + widths * f)
        mlp = widths * (model.shared_ffn_size // t)
        replicated += d * ntok * model.num_experts
    else:
        mlp = widths * (model.ffn_hidden_size // t)
    sharded = d * tok * (attention + mlp)
    if shard.flash:
        core = 4 * shard.micro_batch * heads * shard.local_seq  # fp32 log-sum-exp per query row
    else:
        scores = shard.micro_batch * heads * shard.local_seq * shard.seq_len
        # softmax out, dropout mask, dropout out; the soft-capping tanh's input
        core = scores * (d + mask + (d if mask else 0) + (d if model.attn_softcap else 0))
    if recompute == "selective":
        core = 0.0  # the attention core is recomputed (sec 4.3)
    kept = replicated + sharded + experts + core - fp8_saved_savings(model, shard, kind)
    return kept - (norm_act_savings(model, shard, kind) if recompute == "norm_act" else 0.0)


def eager_norm_bytes(model: ModelSpec, shard: Shard, rebuilt_only: bool = False) -> float:
    """What an eager RMSNorm (plan.elementwise eager: torch's RMSNorm decomposed into its
    ops, as the executor runs it on CPU; torchtitan's 2024 RMSNorm, which normalises the
    input upcast to fp32) keeps beyond a fused kernel's input and statistics: the normalised
    tensor for the weight's gradient (with torchtitan's, the fp32 copy of the input in the
    input's place): 4 bytes an element, per norm of the layer (the QK-norms' and latent
    norms' too), or only of the two that recompute norm_act rebuilds (`rebuilt_only`).
    LayerNorm runs as one kernel, eager or not."""
    if not shard.eager or model.norm != "rmsnorm":
        return 0.0
    h, tok, ntok = model.hidden_size, shard.tokens, shard.norm_tokens
    if rebuilt_only:
        return 4.0 * 2 * ntok * h
    t = shard.tp
    elements = (2 + (2 if model.sandwich_norm else 0)) * ntok * h
    if model.qk_norm:
        elements += tok * (model.num_heads + model.num_kv_heads) // t * model.head_dim
    if model.kv_lora_rank:
        elements += tok * (model.q_lora_rank + model.kv_lora_rank)
    return 4.0 * elements


def norm_act_savings(model: ModelSpec, shard: Shard, kind: LayerKind) -> float:
    """Bytes recompute norm_act (Megatron-LM's --recompute-modules layernorm moe_act) frees
    of what recompute none keeps: the normalised inputs of the QKV projection and of the MLP
    (or the router), and the routed experts' activation output (their down projection's
    input), each rebuilt in backward from the norm's input and the activation's input, which
    stay kept; at 1 byte where FP8 linears would have kept them in FP8 (fp8_saved_savings)."""
    d, h, ntok = shard.dtype_bytes, model.hidden_size, shard.norm_tokens
    kept = 1 if shard.fp8 is not None and shard.fp8_saved else d
    freed = kept * ntok * h + (d if kind.moe else kept) * ntok * h
    if kind.moe:
        rows = shard.expert_tokens * model.experts_per_token * shard.capacity
        freed += kept * rows * (model.moe_ffn_hidden_size // shard.etp)
    return freed + eager_norm_bytes(model, shard, rebuilt_only=True)


def fp8_saved_savings(model: ModelSpec, shard: Shard, kind: LayerKind) -> float:
    """Bytes an FP8 plan's linears save by keeping their inputs for backward in FP8, 1 byte
    for the dtype's d (Transformer Engine's Linear saves the quantized input it cast,
    module/linear.py; ops.Shard.fp8_saved): the QKV input (and latent attention's up-
    projection inputs), the dense MLP's input and its down projection's input, the routed
    experts' permuted input and down-projection input; the out projection keeps its own FP8
    copy beside the attention output the fused kernel keeps. An MoE layer's router (bf16)
    keeps the MLP input in bf16."""
    if shard.fp8 is None or not shard.fp8_saved:
        return 0.0
    d, h, t = shard.dtype_bytes, model.hidden_size, shard.tp
    tok, ntok = shard.tokens, shard.norm_tokens
    inputs = (1 if kind.moe else 2) * ntok * h  # elements kept in FP8 instead of the dtype
    if model.kv_lora_rank:
        inputs += tok * (model.q_lora_rank + model.kv_lora_rank)
    if kind.moe:
        rows = shard.expert_tokens * model.experts_per_token * shard.capacity
        inputs += rows * (h + model.moe_ffn_hidden_size // shard.etp) + tok * (model.shared_ffn_size // t)
    else:
        inputs += tok * (model.ffn_hidden_size // t)
    out_proj_copy = tok * (model.num_heads // t) * model.value_head_dim
    return (d - 1) * inputs - out_proj_copy


def layer_activation_bytes(model: ModelSpec, shard: Shard, recompute: str,
                           kind_ops: tuple | None = None) -> float:
    """Bytes the mean layer keeps for backward (layer kinds weighted by their layers);
    `kind_ops`: ops.kinds_ops(model, shard) where the caller has them."""
    kind_ops = kinds_ops(model, shard) if kind_ops is None and recompute == "op" else kind_ops
    return sum(n * layer_kind_activation_bytes(model, shard, recompute, kind,
                                               None if kind_ops is None else kind_ops[i])
               for i, (kind, n) in enumerate(model.layer_kinds())) / model.num_layers


@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one pipeline stage's device, in bytes."""

    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    buffers_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.activations_bytes + self.buffers_bytes)

    def to_json(self) -> dict:
        return {"weights": self.weights_bytes, "gradients": self.gradients_bytes,
                "optimizer": self.optimizer_bytes, "activations": self.activations_bytes,
                "buffers": self.buffers_bytes, "total": self.total_bytes}


def expert_layer_params(model: ModelSpec, ep=1, etp=1):
    """Routed-expert parameters of the mean layer on one device: num_experts / ep experts,
    each sharded over etp (Megatron-Core parallel folding). Their gradients are reduced, and
    their optimizer states sharded, over the expert data-parallel group instead of DP x CP."""
    moe = sum(n for kind, n in model.layer_kinds() if kind.moe) / model.num_layers
    return moe * model.num_experts * model.mlp_params(model.moe_ffn_hidden_size) / (
        np.asarray(ep) * np.asarray(etp))


def stage_params(model: ModelSpec, tp, pp, layers, first, last, ep=1, etp=None):
    """Parameters held by one device of a pipeline stage of `layers` mean layers (numpy
    arrays broadcast): TP shards the attention and MLP weights, the shared experts and the
    vocabulary; norms, MLA's down-projections and the router are replicated (Megatron-LM,
    which vLLM follows; ModelSpec.layer_replicated_params); the routed experts are
    expert_layer_params (etp default tp). The first stage holds the embedding, the last the
    final norm and the LM head (a synced copy of a tied embedding under PP)."""
    routed = expert_layer_params(model)
    per_layer = sum(n * ((model.layer_params(k) - model.layer_replicated_params(k)) / tp
                         + model.layer_replicated_params(k)) for k, n in model.layer_kinds()) / model.num_layers
    per_layer = per_layer - routed / tp + expert_layer_params(model, ep, tp if etp is None else etp)
    head = model.norm_params() + np.where(np.logical_not(model.tied_embeddings) | (np.asarray(pp) > 1),
                                          model.vocab_size * model.hidden_size / tp, 0.0)
    return layers * per_layer + first * (model.embedding_params() / tp) + last * head


def model_state_bytes(params: float, dtype: str, dtype_bytes: int, zero: int,
                      shard_degree: int, grad_bytes: int | None = None,
                      master_weights=True, moment_bytes=4) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes of `params` parameters on one device under a
    ZeRO stage sharded over `shard_degree` ranks (Rajbhandari et al. 2020 sec 5, Fig. 1);
    gradients take `grad_bytes` each (default the weights' dtype; fp32 where they are kept
    and reduced in fp32, as Megatron-LM's main grads and torchtitan's reduce dtype), and the
    weights' dtype without master weights (the reduced shard cast back to the parameter's
    dtype, as FSDP2 casts it); Adam's state per optimizer_bytes_per_param. ZeRO-2 keeps the
    weights whole beside the shard the optimizer updates, which is the master copy where one
    is kept apart (mixed precision) and else one more in the weights' dtype (FSDP2's sharded
    parameters, all-gathered for the step under reshard_after_forward=False; DeepSpeed's
    fp32 partition of stage 1/2)."""
    whole_beside_shard = (zero == 2) & np.logical_not(_separate_master(dtype, master_weights))
    weights = params * dtype_bytes * (1 / (shard_degree if zero >= 3 else 1) + whole_beside_shard / shard_degree)
    grads = (params * np.where(master_weights, grad_bytes or dtype_bytes, dtype_bytes)
             / (shard_degree if zero >= 2 else 1))
    optimizer = (params * optimizer_bytes_per_param(dtype, master_weights, moment_bytes)
                 / (shard_degree if zero >= 1 else 1))
    return weights, grads, optimizer


def logits_bytes(tokens, vocab_size: int, tp):
    """Bytes of one micro-batch's fp32 logits (or their log-probabilities, or gradient) on one
    device: tokens x vocab / tp, sharded on the vocabulary (Megatron-LM's vocab-parallel
    cross-entropy, Shoeybi et al. 2019 sec 3; torchtitan's loss_parallel)."""
    return 4 * tokens * vocab_size / tp


def cross_entropy_logits(kernel: str, dtype_bytes: int, tp) -> tuple[np.ndarray, np.ndarray]:
    """(kept for backward per micro-batch in flight, held at the loss's backward peak) of a
    cross-entropy kernel (plan.CROSS_ENTROPY) at TP degree `tp` (an int or an array), in
    units of fp32 logits (logits_bytes).
    fused: the fp32 probabilities, then the gradient beside them (Megatron-LM
    tensor_parallel/cross_entropy.py writes it into them). eager: F.cross_entropy of an fp32
    copy keeps log_softmax's fp32 output; its backward holds that, nll_loss's dense fp32
    gradient and log_softmax's fp32 input gradient at once (the bf16 logits are freed first,
    torchtitan's train.py `del pred`); over vocabulary-sharded logits (loss_parallel, tp > 1)
    one more: its NLL backward forms (grad_input + exp(log_probs)) * grad_output, exp's
    temporary beside the sum (torch/distributed/tensor/parallel/loss.py _nll_loss_backward).
    compiled: the graph keeps the logits in the model's dtype and writes their gradient in it."""
    tp = np.asarray(tp)
    if kernel == "eager":
        return np.ones(tp.shape), np.where(tp > 1, 4.0, 3.0)
    if kernel == "compiled":
        return np.full(tp.shape, dtype_bytes / 4), np.full(tp.shape, dtype_bytes / 2)
    return np.ones(tp.shape), np.full(tp.shape, 2.0)


# Reserved-but-unused memory of the caching allocator at the peak (fragmentation), as a share
# of the device, and the runtime's own use outside it (CUDA context, NCCL buffers): the ~1 GiB
# context and few-percent fragmentation PyTorch's CUDA memory notes describe.
FRAGMENTATION_SHARE = 0.05
RUNTIME_BYTES = 2 ** 30


def memory_reserve_bytes(capacity_bytes: float) -> float:
    """Memory held back from the plan: the allocator's fragmentation and the runtime's use."""
    return FRAGMENTATION_SHARE * capacity_bytes + RUNTIME_BYTES


def usable_bytes(capacity_bytes: float) -> float:
    """What a plan may hold of a device's memory: its capacity less memory_reserve_bytes."""
    return capacity_bytes - memory_reserve_bytes(capacity_bytes)
