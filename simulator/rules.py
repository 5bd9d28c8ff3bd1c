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

AXES = ("tp", "cp", "dp", "pp")
# The expert layers' own mesh over a pipeline stage's ranks, innermost first, as
# Megatron-Core orders it (core/parallel_state.py, the expert RankGenerator: order tp-ep-dp
# with tp the expert TP): expert TP, expert parallel, expert data parallel. Megatron-Core's
# "MoE parallel folding" (Liu et al. 2025, arXiv 2504.14960 sec 3): attention runs on
# TP x CP x DP x PP, the expert layers on ETP x EP x EDP x PP over the same ranks, so
# ETP x EP divides TP x CP x DP and EDP = TP x CP x DP / (ETP x EP).
EXPERT_AXES = ("etp", "ep", "edp")
TORCH_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}
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
          lambda x, m, c: ((x.virtual_stages > 1) == ((x.schedule == "interleaved") & (x.pp > 1)))
          | ((x.virtual_stages == 1) & (x.pp == 1)),
          lambda x, m, c: f"{x.virtual_stages} virtual stages with schedule {x.schedule} and pp {x.pp}",
          "use the interleaved schedule with pp >= 2 and virtual_stages >= 2, or 1 virtual "
          "stage otherwise"),
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
    # without SP every TP rank holds the same tokens, and the experts shard as the dense MLP
    _rule("plan.etp", "etp tp sp", lambda x, m, c: (x.tp == 1) | np.asarray(x.sp) | (x.etp == x.tp),
          lambda x, m, c: f"etp {x.etp} differs from tp {x.tp} without sequence parallelism",
          "turn on sp, or use etp = tp"),
)

