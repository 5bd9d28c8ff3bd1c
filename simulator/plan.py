"""Plan and Cluster: one validated, frozen description of how a training step is parallelised.

Axis names follow torchtitan's ParallelDims (dp, tp, cp, pp); `placement` lists the axes
innermost-first, i.e. the order in which consecutive ranks vary (tp innermost by default,
as Megatron-LM and torchtitan place it, so a TP group stays inside a node).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from meshplan.core.fields import from_fields
from meshplan.core.errors import PlanError
from meshplan.core.mesh import Mesh
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.schedule import SCHEDULES
from meshplan.core.io import read_json

RECOMPUTE = ("none", "selective", "full", "op", "norm_act")
# fp8: the weight GEMMs of the decoder layers in FP8, everything else in bf16 (fp8.py)
DTYPES = ("fp32", "bf16", "fp16", "fp8")
# flash: fused attention, no s^2 tensors kept (Dao 2022; FlashAttention-2, scaled_dot_product_
# attention's first choice); cudnn: cuDNN's fused kernel, which Transformer Engine prefers on
# Hopper (its get_attention_backend), priced by the profile's cudnn_attention; naive: explicit
# scores and softmax as in Korthikanti et al. 2022 Table 2.
ATTENTION = (*rules.FUSED_ATTENTION, "naive")
# fused: a gated MLP's activation and gate product in one kernel that saves only its inputs
# (Megatron-LM's bias_swiglu fusion, Transformer Engine, torch.compile); eager: one PyTorch
# op each, which also save the activation's output (memory.mlp_saved_widths)
MLP_KERNELS = ("fused", "eager")
# fused: the norms, RoPE and the gated activation each one kernel over bf16 (torch.compile,
# Transformer Engine, Megatron-LM's fusions); eager: PyTorch ops one kernel each, the norms
# and RoPE through fp32 (torchtitan without compile: ops.eager_bytes_per_element)
ELEMENTWISE = ("fused", "eager")
# The cross-entropy over the logits: fused (Megatron-LM's vocab-parallel cross-entropy: one
# fp32 copy, softmax and gradient in place), eager (PyTorch's F.cross_entropy on an fp32 copy:
# torchtitan without compiling the loss) or compiled (torch.compile of that,
# torchtitan's --compile.components loss); memory.cross_entropy_logits
CROSS_ENTROPY = ("fused", "eager", "compiled")
AXES = rules.AXES
# Bytes of weights, activations and communication per element: an FP8 plan keeps them in
# bf16 and casts to FP8 only at its GEMMs' inputs (fp8.py).
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
# Scaling of FP8 GEMM inputs: torchao's dynamic per-tensor or per-row scales (torchtitan's
# Float8 recipes "tensorwise", "rowwise") or Transformer Engine's delayed scaling.
FP8_RECIPES = ("tensorwise", "rowwise", "delayed")
# MoE token dispatch: NCCL all-to-all of every routed row (Megatron-Core's alltoall
# dispatcher), or DeepEP's node-deduplicated dispatch (its flex dispatcher; cost.ep_comm_s).
MOE_DISPATCHERS = ("alltoall", "deepep")
# Which experts a token is routed to: by the model's learned router (its top-k, taken as
# spread uniformly over the experts), or to k consecutive experts in turn, token t to
# experts k t .. k t + k - 1 mod E (NeMo AutoModel's fake_balanced_gate, FakeBalancedGate in
# components/moe/layers.py, which its performance benchmarks run); cost.groups_hit.
MOE_ROUTINGS = ("learned", "contiguous")
# What an FP8 linear keeps of its input for the backward GEMMs: the FP8 copy it cast
# (Transformer Engine's Linear saves its quantized input) or the bf16 input (torchao's
# Float8Linear saves input_hp and casts again in backward)
FP8_SAVED = ("fp8", "bf16")
# ZeRO-1's gradient and weight sync: reduce-scatter the gradients and all-gather the updated
# weights (Megatron-LM's distributed optimizer, DeepSpeed), or all-reduce the gradients and
# broadcast each rank's updated shard (DDP with torch's ZeroRedundancyOptimizer)
ZERO1_SYNCS = ("reduce_scatter", "all_reduce")
# The passes TP overlap covers: forward and backward (Megatron-LM --tp-comm-overlap:
# Transformer Engine's userbuffers pipeline the backward's GEMMs with their collectives too),
# or the forward alone (torchtitan's async TP: ~20-29% faster forward passes and ~8% faster
# steps on Llama 3 8B and 70B, the PyTorch async-TP post, dev-discuss 2024 topic 209487)
TP_OVERLAP_SCOPES = ("both", "forward")
# How a context-parallel group exchanges keys and values: p2p, Transformer Engine's ring
# (Megatron-LM --cp-comm-type p2p: each step's K,V chunk sent on behind the current block's
# attention; in backward K,V and their gradients in one buffer of their dtype); alltoall and
# allgather, torch's context_parallel rotate methods (set_rotate_method; torchtitan 0.2's
# context_parallel_rotate_method, allgather its and torch's default): the ring by all-to-all,
# or all the chunks gathered once beside the local block; in backward both pass the K,V
# gradients round the ring in fp32 (_cp_options.convert_to_f32) after each block, the last
# pass after the last block (torch _templated_ring_attention_backward); a2a, DeepSpeed-
# Ulysses (Megatron-LM --cp-comm-type a2a): Q,K,V all-to-all'ed to head shards of the whole
# sequence and the output back, exposed. cost.cp_comm_s.
CP_COMMS = ("p2p", "alltoall", "allgather", "a2a")
# When sharded (ZeRO-2/3) gradients are reduced under gradient accumulation: once, in the
# step's last micro-batch, accumulated whole until then (FSDP2's set_requires_gradient_sync
# (False), which torch.distributed.pipelining sets for every other backward:
# stage.backward_maybe_with_nosync), or after each micro-batch's backward, kept sharded
# (FSDP2's and DeepSpeed ZeRO-2/3's default); "default" is the first under a pipeline, the
# second without one.
GRAD_SYNCS = ("default", "last", "each")
# How ZeRO-2/3 hold the weights their collectives move: FSDP2's per-parameter shards, copied
# into each all-gather's input and out of its output, and the gradients into each
# reduce-scatter's input (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py), or flat
# buffers that the collectives read and fill in place, the parameters views into them
# (FSDP1's FlatParameter; Megatron-FSDP's DataParallelBuffer buckets)
FSDP_LAYOUTS = ("per_param", "flat")
# ZeRO-0/1 data parallelism beside TP or PP: DDP's gradient buckets over the weights (PyTorch
# DDP, Megatron-LM's DistributedDataParallel), or FSDP2's replicate, whose unsharded weights
# are a second copy, gathered from the replicated ones at each forward and kept to the
# backward (torch/distributed/_composable/replicate_with_fsdp.py: no post-forward reshard);
# meshplan's executor takes replicate there (executor/parallelize.py apply_dp)
DDP_IMPLS = ("ddp", "replicate")
# The dtype of Adam's two moments: fp32 (mixed precision's, and Transformer Engine FusedAdam's
# default), or bf16 (Megatron-LM's --use-precision-aware-optimizer --exp-avg-dtype bf16
# --exp-avg-sq-dtype bf16; DeepSeek-V3's AdamW, arXiv 2412.19437 sec 3.3.3; torch.optim.Adam
# over bf16 parameters, whose state takes each parameter's dtype)
MOMENTS_DTYPES = ("fp32", "bf16")
EXPERT_AXES = rules.EXPERT_AXES


def grad_sync_once(grad_sync: str, pp):
    """Whether gradients are reduced only in the step's last micro-batch (GRAD_SYNCS),
    per pipeline degree `pp` (an int or an array)."""
    return (grad_sync == "last") | ((grad_sync == "default") & (np.asarray(pp) > 1))


def knob(default=dataclasses.MISSING, help: str = "", choices=None, aliases: tuple[str, ...] = ()):
    """A plan field with what a command line needs to offer it (the CLI derives its plan
    flags from these, so a new knob is added here only)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "aliases": aliases})


