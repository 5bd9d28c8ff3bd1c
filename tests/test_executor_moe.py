"""The executor's mixture-of-experts layers (executor/moe.py): the layer against a plain
per-token loop written here from the routing's definition, and expert parallelism on real
ranks (torchrun, gloo, CPU) against the single-process run of the same model, seed and data
(the comparison and tolerances of test_executor_numerics: fp32, loss rtol 1e-5, gradients
within 1e-5 of the largest plus 1e-4 relative).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from meshplan.core.errors import PlanError
from meshplan.executor import data as batches
from meshplan.executor.launch import check_train
from meshplan.executor.loss import eager_cross_entropy as loss_fn
from meshplan.executor.model import build_model
from meshplan.executor.moe import EXPERT_BIAS_RATE, grouped_mm, looped_mm, route_in_turn, update_expert_bias
from meshplan.executor.options import RunOptions
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan
from tests.test_executor_numerics import LR, SEED, STEPS, check_against_reference, run_group

# top-2 of 4 experts, a gated shared expert, the first layer dense (as DeepSeek's first_k_dense)
MOE = ModelSpec("tiny-moe", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, vocab_size=128, max_seq_len=64, num_experts=4,
                experts_per_token=2, moe_ffn_hidden_size=48, num_shared_experts=1,
                shared_expert_ffn_size=32, shared_expert_gate=True, dense_layers=(0,))
# plain (ungated) gelu experts, no shared expert, every layer routed
MOE_GELU = ModelSpec("tiny-moe-gelu", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=4,
                     ffn_hidden_size=64, vocab_size=128, max_seq_len=64, gated_mlp=False,
                     activation="gelu", num_experts=4, experts_per_token=1, moe_ffn_hidden_size=32)
# top-2 weights left as softmax probabilities (Qwen2-MoE's norm_topk_prob false)
MOE_RAW = replace(MOE, name="tiny-moe-raw", norm_topk_prob=False)
# DeepSeek-V3's router: a sigmoid of each of 8 experts, top 2 from the best 2 of 4 groups, a
# bias on the logits (gpt-oss's); DeepSeek-V2's: softmax, the groups scored by their best
MOE_GROUPED = replace(MOE, name="tiny-moe-grouped", num_experts=8, router="sigmoid", route_groups=4,
                      route_group_topk=2, router_bias=True)
MOE_GROUPED_SOFTMAX = replace(MOE_GROUPED, name="tiny-moe-grouped-softmax", router="softmax", router_bias=False)
# DeepSeek-V3's in full: its choice bias (auxiliary-loss-free balancing) and scaled weights
MOE_FREE = replace(MOE_GROUPED, name="tiny-moe-free", router_bias=False, router_choice_bias=True,
                   routed_scaling=2.5)
# gpt-oss's: biases everywhere (the experts' too), a clamped SwiGLU, a sink logit per head
MOE_OSS = ModelSpec("tiny-oss", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                    vocab_size=128, max_seq_len=64, num_experts=4, experts_per_token=2, moe_ffn_hidden_size=48,
                    bias=True, router_bias=True, swiglu_limit=0.5, attn_sinks=True, sliding_window=8,
                    local_layers=(0,))


def plan(**fields) -> Plan:
    return Plan(**{"global_batch": 8, "seq_len": 16, "dtype": "fp32", "micro_batch": 2, **fields})


def _chosen(scores: torch.Tensor, spec: ModelSpec) -> list[int]:
    """One token's top-k experts by `scores`, from its best groups where routing is
    group-limited: each group of consecutive experts scored by its best expert (softmax
    router) or its best two's sum (sigmoid), its experts ranked within the kept groups."""
    if not spec.route_groups:
        return scores.topk(spec.experts_per_token).indices.tolist()
    size = spec.num_experts // spec.route_groups
    groups = [scores[g * size:(g + 1) * size] for g in range(spec.route_groups)]
    rank = [float(g.topk(2).values.sum()) if spec.router == "sigmoid" else float(g.max()) for g in groups]
    kept = sorted(range(spec.route_groups), key=lambda g: -rank[g])[:spec.route_group_topk]
    pool = [e for g in kept for e in range(g * size, (g + 1) * size)]
    return sorted(pool, key=lambda e: -float(scores[e]))[:spec.experts_per_token]


