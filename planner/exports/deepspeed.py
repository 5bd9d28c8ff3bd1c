"""DeepSpeed: a Megatron-DeepSpeed pretrain_gpt.py command line and its ds_config
(microsoft/Megatron-DeepSpeed megatron/arguments.py spellings; deepspeed.ai/docs/config-json).

Megatron-DeepSpeed splits the model (tensor parallel from its Megatron fork, pipeline through
DeepSpeed's PipelineModule, partition_method "type:transformer") and hands deepspeed.initialize
an mpu that supplies the data-parallel size. The ds_config therefore gives the micro-batch and
the accumulation steps and lets DeepSpeed derive train_batch_size (= micro x steps x DP), so
it also validates where no mpu is given. Its optimizer and activation-checkpointing sections
say what the Megatron flags run (Megatron-DeepSpeed builds the optimizer from --optimizer/--lr
and passes it to DeepSpeed, which then uses it rather than the section).
"""
from __future__ import annotations

import json

from meshplan.core.errors import PlanError
from meshplan.planner.exports import Export, TrainJob
from meshplan.planner.exports.megatron import flatten

USER_PATHS = (("CHECKPOINT_PATH", "Megatron-DeepSpeed checkpoint folder of the model's weights (--load)"),
              ("TOKENIZER_MODEL", "the model's Hugging Face tokenizer (folder or name)"),
              ("DATA_PATH", "prefix of the Megatron-indexed training data (.bin/.idx)"))
# AdamW as meshplan's executor and the simulator's optimizer state assume (2 moments);
# betas and epsilon of Megatron-DeepSpeed's --adam-beta1/2 and --adam-eps defaults.
ADAM = {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}


