"""Apply a Plan to a model with PyTorch's own parallel APIs, one function per parallelism.

Order (torchtitan's parallelize_llama): pipeline splitting first (pipeline.py), then on each
stage module `apply_tp` (tensor + sequence parallel, DTensor), `apply_ep` (experts split
over the expert mesh's ep axis, moe.py), `apply_recompute` (activation checkpointing) and
last `apply_dp` (DDP or FSDP2 over the dp mesh dimension), so that data parallelism wraps
modules whose parameters are already sharded; DDP leaves the EP-sharded experts to
moe.reduce_expert_gradients over the expert mesh's edp axis.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                         checkpoint_wrapper)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel,
                                               loss_parallel, parallelize_module)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from meshplan.executor.adamw import MomentsAdamW
from meshplan.executor.context_parallel import ContextParallel
from meshplan.executor.measure import ActivationMeter
from meshplan.executor.model import Attention, LatentAttention, Transformer, set_context_parallel
from meshplan.executor.moe import (WIDTH_DIMS, ExpertSharding, MoE, expert_parameters, gather_experts,
                                   reduce_expert_gradients, route_in_turn, shard_expert_width,
                                   shard_experts, sharded_experts)
from meshplan.executor.zero_one import ZeroOneOptimizer
from meshplan.core.mesh import Mesh
from meshplan.simulator.plan import Plan


def build_mesh(mesh: Mesh, device_type: str) -> DeviceMesh:
    """torch's DeviceMesh of the ranks `mesh` places: one dimension per axis, outermost
    first (mesh.placement lists them innermost first), size-1 dimensions kept so every axis
    can be looked up by name."""
    names = tuple(reversed(mesh.placement))
    return init_device_mesh(device_type, tuple(mesh.size(n) for n in names), mesh_dim_names=names)


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool,
             training: bool = False) -> None:
    """Megatron-LM tensor parallelism (Shoeybi et al. 2019 sec 3): column-parallel Q/K/V and
    MLP-in, row-parallel attention-out and MLP-down, vocab-parallel embedding and head; with
    sequence parallelism (Korthikanti et al. 2022 sec 4.2) the norms and the residual stream
    are sharded on the sequence dimension between the TP regions. Mirrors torchtitan's
    apply_tp: for `training` the head's logits stay a DTensor sharded on the vocabulary,
    Shard(-1), for the vocab-parallel cross-entropy (executor/loss.py), and the
    embeddings' gradients keep their weights' sharding; for generation the logits are
    gathered (replicated)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    head = (ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
            if training else ColwiseParallel(input_layouts=seq, output_layouts=Replicate()))
    edges = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
             "pos_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
             "output": head}
    if sequence_parallel:
        edges["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, {k: v for k, v in edges.items()
                                        if getattr(model, k) is not None})
    for embedding in (model.tok_embeddings, model.pos_embeddings):
        if training and embedding is not None:
            keep_gradient_sharded(embedding.weight)
    for layer in model.layers.values():
        region = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        layer_plan = {"attention": region, "attention.wo": RowwiseParallel(output_layouts=seq)}
        attention = layer.attention
        if isinstance(attention, LatentAttention):
            # the heads' up-projections split by head; the down-projections and latent norms
            # whole on every rank, their weights replicated DTensors fed the replicated
            # input, so that the heads' parts of their gradients are summed (torchtitan's
            # DeepSeek-V3 plan, its NoParallel)
            layer_plan.update({f"attention.{name}": ColwiseParallel()
                               for name in ("wq_b" if attention.q_low_rank else "wq", "wkv_b")})
            for name in ("wq_a", "q_norm", "wkv_a", "kv_norm"):
                if hasattr(attention, name):
                    distribute_module(getattr(attention, name), tp_mesh)
        else:
            layer_plan.update({f"attention.{name}": ColwiseParallel() for name in ("wq", "wk", "wv")})
            if attention.sinks is not None:  # one per head: split as the heads are
                attention.sinks = nn.Parameter(distribute_tensor(attention.sinks.detach(), tp_mesh, [Shard(0)]))
        moe = layer.feed_forward if isinstance(layer.feed_forward, MoE) else None
        if moe is not None and sequence_parallel:
            # Megatron-Core's folding with etp 1: each TP rank routes its own sequence shard
            # through whole experts (split by apply_ep), on local tensors like the residual
            layer_plan["feed_forward"] = PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(seq,), use_local_output=True)
            moe.tp_group = tp_mesh.get_group()
        elif moe is not None:
            # serving: every rank routes every token through its share of each expert's
            # width; shared experts as the dense MLP
            shard_expert_width(moe, tp_mesh.get_group())
            if moe.shared_experts is not None:
                layer_plan.update({"feed_forward.shared_experts.w1": ColwiseParallel(),
                                   "feed_forward.shared_experts.w2": RowwiseParallel()})
                if moe.shared_experts.w3 is not None:
                    layer_plan["feed_forward.shared_experts.w3"] = ColwiseParallel()
        else:
            layer_plan.update({"feed_forward": region, "feed_forward.w1": ColwiseParallel(),
                               "feed_forward.w2": RowwiseParallel(output_layouts=seq)})
            if layer.feed_forward.w3 is not None:
                layer_plan["feed_forward.w3"] = ColwiseParallel()
        if sequence_parallel:
            layer_plan["attention_norm"] = SequenceParallel()
            layer_plan["ffn_norm"] = SequenceParallel()
            layer.sp_gathers = (True, moe is None)
            # the sandwich norms hand their output to the residual add, a local tensor
            layer_plan.update({name: SequenceParallel(use_local_output=True) for name in (
                "attention_out_norm", "mlp_out_norm") if getattr(layer, name) is not None})
        if isinstance(attention, Attention) and attention.q_norm is not None:
            # one norm over the head width that every TP rank runs on its own heads: its
            # weight replicated and its gradient summed over them, the heads' dimension (2)
            # sharded as SP shards the sequence (torchtitan's Qwen3 plan)
            layer_plan.update({f"attention.{name}": SequenceParallel(sequence_dim=2, use_local_output=True)
                               for name in ("q_norm", "k_norm")})
        parallelize_module(layer, tp_mesh, layer_plan)
    if model.spec.tied_embeddings and model.tok_embeddings is not None and model.output is not None:
        # both are vocab-sharded (Shard(0)): tie the DTensors again (a pipeline's last stage
        # keeps a copy of its own, pipeline.TiedEmbedding)
        model.output.weight = model.tok_embeddings.weight


