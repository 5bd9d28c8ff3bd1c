"""Megatron-LM: pretrain_gpt.py arguments that pass its validate_args, and the environment
the plan needs (NVIDIA/Megatron-LM megatron/training/arguments.py, checked at core_v0.16.1
and at its 2026 head; the MoE, FP8, TP-overlap and reduce-dtype arguments at core_v0.16.1 and
core_v0.17.1).

- Every model hyperparameter that differs from Megatron-LM's defaults is given: RoPE base
  (default 10000) and Llama 3.1 scaling, norm epsilon, dropout (default 0.1), bias, gating,
  GQA groups, tying.
- ZeRO-1 is the distributed optimizer; ZeRO-3 with per-parameter shards is PyTorch FSDP2
  (--use-torch-fsdp2, which needs untied embeddings, no expert parallelism and no
  gradient-accumulation fusion), in flat buffers Megatron-FSDP with fully sharded optimizer,
  gradients and parameters (plan.fsdp_layout).
- Experts: Megatron-Core's MoE arguments (--num-experts ... --moe-*), placed by
  --expert-model-parallel-size / --expert-tensor-parallel-size; FP8 through Transformer Engine
  (--fp8-format hybrid, --fp8-recipe); TP overlap through its userbuffers (--tp-comm-overlap);
  the experts' all-to-all overlapped across micro-batches (--overlap-moe-expert-parallel-comm,
  without --delay-wgrad-compute, which the simulator does not model).
- CUDA_DEVICE_MAX_CONNECTIONS=1 orders TP/CP communication before compute on GPUs before
  Blackwell; FSDP needs it unset or above 1 (validate_args asserts both).
- The pipeline split is given layer by layer (--pipeline-model-parallel-layout) unless the
  (virtual) stages are equal.
"""
from __future__ import annotations

from meshplan.planner.exports import Export, TrainJob

USER_PATHS = (("CHECKPOINT_PATH", "Megatron checkpoint folder of the model's weights (--load)"),
              ("TOKENIZER_MODEL", "the model's Hugging Face tokenizer (folder or name)"),
              ("DATA_PATH", "prefix of the Megatron-indexed training data (.bin/.idx)"))


def layout(partition: tuple[int, ...]) -> str:
    """--pipeline-model-parallel-layout: virtual stages in pipeline order, separated by "|";
    E the embedding, t a transformer layer, L the loss (output head); an end stage of no
    layer holds E or L alone."""
    last = len(partition) - 1
    return "|".join(("E" if i == 0 else "") + (f"t*{n}" if n else "") + ("L" if i == last else "")
                    for i, n in enumerate(partition))


def model_args(job: TrainJob) -> list[tuple[str, object]]:
    """The model's architecture in Megatron-LM flags (shared with Megatron-DeepSpeed,
    whose GPT model takes the same spellings)."""
    m, ckpt = job.model, job.checkpoint
    flags = [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
             ("--ffn-hidden-size", m.ffn_hidden_size), ("--num-attention-heads", m.num_heads),
             ("--max-position-embeddings", max(m.max_seq_len, job.plan.seq_len)),
             ("--norm-epsilon", ckpt.norm_eps)]
    if m.num_kv_heads != m.num_heads:
        flags += [("--group-query-attention", None), ("--num-query-groups", m.num_kv_heads)]
    flags += [(flag, value) for cond, flag, value in (
        (m.gated_mlp and m.activation == "silu", "--swiglu", None),
        (m.norm == "rmsnorm", "--normalization", "RMSNorm"),
        (not m.tied_embeddings, "--untie-embeddings-and-output-weights", None),
        (not m.bias, "--disable-bias-linear", None),
        (not m.dropout, "--attention-dropout", 0.0), (not m.dropout, "--hidden-dropout", 0.0)) if cond]
    if m.position_embedding == "rope":
        flags += [("--position-embedding-type", "rope"), ("--rotary-base", int(ckpt.rope_theta))]
        if ckpt.rope_scaling is not None:
            flags += [("--use-rope-scaling", None), ("--rope-scaling-factor", ckpt.rope_scaling.factor)]
    flags += [(flag, value) for cond, flag, value in (
        (m.head_dim * m.num_heads != m.hidden_size, "--kv-channels", m.head_dim),
        (m.qk_norm, "--qk-layernorm", None), (m.qkv_bias and not m.bias, "--add-qkv-bias", None),
        (m.rotary_pct != 1.0, "--rotary-percent", m.rotary_pct)) if cond]
    return flags + (moe_args(job) if m.num_experts else [])