def per_token(moe, tokens: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """softmax over all experts (or a sigmoid of each), top k (of the best groups)
    renormalised, sum of the chosen experts' MLPs weighted, plus the (gated) shared experts:
    one token at a time."""
    act = F.silu if spec.activation == "silu" else lambda t: F.gelu(t, approximate="tanh")
    limit = spec.swiglu_limit
    out = torch.zeros_like(tokens)
    ex = moe.experts
    bias = {name: getattr(ex, f"{name}_bias") for name in ("w1", "w2", "w3")}
    project = {name: (lambda t, e, n=name: t @ getattr(ex, n)[e] + (bias[n][e] if bias[n] is not None else 0))
               for name in ("w1", "w2", "w3")}
    for i, t in enumerate(tokens):
        logits = moe.router.weight @ t + (moe.router.bias if moe.router.bias is not None else 0)
        scores = torch.sigmoid(logits) if spec.router == "sigmoid" else torch.softmax(logits, -1)
        chosen = _chosen(scores if moe.expert_bias is None else scores + moe.expert_bias, spec)
        weights = scores[chosen]
        weights = (weights / weights.sum() if spec.norm_topk_prob else weights) * spec.routed_scaling
        for w, e in zip(weights, chosen):
            gate = project["w1"](t, e)
            if limit is not None:  # gpt-oss's clamped SwiGLU, by its formula
                gate, up = gate.clamp(max=limit), project["w3"](t, e).clamp(-limit, limit)
                hidden = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            else:
                hidden = act(gate) * project["w3"](t, e) if ex.w3 is not None else act(gate)
            out[i] += w * project["w2"](hidden, e)
        if moe.shared_experts is not None:
            gate = torch.sigmoid(moe.shared_expert_gate.weight @ t) if moe.shared_expert_gate else 1
            out[i] += moe.shared_experts(t) * gate
    return out


@pytest.mark.parametrize("spec", [MOE, MOE_GELU, MOE_RAW, MOE_GROUPED, MOE_GROUPED_SOFTMAX, MOE_OSS, MOE_FREE],
                         ids=["gated-shared", "gelu-top1", "raw", "grouped-sigmoid", "grouped-softmax", "oss",
                              "loss-free"])
def test_moe_layer_is_the_routed_sum(spec):
    model = build_model(spec, seed=0)
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers.values()]
    assert kinds == ["FeedForward" if i in spec.dense_layers else "MoE" for i in range(spec.num_layers)]
    moe = model.layers[str(spec.num_layers - 1)].feed_forward
    x = torch.randn(3, 7, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if moe.expert_bias is not None:  # a bias as balancing leaves it, enough to change choices
            moe.expert_bias.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(moe(x).reshape(-1, spec.hidden_size),
                                   per_token(moe, x.reshape(-1, spec.hidden_size), spec))


def test_choice_bias_moves_against_each_experts_load():
    """Auxiliary-loss-free balancing (DeepSeek-V3 sec 2.1.2): over a training step each MoE
    layer counts the rows its router sent each expert (found here from the router's logits
    under the bias, token by token); after it the bias moves by the rate up for the experts
    below the mean load, down for those above, and no gradient touches it. Serving (eval)
    counts nothing."""
    model = build_model(MOE_FREE, seed=0)
    moes = [layer.feed_forward for layer in model.layers.values() if hasattr(layer.feed_forward, "router")]
    with torch.no_grad():
        for moe in moes:
            moe.expert_bias.uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(3))
    before = [moe.expert_bias.clone() for moe in moes]
    logits = []
    for moe in moes:
        moe.router.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    tokens = batches.global_batch(0, 4, 16, MOE_FREE.vocab_size, SEED)
    inputs, targets = batches.split_inputs_targets(tokens)
    loss_fn(model(inputs), targets).backward()
    assert all(moe.expert_bias.grad is None and not moe.expert_bias.requires_grad for moe in moes)
    update_expert_bias([model], None)
    for moe, bias, layer_logits in zip(moes, before, logits):
        load = torch.zeros(MOE_FREE.num_experts)
        for row in layer_logits:
            for e in _chosen(torch.sigmoid(row) + bias, MOE_FREE):
                load[e] += 1
        assert load.sum() == inputs.numel() * MOE_FREE.experts_per_token
        expected = bias + EXPERT_BIAS_RATE * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.expert_bias, expected, rtol=0, atol=1e-9)
        assert not moe.routed_counts
    model.eval()
    with torch.no_grad():
        model(inputs)
    assert not any(moe.routed_counts for moe in moes)


