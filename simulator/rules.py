"""Legality rules, written once, in terms of plan fields: which training and serving plans
are legal for a model on a cluster, which of them the executor can run on this backend,
and which a target framework can run.

A rule reads `x`, an object whose attributes are the plan's fields: plain values for one
plan, or numpy arrays (the planner's candidate table) for many at once, so the same rule
refuses one plan with a message (`violations`) and filters a search space (`holds`). Rules
combine conditions with `&`, `|` and np.logical_not (never `not`, `and`, `or`, or `~` on a
Python bool) so that they broadcast. `needs` lists the fields a
rule reads, so that a search can apply each rule as soon as its table has those columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from meshplan.core.errors import Issue
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.partition import even_partition, split_text

# The attention kernels (plan.ATTENTION) that fuse the scores and keep no s^2 tensors
FUSED_ATTENTION = ("flash", "cudnn")

AXES = ("tp", "cp", "dp", "pp")
# The expert layers' own mesh over a pipeline stage's ranks, innermost first, as
# Megatron-Core orders it (core/parallel_state.py, the expert RankGenerator: order tp-ep-dp
# with tp the expert TP): expert TP, expert parallel, expert data parallel. Megatron-Core's
# "MoE parallel folding" (Liu et al. 2025, arXiv 2504.14960 sec 3): attention runs on
# TP x CP x DP x PP, the expert layers on ETP x EP x EDP x PP over the same ranks, so
# ETP x EP divides TP x CP x DP and EDP = TP x CP x DP / (ETP x EP).
EXPERT_AXES = ("etp", "ep", "edp")
TORCH_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B",
                   "zb-v": "ZBVZeroBubble"}
DEFAULT_ORDER = ",".join(AXES)


@dataclass(frozen=True)
class Rule:
    """`holds(x, model, cluster)` is true where the rule is met; `problem(x, model,
    cluster)` says what is wrong with one plan that breaks it; `fix` what would mend it.
    The issue is reported against `field` (a plan field, or a dotted name such as
    cluster.num_gpus)."""

    field: str
    needs: tuple[str, ...]
    holds: Callable
    problem: Callable
    fix: str


def holds(rules: tuple[Rule, ...], x, model: ModelSpec, cluster=None, available=None) -> np.ndarray:
    """Where every rule (or, with `available`, every rule whose fields are all available)
    holds; broadcast over x's arrays."""
    ok = np.bool_(True)
    for rule in rules:
        if available is None or set(rule.needs) <= set(available):
            ok = ok & np.asarray(rule.holds(x, model, cluster))
    return ok


def violations(rules: tuple[Rule, ...], x, model: ModelSpec, cluster=None) -> list[Issue]:
    """(field, problem, fix) of every rule one plan breaks, in rule order."""
    return [(rule.field, rule.problem(x, model, cluster), rule.fix)
            for rule in rules if not bool(rule.holds(x, model, cluster))]


def _rule(field, needs, holds_, problem, fix) -> Rule:
    return Rule(field, tuple(needs.split()), holds_, problem, fix)


def max_virtual_stages(num_layers: int, pp):
    """The most (virtual) stages per pipeline rank: a layer in every stage but the first and
    the last, which may hold the embedding or the head alone (partition.balanced_shape)."""
    return (num_layers + 2) // pp


def _microbatches(x):
    return x.global_batch // (x.micro_batch * x.dp)


def _stage_ranks(x):
    return x.tp * x.cp * x.dp


def _folds(x):
    """Whether the expert mesh (EXPERT_AXES, pp at the attention placement's index of pp)
    puts the same ranks in each pipeline stage as the attention's: the ranks placed inside
    pp number the same in both (Megatron-Core asserts it: an order ending in pp, or equal
    data-parallel sizes)."""
    placement = np.asarray(x.placement, dtype=str)
    pp_at = np.char.find(placement, "pp")
    dense, expert = 1, 1
    for axis in AXES[:3]:
        dense = dense * np.where(np.char.find(placement, axis) < pp_at, getattr(x, axis), 1)
    for i, size in enumerate((x.etp, x.ep, _stage_ranks(x) // (x.ep * x.etp))):
        expert = expert * np.where(i < pp_at // 3, size, 1)
    return (x.pp == 1) | (dense == expert)


# Rules within the plan alone (checked when a Plan is made).
PLAN = (
    _rule("plan.sp", "sp tp", lambda x, m, c: np.logical_not(x.sp) | (x.tp > 1),
          lambda x, m, c: "sequence parallel needs tensor parallel", "set tp > 1 or drop sp"),
    _rule("plan.virtual_stages", "virtual_stages schedule pp",
          lambda x, m, c: ((x.virtual_stages > 1) == (np.isin(x.schedule, ("interleaved", "zb-v")) & (x.pp > 1)))
          & ((x.schedule != "zb-v") | (x.pp == 1) | (x.virtual_stages == 2))
          | ((x.virtual_stages == 1) & (x.pp == 1)),
          lambda x, m, c: f"{x.virtual_stages} virtual stages with schedule {x.schedule} and pp {x.pp}",
          "use the interleaved schedule with pp >= 2 and virtual_stages >= 2, or zb-v with 2 (its V "
          "of two chunks per rank), or 1 virtual stage otherwise"),
    # a held interleaving schedule asks for a pipeline (a search holding it ranks pp >= 2 alone)
    _rule("plan.schedule", "schedule pp",
          lambda x, m, c: ~np.isin(x.schedule, ("interleaved", "zb-v")) | (x.pp > 1),
          lambda x, m, c: f"schedule {x.schedule} interleaves the stages of a pipeline, and pp is 1",
          "use pp >= 2, or the 1f1b schedule"),
    _rule("plan.tp_overlap", "tp_overlap sp", lambda x, m, c: np.logical_not(x.tp_overlap) | np.asarray(x.sp),
          lambda x, m, c: "overlapping TP communication splits the sequence-parallel collectives",
          "turn on sp, or drop tp_overlap"),
    _rule("plan.reshard_after_forward", "reshard_after_forward zero",
          lambda x, m, c: np.asarray(x.reshard_after_forward) | (x.zero == 3),
          lambda x, m, c: f"resharding after forward is a ZeRO-3 choice, not ZeRO-{x.zero}'s",
          "keep reshard_after_forward with ZeRO 0-2"),
    _rule("plan.global_batch", "global_batch micro_batch dp",
          lambda x, m, c: x.global_batch % (x.micro_batch * x.dp) == 0,
          lambda x, m, c: f"{x.global_batch} is not divisible by micro_batch*dp = {x.micro_batch * x.dp}",
          "make the global batch a multiple of micro-batch x dp"),
    _rule("plan.ep", "ep etp tp cp dp", lambda x, m, c: _stage_ranks(x) % (x.ep * x.etp) == 0,
          lambda x, m, c: f"ep*etp = {x.ep}*{x.etp} does not divide a pipeline stage's tp*cp*dp = "
          f"{_stage_ranks(x)} ranks", "choose ep and etp whose product divides tp*cp*dp (parallel folding)"),
    # Megatron-Core TransformerConfig: expert and tensor parallelism need sequence parallelism
    _rule("plan.sp", "ep tp sp", lambda x, m, c: (x.ep == 1) | (x.tp == 1) | np.asarray(x.sp),
          lambda x, m, c: "expert parallelism with tensor parallelism needs sequence parallelism",
          "turn on sp, or use ep 1 or tp 1"),
    # Megatron-Core TransformerConfig.__post_init__ (overlap_moe_expert_parallel_comm): expert
    # parallelism, virtual pipeline stages when pp > 1 (its combined 1F1B pairs a forward with a
    # backward in interleaved 1F1B or without pipelining), no full recompute, bf16 or fp16 weights
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap ep", lambda x, m, c: np.logical_not(x.moe_a2a_overlap) | (x.ep > 1),
          lambda x, m, c: "overlapping the experts' all-to-all needs expert parallelism (ep 1 exchanges none)",
          "set ep > 1, or drop moe_a2a_overlap"),
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap pp schedule",
          lambda x, m, c: np.logical_not(x.moe_a2a_overlap) | (x.pp == 1) | (x.schedule == "interleaved"),
          lambda x, m, c: f"the all-to-all overlap pairs micro-batches in interleaved 1F1B or without "
          f"pipelining, not in {x.schedule} with pp {x.pp}", "use the interleaved schedule, or pp 1"),
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap recompute",
          lambda x, m, c: np.logical_not(x.moe_a2a_overlap) | (x.recompute != "full"),
          lambda x, m, c: "Megatron-Core refuses full recompute with the all-to-all overlap",
          "use recompute selective or none, or drop moe_a2a_overlap"),
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap dtype",
          lambda x, m, c: np.logical_not(x.moe_a2a_overlap) | (x.dtype != "fp32"),
          lambda x, m, c: "Megatron-Core overlaps the all-to-all only in bf16 or fp16 training",
          "train in bf16 (or fp16, fp8), or drop moe_a2a_overlap"),
    _rule("plan.grad_sync", "grad_sync zero", lambda x, m, c: (x.grad_sync != "each") | (x.zero >= 2),
          lambda x, m, c: f"ZeRO-{x.zero} keeps whole gradients, reduced once per step (DDP's no_sync, "
          "Megatron-LM's gradient buffer)", "use grad_sync default or last, or ZeRO 2 or 3"),
    # without SP every TP rank holds the same tokens, and the experts shard as the dense MLP
    _rule("plan.etp", "etp tp sp", lambda x, m, c: (x.tp == 1) | np.asarray(x.sp) | (x.etp == x.tp),
          lambda x, m, c: f"etp {x.etp} differs from tp {x.tp} without sequence parallelism",
          "turn on sp, or use etp = tp"),
    _rule("plan.master_weights", "master_weights dtype",
          lambda x, m, c: np.asarray(x.master_weights) | np.isin(x.dtype, ["bf16", "fp16"]),
          lambda x, m, c: f"training without master weights updates bf16 or fp16 weights in place, not "
          f"{x.dtype} ones", "keep master_weights, or train in bf16"),
)