def moe_args(job: TrainJob) -> list[tuple[str, object]]:
    """The experts (Megatron-Core TransformerConfig moe_* fields as arguments) and how they
    are placed, routed and dispatched."""
    m, p = job.model, job.plan
    flags = [("--num-experts", m.num_experts), ("--moe-router-topk", m.experts_per_token),
             ("--moe-ffn-hidden-size", m.moe_ffn_hidden_size), ("--moe-grouped-gemm", None),
             ("--expert-model-parallel-size", p.ep), ("--expert-tensor-parallel-size", p.etp)]
    if m.dense_layers:  # one entry per layer: 1 an expert layer, 0 a dense one
        flags.append(("--moe-layer-freq", "[" + ",".join(
            "0" if i in m.dense_layers else "1" for i in range(m.num_layers)) + "]"))
    if m.num_shared_experts:  # run as one MLP of their summed width, as Megatron-Core does
        flags.append(("--moe-shared-expert-intermediate-size", m.shared_ffn_size))
        if m.shared_expert_gate:
            flags.append(("--moe-shared-expert-gate", None))
    if m.router == "sigmoid":
        flags.append(("--moe-router-score-function", "sigmoid"))
    elif not m.norm_topk_prob:  # softmax over all experts, the top k's weights kept as they are
        flags.append(("--moe-router-pre-softmax", None))
    if m.routed_scaling != 1.0:  # TransformerConfig moe_router_topk_scaling_factor
        flags.append(("--moe-router-topk-scaling-factor", m.routed_scaling))
    if m.router_choice_bias:  # auxiliary-loss-free balancing, its update rate 1e-3 by default
        flags.append(("--moe-router-enable-expert-bias", None))
    if m.route_groups:  # Megatron-Core TransformerConfig moe_router_num_groups / _group_topk
        flags += [("--moe-router-num-groups", m.route_groups), ("--moe-router-group-topk", m.route_group_topk)]
    flags += ([("--moe-token-dispatcher-type", "flex"), ("--moe-flex-dispatcher-backend", "deepep")]
              if p.moe_dispatcher == "deepep" else [("--moe-token-dispatcher-type", "alltoall")])
    if p.moe_capacity_factor > 1:  # the busiest rank's rows over the balanced share, padded to it
        flags += [("--moe-expert-capacity-factor", p.moe_capacity_factor),
                  ("--moe-pad-expert-input-to-capacity", None)]
    if p.moe_a2a_overlap:  # combined 1F1B: each all-to-all beside another micro-batch's compute
        flags.append(("--overlap-moe-expert-parallel-comm", None))
    return flags


def _zero3(job: TrainJob) -> list[tuple[str, object]]:
    # FSDP2 shards per parameter; Megatron-FSDP in flat buckets (and shards tied embeddings and
    # experts, which FSDP2 refuses: rules.FRAMEWORKS)
    if job.plan.fsdp_layout == "flat":
        return [("--use-megatron-fsdp", None), ("--data-parallel-sharding-strategy", "optim_grads_params"),
                ("--ckpt-format", "fsdp_dtensor"), ("--no-gradient-accumulation-fusion", None)]
    return [("--use-torch-fsdp2", None), ("--no-gradient-accumulation-fusion", None),
            ("--ckpt-format", "torch_dist")]