@dataclass(frozen=True)
class Cluster:
    """How many devices, and how many sit in one node (share the intra-node fabric)."""

    num_gpus: int
    gpus_per_node: int

    def __post_init__(self):
        issues = [count_issue("cluster", f, getattr(self, f)) for f in ("num_gpus", "gpus_per_node")]
        if any(issues):
            raise PlanError.of([i for i in issues if i])
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise PlanError("cluster.num_gpus", f"{self.num_gpus} GPUs do not fill whole nodes of "
                            f"{self.gpus_per_node}", "use a multiple of the GPUs per node")

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        """Ranks that share one node (all of them on a cluster smaller than a node)."""
        return min(self.num_gpus, self.gpus_per_node)


@dataclass(frozen=True)
class Plan:
    """A training plan. `layer_partition` gives the layers of each virtual pipeline stage in
    pipeline order (pp * virtual_stages entries); None means balanced (see partition.py)."""

    global_batch: int = knob(help="global batch size (sequences)")
    seq_len: int = knob(help="sequence length (tokens)")
    dp: int = knob(1, "data-parallel degree (default: GPUs / (tp*pp*cp))")
    tp: int = knob(1, "tensor-parallel degree")
    pp: int = knob(1, "pipeline-parallel degree")
    cp: int = knob(1, "context-parallel degree")
    sp: bool = knob(False, "sequence parallel (with TP; Megatron-LM's spelling too)",
                    aliases=("--sequence-parallel",))
    zero: int = knob(0, "ZeRO stage (3 = FSDP)", choices=(0, 1, 2, 3))
    recompute: str = knob("none", "activation recompute: selective (Megatron-LM's attention core), "
                          "full (whole layers), op (torchtitan's per-op selective AC), norm_act "
                          "(Megatron-LM's --recompute-modules layernorm moe_act)", choices=RECOMPUTE)
    micro_batch: int = knob(1, "micro-batch size (sequences)")
    schedule: str = knob("1f1b", "pipeline schedule", choices=SCHEDULES)
    virtual_stages: int = knob(1, "model chunks per pipeline rank (interleaved)")
    layer_partition: tuple[int, ...] | None = knob(None, "layers per (virtual) stage, comma "
                                                   "separated, a run as count*repeat (default: balanced)")
    dtype: str = knob("bf16", "compute dtype (mixed precision, fp32 master)", choices=DTYPES)
    attention: str = knob("flash", "attention kernel", choices=ATTENTION)
    mlp_kernel: str = knob("fused", "gated MLP activation: fused (Megatron-LM, Transformer Engine, "
                           "torch.compile) or eager PyTorch ops, which keep more for backward",
                           choices=MLP_KERNELS)
    elementwise: str = knob("fused", "norms, RoPE, the gated activation and naive attention's masked "
                            "softmax: fused kernels (torch.compile, Transformer Engine, Megatron-LM) or "
                            "eager PyTorch ops, one kernel each (torchtitan without --compile.enable)",
                            choices=ELEMENTWISE)
    cross_entropy: str = knob("fused", "the loss over the logits: fused in place (Megatron-LM), eager "
                              "PyTorch on an fp32 copy (torchtitan without compiling the loss) or "
                              "compiled (torchtitan's compiled loss); sets the memory it holds",
                              choices=CROSS_ENTROPY)
    placement: tuple[str, ...] = knob(AXES, f"rank order innermost-first, default {','.join(AXES)}")
    tp_overlap: bool = knob(False, "overlap TP communication with the GEMMs beside it (Megatron-LM "
                            "--tp-comm-overlap, torchtitan async TP; needs sp)")
    tp_overlap_scope: str = knob("both", "the passes tp_overlap covers: forward and backward "
                                 "(Megatron-LM --tp-comm-overlap) or the forward alone (torchtitan "
                                 "async TP)", choices=TP_OVERLAP_SCOPES)
    cp_comm: str = knob("p2p", "how CP exchanges keys and values: p2p ring (Megatron-LM --cp-comm-type "
                        "p2p), torch context_parallel's alltoall or allgather rotation (torchtitan), or "
                        "a2a, Ulysses' all-to-all to head shards (--cp-comm-type a2a)", choices=CP_COMMS)
    kv_repeat: bool = knob(False, "keys and values repeated to the query heads before the attention "
                           "kernel (torchtitan's Llama until 2025, Hugging Face's repeat_kv), not read "
                           "grouped by it")
    reshard_after_forward: bool = knob(True, "ZeRO-3: free gathered weights after forward and "
                                       "gather them again for backward (FSDP2)")
    grad_reduce_dtype: str = knob("fp32", "dtype gradients are kept and reduced in (Megatron-LM "
                                  "main grads, torchtitan's reduce dtype)", choices=("fp32", "bf16"))
    ep: int = knob(1, "expert-parallel degree (Megatron-LM --expert-model-parallel-size)")
    etp: int | None = knob(None, "expert tensor-parallel degree (default: tp; Megatron-LM "
                           "--expert-tensor-parallel-size)")
    moe_capacity_factor: float = knob(1.0, "routed rows of the busiest expert-parallel rank over the "
                                      "balanced share (1: balanced routing; Megatron-LM "
                                      "--moe-expert-capacity-factor with padding)")
    fp8_recipe: str = knob("tensorwise", "FP8 scaling with dtype fp8", choices=FP8_RECIPES)
    fp8_saved_dtype: str = knob("fp8", "what FP8 linears keep of their input for backward: the FP8 "
                                "copy (Transformer Engine, Megatron-LM) or bf16 (torchao, torchtitan)",
                                choices=FP8_SAVED)
    zero1_sync: str = knob("reduce_scatter", "ZeRO-1's sync: reduce-scatter gradients and all-gather "
                           "weights (Megatron-LM's distributed optimizer), or all-reduce gradients and "
                           "broadcast the updated shards (torch's ZeroRedundancyOptimizer)", choices=ZERO1_SYNCS)
    grad_sync: str = knob("default", "ZeRO-2/3 gradients under gradient accumulation: reduced once in "
                          "the last micro-batch, accumulated unsharded until then (last), or after "
                          "each micro-batch (each); default: last with pp > 1 (torch.distributed."
                          "pipelining), each without (FSDP2, DeepSpeed)", choices=GRAD_SYNCS)
    ddp_impl: str = knob("ddp", "ZeRO-0/1 data parallelism beside TP or PP: DDP, or FSDP2's replicate, which "
                         "keeps a second copy of the weights from forward to backward (meshplan's "
                         "executor)", choices=DDP_IMPLS)
    fsdp_layout: str = knob("per_param", "ZeRO-2/3's weights: FSDP2's per-parameter shards, copied in and "
                            "out of each collective's buffer (torchtitan), or flat buffers the collectives "
                            "fill in place (FSDP1's FlatParameter, Megatron-FSDP)", choices=FSDP_LAYOUTS)
    moe_dispatcher: str = knob("alltoall", "MoE token dispatch: NCCL all-to-all, or DeepEP (Megatron-LM "
                               "--moe-token-dispatcher-type flex --moe-enable-deepep)",
                               choices=MOE_DISPATCHERS)
    master_weights: bool = knob(True, "keep fp32 master weights beside the bf16 or fp16 weights (mixed "
                                "precision: Megatron-LM, torchtitan, DeepSpeed), or update those weights in "
                                "place (a bf16 model under torch.optim.Adam: NeMo AutoModel, torchtune; "
                                "Transformer Engine's FusedAdam by default)")
    moments_dtype: str = knob("fp32", "dtype of Adam's two moments: fp32, or bf16 (Megatron-LM's precision-"
                              "aware optimizer; DeepSeek-V3; torch.optim.Adam over bf16 weights)",
                              choices=MOMENTS_DTYPES)
    moe_routing: str = knob("learned", "which experts a token is routed to: by the learned router, or to "
                            "k consecutive experts in turn (NeMo AutoModel's fake_balanced_gate, as its "
                            "benchmarks run)", choices=MOE_ROUTINGS)
    moe_a2a_overlap: bool = knob(False, "overlap the experts' all-to-all of one micro-batch's forward with "
                                 "another's backward compute, and vice versa (Megatron-LM "
                                 "--overlap-moe-expert-parallel-comm; needs ep > 1, and the "
                                 "interleaved schedule with pp > 1)")

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        issues = field_issues(dataclasses.asdict(self))
        if issues:
            raise PlanError.of(issues)
        issues = rules.violations(rules.PLAN, self.fields(), None)
        if issues:
            raise PlanError.of(issues)
        if self.layer_partition is not None:
            object.__setattr__(self, "layer_partition", tuple(self.layer_partition))
        object.__setattr__(self, "placement", tuple(self.placement))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: a pipeline stage's tp*cp*dp ranks over etp*ep
        (Megatron-Core parallel folding)."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def grad_sync_once(self) -> bool:
        """Whether gradients are reduced once per step, in the last micro-batch: ZeRO 0/1's
        whole gradients always, ZeRO-2/3's per grad_sync_once."""
        return self.zero < 2 or bool(grad_sync_once(self.grad_sync, self.pp))

    @property
    def num_virtual(self) -> int:
        """Virtual pipeline stages in total (pp * chunks per rank)."""
        return self.pp * self.virtual_stages

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def summary(self, experts: bool = False) -> str:
        """The plan in one line, naming every knob the planner searches, e.g. "dp16
        tp8+sp+overlap pp8 cp1 zero3-keep rc:full mb1x96 interleaved(v2) order:tp,dp,cp,pp"
        (the expert degrees where the model has experts (`experts`) or they are set; "(fwd)":
        TP overlap in the forward alone (tp_overlap_scope); "(allgather)": CP's exchange
        where it is not the p2p ring (cp_comm); "-keep":
        ZeRO-3 keeping the weights gathered from forward to backward; the placement where it
        is not the default)."""
        overlap = ("+overlap" + ("(fwd)" if self.tp_overlap_scope == "forward" else "")) if self.tp_overlap else ""
        parts = [f"dp{self.dp}", f"tp{self.tp}" + ("+sp" if self.sp else "") + overlap, f"pp{self.pp}",
                 f"cp{self.cp}" + (f"({self.cp_comm})" if self.cp > 1 and self.cp_comm != "p2p" else "")]
        if experts or self.ep > 1 or self.etp != self.tp:
            parts.append(f"ep{self.ep}" + (f"/etp{self.etp}" if self.etp != self.tp else "")
                         + ("+a2a-overlap" if self.moe_a2a_overlap else ""))
        parts += [f"zero{self.zero}" + ("-keep" if self.zero == 3 and not self.reshard_after_forward else ""),
                  f"rc:{self.recompute}", f"mb{self.micro_batch}x{self.num_microbatches}"]
        if self.pp > 1:
            parts.append(self.schedule + (f"(v{self.virtual_stages})" if self.virtual_stages > 1 else ""))
        if self.placement != tuple(AXES):
            parts.append("order:" + ",".join(self.placement))
        return " ".join(parts)

    def mesh(self, gpus_per_node: int) -> Mesh:
        """The ranks of this plan on nodes of `gpus_per_node`, placed innermost-first by
        `placement`."""
        return Mesh.of({"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp},
                       self.placement, gpus_per_node)

    def expert_mesh(self, gpus_per_node: int) -> Mesh:
        """The expert layers' mesh over the same ranks (expert_order)."""
        return Mesh.of({"etp": self.etp, "ep": self.ep, "edp": self.edp, "pp": self.pp},
                       expert_order(self.placement), gpus_per_node)

    def validate(self, model: ModelSpec, cluster: Cluster) -> None:
        """Legality of this plan for this model on this cluster (rules.TRAINING); one
        PlanError naming every rule it breaks."""
        issues = rules.violations(rules.TRAINING, self.fields(), model, cluster)
        if issues:
            raise PlanError.of(issues)

    def fields(self) -> SimpleNamespace:
        """The plan's fields as rules read them (placement as "tp,cp,dp,pp" text)."""
        return rule_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layer_partition"] = list(self.layer_partition) if self.layer_partition else None
        data["placement"] = list(self.placement)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return from_fields(cls, data, "plan.", PlanError, "plan")

# Largest count a plan field or cluster may hold: bounds every loop over divisors and keeps
# products of sizes inside int64 (2**24 sequences, tokens or ranks is beyond any real job).
MAX_COUNT = 2 ** 24
POSITIVE_INTS = ("global_batch", "seq_len", "dp", "tp", "pp", "cp", "micro_batch", "virtual_stages",
                 "ep", "etp")


# The fields a candidate table holds one value of for all its rows (planner/space.py's
# table.attrs, with global_batch and layer_partition); step.rows reads them.
PLAN_WIDE = ("seq_len", "dtype", "attention", "grad_reduce_dtype", "master_weights", "moments_dtype",
             "moe_capacity_factor", "fp8_recipe", "moe_dispatcher", "moe_routing", "mlp_kernel", "elementwise",
             "fp8_saved_dtype", "zero1_sync", "grad_sync", "cross_entropy", "tp_overlap_scope", "cp_comm",
             "kv_repeat", "fsdp_layout", "ddp_impl")


def count_issue(scope: str, field: str, value) -> tuple[str, str, str] | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
        return (f"{scope}.{field}", f"must be a positive integer up to {MAX_COUNT}, got {value!r}",
                f"give an integer from 1 to {MAX_COUNT}")
    return None


def field_issues(values: dict) -> list[tuple[str, str, str]]:
    """The range and choice problems of whichever plan fields `values` holds (a whole plan,
    or the knobs a user fixed before a search), each as (field, problem, fix)."""
    issues = [count_issue("plan", f, values[f]) for f in POSITIVE_INTS if values.get(f) is not None]
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Plan) if f.metadata.get("choices")}
    issues += [(f"plan.{f}", f"unknown {values[f]!r}", f"use one of {', '.join(map(str, options))}")
               for f, options in choices.items() if f in values
               if isinstance(values[f], (list, dict)) or values[f] not in options]
    factor = values.get("moe_capacity_factor", 1.0)
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 1.0 <= factor < float("inf")):
        issues.append(("plan.moe_capacity_factor", f"{factor!r} is not a factor >= 1",
                       "give 1 for balanced routing, or more"))
    placement = values.get("placement", AXES)
    if not isinstance(placement, (list, tuple)) or sorted(map(str, placement)) != sorted(AXES):
        issues.append(("plan.placement", f"{placement!r} is not an order of tp, cp, dp, pp",
                       "list each of tp, cp, dp, pp once, innermost first"))
    return [i for i in issues if i is not None]


