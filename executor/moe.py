"""The mixture-of-experts MLP of the executor's decoder (model.py), and expert parallelism.

A router scores every expert, softmax over all of them or a sigmoid of each (DeepSeek-V3 sec
2.1.2), keeps each token's top k and, where ModelSpec.norm_topk_prob says so, renormalises
their weights to sum to one (Mixtral, Jiang et al. 2024 sec 2.1; Qwen-MoE's norm_topk_prob).
With group-limited routing the top k come from each token's best route_group_topk of the
route_groups groups of consecutive experts, a group scored by its best expert (DeepSeek-V2
sec 2.2.3, its softmax router) or its best two experts' sum (DeepSeek-V3 sec 2.1.2, its
sigmoid router). The chosen experts' weights are then scaled by ModelSpec.routed_scaling
(DeepSeek's routed_scaling_factor). Where the model balances without an auxiliary loss
(ModelSpec.router_choice_bias; DeepSeek-V3 sec 2.1.2) a bias per expert is added to the
scores for choosing only, not weighting; no gradient moves it: after each optimizer step
update_expert_bias moves it by a fixed rate against the load each expert had over the
step. Under plan.moe_routing contiguous there is no router (route_in_turn). The routed rows
(token copies, one per chosen expert) are sorted by expert and run as grouped GEMMs over
the experts' stacked weights [E, in, out] (torch._grouped_mm), weighted and summed back per
token. Shared experts run as
one dense MLP on every token, behind a sigmoid gate where the model has one (Qwen2-MoE).
Routing is dropless: Plan.moe_capacity_factor prices imbalance, it drops no token here.

Expert parallelism (Lepikhin et al. 2020, GShard sec 2.2; Megatron-Core's all-to-all
dispatcher): apply_ep keeps E/ep consecutive experts on each rank of an EP group; a layer
exchanges the per-expert row counts, sends each row to the rank of its expert (functional
all_to_all_single with split sizes, differentiable, as torchtitan's expert_parallel), runs
its local experts, and sends the results back the same way. Expert weights then differ
along EP and are replicated along EDP (parallel folding, Plan.expert_mesh): their gradients
are summed over the EDP group (reduce_expert_gradients), not over DP with the dense
parameters. Under tensor parallelism with sequence parallelism (etp 1), each TP rank routes
the tokens of its sequence shard, so the EP and EDP groups may span TP ranks, and the
router's and shared experts' gradients are summed over TP.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from meshplan.executor.measure import local_part
from meshplan.executor.rebuild import Rebuilt
from meshplan.simulator.model_spec import ModelSpec


# Whether MoE forwards count their rows (the choice bias's load, the routing imbalance):
# not in torch.distributed.pipelining's metadata inference (uncounted), which runs a stage
# once more on the first micro-batch's shapes, past the first stage on empty tensors.
_counting = True


@contextmanager
def uncounted():
    """MoE forwards inside count no rows."""
    global _counting
    before, _counting = _counting, False
    try:
        yield
    finally:
        _counting = before


def activation(spec: ModelSpec):
    """What an MLP runs between its input and output projections, on x w1 and (gated) x w3:
    act(x w1) * x w3 (Shazeer 2020), gpt-oss's clamped SwiGLU where the model sets a limit,
    act(x w1) for a plain MLP (no up projection)."""
    act = F.silu if spec.activation == "silu" else lambda t: F.gelu(t, approximate="tanh")
    if spec.swiglu_limit is None:
        return lambda gate, up=None: act(gate) if up is None else act(gate) * up
    limit = spec.swiglu_limit

    def clamped(gate, up):
        # gpt-oss's modelling code: the gate clamped above and the up projection both ways at
        # the limit, then (up + 1) * gate * sigmoid(1.702 gate)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(1.702 * gate)
    return clamped


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[i-1]:offsets[i] of x times weight[i], in the autocast dtype if one is
    on. torch._grouped_mm runs any dtype on CPU, but only bf16 on CUDA (torch 2.13's
    F.grouped_mm docs): other CUDA dtypes take one matmul per expert. Its CPU backward
    refuses a broadcast (stride 0) output gradient, so that is made contiguous."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight = weight.to(x.dtype)
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return looped_mm(x, weight, offsets)
    out = torch._grouped_mm(x, weight, offs=offsets)
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out


def looped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm as one matmul per group."""
    starts = [0, *offsets.tolist()]
    return torch.cat([x[a:b] @ w for a, b, w in zip(starts, starts[1:], weight)])