def test_contiguous_routing_sends_tokens_to_experts_in_turn_without_a_router():
    """plan.moe_routing contiguous (NeMo AutoModel's FakeBalancedGate): no router weights; the
    t-th token to experts k t .. k t + k - 1 (mod E), each weighted 1/k: the routed experts'
    sum by a token-by-token loop, with the gated shared expert on top."""
    model = build_model(MOE, seed=0)
    route_in_turn(model)
    moe = model.layers["1"].feed_forward
    assert moe.router is None and not any("router" in n for n, _ in model.named_parameters())
    x = torch.randn(7, MOE.hidden_size, generator=torch.Generator().manual_seed(1))
    ex, k = moe.experts, MOE.experts_per_token
    expected = torch.zeros_like(x)
    for t, row in enumerate(x):
        for e in ((k * t + j) % MOE.num_experts for j in range(k)):
            expected[t] += (F.silu(row @ ex.w1[e]) * (row @ ex.w3[e])) @ ex.w2[e] / k
        expected[t] += moe.shared_experts(row) * torch.sigmoid(moe.shared_expert_gate.weight @ row)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), expected)


def test_expert_with_no_rows_gets_zero_gradient():
    model = build_model(MOE, seed=0)
    experts = model.layers["1"].feed_forward.experts
    rows = torch.randn(5, MOE.hidden_size)
    experts(rows, torch.tensor([2, 0, 3, 0])).square().sum().backward()
    assert experts.w1.grad[[1, 3]].abs().max() == 0 and experts.w2.grad[[1, 3]].abs().max() == 0
    assert experts.w1.grad[0].abs().max() > 0 and experts.w2.grad[2].abs().max() > 0