# Rules of a plan for a model on a cluster.
TRAINING = PLAN + (
    # per-op selective AC keeps the fused attention kernel's output (ops.op_sac)
    _rule("plan.recompute", "recompute attention",
          lambda x, m, c: (x.recompute != "op") | np.isin(x.attention, FUSED_ATTENTION),
          lambda x, m, c: "per-op recompute is modelled with fused attention, whose output it keeps",
          "plan op recompute with fused (flash or cudnn) attention, or another recompute"),
    _rule("plan.placement", "placement ep etp tp cp dp pp",
          lambda x, m, c: (m.num_experts == 0) | _folds(x),
          lambda x, m, c: f"with placement {x.placement} the expert mesh (etp, ep, edp) would put other "
          f"ranks in each pipeline stage than the attention's", "place pp outermost, or choose "
          "etp*ep = the product of the axes placed inside pp"),
    _rule("cluster.num_gpus", "dp tp pp cp", lambda x, m, c: x.dp * x.tp * x.pp * x.cp == c.num_gpus,
          lambda x, m, c: f"dp*tp*pp*cp = {x.dp}*{x.tp}*{x.pp}*{x.cp} = {x.dp * x.tp * x.pp * x.cp} "
          f"but the cluster has {c.num_gpus} GPUs", "choose dp, tp, pp, cp whose product is the GPU count"),
    _rule("plan.tp", "tp", lambda x, m, c: m.num_heads % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide the {m.num_heads} attention heads",
          "use a TP degree that divides num_heads"),
    _rule("plan.tp", "tp", lambda x, m, c: m.num_kv_heads % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide the {m.num_kv_heads} KV heads",
          "use a TP degree that divides num_key_value_heads"),
    _rule("plan.tp", "tp", lambda x, m, c: m.ffn_hidden_size % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide ffn size {m.ffn_hidden_size}",
          "use a TP degree that divides the MLP width"),
    _rule("plan.etp", "etp", lambda x, m, c: m.moe_ffn_hidden_size % x.etp == 0,
          lambda x, m, c: f"{x.etp} does not divide the experts' width {m.moe_ffn_hidden_size}",
          "use an expert TP degree that divides the expert MLP width"),
    _rule("plan.tp", "tp", lambda x, m, c: (m.num_shared_experts * m.shared_expert_ffn_size) % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide the shared experts' width "
          f"{m.num_shared_experts * m.shared_expert_ffn_size}",
          "use a TP degree that divides the shared experts' MLP width"),
    _rule("plan.ep", "ep etp tp", lambda x, m, c: (m.num_experts > 0) | ((x.ep == 1) & (x.etp == x.tp)),
          lambda x, m, c: f"{m.name} has no experts to place (ep {x.ep}, etp {x.etp})",
          "use ep 1 and leave etp to tp"),
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap",
          lambda x, m, c: np.logical_not(x.moe_a2a_overlap) | (m.num_experts > 0),
          lambda x, m, c: f"{m.name} has no experts, so no all-to-all to overlap", "drop moe_a2a_overlap"),
    _rule("plan.ep", "ep", lambda x, m, c: (m.num_experts == 0) | (m.num_experts % x.ep == 0),
          lambda x, m, c: f"{x.ep} does not divide the {m.num_experts} experts",
          "use an expert-parallel degree that divides num_experts"),
    _rule("plan.seq_len", "seq_len",
          lambda x, m, c: (m.position_embedding != "learned") | (x.seq_len <= m.max_seq_len),
          lambda x, m, c: f"{x.seq_len} exceeds the model's {m.max_seq_len} positions",
          "use a sequence no longer than the model's positions"),
    # load-balanced causal context parallelism splits the sequence in 2*cp chunks
    _rule("plan.cp", "cp seq_len", lambda x, m, c: (x.cp == 1) | (x.seq_len % (2 * x.cp) == 0),
          lambda x, m, c: f"seq_len {x.seq_len} is not divisible by 2*cp = {2 * x.cp}",
          "choose cp so that 2*cp divides the sequence"),
    # Ulysses' all-to-all hands each CP rank whole heads (Transformer Engine asserts it of Q's
    # and K's local heads) and has no latent-attention path (attn_forward_func_with_cp)
    _rule("plan.cp_comm", "cp cp_comm tp",
          lambda x, m, c: (x.cp == 1) | (x.cp_comm != "a2a") | (
              (m.kv_lora_rank == 0) & ((m.num_heads // x.tp) % x.cp == 0)
              & (np.maximum(1, m.num_kv_heads // x.tp) % x.cp == 0)),
          lambda x, m, c: (f"{m.name}'s latent attention has no all-to-all CP" if m.kv_lora_rank else
                           f"all-to-all CP needs cp {x.cp} to divide each TP rank's {m.num_heads // x.tp} "
                           f"query and {max(1, m.num_kv_heads // x.tp)} key/value heads"),
          "plan with cp_comm p2p, or a cp dividing the heads per TP rank"),
    _rule("plan.sp", "sp seq_len cp tp",
          lambda x, m, c: np.logical_not(x.sp) | ((x.seq_len // x.cp) % x.tp == 0),
          lambda x, m, c: f"sequence {x.seq_len // x.cp} per CP rank not divisible by tp {x.tp}",
          "choose seq_len divisible by tp*cp, or drop sp"),
    # eager PyTorch runs the gated activation as PyTorch ops too (memory.mlp_saved_widths)
    _rule("plan.mlp_kernel", "elementwise mlp_kernel",
          lambda x, m, c: (x.elementwise == "fused") | (x.mlp_kernel == "eager") | (not m.gated_mlp),
          lambda x, m, c: "eager elementwise ops run the gated MLP's activation as PyTorch ops too",
          "plan with mlp_kernel eager, or elementwise fused"),
    _rule("plan.pp", "pp virtual_stages",
          lambda x, m, c: x.virtual_stages <= max_virtual_stages(m.num_layers, x.pp),
          lambda x, m, c: f"{m.num_layers} layers cannot fill {x.pp * x.virtual_stages} (virtual) stages "
          f"(at most {m.num_layers + 2}: a layer in each but the first and the last)",
          "use fewer pipeline stages or virtual stages"),
    # Narayanan et al. 2021 sec 2.2.2: interleaving runs micro-batches in groups of pp
    _rule("plan.global_batch", "schedule pp global_batch micro_batch dp",
          lambda x, m, c: (x.schedule != "interleaved") | (x.pp == 1) | (_microbatches(x) % x.pp == 0),
          lambda x, m, c: f"interleaved 1F1B needs micro-batches ({_microbatches(x)}) divisible by "
          f"pp ({x.pp})", "adjust the global batch or the micro-batch"),
    _rule("plan.layer_partition", "layer_partition pp virtual_stages",
          lambda x, m, c: True if x.layer_partition is None else (
              (len(x.layer_partition) == x.pp * x.virtual_stages) & (min(x.layer_partition) >= 0)
              & (min(x.layer_partition[1:-1], default=1) >= 1) & (sum(x.layer_partition) == m.num_layers)),
          lambda x, m, c: f"{list(x.layer_partition)} is not {x.pp * x.virtual_stages} counts summing to "
          f"{m.num_layers} layers, each >= 1 but the first and the last (the embedding's and the head's "
          f"stages, which may hold none)",
          "give one layer count per (virtual) stage, or none for the balanced split"),
)

# What the device can run (`c` is the hardware profile here): FP8 GEMMs only where the
# profile has their throughput (A100: no FP8 tensor cores, NVIDIA A100 datasheet; H100:
# FP8 at 2x BF16, H100 datasheet).
HARDWARE = (
    _rule("plan.dtype", "dtype", lambda x, m, c: np.isin(x.dtype, sorted(set(c.gemm) & set(c.peak_flops))),
          lambda x, m, c: f"{c.name} has no {x.dtype} GEMM throughput in its profile (it lists "
          f"{', '.join(sorted(c.gemm))})", "use bf16, or hardware with FP8 tensor cores (h100-80gb)"),
)
SERVING_HARDWARE = (
    _rule("plan.quantization", "quantization",
          lambda x, m, c: (x.quantization != "fp8") | ("fp8" in c.gemm and "fp8" in c.peak_flops),
          lambda x, m, c: f"{c.name} has no fp8 GEMM throughput in its profile",
          "use int8 or int4 weight-only quantization, or hardware with FP8 tensor cores (h100-80gb)"),
)


def model_features(m: ModelSpec) -> dict[str, bool]:
    """What a model has beyond a dense llama- or gpt2-style decoder (dense MLP, full multi-head
    or grouped-query attention, one norm before each block), by name: present or not."""
    return {"mixture-of-experts": m.num_experts > 0, "shared experts": m.num_shared_experts > 0,
            "dense layers among the expert layers": bool(m.dense_layers),
            "a sigmoid router": m.num_experts > 0 and m.router == "sigmoid",
            "group-limited routing": m.route_groups > 0,
            "latent attention (MLA)": m.kv_lora_rank > 0,
            "sliding-window attention": m.sliding_window is not None, "QK-norm": m.qk_norm,
            "sandwich norms": m.sandwich_norm, "attention-only biases": m.qkv_bias or m.out_bias,
            "an attention output bias": m.out_bias and not m.bias,
            "parallel residual": m.parallel_residual, "partial rotary": m.rotary_pct != 1.0,
            "soft-capping": m.attn_softcap is not None or m.final_softcap is not None,
            "attention sinks": m.attn_sinks, "a router bias": m.router_bias,
            "a clamped SwiGLU": m.swiglu_limit is not None,
            "head_dim other than hidden/heads": m.head_dim is not None and m.head_dim * m.num_heads != m.hidden_size}


def _features_rule(field: str, who: str, builds: tuple[str, ...], fix: str) -> Rule:
    """Refuses a model with a feature of model_features that is not in `builds`."""
    def missing(m):
        return [name for name, present in model_features(m).items() if present and name not in builds]
    return _rule(field, "", lambda x, m, c: not missing(m),
                 lambda x, m, c: f"{who} does not build {', '.join(missing(m))}", fix)


# What the executor cannot run on this backend (torch 2.13, gloo on CPU).
# executor/model.py builds a dense decoder or experts (executor/moe.py: softmax or sigmoid
# routers, group-limited or not, biases on the router and the experts or not, the clamped
# SwiGLU) with shared experts and dense layers among them, standard or latent attention
# with QK-norm, sinks, soft-capping (in its unfused core), any head width and attention-only
# biases, sandwich norms, a parallel residual, partial RoPE, and sliding-window layers (their
# window mask, and in serving their kept window, executor/kv_cache.py)
_EXECUTOR_BUILDS = ("mixture-of-experts", "shared experts", "dense layers among the expert layers",
                    "QK-norm", "sandwich norms", "parallel residual", "partial rotary",
                    "head_dim other than hidden/heads", "attention-only biases", "an attention output bias",
                    "sliding-window attention", "a sigmoid router", "group-limited routing", "a router bias",
                    "attention sinks", "a clamped SwiGLU", "latent attention (MLA)", "soft-capping")


def _executor_model(builds: tuple[str, ...]) -> Rule:
    return _features_rule("model", "the executor's decoder", builds,
                          "run a model without these (README, meshplan run); plan and simulate take this one")


_PIPELINING_SYNC = _rule(
    "plan.grad_sync", "grad_sync pp", lambda x, m, c: (x.pp == 1) | (x.grad_sync != "each"),
    lambda x, m, c: "torch.distributed.pipelining reduces a stage's gradients in its last micro-batch "
    "only (stage.backward_maybe_with_nosync)", "plan with grad_sync default or last, or pp 1")


# Under torch.distributed.pipelining, FSDP2 modules keep their gathered weights after every
# backward but the last (set_reshard_after_backward(False)), so the next forward finds them
# gathered: resharding after forward saves no memory there, and costs a gather a micro-batch
# that meshplan does not price
_PIPELINING_RESHARD = _rule(
    "plan.reshard_after_forward", "reshard_after_forward zero pp",
    lambda x, m, c: np.logical_not(x.reshard_after_forward) | (x.zero != 3) | (x.pp == 1),
    lambda x, m, c: "torch.distributed.pipelining keeps a stage's weights gathered from one backward to "
    "the next forward (stage.backward_maybe_with_nosync), so resharding them after forward frees nothing",
    "plan ZeRO-3 without resharding after forward (--no-reshard-after-forward), or pp 1")


def _sync_each(who: str) -> Rule:
    """`who` reduce-scatters sharded gradients after every micro-batch without a pipeline."""
    return _rule("plan.grad_sync", "grad_sync zero pp global_batch micro_batch dp",
                 lambda x, m, c: (x.grad_sync != "last") | (x.zero < 2) | (x.pp > 1) | (_microbatches(x) == 1),
                 lambda x, m, c: f"{who} reduce-scatters ZeRO-{x.zero} gradients after every micro-batch",
                 "plan with grad_sync default or each")


def _fused_loss(who: str) -> Rule:
    """`who` runs Megatron-LM's fused vocab-parallel cross-entropy."""
    return _rule("plan.cross_entropy", "cross_entropy", lambda x, m, c: x.cross_entropy == "fused",
                 lambda x, m, c: f"{who} computes the loss with Megatron-LM's fused vocab-parallel "
                 f"cross-entropy, not {x.cross_entropy}", "plan with cross_entropy fused")


def _master_weights(who: str) -> Rule:
    """`who` keeps fp32 master weights and Adam moments in mixed precision."""
    return _rule("plan.master_weights", "master_weights", lambda x, m, c: np.asarray(x.master_weights),
                 lambda x, m, c: f"{who} keeps fp32 master weights and Adam moments in mixed precision",
                 "plan with master_weights")


def _learned_routing(who: str) -> Rule:
    """`who` routes tokens with the model's router (plan.MOE_ROUTINGS)."""
    return _rule("plan.moe_routing", "moe_routing", lambda x, m, c: x.moe_routing == "learned",
                 lambda x, m, c: f"{who} routes tokens with the model's router, not to consecutive experts "
                 "in turn (NeMo AutoModel's fake_balanced_gate)", "plan with moe_routing learned")


def _per_param_shards(zero_from: int, why: str) -> Rule:
    """A framework whose ZeRO from stage `zero_from` up copies each parameter's shard into and
    out of its collectives (plan.fsdp_layout per_param), `why`."""
    return _rule("plan.fsdp_layout", "fsdp_layout zero",
                 lambda x, m, c: (x.fsdp_layout == "per_param") | (x.zero < zero_from),
                 lambda x, m, c: why, "plan with fsdp_layout per_param")


def _grouped_kv(who: str, how: str) -> Rule:
    """`who`'s attention reads grouped keys and values (`how`), repeating none (plan.kv_repeat)."""
    return _rule("plan.kv_repeat", "kv_repeat", lambda x, m, c: np.logical_not(x.kv_repeat),
                 lambda x, m, c: f"{who}'s attention reads grouped keys and values ({how}), repeating none",
                 "plan without kv_repeat")


def _cp_comms(who: str, runs: tuple[str, ...], fix: str) -> Rule:
    """`who` exchanges context parallelism's keys and values only as `runs` (plan.CP_COMMS)."""
    return _rule("plan.cp_comm", "cp cp_comm", lambda x, m, c: (x.cp == 1) | np.isin(x.cp_comm, runs),
                 lambda x, m, c: f"{who} exchanges CP's keys and values as {' or '.join(runs)}, not "
                 f"{x.cp_comm}", fix)


EXECUTOR_TRAINING = (
    _executor_model(_EXECUTOR_BUILDS),
    _rule("plan.attention", "attention", lambda x, m, c: (m.attn_softcap is None) | (x.attention == "naive"),
          lambda x, m, c: f"the executor soft-caps attention scores in its unfused core only (SDPA's {x.attention} "
          "kernel takes no cap)", "use attention naive"),
    _master_weights("the executor"),
    _rule("plan.dtype", "dtype", lambda x, m, c: x.dtype != "fp8",
          lambda x, m, c: "the executor runs no FP8 GEMMs", "use bf16"),
    # its experts are dropless: the run prices the imbalance it measures in the factor's place
    _rule("plan.moe_capacity_factor", "moe_capacity_factor", lambda x, m, c: x.moe_capacity_factor == 1.0,
          lambda x, m, c: f"the executor's experts take every routed row, with no capacity to pad to "
          f"({x.moe_capacity_factor}); a run prices the routing imbalance it measures instead",
          "drop moe_capacity_factor"),
    _rule("plan.global_batch", "pp schedule global_batch micro_batch dp",
          lambda x, m, c: (x.pp == 1) | np.logical_not(np.isin(x.schedule, ("1f1b", "zb-h1"))) | (_microbatches(x) >= x.pp),
          lambda x, m, c: f"{x.schedule} needs at least pp = {x.pp} micro-batches, got {_microbatches(x)}",
          "raise the global batch or lower the micro-batch"),
    # (with tp > 1 and no SP, etp must also be tp (TRAINING), so sp is the one way out)
    _rule("plan.sp", "etp tp sp", lambda x, m, c: (m.num_experts == 0) | (x.etp == 1) | (x.tp == 1) | np.asarray(x.sp),
          lambda x, m, c: f"the executor's expert TP gathers each rank's own routed rows over etp {x.etp}, and "
          "without sequence parallelism the TP ranks hold the same tokens", "turn on sp"),
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap", lambda x, m, c: np.logical_not(x.moe_a2a_overlap),
          lambda x, m, c: "the executor runs each micro-batch's forward and backward one after the other, "
          "so no all-to-all overlaps another micro-batch's compute", "drop moe_a2a_overlap"),
    _rule("plan.fsdp_layout", "fsdp_layout", lambda x, m, c: x.fsdp_layout == "per_param",
          lambda x, m, c: "the executor shards ZeRO-2/3 weights per parameter (FSDP2)", "drop fsdp_layout flat"),
    _rule("plan.tp_overlap", "tp_overlap", lambda x, m, c: np.logical_not(x.tp_overlap),
          lambda x, m, c: "the executor runs TP's collectives between its GEMMs (no async TP)",
          "drop tp_overlap"),
    _PIPELINING_SYNC,
    _PIPELINING_RESHARD,
)

# A serving deployment: tp x pp GPUs per replica.
SERVING = (
    _rule("cluster.num_gpus", "tp pp replicas", lambda x, m, c: x.tp * x.pp * x.replicas == c.num_gpus,
          lambda x, m, c: f"tp*pp*replicas = {x.tp}*{x.pp}*{x.replicas} = {x.tp * x.pp * x.replicas} "
          f"but the cluster has {c.num_gpus} GPUs", "choose tp, pp, replicas whose product is the GPU count"),
    _rule("plan.tp", "tp", lambda x, m, c: m.num_heads % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide the {m.num_heads} attention heads",
          "use a TP degree that divides num_heads"),
    # vLLM's QKVParallelLinear replicates KV heads tp/kv times when tp > KV heads
    _rule("plan.tp", "tp", lambda x, m, c: (m.num_kv_heads % x.tp == 0) | (x.tp % m.num_kv_heads == 0),
          lambda x, m, c: f"{x.tp} neither divides nor is a multiple of the {m.num_kv_heads} KV heads",
          "use a TP degree that divides the KV heads, or a multiple of them (each KV head is then "
          "replicated tp/kv times)"),
    _rule("plan.tp", "tp", lambda x, m, c: m.ffn_hidden_size % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide ffn size {m.ffn_hidden_size}",
          "use a TP degree that divides the MLP width"),
    # a served model stays within the positions it was trained for, RoPE or learned (vLLM
    # refuses a --max-model-len past them: vllm/config/model.py _get_and_verify_max_len); training
    # may extend a RoPE model's context, serving only the extended checkpoint
    _rule("plan.prompt_len", "prompt_len gen_len",
          lambda x, m, c: x.prompt_len + x.gen_len <= m.max_seq_len,
          lambda x, m, c: f"prompt_len + gen_len = {x.prompt_len + x.gen_len} exceeds the model's "
          f"{m.max_seq_len} positions", "keep prompt_len + gen_len within the model's positions"),
    _rule("plan.pp", "pp", lambda x, m, c: m.num_layers >= x.pp,
          lambda x, m, c: f"{m.num_layers} layers cannot fill {x.pp} stages", "use fewer pipeline stages"),
    # AWQ/GPTQ kernels need whole groups in every TP shard's input features (vLLM's
    # weight-only methods check input_size_per_partition % group_size)
    _rule("plan.quant_group_size", "quantization quant_group_size tp replicas expert_parallel",
          lambda x, m, c: np.logical_not(np.isin(x.quantization, ("int8", "int4"))) | (
              (_shard_widths(m, x) % x.quant_group_size == 0).all()),
          lambda x, m, c: f"groups of {x.quant_group_size} do not divide every weight's input features "
          f"per rank ({', '.join(map(str, _shard_widths(m, x)))})",
          "use a group size dividing them (64, 32), a smaller tp, or expert_parallel for "
          "mixture-of-experts models"),
    # vLLM's MoE layers run over tp x replicas ranks (FusedMoEParallelConfig flattens TP across DP):
    # each expert's intermediate size split over them, or whole experts with expert parallelism
    _rule("plan.tp", "tp replicas expert_parallel",
          lambda x, m, c: (m.num_experts == 0) | np.asarray(x.expert_parallel)
          | (m.moe_ffn_hidden_size % (x.tp * x.replicas) == 0),
          lambda x, m, c: f"tp*replicas = {x.tp * x.replicas} ranks (vLLM shards the experts over all of "
          f"them) do not divide the experts' width {m.moe_ffn_hidden_size}",
          "choose tp and replicas whose product divides the experts' width, or set expert_parallel"),
    _rule("plan.expert_parallel", "expert_parallel",
          lambda x, m, c: (m.num_experts > 0) | np.logical_not(x.expert_parallel),
          lambda x, m, c: f"{m.name} has no experts to place", "leave expert_parallel off for a dense model"),
    # vLLM ignores the flag on one rank, and gives E mod G ranks one expert more (plans here
    # place the experts evenly: memory and load per rank as priced)
    _rule("plan.expert_parallel", "expert_parallel tp replicas",
          lambda x, m, c: np.logical_not(x.expert_parallel) | (m.num_experts == 0)
          | ((x.tp * x.replicas > 1) & (m.num_experts % (x.tp * x.replicas) == 0)),
          lambda x, m, c: f"expert parallelism spreads the {m.num_experts} experts over tp*replicas = "
          f"{x.tp * x.replicas} ranks, which must be more than 1 and divide them (an even split)",
          "choose tp and replicas whose product divides num_experts, or leave expert_parallel off"),
)


def _shard_widths(m: ModelSpec, x) -> np.ndarray:
    """Input features of the decoder's weight GEMMs on one rank: the hidden size (QKV,
    MLP up) and the widths the output and down projections read: over TP, the routed
    experts' over tp x replicas or whole under expert parallelism."""
    widths = [m.hidden_size, m.num_heads * m.value_head_dim // x.tp, m.ffn_hidden_size // x.tp]
    if m.num_experts:
        widths.append(m.moe_ffn_hidden_size // (1 if x.expert_parallel else x.tp * x.replicas))
    if m.num_shared_experts:
        widths.append(m.shared_ffn_size // x.tp)
    return np.array(widths)

EXECUTOR_SERVING = (
    _executor_model(_EXECUTOR_BUILDS),
    _rule("plan.tp", "tp", lambda x, m, c: (m.num_experts == 0) | (
              (m.moe_ffn_hidden_size % x.tp == 0) & (m.shared_ffn_size % x.tp == 0)),
          lambda x, m, c: f"{x.tp} does not divide the experts' width {m.moe_ffn_hidden_size} and "
          f"the shared experts' {m.shared_ffn_size} (the executor splits each expert over TP)",
          "use a TP degree dividing both"),
    _rule("plan.quantization", "quantization", lambda x, m, c: np.isin(x.quantization, ("none", "int8")),
          lambda x, m, c: f"the executor serves unquantized or int8 weights, not {x.quantization}",
          "use quantization none or int8"),
    _rule("plan.tp", "quantization tp", lambda x, m, c: (x.quantization == "none") | (x.tp == 1),
          lambda x, m, c: "the executor does not tensor-shard int8 weights",
          "use tp 1 (pp and replicas combine with int8)"),
    _rule("plan.tp", "tp", lambda x, m, c: m.num_kv_heads % x.tp == 0,
          lambda x, m, c: f"{x.tp} does not divide the {m.num_kv_heads} KV heads (the executor shards "
          "KV heads, it does not replicate them)", "use a TP degree that divides num_key_value_heads"),
    _rule("plan.gen_len", "gen_len", lambda x, m, c: x.gen_len >= 2,
          lambda x, m, c: "one generated token leaves no decode step to time", "generate 2 or more tokens"),
    _rule("plan.expert_parallel", "expert_parallel", lambda x, m, c: np.logical_not(x.expert_parallel),
          lambda x, m, c: "the executor serves every expert split over TP within a replica",
          "leave expert_parallel off"),
    # the plan prices vLLM's data-parallel MoE (serve_experts.py), not independent copies
    _rule("plan.replicas", "replicas", lambda x, m, c: (m.num_experts == 0) | (x.replicas == 1),
          lambda x, m, c: f"the executor runs {x.replicas} independent replicas, while a mixture-of-experts "
          "serving plan prices vLLM's replicas sharing the experts over tp x replicas ranks",
          "serve one replica of a mixture-of-experts model"),
)


@dataclass(frozen=True)
class Flavor:
    """A model torchtitan builds: `module` its model package (0.2 [model] name, 0.3 --module),
    `name` the flavor, `recipe` the 0.3 config_registry function that selects it (None in 0.2),
    `float8` the Float8 recipe that function converts the linear layers with (None: bf16),
    `shape` as _shape gives it."""

    module: str
    name: str
    recipe: str | None
    float8: str | None
    shape: tuple


def _shape(m: ModelSpec) -> tuple:
    """(layers, hidden, heads, KV heads, head dim, MLP width, vocab, tied, QK-norm, experts,
    experts per token, expert width, shared experts' width, dense layers) of a pre-norm
    RMSNorm SwiGLU decoder, as torchtitan's model registries spell their flavors."""
    return (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_hidden_size,
            m.vocab_size, m.tied_embeddings, m.qk_norm, m.num_experts, m.experts_per_token,
            m.moe_ffn_hidden_size, m.shared_ffn_size, m.dense_layers)


# torchtitan's model registries (models/llama3/__init__.py, models/qwen3/__init__.py; 0.2 at
# v0.2.2, 0.3 at v0.3.0). Llama 3.1 8B/70B/405B; Qwen3-30B-A3B, its MoE flavor (128 experts,
# top 8, QK-norm). 0.3 builds a flavor through a recipe of its config_registry: Llama 1B/3B and
# Qwen3-235B-A22B have none, and llama3_405b converts the linear layers (but lm_head) to
# float8 with the rowwise recipe (components/quantization/float8.py: its default).
_DENSE = (False, False, 0, 0, 0, 0, ())
_LLAMA31 = {"8B": (32, 4096, 32, 8, 128, 14336, 128256) + _DENSE,
            "70B": (80, 8192, 64, 8, 128, 28672, 128256) + _DENSE,
            "405B": (126, 16384, 128, 8, 128, 53248, 128256) + _DENSE}
_QWEN3_30B_A3B = (48, 2048, 32, 4, 128, 6144, 151936, False, True, 128, 8, 768, 0, ())
TORCHTITAN_FLAVORS = {
    "0.3": (Flavor("llama3", "8B", "llama3_8b", None, _LLAMA31["8B"]),
            Flavor("llama3", "70B", "llama3_70b", None, _LLAMA31["70B"]),
            Flavor("llama3", "405B", "llama3_405b", "rowwise", _LLAMA31["405B"]),
            Flavor("qwen3", "30B-A3B", "qwen3_30b_a3b", None, _QWEN3_30B_A3B)),
    "0.2": tuple(Flavor("llama3", k, None, None, v) for k, v in _LLAMA31.items())
    + (Flavor("qwen3", "30B-A3B", None, None, _QWEN3_30B_A3B),),
}
TORCHTITAN_VERSIONS = tuple(TORCHTITAN_FLAVORS)


def torchtitan_flavor(model: ModelSpec, version: str) -> Flavor | None:
    """The flavor of torchtitan `version` with the model's shape, if any."""
    if model.norm != "rmsnorm" or not model.gated_mlp or model.activation != "silu" or any(
            present for name, present in model_features(model).items()
            if name not in ("mixture-of-experts", "QK-norm", "head_dim other than hidden/heads")):
        return None
    return next((f for f in TORCHTITAN_FLAVORS[version] if f.shape == _shape(model)), None)


def _flavor_rule(version: str) -> Rule:
    names = ", ".join(f"{f.module} {f.name}" for f in TORCHTITAN_FLAVORS[version])
    return _rule("model", "", lambda x, m, c: torchtitan_flavor(m, version) is not None,
                 lambda x, m, c: f"torchtitan {version} has no model flavor of this shape (it builds "
                 f"{names} only: layers, width, heads, KV heads, head and MLP widths, vocab, tying, "
                 "QK-norm and experts must match)",
                 "plan a model of one of those shapes, or register a flavor of this shape in "
                 "torchtitan's models and export by hand")


def _float8(m: ModelSpec, version: str) -> str | None:
    flavor = torchtitan_flavor(m, version)
    return flavor.float8 if flavor else None


def _dp_shard(x):
    """torchtitan's data_parallel_shard_degree (ZeRO 0 replicates instead)."""
    return np.where(x.zero == 0, 1, x.dp)


def _deepspeed_partition(x, m, c):
    """The stages hold the layer counts DeepSpeed's split gives them (an unknown partition
    passes where the layers divide evenly, and is checked again, filled in, before export)."""
    if x.layer_partition is None:
        return m.num_layers % x.pp == 0
    return np.array([tuple(x.layer_partition) == even_partition(m.num_layers, int(p)) for p in np.atleast_1d(x.pp)])


# Of model_features, what the Megatron-LM export writes (exports/megatron.py model_args).
_MEGATRON_BUILDS = ("mixture-of-experts", "shared experts", "dense layers among the expert layers",
                    "group-limited routing",
                    "a sigmoid router", "QK-norm", "attention-only biases", "partial rotary",
                    "head_dim other than hidden/heads")

# The frameworks' ZeRO-0/1 data parallelism is DDP's (FSDP2's replicate is the executor's)
_DDP = _rule("plan.ddp_impl", "ddp_impl", lambda x, m, c: x.ddp_impl == "ddp",
             lambda x, m, c: "FSDP2's replicate beside TP or PP is meshplan's executor's data parallelism",
             "plan with ddp_impl ddp")

_TORCHTITAN = (
    _flavor_rule("0.3"),
    _DDP,
    _learned_routing("torchtitan"),
    # torch's context_parallel rotates K,V by all-to-all or all-gather (set_rotate_method)
    _cp_comms("torchtitan (torch's context_parallel)", ("allgather", "alltoall"),
              "plan with cp_comm allgather (or alltoall for torchtitan 0.2)"),
    # models/*/model.py since v0.2.2: scaled_dot_product_attention(..., enable_gqa=...)
    _grouped_kv("torchtitan", "enable_gqa"),
    _per_param_shards(2, "torchtitan shards ZeRO-2/3 weights per parameter (FSDP2)"),
    # FSDP2's MixedPrecisionPolicy keeps the sharded parameters in fp32 (torchtitan's
    # training.mixed_precision_param is the dtype they are gathered in); training.dtype
    # bfloat16 keeps "all parameters, gradients, and optimizer states in bfloat16, without an
    # extra copy of fp32 weights" (config/job_config.py 0.2, config/configs.py 0.3)
    _rule("plan.master_weights", "master_weights moments_dtype dtype",
          lambda x, m, c: np.asarray(x.master_weights) | ((x.moments_dtype == "bf16") & (x.dtype == "bf16")),
          lambda x, m, c: "torchtitan keeps fp32 master weights, or with training.dtype bfloat16 bf16 weights, "
          f"gradients and moments, not {x.dtype} weights with {x.moments_dtype} moments",
          "plan with master_weights, or without them with bf16 moments in bf16"),
    _rule("plan.attention", "attention", lambda x, m, c: x.attention == "flash",
          lambda x, m, c: "torchtitan runs scaled_dot_product_attention, whose first choice is its flash "
          f"backend (or flex attention), not {x.attention} attention", "plan with flash attention"),
    # async TP works in a compiled model; compiling fuses the elementwise ops, the gated
    # MLP's activation with them, and nothing else does
    _rule("plan.elementwise", "tp_overlap elementwise",
          lambda x, m, c: ~np.asarray(x.tp_overlap, dtype=bool) | (x.elementwise == "fused"),
          lambda x, m, c: "torchtitan's async TP compiles the model, which fuses the elementwise ops",
          "plan with elementwise fused, or without tp_overlap"),
    # its async TP (torch's micro-pipeline TP) speeds the forward, little of the backward
    # (the PyTorch async-TP post: forward passes ~20-29% faster, steps ~8%)
    _rule("plan.tp_overlap_scope", "tp_overlap tp_overlap_scope",
          lambda x, m, c: ~np.asarray(x.tp_overlap, dtype=bool) | (x.tp_overlap_scope == "forward"),
          lambda x, m, c: "torchtitan's async TP overlaps the forward's TP communication, not the backward's",
          "plan with tp_overlap_scope forward, or without tp_overlap"),
    _rule("plan.mlp_kernel", "elementwise mlp_kernel",
          lambda x, m, c: (x.mlp_kernel == "fused") | (x.elementwise == "eager") | (not m.gated_mlp),
          lambda x, m, c: "torchtitan runs the MLP's activation eager only uncompiled, which leaves the "
          "norms and RoPE eager too", "plan with elementwise eager too, or mlp_kernel fused"),
    # --compile.components model,loss (its default): the loss compiles with the model
    _rule("plan.cross_entropy", "elementwise cross_entropy",
          lambda x, m, c: x.cross_entropy == np.where(x.elementwise == "fused", "compiled", "eager"),
          lambda x, m, c: f"torchtitan {'compiles' if x.elementwise == 'fused' else 'runs eager'} the loss "
          f"with the model, not {x.cross_entropy}",
          "plan with cross_entropy compiled (elementwise fused) or eager (elementwise eager)"),
    # its SelectiveAC is per-op (ops.op_sac); FullAC checkpoints whole blocks
    _rule("plan.recompute", "recompute", lambda x, m, c: (x.recompute != "selective") & (x.recompute != "norm_act"),
          lambda x, m, c: "torchtitan's selective activation checkpointing is per-op (recompute op), not "
          f"Megatron-LM's module recompute ({x.recompute})", "plan with recompute op, full or none"),
    # torchao's Float8Linear keeps the bf16 input for backward (matmul_with_hp_or_float8_args)
    _rule("plan.fp8_saved_dtype", "dtype fp8_saved_dtype", lambda x, m, c: (x.dtype != "fp8") | (x.fp8_saved_dtype == "bf16"),
          lambda x, m, c: "torchtitan's float8 linears (torchao) keep their bf16 input for backward",
          "plan with fp8_saved_dtype bf16"),
    # torchtitan runs zero-bubble schedules only with >= 2 stages per rank
    _rule("plan.schedule", "pp schedule",
          lambda x, m, c: (x.pp == 1) | np.isin(x.schedule, list(TORCH_SCHEDULES)),
          lambda x, m, c: f"torchtitan has no single-stage schedule {x.schedule} (its zero-bubble "
          "schedules need >= 2 stages per rank)", "plan with the 1f1b, gpipe, interleaved or zb-v schedule"),
    _rule("plan.zero", "zero", lambda x, m, c: x.zero != 1,
          lambda x, m, c: "ZeRO-1 has no torchtitan form (it replicates or shards with FSDP2)",
          "plan with ZeRO 0, 2 (FSDP2 without resharding after forward) or 3 (FSDP2)"),
    _PIPELINING_SYNC,
    _PIPELINING_RESHARD,
    # its trainer leaves FSDP2's gradient sync on through gradient accumulation (trainer.py)
    _sync_each("torchtitan without a pipeline"),
    _rule("plan.sp", "tp sp", lambda x, m, c: (x.tp == 1) | np.asarray(x.sp),
          lambda x, m, c: "torchtitan's tensor parallelism always shards norms over the sequence "
          "(SequenceParallel)", "plan with sequence parallelism"),
    _rule("plan.placement", "placement", lambda x, m, c: x.placement == DEFAULT_ORDER,
          lambda x, m, c: f"torchtitan's device mesh orders ranks {DEFAULT_ORDER} innermost first, "
          f"not {x.placement}", f"plan with placement {DEFAULT_ORDER}"),
    _rule("plan.dtype", "dtype", lambda x, m, c: x.dtype != "fp16",
          lambda x, m, c: "torchtitan trains in bf16 or fp32", "plan with bf16"),
    # torchtitan trainer.py: seq_len divisible by tp (sequence parallel) x 2 cp (load balancing)
    _rule("plan.seq_len", "seq_len tp cp",
          lambda x, m, c: x.seq_len % (x.tp * np.where(x.cp > 1, 2 * x.cp, 1)) == 0,
          lambda x, m, c: f"torchtitan needs the sequence {x.seq_len} divisible by tp x 2cp",
          "choose a sequence length divisible by tp x 2cp"),
    # TrainingConfig.mixed_precision_reduce: Literal["float32"]
    _rule("plan.grad_reduce_dtype", "grad_reduce_dtype", lambda x, m, c: x.grad_reduce_dtype == "fp32",
          lambda x, m, c: "torchtitan reduces gradients in float32 only (mixed_precision_reduce)",
          "plan with grad_reduce_dtype fp32"),
    # ParallelDims: the experts' FSDP axis efsdp = dp_shard * cp * tp / (etp * ep)
    _rule("plan.ep", "ep etp dp zero cp tp",
          lambda x, m, c: (_dp_shard(x) * x.cp * x.tp) % (x.ep * x.etp) == 0,
          lambda x, m, c: f"torchtitan takes expert parallelism from the sharded data-parallel, CP and "
          f"TP ranks ({_dp_shard(x) * x.cp * x.tp}), which ep*etp = {x.ep * x.etp} does not divide",
          "choose ep dividing dp*cp*tp with ZeRO 2 or 3 (ZeRO 0 replicates, and EP cannot span replicas)"),
    # torchtitan's routed experts are dropless (no capacity, no padding)
    _rule("plan.moe_capacity_factor", "moe_capacity_factor", lambda x, m, c: x.moe_capacity_factor == 1.0,
          lambda x, m, c: f"torchtitan's experts are dropless, with no capacity factor ({x.moe_capacity_factor})",
          "plan with moe_capacity_factor 1"),
    # its pipeline schedules (torch.distributed.pipelining) run a stage's forward and backward
    # of different micro-batches one after the other, each with its own all-to-all
    _rule("plan.moe_a2a_overlap", "moe_a2a_overlap", lambda x, m, c: np.logical_not(x.moe_a2a_overlap),
          lambda x, m, c: "torchtitan has no flag that overlaps one micro-batch's expert all-to-all with "
          "another's compute (Megatron-Core's combined 1F1B)", "plan without moe_a2a_overlap, or export for megatron"),
)

# What each training framework can run; x.placement is the "tp,cp,dp,pp" text. A key with a
# space names an older version of a target ("torchtitan 0.2"); the bare name is the newest.
FRAMEWORKS = {
    "torchtitan": _TORCHTITAN + (
        # 0.3 converts to float8 in a recipe's model spec, which no flag reaches
        _rule("plan.dtype", "dtype", lambda x, m, c: (x.dtype == "fp8") == (_float8(m, "0.3") is not None),
              lambda x, m, c: f"torchtitan 0.3's recipe for this model trains in "
              f"{'float8' if _float8(m, '0.3') else 'bf16'}, not {x.dtype} (float8 is set in a "
              "recipe's model converters, which no flag reaches; llama3_405b has them)",
              "plan with fp8 (rowwise) for Llama 3.1 405B and bf16 otherwise, or export for torchtitan 0.2"),
        _rule("plan.fp8_recipe", "dtype fp8_recipe",
              lambda x, m, c: (x.dtype != "fp8") | (_float8(m, "0.3") in (None, x.fp8_recipe)),
              lambda x, m, c: f"torchtitan 0.3's recipe for this model scales float8 {_float8(m, '0.3')}, "
              f"not {x.fp8_recipe}", "plan with the recipe's fp8_recipe (rowwise for llama3_405b)"),
        # ParallelDims 0.3: EP borrows ranks from FSDP and TP; the experts shard over TP only without EP
        _rule("plan.etp", "ep etp tp", lambda x, m, c: x.etp == np.where(x.ep > 1, 1, x.tp),
              lambda x, m, c: f"torchtitan 0.3 runs the experts with expert TP 1 under EP, else TP's "
              f"(etp {x.etp} with ep {x.ep}, tp {x.tp})", "plan with etp 1 when ep > 1, etp = tp otherwise"),
        _rule("plan.moe_dispatcher", "moe_dispatcher", lambda x, m, c: x.moe_dispatcher == "alltoall",
              lambda x, m, c: "torchtitan 0.3 sets DeepEP in a recipe's model (moe_comm_backend), which no "
              "flag reaches", "plan with the alltoall dispatcher, or export for torchtitan 0.2"),
        # 0.3 has no rotate-method option: torch's default, _ContextParallelOptions.rotate_method
        _cp_comms("torchtitan 0.3 (torch's default rotation)", ("allgather",),
                  "plan with cp_comm allgather, or export for torchtitan 0.2"),
    ),
    "torchtitan 0.2": (_flavor_rule("0.2"),) + _TORCHTITAN[1:] + (
        # optimizer.implementation fused_opt_states_bf16 came after v0.2.2 (torchtitan #2732)
        _rule("plan.moments_dtype", "master_weights moments_dtype",
              lambda x, m, c: np.logical_not(x.master_weights) | (x.moments_dtype == "fp32"),
              lambda x, m, c: "torchtitan 0.2's AdamW keeps fp32 moments beside fp32 master weights",
              "plan with fp32 moments, or export for torchtitan 0.3"),
        # torchtitan 0.2 models/llama3/infra/parallelize.py: apply_ddp on a 1-D mesh only
        _rule("plan.zero", "zero dp tp pp cp",
              lambda x, m, c: (x.zero != 0) | (x.dp == 1) | ((x.tp == 1) & (x.pp == 1) & (x.cp == 1)),
              lambda x, m, c: "torchtitan 0.2 replicates with DDP only when no other axis is parallel",
              "plan with ZeRO 2 or 3, or export for torchtitan 0.3"),
        # job_config.py Float8Linear.recipe_name: tensorwise, rowwise, rowwise_with_gw_hp
        _rule("plan.fp8_recipe", "dtype fp8_recipe", lambda x, m, c: (x.dtype != "fp8") | (x.fp8_recipe != "delayed"),
              lambda x, m, c: "torchtitan 0.2's float8 (torchao) has no delayed scaling",
              "plan with fp8_recipe tensorwise or rowwise"),
        # the float8 grouped GEMM of the experts is a prototype there (quantize.grouped_mm.float8)
        _rule("plan.dtype", "dtype", lambda x, m, c: (x.dtype != "fp8") | (m.num_experts == 0),
              lambda x, m, c: "torchtitan 0.2 converts the experts' grouped GEMMs to float8 only as a "
              "prototype", "plan a mixture-of-experts model with bf16"),
        # ParallelDims 0.2: "Currently we only support ETP=TP or ETP=1"
        _rule("plan.etp", "ep etp tp", lambda x, m, c: (x.etp == x.tp) | ((x.ep > 1) & (x.etp == 1)),
              lambda x, m, c: f"torchtitan 0.2 runs the experts with TP's degree, or expert TP 1 under EP, "
              f"not etp {x.etp} (ep {x.ep}, tp {x.tp})", "plan with etp = tp, or etp 1 with ep > 1"),
    ),
    "megatron": (
        _DDP,
        # --moe-router-force-load-balancing draws random scores: learned-like spread, not in turn
        _learned_routing("Megatron-LM"),
        # --cp-comm-type p2p (its default) or a2a; its all_gather (Transformer Engine's
        # AttnFuncWithCPAndKVAllGather) leaves the gather exposed, which cp_comm_s does not price
        _cp_comms("Megatron-LM (as priced)", ("p2p", "a2a"), "plan with cp_comm p2p or a2a"),
        _grouped_kv("Megatron-LM", "Transformer Engine's num_gqa_groups"),
        _master_weights("Megatron-LM's distributed optimizer"),
        # --use-precision-aware-optimizer (bf16 moments) asserts --use-distributed-optimizer
        _rule("plan.moments_dtype", "moments_dtype zero", lambda x, m, c: (x.moments_dtype == "fp32") | (x.zero == 1),
              lambda x, m, c: f"Megatron-LM keeps {x.moments_dtype} moments only in its distributed optimizer "
              f"(--use-precision-aware-optimizer), not with ZeRO-{x.zero}", "plan with ZeRO 1, or fp32 moments"),
        # Transformer Engine's LayerNorm / RMSNorm kernels and Megatron-Core's fused RoPE
        _rule("plan.elementwise", "elementwise", lambda x, m, c: x.elementwise == "fused",
              lambda x, m, c: "Megatron-LM runs its norms and RoPE as fused kernels",
              "plan with elementwise fused"),
        _rule("plan.recompute", "recompute", lambda x, m, c: x.recompute != "op",
              lambda x, m, c: "Megatron-LM recomputes whole layers or chosen modules, not torchtitan's "
              "per-op selection", "plan with recompute selective, full or none"),
        _rule("plan.zero1_sync", "zero zero1_sync", lambda x, m, c: (x.zero != 1) | (x.zero1_sync == "reduce_scatter"),
              lambda x, m, c: "Megatron-LM's distributed optimizer reduce-scatters gradients and all-gathers "
              "the updated weights", "plan with zero1_sync reduce_scatter"),
        # Transformer Engine's Linear saves the quantized input it cast (module/linear.py)
        _rule("plan.fp8_saved_dtype", "dtype fp8_saved_dtype", lambda x, m, c: (x.dtype != "fp8") | (x.fp8_saved_dtype == "fp8"),
              lambda x, m, c: "Megatron-LM's FP8 linears (Transformer Engine) keep their input in FP8 for backward",
              "plan with fp8_saved_dtype fp8"),
        _rule("plan.schedule", "pp schedule",
              lambda x, m, c: (x.pp == 1) | np.isin(x.schedule, ["1f1b", "interleaved"]),
              lambda x, m, c: f"Megatron-LM runs 1F1B or interleaved 1F1B, not {x.schedule}",
              "plan with the 1f1b or interleaved schedule"),
        _rule("plan.zero", "zero pp", lambda x, m, c: (x.zero <= 1) | ((x.zero == 3) & (x.pp == 1)),
              lambda x, m, c: f"ZeRO-{x.zero} has no Megatron-LM flag here (distributed optimizer = "
              "ZeRO-1; FSDP = ZeRO-3, and not with pipeline parallelism)", "plan with ZeRO 0 or 1"),
        _rule("plan.placement", "placement",
              lambda x, m, c: np.isin(x.placement, [DEFAULT_ORDER, "tp,cp,pp,dp"]),
              lambda x, m, c: f"Megatron-LM orders ranks tp-cp-dp-pp (or tp-cp-pp-dp with "
              f"--use-tp-pp-dp-mapping), not {x.placement}", f"plan with placement {DEFAULT_ORDER}"),
        _rule("plan.tp", "tp", lambda x, m, c: m.num_kv_heads % x.tp == 0,
              lambda x, m, c: "Megatron-LM's --tensor-model-parallel-size must divide the KV heads",
              "choose such a TP degree"),
        _rule("plan.dtype", "dtype zero", lambda x, m, c: (x.dtype != "fp16") | (x.zero != 3),
              lambda x, m, c: "Megatron-LM's FSDP does not train in fp16", "plan with bf16"),
        _features_rule("model", "Megatron-LM's GPT model as exported here", _MEGATRON_BUILDS,
                       "plan a model without them, or add their Megatron-LM flags by hand"),
        # TransformerConfig.fp8_recipe: tensorwise, delayed, mxfp8, blockwise (Transformer Engine)
        _rule("plan.fp8_recipe", "dtype fp8_recipe", lambda x, m, c: (x.dtype != "fp8") | (x.fp8_recipe != "rowwise"),
              lambda x, m, c: "Megatron-LM's FP8 recipes (Transformer Engine) are tensorwise, delayed, "
              "blockwise and mxfp8, not torchao's rowwise", "plan with fp8_recipe tensorwise or delayed"),
        # TransformerConfig: the flex dispatcher with the deepep backend cannot pad to capacity
        _rule("plan.moe_capacity_factor", "moe_capacity_factor moe_dispatcher",
              lambda x, m, c: (x.moe_capacity_factor == 1.0) | (x.moe_dispatcher != "deepep"),
              lambda x, m, c: "Megatron-LM's DeepEP dispatcher does not pad the experts' input to a capacity "
              f"({x.moe_capacity_factor})", "plan DeepEP with moe_capacity_factor 1, or the alltoall dispatcher"),
        # validate_args: --grad-reduce-in-bf16 takes effect with --bf16 only
        _rule("plan.grad_reduce_dtype", "grad_reduce_dtype dtype",
              lambda x, m, c: (x.grad_reduce_dtype == "fp32") | np.isin(x.dtype, ["bf16", "fp8"]),
              lambda x, m, c: f"Megatron-LM reduces gradients in bf16 only when training in bf16, not {x.dtype}",
              "plan with grad_reduce_dtype fp32"),
        # its FSDP2 wrapper's no_sync is the base class's no-op (data_parallel_base.py), and
        # Megatron-FSDP syncs sharded gradients in no_sync too (megatron_fsdp.py)
        _sync_each("Megatron-LM's FSDP"),
        _fused_loss("Megatron-LM"),
        # ZeRO-3 by PyTorch FSDP2 (--use-torch-fsdp2: per-parameter shards), which refuses tied
        # embeddings and expert parallelism, or by Megatron-FSDP (flat buckets), which shards both
        _rule("plan.fsdp_layout", "fsdp_layout zero ep",
              lambda x, m, c: ((x.zero < 3) | (x.fsdp_layout == "flat")
                               | (np.logical_not(m.tied_embeddings) & (x.ep == 1))),
              lambda x, m, c: "Megatron-LM's per-parameter ZeRO-3 (PyTorch FSDP2) refuses tied embeddings and "
              "expert parallelism", "plan with fsdp_layout flat (Megatron-FSDP)"),
        # Megatron-FSDP always reshards
        _rule("plan.reshard_after_forward", "reshard_after_forward fsdp_layout zero",
              lambda x, m, c: np.asarray(x.reshard_after_forward) | (x.fsdp_layout == "per_param") | (x.zero < 3),
              lambda x, m, c: "Megatron-FSDP (ZeRO-3 in flat buffers) reshards after forward",
              "keep reshard_after_forward, or plan with fsdp_layout per_param (PyTorch FSDP2 takes "
              "--torch-fsdp2-no-reshard-after-forward)"),
    ),
    "deepspeed": (
        _DDP,
        _learned_routing("DeepSpeed-MoE"),
        # bf16_optimizer_states asserts bf16_master_weights_and_grads, which keeps fp32 moments
        # only offloaded to DeepSpeedCPUAdam (runtime/config.py, base_optimizer.py
        # _configure_master_weights): two layouts on the GPU, ZeRO 1-3 for the second
        _rule("plan.master_weights", "master_weights moments_dtype zero dtype",
              lambda x, m, c: np.where(x.master_weights, x.moments_dtype == "fp32",
                                       (x.moments_dtype == "bf16") & (x.zero >= 1) & (x.dtype == "bf16")),
              lambda x, m, c: "DeepSpeed keeps fp32 master weights with fp32 moments, or bf16 weights and "
              "gradients with bf16 moments (bf16_master_weights_and_grads, bf16_optimizer_states; ZeRO 1-3), "
              f"not {'fp32 master weights' if x.master_weights else f'{x.dtype} weights'} with "
              f"{x.moments_dtype} moments{' under ZeRO-0' if x.zero == 0 and not x.master_weights else ''}",
              "plan with master_weights and fp32 moments, or without master weights with bf16 moments, "
              "ZeRO 1-3 and bf16"),
        # zero_optimization.reduce_scatter (default true) with the partitioned weights all-gathered
        _rule("plan.zero1_sync", "zero zero1_sync", lambda x, m, c: (x.zero != 1) | (x.zero1_sync == "reduce_scatter"),
              lambda x, m, c: "DeepSpeed's ZeRO-1 reduce-scatters gradients and all-gathers the updated weights",
              "plan with zero1_sync reduce_scatter"),
        _rule("plan.recompute", "recompute", lambda x, m, c: (x.recompute != "op") & (x.recompute != "norm_act"),
              lambda x, m, c: "Megatron-DeepSpeed recomputes whole layers or the attention core, not "
              f"{'torchtitan' if x.recompute == 'op' else 'Megatron-Core'}'s {x.recompute} selection",
              "plan with recompute selective, full or none"),
        _rule("plan.cp", "cp", lambda x, m, c: x.cp == 1,
              lambda x, m, c: "DeepSpeed has no ring context parallelism", "plan with cp 1"),
        # its GPT model runs FlashAttention (--use-flash-attn-v2) or the unfused core
        _rule("plan.attention", "attention", lambda x, m, c: x.attention != "cudnn",
              lambda x, m, c: "Megatron-DeepSpeed has no cuDNN fused attention", "plan with flash or naive attention"),
        _rule("plan.schedule", "pp schedule", lambda x, m, c: (x.pp == 1) | (x.schedule == "1f1b"),
              lambda x, m, c: "the DeepSpeed pipeline engine runs its own 1F1B schedule",
              "plan with the 1f1b schedule"),
        _rule("plan.zero", "pp zero", lambda x, m, c: (x.pp == 1) | (x.zero <= 1),
              lambda x, m, c: "ZeRO-2 and ZeRO-3 are incompatible with DeepSpeed pipeline parallelism",
              "plan with ZeRO 0 or 1, or pp 1"),
        _sync_each("DeepSpeed"),
        _fused_loss("Megatron-DeepSpeed"),
        _rule("plan.placement", "placement", lambda x, m, c: x.placement == DEFAULT_ORDER,
              lambda x, m, c: f"DeepSpeed's topology orders ranks model, data, pipe innermost first, "
              f"not {x.placement}", f"plan with placement {DEFAULT_ORDER}"),
        # Megatron-DeepSpeed builds a PipelineModule with partition_method="type:transformer",
        # whose partition_balanced (deepspeed/runtime/utils.py, a dynamic program over the layer
        # specs weighted 1 for a transformer layer, 0 else) gives the first stages the remainder:
        # even_partition, equal for every layer count to 96 and pp to 33 under DeepSpeed 0.19.8
        _rule("plan.layer_partition", "pp layer_partition",
              lambda x, m, c: (x.pp == 1) | _deepspeed_partition(x, m, c),
              lambda x, m, c: f"DeepSpeed's PipelineModule (partition_method type:transformer) splits the "
              f"{m.num_layers} transformer layers over {x.pp} stages as "
              f"{split_text(even_partition(m.num_layers, x.pp))}, the remainder to the first stages, "
              + (f"not as {split_text(x.layer_partition)}" if x.layer_partition
                 else "where the split priced without --layer-partition balances the embedding and head"),
              "plan with --layer-partition set to DeepSpeed's split, or a pp dividing the layers"),
        _features_rule("model", "Megatron-DeepSpeed's GPT model", ("mixture-of-experts",),
                       "plan a model without them, or export for megatron"),
        _rule("plan.dtype", "dtype", lambda x, m, c: x.dtype != "fp8",
              lambda x, m, c: "Megatron-DeepSpeed trains in bf16, fp16 or fp32, not FP8", "plan with bf16"),
        _rule("plan.tp_overlap", "tp_overlap", lambda x, m, c: np.logical_not(x.tp_overlap),
              lambda x, m, c: "Megatron-DeepSpeed does not overlap TP communication with the GEMMs",
              "plan without tp_overlap"),
        _rule("plan.reshard_after_forward", "reshard_after_forward", lambda x, m, c: np.asarray(x.reshard_after_forward),
              lambda x, m, c: "DeepSpeed ZeRO-3 gathers the parameters again for backward (it has no "
              "reshard_after_forward=False)", "keep reshard_after_forward, or plan with ZeRO 2"),
        # ZeRO-3 copies each bucket's shards into the gather's input (torch.cat out= its partition),
        # the gathered partitions out into each parameter (AllGatherCoalescedHandle.wait's
        # torch.cat) and the gradients into the reduce-scatter's input (reduce_scatter_coalesced):
        # FSDP2's copies (partition_parameters.py, comm/coalesced_collectives.py)
        _per_param_shards(3, "DeepSpeed ZeRO-3 copies each parameter's shard into the all-gather and out of "
                          "it, as FSDP2 does, not into flat buffers"),
        # DeepSpeed-MoE (deepspeed/moe/layer.py MoE, built by Megatron-DeepSpeed's ParallelTransformerLayer
        # from --moe-expert-parallel-size): expert-parallel groups are carved out of the data-parallel
        # ranks (deepspeed/utils/groups.py), and the experts shard over TP with
        # --enable-expert-tensor-parallelism or not at all
        _rule("plan.ep", "ep dp", lambda x, m, c: x.dp % x.ep == 0,
              lambda x, m, c: f"DeepSpeed-MoE forms expert-parallel groups from the data-parallel ranks, and "
              f"ep {x.ep} does not divide dp {x.dp}", "choose ep dividing dp"),
        _rule("plan.etp", "etp tp", lambda x, m, c: x.etp == x.tp,
              lambda x, m, c: f"DeepSpeed-MoE's experts under TP run on every TP rank (replicated, or "
              f"sharded over all of them), not expert TP {x.etp} of tp {x.tp}", "plan with etp = tp"),
        _rule("plan.zero", "zero", lambda x, m, c: (m.num_experts == 0) | (x.zero <= 2),
              lambda x, m, c: "DeepSpeed-MoE does not run under ZeRO-3", "plan with ZeRO 0-2"),
        _rule("plan.moe_dispatcher", "moe_dispatcher", lambda x, m, c: x.moe_dispatcher == "alltoall",
              lambda x, m, c: "DeepSpeed-MoE dispatches with its all-to-all only", "plan with the alltoall dispatcher"),
        _rule("plan.moe_a2a_overlap", "moe_a2a_overlap", lambda x, m, c: np.logical_not(x.moe_a2a_overlap),
              lambda x, m, c: "DeepSpeed-MoE runs its all-to-all inside each micro-batch's own forward and "
              "backward, overlapped with no other micro-batch", "plan without moe_a2a_overlap, or export for megatron"),
        # Megatron-DeepSpeed's ParallelMLP: swiglu(x) = F.silu(x[0]) * x[1], no fused kernel
        _rule("plan.mlp_kernel", "mlp_kernel",
              lambda x, m, c: (x.mlp_kernel == "eager") | (not m.gated_mlp),
              lambda x, m, c: "Megatron-DeepSpeed runs its SwiGLU as eager PyTorch ops",
              "plan with mlp_kernel eager"),
    ),
    "plan": (),
}