def keep_gradient_sharded(weight: DTensor) -> None:
    """Give `weight` its gradient in its own placements: DTensor's embedding backward from a
    replicated output gradient makes a replicated (whole-vocabulary) weight gradient, which
    would otherwise stay in .grad at tp times the shard's size (torch 2.13)."""
    weight.register_hook(lambda grad: grad.redistribute(placements=weight.placements))


def apply_ep(model: Transformer, expert_mesh: DeviceMesh, dp: int, dispatcher: str = "alltoall") -> None:
    """Expert parallelism: each MoE layer keeps the experts of this rank's place on the
    expert mesh's ep axis, and routes rows to the others with all-to-all (moe.py), a row per
    chosen expert, or with plan.moe_dispatcher deepep a row per token and rank its experts
    sit on. With TP (ep 1 included) the experts are replicated along edp, which then spans
    TP ranks that saw other tokens: their gradients are reduced over edp, not by the DP
    wrapper."""
    sharding = ExpertSharding(expert_mesh["ep"].get_group(), expert_mesh["edp"].get_group(), dp,
                              deduplicated=dispatcher == "deepep",
                              etp_group=expert_mesh["etp"].get_group() if expert_mesh["etp"].size() > 1 else None)
    for layer in model.layers.values():
        if isinstance(layer.feed_forward, MoE):
            shard_experts(layer.feed_forward, sharding)


# the matmuls per-op recompute counts (the weight: mm's second operand, addmm's third), and
# the ops whose output it keeps: attention kernels, TP's reduce-scatters and EP's all-to-alls
_MATMULS = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}
_KEPT = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)) + (torch.ops._c10d_functional.reduce_scatter_tensor.default,
                                         torch.ops._c10d_functional.all_to_all_single.default,
                                         torch.ops.meshplan.flash_ring.default)