def expert_order(placement) -> tuple[str, ...]:
    """The expert mesh's axis order, innermost first: EXPERT_AXES, with pp where the
    attention's placement has it (Megatron-Core builds both meshes from one order string;
    rules.py requires the two to put the same ranks in each pipeline stage)."""
    axes = list(EXPERT_AXES)
    axes.insert(list(placement).index("pp"), "pp")
    return tuple(axes)


def complete_fields(fields: dict, num_gpus: int) -> dict:
    """Plan fields with the data-parallel degree filled from the GPU count when it is the one
    axis left open, and 2 virtual stages for an interleaved schedule of a pipeline that names
    none."""
    fields = dict(fields)
    degrees = [fields.get(axis, 1) for axis in ("tp", "pp", "cp")]
    # a degree that is not a positive integer is left for the plan's range rules to name
    if "dp" not in fields and all(isinstance(d, int) and d >= 1 for d in degrees):
        other = math.prod(degrees)
        if num_gpus % other:
            raise PlanError("cluster.num_gpus", f"{num_gpus} GPUs are not divisible by tp*pp*cp = "
                            f"{other}", "choose tp, pp, cp whose product divides the GPU count")
        fields["dp"] = num_gpus // other
    if (fields.get("schedule") in ("interleaved", "zb-v") and "virtual_stages" not in fields
            and fields.get("pp", 1) != 1):
        fields["virtual_stages"] = 2
    return fields