def ds_config(job: TrainJob) -> dict:
    p = job.plan
    config = {"train_micro_batch_size_per_gpu": p.micro_batch,
              "gradient_accumulation_steps": p.num_microbatches,
              "zero_optimization": {"stage": p.zero},
              "optimizer": {"type": "AdamW", "params": ADAM},
              # the dtype gradients are all-reduced / reduce-scattered in
              "communication_data_type": p.grad_reduce_dtype,
              "gradient_clipping": 1.0, "steps_per_print": 10}
    if p.dtype in ("bf16", "fp16"):
        config[p.dtype] = {"enabled": True}
    if not p.master_weights:  # the bf16 weights updated in place, bf16 gradients and moments
        config["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    if p.recompute == "full":  # deepspeed.checkpointing recomputes whole layers
        # partition_activations shards each checkpointed layer input over the TP ranks, as
        # sequence parallelism keeps it (Korthikanti et al. 2022 sec. 4.2.2)
        config["activation_checkpointing"] = {
            "partition_activations": p.sp, "contiguous_memory_optimization": False,
            "cpu_checkpointing": False, "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False, "profile": False}
    return config


def model_args(job: TrainJob) -> list[tuple[str, object]]:
    m, ckpt = job.model, job.checkpoint
    if ckpt.rope_scaling is not None:
        raise PlanError("emit.deepspeed", "Megatron-DeepSpeed has no Llama 3.1 RoPE scaling",
                        "export this model for megatron or torchtitan")
    # an MoE model's every layer is an expert layer here (rules: no dense layers among them), whose
    # experts are Megatron-DeepSpeed's ParallelMLP of --ffn-hidden-size
    flags = [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
             ("--ffn-hidden-size", m.moe_ffn_hidden_size if m.num_experts else m.ffn_hidden_size),
             ("--num-attention-heads", m.num_heads),
             ("--max-position-embeddings", max(m.max_seq_len, job.plan.seq_len)),
             ("--normalization", m.norm), ("--layernorm-epsilon", ckpt.norm_eps)]
    if m.num_kv_heads != m.num_heads:
        flags.append(("--num-key-value-heads", m.num_kv_heads))
    flags += [(flag, value) for cond, flag, value in (
        (m.gated_mlp and m.activation == "silu", "--swiglu", None),
        (not m.tied_embeddings, "--untie-embeddings-and-output-weights", None),
        (not m.bias, "--disable-bias-linear", None),
        (not m.dropout, "--attention-dropout", 0.0), (not m.dropout, "--hidden-dropout", 0.0),
        (m.position_embedding == "rope", "--use-rotary-position-embeddings", None),
        (m.position_embedding == "rope", "--no-position-embedding", None),
        (m.position_embedding == "rope", "--rotary-position-embeddings-theta",
         int(ckpt.rope_theta or 10000))) if cond]
    return flags + (moe_args(job) if m.num_experts else [])


def moe_args(job: TrainJob) -> list[tuple[str, object]]:
    """DeepSpeed-MoE layers (deepspeed.moe.layer.MoE) as Megatron-DeepSpeed builds them from its
    arguments: every --expert-interval-th layer, top-k gating, expert parallelism over the
    data-parallel ranks, capacity padded to the plan's factor (its gate drops rows above it)."""
    m, p = job.model, job.plan
    flags = [("--num-experts", m.num_experts), ("--expert-interval", 1), ("--topk", m.experts_per_token),
             ("--moe-expert-parallel-size", p.ep), ("--moe-train-capacity-factor", p.moe_capacity_factor)]
    if p.tp > 1:  # the experts shard over TP as the dense MLP does (rules: etp = tp)
        flags.append(("--enable-expert-tensor-parallelism", None))
    if p.zero:  # ZeRO partitions the experts' parameters apart from the dense ones
        flags.append(("--create-moe-param-group", None))
    return flags


def parallel_args(job: TrainJob) -> list[tuple[str, object]]:
    p = job.plan
    flags = [("--tensor-model-parallel-size", p.tp), ("--pipeline-model-parallel-size", p.pp),
             ("--micro-batch-size", p.micro_batch), ("--global-batch-size", p.global_batch),
             ("--seq-length", p.seq_len), ("--optimizer", "adam"), ("--lr", ADAM["lr"]),
             ("--adam-beta1", ADAM["betas"][0]), ("--adam-beta2", ADAM["betas"][1]),
             ("--adam-eps", ADAM["eps"]), ("--weight-decay", ADAM["weight_decay"]), ("--clip-grad", 1.0)]
    if p.pp == 1:  # DeepSpeed's pipeline engine takes no ZeRO-2/3; a 1-stage job runs without it
        flags.append(("--no-pipeline-parallel", None))
    if p.sp:
        flags.append(("--sequence-parallel", None))
    if p.recompute == "full":
        flags += [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                  ("--deepspeed-activation-checkpointing", None)]
        if p.sp:
            flags.append(("--partition-activations", None))
    elif p.recompute == "selective":
        flags.append(("--recompute-granularity", "selective"))
    if p.attention == "flash":
        flags.append(("--use-flash-attn-v2", None))
    flags += {"bf16": [("--bf16", None)], "fp16": [("--fp16", None)]}.get(p.dtype, [])
    flags += [("--deepspeed", None), ("--deepspeed_config", "ds_config.json"), ("--zero-stage", p.zero)]
    return flags


def export(job: TrainJob) -> Export:
    paths = [("--load", "${CHECKPOINT_PATH}"), ("--tokenizer-type", "HFTokenizer"),
             ("--tokenizer-model", "${TOKENIZER_MODEL}"), ("--data-path", "${DATA_PATH}")]
    notes = ("training length is Megatron-DeepSpeed's default: add --train-iters (and --save) "
             "for your run",)
    config = json.dumps(ds_config(job), indent=2) + "\n"
    env = (("CUDA_DEVICE_MAX_CONNECTIONS", "1"),) if job.plan.tp > 1 else ()
    return Export("deepspeed", job.header, env, (("ds_config.json", config),), ("pretrain_gpt.py",),
                  flatten(model_args(job) + parallel_args(job) + paths), USER_PATHS, notes)