def parallel_args(job: TrainJob) -> list[tuple[str, object]]:
    p = job.plan
    flags = [("--tensor-model-parallel-size", p.tp), ("--pipeline-model-parallel-size", p.pp),
             ("--context-parallel-size", p.cp), ("--micro-batch-size", p.micro_batch),
             ("--global-batch-size", p.global_batch), ("--seq-length", p.seq_len)]
    if p.cp > 1:  # its default, written out: the ring the plan was priced as (rules)
        flags.append(("--cp-comm-type", p.cp_comm))
    if p.sp:
        flags.append(("--sequence-parallel", None))
    if p.pp > 1 and len(set(job.partition)) > 1:
        flags.append(("--pipeline-model-parallel-layout", layout(job.partition)))
    elif p.virtual_stages > 1:
        flags.append(("--num-virtual-stages-per-pipeline-rank", p.virtual_stages))
    if p.recompute == "full":
        flags += [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                  ("--recompute-num-layers", 1)]
    elif p.recompute == "selective":
        flags.append(("--recompute-granularity", "selective"))
    elif p.recompute == "norm_act":
        flags += [("--recompute-granularity", "selective"),
                  ("--recompute-modules", ["layernorm", "moe_act"] if job.model.num_experts else ["layernorm"])]
    flags += {1: [("--use-distributed-optimizer", None)], 3: _zero3(job)}.get(p.zero, [])
    if ",".join(p.placement) == "tp,cp,pp,dp":
        flags.append(("--use-tp-pp-dp-mapping", None))
    if p.zero == 3 and not p.reshard_after_forward:
        flags.append(("--torch-fsdp2-no-reshard-after-forward", None))
    if p.tp_overlap:  # Transformer Engine userbuffers: TP collectives overlapped with the GEMMs
        flags.append(("--tp-comm-overlap", None))
    # Megatron-LM's AttnBackend: flash (FlashAttention through TE), fused (TE's cuDNN kernel), unfused
    flags.append(("--attention-backend", {"flash": "flash", "cudnn": "fused", "naive": "unfused"}[p.attention]))
    if p.mlp_kernel == "eager" and job.model.gated_mlp:
        flags.append(("--no-bias-swiglu-fusion", None))
    flags += {"bf16": [("--bf16", None)], "fp16": [("--fp16", None)],
              # hybrid: E4M3 forward, E5M2 gradients (Micikevicius et al. 2022 sec 3)
              "fp8": [("--bf16", None), ("--fp8-format", "hybrid"), ("--fp8-recipe", p.fp8_recipe)]
              }.get(p.dtype, [])
    if p.dtype != "fp32":
        flags.append(("--grad-reduce-in-bf16", None) if p.grad_reduce_dtype == "bf16"
                     else ("--accumulate-allreduce-grads-in-fp32", None))
    if p.moments_dtype != "fp32":
        flags += [("--use-precision-aware-optimizer", None), ("--exp-avg-dtype", p.moments_dtype),
                  ("--exp-avg-sq-dtype", p.moments_dtype)]
    return flags


def environment(job: TrainJob) -> tuple[tuple[str, str], ...]:
    p = job.plan
    if (p.tp > 1 or p.cp > 1) and p.zero != 3:
        return (("CUDA_DEVICE_MAX_CONNECTIONS", "1"),)
    return ()


def flatten(flags: list[tuple[str, object]]) -> tuple[str, ...]:
    args = []
    for flag, value in flags:  # a list value: one word each (argparse nargs)
        args += [flag] + ([] if value is None else [str(v) for v in value] if isinstance(value, list)
                          else [str(value)])
    return tuple(args)


def export(job: TrainJob) -> Export:
    paths = [("--load", "${CHECKPOINT_PATH}"), ("--tokenizer-type", "HuggingFaceTokenizer"),
             ("--tokenizer-model", "${TOKENIZER_MODEL}"), ("--data-path", "${DATA_PATH}")]
    notes = ("training length, learning rate and its schedule are Megatron-LM's defaults: add "
             "--train-iters and --lr (and --save) for your run",)
    if job.plan.zero == 3 and (job.plan.tp > 1 or job.plan.cp > 1):
        notes += ("TP/CP with FSDP: CUDA_DEVICE_MAX_CONNECTIONS stays unset, as FSDP requires, "
                  "so TP/CP communication is not ordered before compute",)
    return Export("megatron", job.header, environment(job), (), ("pretrain_gpt.py",),
                  flatten(model_args(job) + parallel_args(job) + paths), USER_PATHS, notes)