def _op_policy(router_shape: tuple[int, int] | None):
    """torchtitan's per-op selective checkpointing policy (simulator ops.op_sac): keep the
    outputs of the attention kernels (the CP ring's whole, as torch's ring runs under one
    SDPA operator), the reduce-scatters and all-to-alls, and every other
    matmul's, counting the layer's matmuls on over its calls; recompute the rest, the
    router's matmul (its weight of `router_shape`) always and uncounted."""
    count = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs):
        if func in _MATMULS:
            if tuple(args[_MATMULS[func]].shape) == router_shape:
                return CheckpointPolicy.PREFER_RECOMPUTE
            mode = "recompute" if ctx.is_recompute else "forward"
            count[mode] += 1
            return CheckpointPolicy.MUST_SAVE if count[mode] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _metered(forward=None, recompute=None, keeps=None):
    """A checkpoint's (forward, recompute) contexts (a per-op policy's caching ones, or
    none), each inside what an active activation meter counts of it: in forward the outputs
    for which `keeps()` says the policy keeps them (measure.ActivationMeter.kept_outputs), in
    the recompute those it keeps for backward (recomputed_outputs). A context_fn for
    torch.utils.checkpoint."""
    forward, recompute = forward or nullcontext(), recompute or nullcontext()
    meter = ActivationMeter.active()
    if meter is None:
        return forward, recompute

    @contextmanager
    def forward_counted():
        with meter.kept_outputs(keeps) if keeps else nullcontext(), forward:
            yield

    @contextmanager
    def recompute_counted():
        with meter.recomputed_outputs(), recompute:
            yield
    return forward_counted(), recompute_counted()


def _op_contexts(policy):
    """torch's selective-checkpoint contexts under `policy`, metered (_metered)."""
    last: list = []

    def deciding(ctx, func, *args, **kwargs):
        last[:] = [policy(ctx, func, *args, **kwargs)]
        return last[0]
    forward, recompute = create_selective_checkpoint_contexts(deciding)
    return _metered(forward, recompute, lambda: last == [CheckpointPolicy.MUST_SAVE])


def apply_recompute(model: Transformer, mode: str) -> None:
    """Activation recompute with torch.utils.checkpoint (non-reentrant): "full" checkpoints
    each decoder layer (keeps only its input), "selective" only the attention core
    (softmax(QK^T)V, the part Korthikanti et al. 2022 sec 5 recompute), "op" each layer
    under torchtitan's per-op policy (_op_policy); "norm_act" rebuilds the two norms' outputs
    and the experts' activation output in backward (rebuild.Rebuilt)."""
    def wrap(module: nn.Module, **kwargs) -> nn.Module:
        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                  preserve_rng_state=False, **kwargs)

    for key, layer in model.layers.items():
        if mode == "full":
            model.layers[key] = wrap(layer, context_fn=_metered)
        elif mode == "selective":
            layer.attention.core = wrap(layer.attention.core, context_fn=_metered)
        elif mode == "norm_act":
            layer.rebuild_norms = True
            if isinstance(layer.feed_forward, MoE):
                layer.feed_forward.experts.rebuild_act = True
        elif mode == "op":
            moe = layer.feed_forward
            routed = isinstance(moe, MoE) and moe.router is not None
            policy = _op_policy(tuple(moe.router.weight.t().shape) if routed else None)
            # early_stop=False redoes the whole layer, as torchtitan 0.3's SelectiveAC does
            model.layers[key] = wrap(layer, context_fn=lambda p=policy: _op_contexts(p),
                                     early_stop=False)


def apply_dp(model: Transformer, dp_mesh: DeviceMesh, plan: Plan) -> nn.Module:
    """ZeRO 0 and 1: DDP, bucketed all-reduce overlapped with backward (stage 1 also shards
    the optimizer, see build_optimizer). With TP or PP, ZeRO 0 uses FSDP2's replicate
    instead: DDP does not take TP's DTensor parameters, and under torch.distributed.pipelining
    it leaves the last stage's gradients unreduced (torch 2.13); replicate keeps a second,
    gathered copy of each weight from forward to backward, so DDP is preferred where it
    works. ZeRO 2: FSDP2 keeping the gathered weights from forward to backward
    (reshard_after_forward=False; gradients and optimizer state sharded). ZeRO 3: FSDP2
    resharding after forward (weights sharded too) unless the plan keeps them
    (Plan.reshard_after_forward, as it must under a pipeline: resharded, the stages past the
    first of a split-backward schedule, zb-h1 or zb-v, ended torch 2.13's step with no
    gradients). FSDP2 wraps each layer, then the root
    (embedding, head, final norm). Each leaves out the experts that apply_ep split: they
    differ along dp, and moe.reduce_expert_gradients reduces them over edp instead."""
    experts = set(expert_parameters(model))
    if plan.zero >= 2:
        reshard = plan.zero == 3 and plan.reshard_after_forward
        for layer in model.layers.values():
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard, ignored_params=experts)
        return fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, ignored_params=experts)
    if plan.tp > 1 or plan.pp > 1:
        for layer in model.layers.values():
            replicate(layer, mesh=dp_mesh, ignored_params=experts)
        return replicate(model, mesh=dp_mesh, ignored_params=experts)
    # nor does DDP broadcast the MoE choice biases before each forward: every rank updates
    # them alike (moe.update_expert_bias)
    ignored = [name for name, p in model.named_parameters() if p in experts] + [n for n, _ in model.named_buffers()]
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_mesh=dp_mesh, gradient_as_bucket_view=True)