def rule_fields(values: dict) -> SimpleNamespace:
    """A whole plan's field values as rules read them: expert TP defaulting to TP (as a Plan
    sets it), placement as "tp,cp,dp,pp" text."""
    etp = values["tp"] if values["etp"] is None else values["etp"]
    return SimpleNamespace(**{**values, "etp": etp, "placement": ",".join(values["placement"])})


def checked_plan(fields: dict, model: ModelSpec, cluster: Cluster, also: tuple = ()) -> Plan:
    """The plan of the user's `fields` for `model` on `cluster`, dp filled from the GPU count
    (complete_fields); one PlanError naming every field that is missing, out of range, or
    breaks a legality rule (rules.TRAINING, and the rules `also` holds: what the executor
    runs, for `meshplan run`), the rules that read dp left out where the GPU count leaves dp
    undefined."""
    issues = [(f"plan.{name}", "missing", "give it as a flag (or in a --plan file)")
              for name in ("global_batch", "seq_len") if name not in fields]
    issues += field_issues(fields)
    if issues:   # the rules cannot read a field that is absent or not a number
        raise PlanError.of(issues)
    try:
        fields, open_dp = complete_fields(fields, cluster.num_gpus), False
    except PlanError as exc:
        issues, fields, open_dp = list(exc.issues), {**fields, "dp": 1}, True
    x = rule_fields({f.name: f.default for f in dataclasses.fields(Plan)
                     if f.default is not dataclasses.MISSING} | fields)
    issues += rules.violations(tuple(r for r in rules.TRAINING + also if not (open_dp and "dp" in r.needs)),
                               x, model, cluster)
    if issues:
        raise PlanError.of(issues)
    return Plan(**fields)