def test_grouped_gemm_equals_one_matmul_per_expert():
    """torch._grouped_mm (CPU, and bf16 on CUDA) against the per-expert loop that other CUDA
    dtypes take, forward and backward, with an expert of no rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 16, generator=gen, requires_grad=True)
    w = torch.randn(3, 16, 8, generator=gen, requires_grad=True)
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)
    grad = torch.randn(9, 8, generator=gen)
    outs, grads = [], []
    for mm in (grouped_mm, looped_mm):
        out = mm(x, w, offsets)
        out.backward(grad)
        outs.append(out.detach())
        grads.append((x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][1][1].abs().max() == 0


def test_parameter_count_matches_model_spec():
    for spec in (MOE, MOE_GELU, MOE_GROUPED, MOE_OSS):
        assert sum(p.numel() for p in build_model(spec, 0).parameters()) == spec.num_params()


@pytest.mark.parametrize("fields, field", [
    (dict(dp=2, tp=2), "plan.sp"),
    (dict(dp=2, tp=2, etp=2), "plan.sp"),  # without SP the TP ranks' tokens are the same
    (dict(dp=2, ep=2, dtype="bf16", master_weights=False), "plan.master_weights"),
])
def test_executor_refuses_what_it_does_not_run(fields, field):
    p = plan(**fields)
    with pytest.raises(PlanError) as err:
        check_train(MOE, p, Cluster(p.world_size, p.world_size), RunOptions())
    assert err.value.field == field


def test_executor_takes_expert_parallel_plans():
    for p in (plan(dp=2, ep=2), plan(dp=4, ep=2, zero=3), plan(dp=4, ep=4, recompute="full"),
              plan(dp=2, pp=2, ep=2, schedule="1f1b", micro_batch=1), plan(dp=2, tp=2, sp=True, etp=1, ep=2,
                                                                          recompute="op")):
        assert not rules.violations(rules.EXECUTOR_TRAINING, p.fields(), MOE, Cluster(4, 4))
    dense = ModelSpec("dense", 2, 32, 4, 2, 64, 128, 64)
    assert not rules.violations(rules.EXECUTOR_TRAINING, plan(tp=2, dp=2, zero=2).fields(), dense)
    for routed in (MOE_GROUPED, MOE_GROUPED_SOFTMAX):
        assert not rules.violations(rules.EXECUTOR_TRAINING, plan(dp=2, ep=2).fields(), routed, Cluster(2, 2))
    assert not rules.violations(rules.EXECUTOR_TRAINING, plan(dp=2, ep=2).fields(), MOE_OSS, Cluster(2, 2))
    # its sinks and sliding window join every exchange's core, the ring's merges too
    for comm in ("p2p", "alltoall", "allgather", "a2a"):
        assert not rules.violations(rules.EXECUTOR_TRAINING, plan(cp=2, cp_comm=comm).fields(), MOE_OSS,
                                    Cluster(2, 2))


def test_validation_suite_runs_expert_parallel_plans():
    """`meshplan validate` covers EP: its MoE plans are legal, run here, and are priced."""
    from meshplan.validation.suite import MOE_SUITE, SUITES, VALIDATION_MOE_MODEL
    assert (VALIDATION_MOE_MODEL, MOE_SUITE) in SUITES
    eps = set()
    for _, p in MOE_SUITE:
        cluster = Cluster(p.world_size, p.world_size)
        ran = check_train(VALIDATION_MOE_MODEL, p, cluster, RunOptions(profile="local"))
        eps.add((ran.ep, ran.edp))
    assert {(2, 1), (2, 2)} <= eps


WORLD_2 = [("ep2", MOE, plan(dp=2, ep=2)),
           ("ep2-gelu-top1-recompute", MOE_GELU, plan(dp=2, ep=2, recompute="full")),
           ("ep1-zero3", MOE, plan(dp=2, zero=3)),
           ("pp2-zb-h1", MOE, plan(pp=2, schedule="zb-h1")),
           ("pp2-interleaved", replace(MOE, num_layers=4), plan(pp=2, schedule="interleaved",
                                                                 virtual_stages=2)),
           ("tp2-sp-ep1", MOE, plan(tp=2, sp=True, etp=1)),
           ("tp2-sp-ep2", MOE_GELU, plan(tp=2, sp=True, etp=1, ep=2)),
           # the attention norm's gather rebuilt with it; the routed experts take the shards
           ("tp2-sp-ep2-norm-act", MOE, plan(tp=2, sp=True, etp=1, ep=2, recompute="norm_act")),
           # expert TP: each expert's width split over the TP ranks, which route their own rows;
           # gpt-oss's up-projection biases split with the width, the down projection's added
           # after the sum on each rank's rows, its gradient summed over the two
           ("oss-tp2-sp-etp2", MOE_OSS, plan(tp=2, sp=True, etp=2)),
           # every expert owned by one rank (edp 1): their optimizer unsharded
           ("ep2-zero1", MOE, plan(dp=2, ep=2, zero=1)),
           # the experts split over the CP ranks, which route their own sequence shards
           ("cp2-ep2", MOE, plan(cp=2, ep=2, cp_comm="a2a")),
           # DeepSeek-V3's router: a sigmoid, the best experts of the best groups
           ("grouped-ep2", MOE_GROUPED, plan(dp=2, ep=2)),
           # gpt-oss's: the experts' biases split with them, the sinks with TP's heads
           ("oss-ep2", MOE_OSS, plan(dp=2, ep=2)),
           # a token sent once to each rank its experts sit on, weighted and summed there
           ("deepep-ep2", MOE_GROUPED, plan(dp=2, ep=2, moe_dispatcher="deepep")),
           # DeepSeek-V3's choice bias, moved by the load the two ranks' tokens gave each expert
           ("loss-free-ep2", MOE_FREE, plan(dp=2, ep=2)),
           # the per-op policy keeping the all-to-alls' outputs and redoing the router and the
           # grouped GEMMs, each micro-batch's rows counted again in the redone forward
           ("loss-free-ep2-recompute-op", MOE_FREE, plan(dp=2, ep=2, recompute="op")),
           # the norms' outputs and the experts' activation output rebuilt in backward; under
           # ZeRO-3 the norm's weight gathered again for it
           ("oss-ep2-zero3-norm-act", MOE_OSS, plan(dp=2, ep=2, zero=3, recompute="norm_act")),
           # AutoModel's benchmark routing: tokens to experts in turn, no router
           ("contiguous-ep2", MOE, plan(dp=2, ep=2, moe_routing="contiguous"))]
WORLD_4 = [("ep2-edp2", MOE_RAW, plan(dp=4, ep=2, micro_batch=1)),
           ("ep4", MOE, plan(dp=4, ep=4)),
           ("ep2-edp2-zero2", MOE, plan(dp=4, ep=2, zero=2)),
           # the dense parameters' optimizer sharded over dp 4, the experts' over edp 2
           ("ep2-edp2-zero1", MOE, plan(dp=4, ep=2, zero=1)),
           ("dp2-cp2-ep4", MOE, plan(dp=2, cp=2, ep=4, cp_comm="a2a")),
           ("ep4-zero3", MOE_GELU, plan(dp=4, ep=4, zero=3)),
           ("pp2-dp2-ep2-1f1b", MOE, plan(pp=2, dp=2, ep=2, schedule="1f1b", micro_batch=1)),
           ("dp2-tp2-sp-ep2", MOE, plan(dp=2, tp=2, sp=True, etp=1, ep=2)),
           ("dp2-tp2-sp-ep4-zero3", MOE, plan(dp=2, tp=2, sp=True, etp=1, ep=4, zero=3)),
           ("oss-dp2-tp2-sp-ep2", MOE_OSS, plan(dp=2, tp=2, sp=True, etp=1, ep=2)),
           ("deepep-ep4", MOE, plan(dp=4, ep=4, moe_dispatcher="deepep")),
           ("dp2-tp2-sp-ep2-etp2", MOE_GELU, plan(dp=2, tp=2, sp=True, ep=2, etp=2)),
           ("deepep-dp2-tp2-sp-ep4", MOE_OSS, plan(dp=2, tp=2, sp=True, etp=1, ep=4, moe_dispatcher="deepep")),
           # the choice bias's load summed over each stage's dp x tp ranks, a stage apiece
           ("dp2-tp2-sp-ep2-recompute-op", MOE, plan(dp=2, tp=2, sp=True, etp=1, ep=2, recompute="op")),
           # the rebuild under a pipeline (its metadata inference's backward takes no gradients)
           ("pp2-dp2-ep2-norm-act", MOE, plan(pp=2, dp=2, ep=2, schedule="1f1b", micro_batch=1,
                                              recompute="norm_act")),
           ("contiguous-dp2-tp2-sp-ep2-deepep", MOE, plan(dp=2, tp=2, sp=True, etp=1, ep=2, moe_dispatcher="deepep",
                                                          moe_routing="contiguous")),
           ("loss-free-pp2-tp2-sp-ep2", MOE_FREE, plan(pp=2, tp=2, sp=True, etp=1, ep=2, schedule="1f1b",
                                                       micro_batch=1))]


def _top_experts(logits: torch.Tensor, model: ModelSpec) -> torch.Tensor:
    """Each token's chosen experts [tokens, k] from its router logits (_chosen)."""
    if not model.route_groups:
        return logits.topk(model.experts_per_token, -1)[1]
    scores = torch.sigmoid(logits) if model.router == "sigmoid" else torch.softmax(logits, -1)
    return torch.tensor([_chosen(row, model) for row in scores])