# Rules of a plan for a model on a cluster.
TRAINING = PLAN + (
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
    _rule("plan.sp", "sp seq_len cp tp",
          lambda x, m, c: np.logical_not(x.sp) | ((x.seq_len // x.cp) % x.tp == 0),
          lambda x, m, c: f"sequence {x.seq_len // x.cp} per CP rank not divisible by tp {x.tp}",
          "choose seq_len divisible by tp*cp, or drop sp"),
    _rule("plan.pp", "pp virtual_stages", lambda x, m, c: m.num_layers >= x.pp * x.virtual_stages,
          lambda x, m, c: f"{m.num_layers} layers cannot fill {x.pp * x.virtual_stages} (virtual) stages",
          "use fewer pipeline stages or virtual stages"),
    # Narayanan et al. 2021 sec 2.2.2: interleaving runs micro-batches in groups of pp
    _rule("plan.global_batch", "schedule pp global_batch micro_batch dp",
          lambda x, m, c: (x.schedule != "interleaved") | (x.pp == 1) | (_microbatches(x) % x.pp == 0),
          lambda x, m, c: f"interleaved 1F1B needs micro-batches ({_microbatches(x)}) divisible by "
          f"pp ({x.pp})", "adjust the global batch or the micro-batch"),
    _rule("plan.layer_partition", "layer_partition pp virtual_stages",
          lambda x, m, c: True if x.layer_partition is None else (
              (len(x.layer_partition) == x.pp * x.virtual_stages) & (min(x.layer_partition) >= 1)
              & (sum(x.layer_partition) == m.num_layers)),
          lambda x, m, c: f"{list(x.layer_partition)} is not {x.pp * x.virtual_stages} positive counts "
          f"summing to {m.num_layers} layers",
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


def _model_features(m: ModelSpec) -> list[str]:
    """What of the model the executor's decoder (executor/model.py: full multi-head or
    grouped-query attention, one norm before each block, dense or softmax-routed experts,
    executor/moe.py) does not build."""
    checks = ((m.num_experts > 0 and m.router != "softmax", f"{m.router}-scored expert routing"),
              (m.num_experts > 0 and m.bias, "biases in experts"),
              (m.kv_lora_rank > 0, "latent attention (MLA)"),
              (m.sliding_window is not None, "sliding-window attention"), (m.qk_norm, "QK-norm"),
              (m.sandwich_norm, "sandwich norms"), (m.qkv_bias or m.out_bias, "attention-only biases"),
              (m.parallel_residual, "parallel residual"), (m.rotary_pct != 1.0, "partial rotary"),
              (m.attn_softcap is not None or m.final_softcap is not None, "soft-capping"),
              (m.head_dim is not None and m.head_dim * m.num_heads != m.hidden_size,
               "head_dim other than hidden/heads"))
    return [name for present, name in checks if present]


def _model_rule(field: str) -> Rule:
    return _rule(field, "", lambda x, m, c: not _model_features(m),
                 lambda x, m, c: f"the executor's decoder does not build {', '.join(_model_features(m))}",
                 "run a dense llama- or gpt2-style model; plan and simulate take this one")


# What the executor cannot run on this backend (torch 2.13, gloo on CPU).
EXECUTOR_TRAINING = (
    _model_rule("model"),
    _rule("plan.dtype", "dtype", lambda x, m, c: x.dtype != "fp8",
          lambda x, m, c: "the executor runs no FP8 GEMMs", "use bf16"),
    _rule("plan.cp", "cp", lambda x, m, c: x.cp == 1,
          lambda x, m, c: "context parallel cannot run here: torch's ring attention has no DTensor "
          "rule for the CPU attention kernel", "use cp 1"),
    _rule("plan.pp", "pp", lambda x, m, c: np.logical_not(m.tied_embeddings) | (x.pp == 1),
          lambda x, m, c: "tied embeddings would sit on the first and last pipeline stages",
          "use pp 1 for a model with tie_word_embeddings"),
    _rule("plan.zero", "zero dp tp pp", lambda x, m, c: np.logical_not((x.zero == 1) & (x.dp > 1) & ((x.tp > 1) | (x.pp > 1))),
          lambda x, m, c: "ZeRO 1 runs as DDP + ZeroRedundancyOptimizer, and in torch 2.13 DDP takes "
          "neither TP's DTensor parameters nor pipeline stages", "use ZeRO 0, 2 or 3 with tp or pp"),
    _rule("plan.global_batch", "pp schedule global_batch micro_batch dp",
          lambda x, m, c: (x.pp == 1) | np.logical_not(np.isin(x.schedule, ("1f1b", "zb-h1"))) | (_microbatches(x) >= x.pp),
          lambda x, m, c: f"{x.schedule} needs at least pp = {x.pp} micro-batches, got {_microbatches(x)}",
          "raise the global batch or lower the micro-batch"),
    _rule("plan.etp", "etp", lambda x, m, c: (m.num_experts == 0) | (x.etp == 1),
          lambda x, m, c: f"the executor runs each expert whole on one rank, not over etp {x.etp}",
          "use etp 1 (with tp > 1 that needs sp)"),
    _rule("plan.zero", "zero ep", lambda x, m, c: (x.ep == 1) | (x.zero != 1),
          lambda x, m, c: "ZeRO 1's ZeroRedundancyOptimizer would shard the expert-parallel "
          "experts' optimizer over dp as if they were replicated there",
          "use ZeRO 0, 2 or 3 with ep > 1"),
    _rule("plan.moe_dispatcher", "moe_dispatcher", lambda x, m, c: x.moe_dispatcher == "alltoall",
          lambda x, m, c: f"the executor dispatches tokens with torch's all_to_all, not {x.moe_dispatcher}",
          "use moe_dispatcher alltoall"),
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
    _rule("plan.prompt_len", "prompt_len gen_len",
          lambda x, m, c: (m.position_embedding != "learned") | (x.prompt_len + x.gen_len <= m.max_seq_len),
          lambda x, m, c: f"prompt_len + gen_len = {x.prompt_len + x.gen_len} exceeds the model's "
          f"{m.max_seq_len} positions", "keep prompt_len + gen_len within the model's positions"),
    _rule("plan.pp", "pp", lambda x, m, c: m.num_layers >= x.pp,
          lambda x, m, c: f"{m.num_layers} layers cannot fill {x.pp} stages", "use fewer pipeline stages"),
    # AWQ/GPTQ kernels need whole groups in every TP shard's input features (vLLM's
    # weight-only methods check input_size_per_partition % group_size)
    _rule("plan.quant_group_size", "quantization quant_group_size tp",
          lambda x, m, c: np.logical_not(np.isin(x.quantization, ("int8", "int4"))) | (
              (_shard_widths(m, x.tp) % x.quant_group_size == 0).all()),
          lambda x, m, c: f"groups of {x.quant_group_size} do not divide every weight's input features "
          f"per TP rank ({', '.join(map(str, _shard_widths(m, x.tp)))})",
          "use a group size dividing them (64, 32), or a smaller tp"),
)


def _shard_widths(m: ModelSpec, tp) -> np.ndarray:
    """Input features of the decoder's weight GEMMs on one TP rank: the hidden size (QKV,
    MLP up) and the sharded widths the output and down projections read."""
    widths = [m.hidden_size, m.num_heads * m.value_head_dim // tp, m.ffn_hidden_size // tp]
    if m.num_experts:
        widths.append(m.moe_ffn_hidden_size // tp)
    if m.num_shared_experts:
        widths.append(m.shared_ffn_size // tp)
    return np.array(widths)

EXECUTOR_SERVING = (
    _model_rule("model"),
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
    _rule("plan.pp", "pp", lambda x, m, c: np.logical_not(m.tied_embeddings) | (x.pp == 1),
          lambda x, m, c: "tied embeddings would sit on the first and last pipeline stages",
          "use pp 1 for a model with tie_word_embeddings"),
    _rule("plan.gen_len", "gen_len", lambda x, m, c: x.gen_len >= 2,
          lambda x, m, c: "one generated token leaves no decode step to time", "generate 2 or more tokens"),
)


# torchtitan builds models only from its registry's flavors (torchtitan/models/llama3/__init__.py):
# (layers, hidden, heads, KV heads, MLP width, vocab, tied embeddings) of each, by version.
_LLAMA31 = {"8B": (32, 4096, 32, 8, 14336, 128256, False), "70B": (80, 8192, 64, 8, 28672, 128256, False),
            "405B": (126, 16384, 128, 8, 53248, 128256, False)}
# 0.3 selects a flavor through a recipe of its config_registry: 1B and 3B have none, and the
# 405B one (llama3_405b) converts the linear layers to float8, which no plan here describes.
TORCHTITAN_FLAVORS = {"0.3": {k: _LLAMA31[k] for k in ("8B", "70B")}, "0.2": _LLAMA31}
TORCHTITAN_VERSIONS = tuple(TORCHTITAN_FLAVORS)


def torchtitan_flavor(model: ModelSpec, version: str) -> str | None:
    """The llama3 flavor of torchtitan `version` with the model's shape, if any."""
    shape = (model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads,
             model.ffn_hidden_size, model.vocab_size, model.tied_embeddings)
    return next((name for name, dims in TORCHTITAN_FLAVORS[version].items()
                 if dims == shape and model.norm == "rmsnorm" and model.gated_mlp), None)


def _flavor_rule(version: str) -> Rule:
    names = ", ".join(TORCHTITAN_FLAVORS[version])
    return _rule("model", "", lambda x, m, c: torchtitan_flavor(m, version) is not None,
                 lambda x, m, c: f"torchtitan {version} has no llama3 flavor of this shape (it builds "
                 f"{names} only: layers, width, heads, KV heads, MLP width, vocab and tying must match)",
                 "plan a model of one of those shapes, or register a flavor of this shape in "
                 "torchtitan's models/llama3 and export by hand")


def _uniform_partition(x, m, c):
    """The (virtual) stages hold equal layer counts (an unknown partition passes here and
    is checked again, filled in, before export)."""
    return (m.num_layers % (x.pp * x.virtual_stages) == 0) & (
        True if x.layer_partition is None else len(set(x.layer_partition)) == 1)


_TORCHTITAN = (
    _flavor_rule("0.3"),
    _rule("plan.attention", "attention", lambda x, m, c: x.attention == "flash",
          lambda x, m, c: "torchtitan runs fused attention (SDPA / flex) only", "plan with flash attention"),
    # torchtitan runs zero-bubble schedules only with >= 2 stages per rank
    _rule("plan.schedule", "pp schedule",
          lambda x, m, c: (x.pp == 1) | np.isin(x.schedule, list(TORCH_SCHEDULES)),
          lambda x, m, c: f"torchtitan has no single-stage schedule {x.schedule} (its zero-bubble "
          "schedules need >= 2 stages per rank)", "plan with the 1f1b, gpipe or interleaved schedule"),
    _rule("plan.zero", "zero", lambda x, m, c: x.zero != 1,
          lambda x, m, c: "ZeRO-1 has no torchtitan form (it replicates or shards with FSDP2)",
          "plan with ZeRO 0, 2 (FSDP2 without resharding after forward) or 3 (FSDP2)"),
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
)

# What each training framework can run; x.placement is the "tp,cp,dp,pp" text. A key with a
# space names an older version of a target ("torchtitan 0.2"); the bare name is the newest.
FRAMEWORKS = {
    "torchtitan": _TORCHTITAN,
    "torchtitan 0.2": (_flavor_rule("0.2"),) + _TORCHTITAN[1:] + (
        # torchtitan 0.2 models/llama3/infra/parallelize.py: apply_ddp on a 1-D mesh only
        _rule("plan.zero", "zero dp tp pp cp",
              lambda x, m, c: (x.zero != 0) | (x.dp == 1) | ((x.tp == 1) & (x.pp == 1) & (x.cp == 1)),
              lambda x, m, c: "torchtitan 0.2 replicates with DDP only when no other axis is parallel",
              "plan with ZeRO 2 or 3, or export for torchtitan 0.3"),
    ),
    "megatron": (
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
    ),
    "deepspeed": (
        _rule("plan.cp", "cp", lambda x, m, c: x.cp == 1,
              lambda x, m, c: "DeepSpeed has no ring context parallelism", "plan with cp 1"),
        _rule("plan.schedule", "pp schedule", lambda x, m, c: (x.pp == 1) | (x.schedule == "1f1b"),
              lambda x, m, c: "the DeepSpeed pipeline engine runs its own 1F1B schedule",
              "plan with the 1f1b schedule"),
        _rule("plan.zero", "pp zero", lambda x, m, c: (x.pp == 1) | (x.zero <= 1),
              lambda x, m, c: "ZeRO-2 and ZeRO-3 are incompatible with DeepSpeed pipeline parallelism",
              "plan with ZeRO 0 or 1, or pp 1"),
        _rule("plan.placement", "placement", lambda x, m, c: x.placement == DEFAULT_ORDER,
              lambda x, m, c: f"DeepSpeed's topology orders ranks model, data, pipe innermost first, "
              f"not {x.placement}", f"plan with placement {DEFAULT_ORDER}"),
        # Megatron-DeepSpeed builds a PipelineModule with partition_method="type:transformer"
        _rule("plan.layer_partition", "pp virtual_stages layer_partition",
              lambda x, m, c: (x.pp == 1) | _uniform_partition(x, m, c),
              lambda x, m, c: f"DeepSpeed's PipelineModule splits the {m.num_layers} transformer layers "
              f"evenly over {x.pp} stages, not as {list(x.layer_partition or ())}",
              "plan with a pp that divides the layers and --layer-partition giving equal stages"),
    ),
    "plan": (),
}