def load_plan_fields(path: str) -> dict:
    """The plan fields of a JSON file as written by `simulate --json` (its "plan" key),
    `plan --json` (its winner's) or `plan --emit plan`, or of a hand-written one holding some
    of them (flags or a search fill the rest; checked_plan checks the whole); a null field is
    left to its default, as `simulate --json` writes an etp that follows tp. Keys that are
    not plan fields are one error naming each as the file's key."""
    try:
        data = read_json(path)
    except ValueError as exc:
        raise PlanError("plan_file", f"cannot read {path} ({exc})", "pass a plan JSON file")
    if isinstance(data, dict) and isinstance(data.get("plans"), list) and data["plans"]:
        data = data["plans"][0]  # plan --json: the ranked plans, the winner first
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise PlanError("plan_file", f"{path} does not hold a JSON object", "pass a plan JSON file")
    known = {f.name for f in dataclasses.fields(Plan)}
    unknown = sorted(set(data) - known)
    given = {k: v for k, v in data.items() if v is not None}
    if unknown:  # with the known keys' range and choice problems: every offending field at once
        raise PlanError.of([(f"{path}:{key}", "unknown plan key", "drop it" + (
            f"; a plan file holds only {', '.join(sorted(known))}" if key == unknown[-1] else ""))
            for key in unknown] + field_issues({k: v for k, v in given.items() if k in known}))
    return given