def reference_imbalance(model: ModelSpec, p: Plan) -> float:
    """The routing imbalance that an EP-over-all-DP-ranks run measures, found independently:
    one process trains on the whole batch (as the numerics reference), a hook records each
    token's top-k experts in every MoE layer, and the tokens are grouped as the EP ranks
    see them (micro-batch j of every DP rank at once); each group's busiest EP rank's rows
    over the mean, averaged over steps, micro-batches and layers."""
    assert p.ep == p.dp and p.tp == p.pp == 1
    torch.manual_seed(SEED)
    net = build_model(model, SEED)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR)
    chosen: list[torch.Tensor] = []
    for layer in net.layers.values():
        if hasattr(layer.feed_forward, "router"):
            layer.feed_forward.router.register_forward_hook(
                lambda _m, _i, logits: chosen.append(_top_experts(logits.detach(), model)))
    ratios = []
    rows_per_rank, chunks = p.global_batch // p.dp, p.num_microbatches
    for step in range(STEPS):
        tokens = batches.global_batch(step, p.global_batch, p.seq_len, model.vocab_size, SEED)
        inputs, targets = batches.split_inputs_targets(tokens)
        chosen.clear()
        loss_fn(net(inputs), targets).backward()
        for flat in chosen:  # [sequences * positions, k]
            experts = flat.view(inputs.shape[0], -1, model.experts_per_token)
            for j in range(chunks):
                group = torch.cat([experts[d * rows_per_rank:(d + 1) * rows_per_rank].chunk(chunks)[j]
                                   for d in range(p.dp)])
                per_rank = group.flatten().bincount(minlength=model.num_experts).view(p.ep, -1).sum(1)
                ratios.append(per_rank.max().item() / per_rank.float().mean().item())
        optimizer.step()
        optimizer.zero_grad()
    return sum(ratios) / len(ratios)