@dataclass(frozen=True)
class ExpertSharding:
    """Where a layer's experts live: this rank's EP group (which splits them) and EDP group
    (which replicates them), the data-parallel degree that the gradient mean divides by, and
    whether a token goes once to each rank its experts sit on (plan.moe_dispatcher deepep)
    rather than once per expert."""

    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    dp: int
    deduplicated: bool = False
    etp_group: dist.ProcessGroup | None = None  # expert TP: each expert's width split over it

    @property
    def ep(self) -> int:
        return dist.get_world_size(self.ep_group)

    @property
    def etp(self) -> int:
        return 1 if self.etp_group is None else dist.get_world_size(self.etp_group)


# The dimension of each expert weight that expert tensor parallelism splits (Megatron-Core's
# expert TP: w1 and w3 by output columns, their biases with them, w2 by input rows; w2's
# bias stays whole, added once after the sum), as vLLM's FusedMoE under TP does
WIDTH_DIMS = {"w1": 2, "w3": 2, "w2": 1, "w1_bias": 1, "w3_bias": 1}


class GroupedExperts(nn.Module):
    """`count` MLPs of the experts' width, weights stacked per expert: w1, w3 [E, h, f], w2
    [E, f, h], and with the model's biases (gpt-oss) w1_bias, w3_bias [E, f], w2_bias
    [E, h]. Gated (w2(act(x w1) * x w3)) or plain, as the model's dense MLP."""

    def __init__(self, spec: ModelSpec, count: int):
        super().__init__()
        h, f = spec.hidden_size, spec.moe_ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(count, h, f))
        self.w2 = nn.Parameter(torch.empty(count, f, h))
        self.w3 = nn.Parameter(torch.empty(count, h, f)) if spec.gated_mlp else None
        self.w1_bias = nn.Parameter(torch.zeros(count, f)) if spec.bias else None
        self.w2_bias = nn.Parameter(torch.zeros(count, h)) if spec.bias else None
        self.w3_bias = nn.Parameter(torch.zeros(count, f)) if spec.bias and spec.gated_mlp else None
        self.act = activation(spec)
        self.sharding: ExpertSharding | None = None  # set by apply_ep
        self.rebuild_act = False  # recompute norm_act (moe_act): expert_mlps(rebuild=True)
        self.received_rows: list[int] = []  # per forward over EP: the rows this rank ran

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [n, h] sorted by expert, counts [E] rows of each expert -> [n, h]."""
        if self.sharding is not None and self.sharding.etp > 1:
            return self._tensor_parallel(rows, counts, self.sharding.etp_group)
        return expert_mlps(rows, counts, self.act, self.w1, self.w2, self.w3,
                           (self.w1_bias, self.w2_bias, self.w3_bias), self.rebuild_act)

    def _tensor_parallel(self, rows: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """Expert TP (Megatron-Core's, after the EP exchange): this rank's rows gathered
        with every rank's of `group`, each expert's width share run on all of them, and the
        partial outputs summed back onto the rows they came from (all-gather and
        reduce-scatter as all-to-alls of uneven parts, differentiable). The up projections'
        biases are split with their columns; the down projection's, whole on every rank, is
        added to the rank's own rows after the sum, its gradient summed over `group`
        (Megatron-Core's RowParallelLinear adds its bias after the reduction alike)."""
        etp, count = dist.get_world_size(group), rows.shape[0]
        table = [torch.empty_like(counts) for _ in range(etp)]  # [source rank][local expert]
        dist.all_gather(table, counts, group=group)
        table = torch.stack(table)
        sizes = table.sum(1).tolist()
        gathered = funcol.wait_tensor(funcol.all_to_all_single(rows.repeat(etp, 1), sizes, [count] * etp, group))
        partial = _by_expert(lambda r, c: expert_mlps(r, c, self.act, self.w1, self.w2, self.w3,
                                                      (self.w1_bias, None, self.w3_bias), self.rebuild_act),
                             gathered, table)
        back = funcol.wait_tensor(funcol.all_to_all_single(partial.contiguous(), [count] * etp, sizes, group))
        out = back.view(etp, count, -1).sum(0)
        if self.w2_bias is None:
            return out
        bias = _SumGradient.apply(self.w2_bias, group)
        return out + bias.to(out.dtype).repeat_interleave(counts, dim=0, output_size=count)


class _SumGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group`: a parameter replicated
    over ranks that each use it on their own rows (Megatron-Core's
    copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def expert_mlps(rows: torch.Tensor, counts: torch.Tensor, act, w1: torch.Tensor, w2: torch.Tensor,
                w3: torch.Tensor | None, biases: tuple = (None, None, None), rebuild: bool = False) -> torch.Tensor:
    """Each expert's MLP on its rows: rows [n, h] sorted by expert, counts [E]; w1, w3
    [E, h, f], w2 [E, f, h] (w3 None: not gated), and their biases [E, out] or None, each
    expert's added to its rows -> [n, h]. `rebuild`: the activation's output freed once the
    down projection has run, rebuilt in backward (recompute norm_act's moe_act)."""
    offsets = counts.cumsum(0).to(torch.int32)

    def project(x, weight, bias):
        out = grouped_mm(x, weight, offsets)
        return out if bias is None else out + bias.to(out.dtype).repeat_interleave(counts, dim=0,
                                                                                   output_size=x.shape[0])
    b1, b2, b3 = biases
    gate = project(rows, w1, b1)
    up = project(rows, w3, b3) if w3 is not None else None
    if not rebuild:
        return project(act(gate, up), w2, b2)
    hidden = Rebuilt(act, gate, up) if up is not None else Rebuilt(lambda g: act(g, None), gate)
    out = project(hidden.output, w2, b2)
    hidden.discard(out)
    return out


class MoE(nn.Module):
    """Router, routed experts and shared experts of one layer; x [..., h] -> [..., h]."""

    def __init__(self, spec: ModelSpec, shared: nn.Module | None):
        super().__init__()
        self.num_experts, self.top_k = spec.num_experts, spec.experts_per_token
        self.renormalise, self.sigmoid = spec.norm_topk_prob, spec.router == "sigmoid"
        self.scaling = spec.routed_scaling
        self.groups, self.group_topk = spec.route_groups, spec.route_group_topk
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=spec.router_bias)
        # the choice bias is state, saved with the model, but no parameter; the rows routed
        # to each expert since its last update (from this rank's tokens) are not saved
        self.expert_bias = nn.Buffer(torch.zeros(spec.num_experts)) if spec.router_choice_bias else None
        self.routed_counts: list[torch.Tensor] = []  # kept as they come: no op for recompute to redo
        self.experts = GroupedExperts(spec, spec.num_experts)
        self.shared_experts = shared
        self.shared_expert_gate = (nn.Linear(spec.hidden_size, 1, bias=False)
                                   if spec.shared_expert_gate else None)
        # Under sequence parallelism each TP rank routes its own tokens (apply_tp): the
        # router's and shared experts' gradients are then summed over this group.
        self.tp_group: dist.ProcessGroup | None = None
        # Serving TP without SP: each rank holds 1/tp of every expert's width
        # (shard_expert_width), and the routed partial sums are added over this group.
        self.width_group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        chosen, weights = self._route(tokens) if self.router is not None else self._in_turn(tokens)
        counts = chosen.flatten().bincount(minlength=self.num_experts)
        if self.expert_bias is not None and self.router is not None and self.training and _counting:
            self.routed_counts.append(counts)
        sharding = self.experts.sharding
        if sharding is not None and sharding.ep > 1 and sharding.deduplicated:
            routed = deduplicated_expert_parallel(self.experts, tokens, chosen, weights, sharding.ep_group)
            return self._with_shared(tokens, routed).view(x.shape)
        order = chosen.flatten().argsort(stable=True)  # routed rows grouped by expert
        source = order // self.top_k                      # the token of each routed row
        rows = tokens[source]
        out = self.experts(rows, counts) if sharding is None or sharding.ep == 1 else \
            expert_parallel(self.experts, rows, counts, sharding.ep_group)
        out = out * weights.flatten()[order, None]
        routed = tokens.new_zeros(tokens.shape).index_add(0, source, out.to(tokens.dtype))
        if self.width_group is not None:
            dist.all_reduce(routed, group=self.width_group)
        return self._with_shared(tokens, routed).view(x.shape)

    def _route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's chosen experts [tokens, k] by the router, and their weights."""
        logits = self.router(tokens).float()
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(-1)
        chosen = self._choose(scores if self.expert_bias is None else scores + self.expert_bias.float())
        weights = scores.gather(-1, chosen)
        if self.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        return chosen, (weights * self.scaling).to(tokens.dtype)

    def _in_turn(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Without a router (route_in_turn): token t to experts k t .. k t + k - 1 (mod E),
        each weighted 1/k."""
        n = tokens.shape[0]
        chosen = torch.arange(n * self.top_k, device=tokens.device).view(n, self.top_k) % self.num_experts
        return chosen, tokens.new_full((n, self.top_k), 1.0 / self.top_k)

    def _with_shared(self, tokens: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum plus the (gated) shared experts' output."""
        if self.shared_experts is None:
            return routed
        shared = self.shared_experts(tokens)
        if self.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(self.shared_expert_gate(tokens))
        return routed + shared

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Each token's top-k experts [tokens, k], from its best groups where routing is
        group-limited."""
        if self.groups <= 1:
            return scores.topk(self.top_k, dim=-1).indices
        grouped = scores.view(scores.shape[0], self.groups, -1)
        group_scores = (grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1) if self.sigmoid
                        else grouped.amax(-1))
        kept = group_scores.topk(self.group_topk, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        masked = grouped.masked_fill(~allowed[..., None], float("-inf")).view_as(scores)
        return masked.topk(self.top_k, dim=-1).indices


def route_in_turn(module: nn.Module) -> None:
    """plan.moe_routing contiguous: every MoE layer of `module` drops its router and sends
    the t-th token it sees to experts k t .. k t + k - 1 (mod E), each weighted 1/k, as NeMo
    AutoModel's FakeBalancedGate (which has no weights) does for its benchmarks: the order
    of a rank's tokens routes them, not the model."""
    for m in module.modules():
        if isinstance(m, MoE):
            m.router = None


def expert_parallel(experts: GroupedExperts, rows: torch.Tensor, counts: torch.Tensor,
                    group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's routed rows (sorted by global expert, counts [E]) through the experts
    spread over `group`, each rank holding E/ep consecutive ones: rows [n, h] -> [n, h]."""
    ep, local = dist.get_world_size(group), experts.w1.shape[0]
    received_counts = torch.empty_like(counts)  # [source rank, local expert]
    dist.all_to_all_single(received_counts, counts, group=group)
    send = counts.view(ep, local).sum(1).tolist()
    per_source = received_counts.view(ep, local)
    receive = per_source.sum(1).tolist()
    if _counting:
        experts.received_rows.append(sum(receive))
    received = funcol.wait_tensor(funcol.all_to_all_single(rows.contiguous(), receive, send, group))
    out = _by_expert(experts, received, per_source)
    return funcol.wait_tensor(funcol.all_to_all_single(out.contiguous(), send, receive, group))


def _by_expert(run, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """run(rows sorted by expert, rows per expert) on rows that arrived grouped by source
    rank and within each by expert (table [sources, experts]: their counts), its output
    [n, h] back in the order they arrived."""
    sources, experts = table.shape
    expert = torch.arange(experts, device=rows.device).repeat(sources).repeat_interleave(table.flatten())
    regroup = expert.argsort(stable=True)
    return run(rows[regroup], table.sum(0))[regroup.argsort()]


def deduplicated_expert_parallel(experts: GroupedExperts, tokens: torch.Tensor, chosen: torch.Tensor,
                                 weights: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The routed experts' weighted sum [tokens, h] for this rank's tokens, each sent once to
    each rank of `group` its chosen experts [tokens, k] sit on, with its weights for that
    rank's experts; the rank expands it to those experts, weights and sums their outputs, and
    sends one row back per token (DeepEP's dispatch layout, is_token_in_rank, and its
    combine; here over torch's all_to_all_single, differentiable: the weights' gradients
    come back through it)."""
    ep, local = dist.get_world_size(group), experts.w1.shape[0]
    count, width = tokens.shape
    on_rank = torch.zeros(count, ep, dtype=torch.bool, device=tokens.device).scatter_(1, chosen // local, True)
    destination, token = on_rank.t().nonzero(as_tuple=True)  # rows in rank order, tokens within
    weight = torch.zeros(count, ep * local, dtype=weights.dtype, device=tokens.device).scatter(1, chosen, weights)
    picked = torch.zeros(count, ep * local, dtype=tokens.dtype, device=tokens.device).scatter_(1, chosen, 1.0)
    payload = torch.cat([tokens[token], weight.view(count, ep, local)[token, destination].to(tokens.dtype),
                         picked.view(count, ep, local)[token, destination]], dim=1)
    send = on_rank.sum(0)
    received_counts = torch.empty_like(send)
    dist.all_to_all_single(received_counts, send, group=group)
    send, receive = send.tolist(), received_counts.tolist()
    arrived = funcol.wait_tensor(funcol.all_to_all_single(payload.contiguous(), receive, send, group))
    rows, row_weights, row_picked = arrived.split([width, local, local], dim=1)
    row, expert = row_picked.detach().bool().nonzero(as_tuple=True)
    order = expert.argsort(stable=True)  # the expanded rows grouped by local expert
    row, expert = row[order], expert[order]
    counts = expert.bincount(minlength=local)
    if _counting:
        experts.received_rows.append(int(counts.sum()))
    out = experts(rows[row], counts) * row_weights[row, expert, None]
    combined = rows.new_zeros(rows.shape).index_add(0, row, out.to(rows.dtype))
    back = funcol.wait_tensor(funcol.all_to_all_single(combined, send, receive, group))
    return tokens.new_zeros(tokens.shape).index_add(0, token, back)


def shard_experts(moe: MoE, sharding: ExpertSharding) -> None:
    """Keep only this rank's E/ep consecutive experts of the full layer."""
    experts = moe.experts
    ep, rank = dist.get_world_size(sharding.ep_group), dist.get_rank(sharding.ep_group)
    local = moe.num_experts // ep
    for name, param in list(experts.named_parameters()):
        part = param.detach()[rank * local:(rank + 1) * local]
        if name in WIDTH_DIMS and sharding.etp > 1:  # and this rank's share of each one's width
            part = part.chunk(sharding.etp, WIDTH_DIMS[name])[dist.get_rank(sharding.etp_group)]
        setattr(experts, name, nn.Parameter(part.clone()))
    experts.sharding = sharding


def shard_expert_width(moe: MoE, group: dist.ProcessGroup) -> None:
    """Keep this rank's 1/tp of every expert's MLP width (vLLM's FusedMoE under TP: w1, w3
    split by output columns, w2 by input rows), for inference: the partial outputs are
    all-reduced in MoE.forward, outside autograd."""
    experts, tp, rank = moe.experts, dist.get_world_size(group), dist.get_rank(group)
    for name, dim in (("w1", 2), ("w3", 2), ("w2", 1), ("w1_bias", 1), ("w3_bias", 1)):
        param = getattr(experts, name)
        if param is not None:
            setattr(experts, name, nn.Parameter(param.detach().chunk(tp, dim)[rank].clone(),
                                                requires_grad=False))
    if experts.w2_bias is not None and rank:  # added once to the sum of the partial outputs
        experts.w2_bias = nn.Parameter(torch.zeros_like(experts.w2_bias), requires_grad=False)
    moe.width_group = group


def sharded_experts(module: nn.Module) -> list[GroupedExperts]:
    return [m for m in module.modules() if isinstance(m, GroupedExperts) and m.sharding is not None]


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module`'s experts that apply_ep split (they differ along dp)."""
    return [p for e in sharded_experts(module) for p in e.parameters()]


def routing_imbalance(modules: list[nn.Module]) -> float | None:
    """The rows of the busiest rank of this rank's EP group over the group's mean, averaged
    over every MoE forward so far (each waits at its all-to-all for the busiest): the plan's
    moe_capacity_factor as this run's router routed. None without EP. Collective over the
    EP group (its ranks run the same layers)."""
    experts = [e for m in modules for e in sharded_experts(m) if e.sharding.ep > 1]
    if not experts:
        return None
    group = experts[0].sharding.ep_group
    rows = torch.tensor([r for e in experts for r in e.received_rows], dtype=torch.float64)
    table = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, rows, group=group)
    by_rank = torch.stack(table)
    return float((by_rank.max(0).values / by_rank.mean(0).clamp_min(1.0)).mean())


# The choice bias's step per optimizer step: DeepSeek-V3's bias update speed (sec 4.2,
# gamma = 0.001), Megatron-Core's --moe-router-bias-update-rate default.
EXPERT_BIAS_RATE = 1e-3


@torch.no_grad()
def update_expert_bias(modules: list[nn.Module], group: dist.ProcessGroup | None,
                       rate: float = EXPERT_BIAS_RATE) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3 sec 2.1.2), after an optimizer step: each
    MoE layer's experts' rows over the step are summed over `group` (the ranks holding this
    pipeline stage, which routed the other tokens of the global batch; None: this rank
    alone), and each expert's choice bias moves by `rate` up where the expert took fewer
    than the mean, down where it took more (Megatron-Core's get_updated_expert_bias sums over
    its TP x CP x DP group alike). Rows counted twice, under full recompute or by TP ranks
    routing the same tokens, are counted twice for every expert of the layer: the signs stay
    (recompute redoes every micro-batch's forward of the layer, or none)."""
    layers = [m for module in modules for m in module.modules()
              if isinstance(m, MoE) and m.expert_bias is not None and m.routed_counts]
    if not layers:
        return
    load = torch.stack([torch.stack(m.routed_counts).sum(0) for m in layers]).double()
    if group is not None:
        dist.all_reduce(load, group=group)
    for m, offset in zip(layers, load.mean(-1, keepdim=True) - load):
        m.expert_bias += rate * offset.sign().to(m.expert_bias.dtype)
        m.routed_counts.clear()


def reduce_expert_gradients(module: nn.Module) -> None:
    """Sum the EP-sharded experts' gradients over their EDP group and divide by DP, giving
    the mean over the global batch as DDP gives the dense parameters': each copy's gradient
    already sums the rows its EP group's ranks routed to it. Under sequence parallelism,
    also sum the router's and shared experts' gradients over TP (each TP rank saw its part
    of the sequence; the DP wrapper has averaged them over dp)."""
    groups = sharded_experts(module)
    if groups:
        sharding = groups[0].sharding
        _all_reduce([p.grad for p in expert_parameters(module)], sharding.edp_group, sharding.dp)
    split = set(expert_parameters(module))
    routed = [m for m in module.modules() if isinstance(m, MoE) and m.tp_group is not None]
    if routed:
        _all_reduce([p.grad for m in routed for p in m.parameters() if p not in split],
                    routed[0].tp_group, 1)


def _all_reduce(grads: list, group: dist.ProcessGroup, divide_by: int) -> None:
    """Sum the (local parts of the) gradients over `group` in one flat all-reduce, divided."""
    local = [local_part(g) for g in grads if g is not None]
    if not local:
        return
    flat = torch.cat([g.flatten() for g in local])
    dist.all_reduce(flat, group=group)
    flat /= divide_by
    for grad, part in zip(local, flat.split([g.numel() for g in local])):
        grad.copy_(part.view_as(grad))


def gather_experts(tensor: torch.Tensor, sharding: ExpertSharding, width_dim: int | None = None) -> torch.Tensor:
    """The whole [E, ...] tensor from this rank's [E/ep, ...] part (collective over EP),
    and over expert TP its whole width along `width_dim` (WIDTH_DIMS)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(sharding.ep_group))]
    dist.all_gather(parts, tensor.contiguous(), group=sharding.ep_group)
    whole = torch.cat(parts)
    if sharding.etp == 1 or width_dim is None:
        return whole
    parts = [torch.empty_like(whole) for _ in range(sharding.etp)]
    dist.all_gather(parts, whole, group=sharding.etp_group)
    return torch.cat(parts, dim=width_dim)