def data_parallel_mesh(mesh: DeviceMesh, plan: Plan) -> DeviceMesh:
    """The ranks that average the gradients and that ZeRO shards over: the dp ranks, or with
    context parallelism the dp x cp ranks, each CP rank having seen its shard of the same
    sequences (Megatron-LM's data-parallel group with CP, torchtitan's dp_shard_cp),
    flattened from `mesh` so that FSDP2 can join it with the TP dimension of the same mesh
    (DeviceMesh._flatten, as torchtitan builds dp_shard_cp: torch 2.13 has no public
    flatten; a mesh built apart from `mesh` is refused beside TP's). Collective over every
    rank."""
    if plan.cp == 1:
        return mesh["dp"]
    return mesh[tuple(n for n in mesh.mesh_dim_names if n in ("dp", "cp"))]._flatten("dp_cp")


def context_parallel(mesh: DeviceMesh, plan: Plan) -> ContextParallel | None:
    """The plan's CP group on `mesh` and its exchange (plan.cp_comm); None without CP."""
    return ContextParallel(mesh["cp"].get_group(), plan.cp_comm) if plan.cp > 1 else None


def parallelize(model: Transformer, plan: Plan, mesh: DeviceMesh, dp_mesh: DeviceMesh,
                expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """The plan's attention kernel and CP group, then TP/SP -> EP (with an expert mesh) ->
    recompute -> DP (over `dp_mesh`, data_parallel_mesh) on one (stage) module, in that
    order."""
    for layer in model.layers.values():
        layer.attention.core.kernel = plan.attention
    if plan.moe_routing == "contiguous":
        route_in_turn(model)
    set_context_parallel(model, context_parallel(mesh, plan))
    if plan.tp > 1:
        apply_tp(model, mesh["tp"], plan.sp, training=True)
    if expert_mesh is not None:
        apply_ep(model, expert_mesh, plan.dp * plan.cp, plan.moe_dispatcher)
    if plan.recompute != "none":
        apply_recompute(model, plan.recompute)
    if plan.dp * plan.cp > 1:
        return apply_dp(model, dp_mesh, plan)
    return model


def build_optimizer(modules: list[nn.Module], plan: Plan, dp_mesh: DeviceMesh,
                    lr: float) -> torch.optim.Optimizer:
    """AdamW in fp32 (the parameters are the fp32 master weights), its fused kernel: one
    pass per parameter tensor, as torchtitan's default optimizer implementation and the
    profile's measured `adam` (calibration/measure/compute.py) run it, not the per-tensor
    loop of one kernel per update term that PyTorch picks on CPU by default (4.5x slower
    here). ZeRO 1 shards its state over the dp group with ZeroRedundancyOptimizer
    (Rajbhandari et al. 2020, P_os), each rank's parameters viewed in one flat bucket, so that
    the updated weights go out in one broadcast per rank instead of one per tensor (the 8M
    validation model on two gloo ranks here: a 9 ms step instead of 29 ms); with TP or PP,
    whose parameters it cannot bucket, or expert-parallel experts, which it would shard over
    dp as if replicated there, ZeroOneOptimizer does the same, the experts over their EDP
    group. Bf16 moments: MomentsAdamW (optimizer_of)."""
    params = [p for m in modules for p in m.parameters()]
    optimizer_class, options = optimizer_of(plan)
    experts = [e for m in modules for e in sharded_experts(m)]
    if plan.zero == 1 and dp_mesh.size() > 1 and (plan.tp > 1 or plan.pp > 1 or experts):
        split = [p for m in modules for p in expert_parameters(m)]
        in_split = set(split)
        shards = [([p for p in params if p not in in_split], dp_mesh.get_group())]
        if experts:
            shards.append((split, experts[0].sharding.edp_group))
        return ZeroOneOptimizer(shards, optimizer_class, options, lr)
    if plan.zero == 1 and dp_mesh.size() > 1:
        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                       process_group=dp_mesh.get_group(), lr=lr,
                                       parameters_as_bucket_view=True, **options)
    return optimizer_class(params, lr=lr, **options)