@pytest.mark.slow
@pytest.mark.parametrize("world, jobs", [(2, WORLD_2), (4, WORLD_4)], ids=["world2", "world4"])
def test_moe_plans_match_single_process(world, jobs, tmp_path):
    runs = run_group(jobs, world, tmp_path)
    for job_id, _, _ in jobs:
        index, record = runs[job_id]
        assert record.world_size == world, job_id
        check_against_reference(tmp_path, index, record)
    # the plan as executed carries the routing imbalance the run measured, which the
    # prediction prices; without EP the experts' work is not split and it stays as planned
    for job_id, model, planned in jobs:
        ran = runs[job_id][1].plan
        if planned.moe_routing == "contiguous":  # a micro-batch's tokens x k a multiple of E: even
            assert ran.moe_capacity_factor == 1.0, job_id
        elif planned.ep == planned.dp > 1 and planned.tp == planned.pp == 1:
            assert ran.moe_capacity_factor == pytest.approx(reference_imbalance(model, planned), rel=0.02)
        if planned.ep == 1:
            assert ran.moe_capacity_factor == planned.moe_capacity_factor, job_id
        assert ran.moe_capacity_factor >= 1.0


@pytest.mark.slow
def test_moe_serving_with_tp_matches_single_process():
    """Serving splits each expert's width over TP (the shared expert as the dense MLP) or
    keeps whole experts in each pipeline stage: greedy tokens equal the single-process
    generation at tp 2 and at pp 2, and TP holds a share of the expert weights."""
    from meshplan.executor.generate import generate, prompt_tokens
    from meshplan.executor.launch import launch_serve_many
    from meshplan.executor.options import ServeOptions
    from meshplan.simulator.serve import InferencePlan
    plans = [InferencePlan(batch=4, prompt_len=12, gen_len=8, dtype="fp32", **f)
             for f in (dict(tp=2), dict(pp=2))]
    records = launch_serve_many([(MOE, p) for p in plans], Cluster(2, 2),
                                ServeOptions(warmup=0, repeats=1, seed=0))
    expected = generate(build_model(MOE, 0).eval(), prompt_tokens(4, 12, MOE.vocab_size, 0), 8)
    for p, record in zip(plans, records):
        assert torch.equal(torch.tensor(record.tokens), expected), p
    tp_weights = max(m["weights_bytes"] for m in records[0].memory_by_rank)
    assert tp_weights < 0.75 * MOE.num_params() * 4