def optimizer_of(plan: Plan) -> tuple[type, dict]:
    """The optimizer class of a plan and its options beside the learning rate: torch's fused
    AdamW, or MomentsAdamW where the plan keeps its moments in bf16 (plan.moments_dtype)."""
    if plan.moments_dtype == "fp32":
        return torch.optim.AdamW, {"fused": True}
    return MomentsAdamW, {"moments_dtype": torch.bfloat16}


def training_context(plan: Plan):
    """Where a training step's forward and backward run: under loss_parallel() with TP and
    the eager loss (F.cross_entropy over the vocabulary-sharded logits of apply_tp, as
    torchtitan's train_context), else nothing."""
    return loss_parallel() if plan.tp > 1 and plan.cross_entropy == "eager" else nullcontext()


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool, last: bool, zero: int):
    """Reduce gradients over dp in this backward or only accumulate them locally: DDP's
    no_sync, FSDP2's set_requires_gradient_sync; after the step's last micro-batch, reduce
    the experts' (and under SP the router's) accumulated gradients. ZeRO-2 keeps the
    gathered weights until the step's last backward (FSDP2 set_reshard_after_backward, as
    torch.distributed.pipelining's stages do between micro-batches): the weights are gathered
    once per step (Rajbhandari et al. 2020, P_os+g), not again in each micro-batch's forward."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        if zero == 2:
            model.set_reshard_after_backward(last)
    with model.no_sync() if isinstance(model, DistributedDataParallel) and not enabled \
            else nullcontext():
        yield
    if last:
        reduce_expert_gradients(model)


def clear_gradients(optimizer, modules: list[nn.Module]) -> None:
    """After the optimizer step. DDP's gradients are views of its all-reduce buckets
    (gradient_as_bucket_view): zeroed in place they stay so, and the next step's micro-batches
    accumulate into the buckets under no_sync; set to None, the first micro-batch's backward
    would allocate a second copy of every gradient beside the buckets, held until the last
    micro-batch's reduction copies it in (torch's Reducer). Other gradients are freed (the
    experts', which DDP ignores: a zero gradient would still decay an expert no token reached)."""
    buckets = {p: p.grad for m in modules if isinstance(m, DistributedDataParallel)
               for name, p in m.module.named_parameters() if name not in m.parameters_to_ignore}
    optimizer.zero_grad(set_to_none=True)
    for param, grad in buckets.items():
        if grad is not None:
            param.grad = grad.zero_()


def parameter_name(name: str) -> str:
    """A parameter's name in the plain model, without the DDP / checkpoint wrappers."""
    return name.replace("_checkpoint_wrapped_module.", "").removeprefix("module.")


def full_gradients(modules: list[nn.Module], tied: bool = False) -> dict[str, torch.Tensor]:
    """Every local parameter's gradient as a whole (unsharded) CPU tensor, by plain name:
    with `tied` embeddings, a pipeline's copy of the embedding as the head under the
    embedding's name, as the plain model has it. Collective over the TP/DP groups of this
    rank (DTensor.full_tensor) and its EP group (experts split by apply_ep)."""
    grads = {}
    for module in modules:
        experts = {id(p): e.sharding for e in sharded_experts(module) for p in e.parameters()}
        for name, param in module.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()
            if id(param) in experts:
                grad = gather_experts(grad, experts[id(param)], WIDTH_DIMS.get(name.rsplit(".", 1)[-1]))
            name = parameter_name(name)
            if tied and name == "output.weight":
                name = "tok_embeddings.weight"
            grads[name] = grad.detach().cpu().clone()
    return grads
