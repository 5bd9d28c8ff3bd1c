"""Mixture-of-experts parallelism and FP8 training against hand computations: the
parallel-folding legality rules, the expert mesh's placement, the token exchange's volume,
expert memory over EP and the expert data-parallel group, FP8 GEMM time and cast passes."""
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from meshplan.core.errors import PlanError
from meshplan.core.mesh import Group
from meshplan.hw_profiles.profile import load_profile
from meshplan.simulator import rules
from meshplan.simulator.cost import _op_arrays, ep_comm_s, ep_counts_s, groups_hit, tp_edge_comm_s
from meshplan.simulator.memory import optimizer_bytes_per_param, stage_params
from meshplan.simulator.model_spec import ZOO, load_model
from meshplan.simulator.ops import FP8_CAST_BYTES, GEMM, Shard, active_experts, layer_ops
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate
from meshplan.validation.published import PublishedRun, fit_moe_host_gap, predict

H100, A100 = load_profile("h100-80gb"), load_profile("a100-80gb")
CONFIGS = Path(__file__).parent / "data" / "hf_configs"
MIXTRAL = load_model(str(CONFIGS / "mixtral-8x7b.json"))
# Mixtral 8x7B: 32 layers of 8 experts, each a gated MLP 4096 -> 14336 (transformers' count)
EXPERTS = 32 * 8 * 3 * 4096 * 14336
TOTAL = 46_702_792_704


def plan(**kw) -> Plan:
    return Plan(**{"global_batch": 256, "seq_len": 4096, **kw})


@pytest.mark.parametrize("kw,field", [
    (dict(dp=64, ep=3), "plan.ep"),                     # 3 does not divide 8 experts (nor 64 ranks)
    (dict(dp=4, ep=8), "plan.ep"),                      # ep x etp = 8 > tp*cp*dp = 4 ranks per stage
    (dict(tp=2, dp=32, ep=8, etp=1), "plan.sp"),        # EP with TP needs SP (Megatron-Core)
    (dict(tp=2, dp=32, etp=1), "plan.etp"),             # without SP the experts shard as the MLP
    (dict(tp=2, pp=2, dp=16, sp=True, ep=4, etp=1, placement=("tp", "cp", "pp", "dp")), "plan.placement"),
])
def test_illegal_expert_meshes_name_the_field(kw, field):
    with pytest.raises(PlanError) as err:
        plan(**kw).validate(MIXTRAL, Cluster(kw.get("tp", 1) * kw.get("pp", 1) * kw["dp"], 8))
    assert field in {f for f, _, _ in err.value.issues}


def test_dense_models_have_no_experts_to_place():
    with pytest.raises(PlanError, match="no experts"):
        plan(dp=8, ep=2).validate(ZOO["llama-2-7b"], Cluster(8, 8))
    plan(dp=8).validate(ZOO["llama-2-7b"], Cluster(8, 8))   # etp defaults to tp


def test_folding_rules_hold_over_arrays_as_for_one_plan():
    """The rules the candidate table applies to arrays agree with the one-plan verdicts."""
    cases = [dict(tp=2, pp=2, dp=16, sp=True, ep=e, etp=t, placement=pl) for e in (1, 2, 4, 8)
             for t in (1, 2) for pl in (("tp", "cp", "dp", "pp"), ("tp", "cp", "pp", "dp"))]
    fields = {k: np.array([c[k] if k != "placement" else ",".join(c[k]) for c in cases])
              for k in ("tp", "pp", "dp", "sp", "ep", "etp", "placement")}
    x = SimpleNamespace(**fields, cp=np.ones(len(cases), int), global_batch=256, micro_batch=np.ones(len(cases), int))
    ok = rules.holds(rules.TRAINING, x, MIXTRAL, Cluster(64, 8),
                     available=("tp", "pp", "dp", "cp", "sp", "ep", "etp", "placement"))
    for case, verdict in zip(cases, ok):
        try:
            plan(**case).validate(MIXTRAL, Cluster(64, 8))
            legal = True
        except PlanError:
            legal = False
        assert verdict == legal, case


def test_expert_mesh_folds_over_the_stage_ranks():
    # tp 2 x dp 32 attention; experts etp 1 x ep 8 x edp 8: the EP group is 8 consecutive
    # ranks (one node), the expert data-parallel group every 8th rank (8 nodes)
    p = plan(tp=2, dp=32, sp=True, ep=8, etp=1)
    mesh = p.expert_mesh(8)
    assert p.edp == 8 and mesh.group(("ep",)) == Group(8, 8) and mesh.group(("edp",)) == Group(8, 1)
    # expert TP 2 inside, EP 8 spans two nodes
    assert plan(tp=2, dp=32, sp=True, ep=8, etp=2).expert_mesh(8).group(("ep",)) == Group(8, 4)


def test_all_to_all_volume_by_hand():
    # one MoE block of Mixtral, 4096 tokens on the rank, top-2, bf16: each rank's buffer
    # holds 4096 x 2 rows of 4096 x 2 bytes = 64 MiB, dispatched and combined
    message = 4096 * 2 * 4096 * 2
    assert message == 64 * 2 ** 20
    one = ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 8, 8, 1, 1)
    assert one == pytest.approx(2 * H100.collective_time_s("all_to_all", message, 8, 8))
    # the capacity factor scales the busiest rank's rows
    assert ep_comm_s(MIXTRAL, 4096, 2, 1.5, H100, 8, 8, 1, 1) == pytest.approx(
        2 * H100.collective_time_s("all_to_all", 1.5 * message, 8, 8))
    # with expert TP 2 the 8192 received rows are gathered (and reduce-scattered) over ETP
    gathered = 2 * message
    assert ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 8, 8, 2, 2) == pytest.approx(
        one + H100.collective_time_s("all_gather", gathered, 2, 2)
        + H100.collective_time_s("reduce_scatter", gathered, 2, 2))
    # at ep 1 the tokens, not the rows, are gathered over ETP (the all-gather dispatcher)
    assert ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 1, 1, 8, 8) == pytest.approx(
        H100.collective_time_s("all_gather", 8 * 4096 * 4096 * 2, 8, 8)
        + H100.collective_time_s("reduce_scatter", 8 * 4096 * 4096 * 2, 8, 8))


def test_dispatch_counts_exchange_once_per_forward_by_hand():
    # Mixtral on one node, dp8 ep8, 32 micro-batches of 4096 tokens through 32 MoE layers:
    # each forward and each backward dispatches and combines 64 MiB per rank, and each
    # forward first exchanges the 8 experts' row counts (8 x int64); apart from that, each
    # forward's MoE block waits for the host
    assert ep_counts_s(MIXTRAL, H100, 8, 8) == pytest.approx(H100.collective_time_s("all_to_all", 64, 8, 8))
    assert ep_counts_s(MIXTRAL, H100, 1, 1) == 0.0
    result = simulate(MIXTRAL, plan(dp=8, ep=8, micro_batch=1), Cluster(8, 8), H100)
    a2a = H100.collective_time_s("all_to_all", 64 * 2 ** 20, 8, 8)
    assert result.breakdown_s["ep_comm"] == pytest.approx(
        32 * 32 * (2 * 2 * a2a + H100.collective_time_s("all_to_all", 64, 8, 8)))
    assert H100.overhead.moe_host_gap_s > 0
    assert result.breakdown_s["host_gap"] == pytest.approx(32 * 32 * H100.overhead.moe_host_gap_s)


@pytest.mark.parametrize("groups", [2, 8, 16, 64])
def test_group_limited_routing_hits_fewer_groups_as_a_monte_carlo_of_it(groups):
    """DeepSeek-V3 (256 experts in 8 routing groups, each token's 8 from its best 4 groups)
    against sampled routing: 4 of the 8 groups, then 8 experts among their 128."""
    model = load_model(str(CONFIGS / "deepseek-v3.json"))
    assert (model.route_groups, model.route_group_topk) == (8, 4)
    rng, e, k, r, t = np.random.default_rng(0), 256, 8, 8, 4
    samples = []
    for _ in range(4000):
        chosen = rng.choice(r, t, replace=False)
        pool = np.concatenate([np.arange(g * e // r, (g + 1) * e // r) for g in chosen])
        samples.append(len(np.unique(rng.choice(pool, k, replace=False) // (e // groups))))
    assert groups_hit(model, groups) == pytest.approx(np.mean(samples), abs=4 * np.std(samples) / np.sqrt(4000))
    # fewer than without the limit: the nodes DeepEP sends a token to (DeepSeek-V3 sec 2.1.2)
    free = replace(model, route_groups=0, route_group_topk=0)
    assert groups_hit(model, groups) < groups_hit(free, groups)


def test_deepep_sends_each_token_once_per_rank_and_per_remote_node():
    # 8 experts over 2 groups (4 each), top-2: a group is missed with probability
    # C(4,2)/C(8,2) = 6/28
    assert groups_hit(MIXTRAL, 2) == pytest.approx(2 * (1 - 6 / 28))
    assert groups_hit(MIXTRAL, 1) == pytest.approx(1.0)
    # one expert per rank: a token's 2 experts are 2 ranks, as many rows as the all-to-all's
    assert ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 8, 8, 1, 1, "deepep") == pytest.approx(
        ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 8, 8, 1, 1))
    # two experts per rank (ep 4): 4 x (1 - C(6,2)/C(8,2)) = 13/7 ranks per token, not 2 rows
    row = 4096 * MIXTRAL.hidden_size * 2
    assert ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 4, 4, 1, 1, "deepep") == pytest.approx(
        2 * H100.collective_time_s("all_to_all", 13 / 7 * row, 4, 4))
    # across 2 nodes it puts 22/28 rows per token on the NICs instead of 2 x 1/2
    assert ep_comm_s(MIXTRAL, 4096, 2, 1.0, H100, 8, 4, 1, 1, "deepep") < ep_comm_s(
        MIXTRAL, 4096, 2, 1.0, H100, 8, 4, 1, 1)


def test_contiguous_routing_spans_the_groups_its_consecutive_experts_sit_on():
    """NeMo AutoModel's fake_balanced_gate: token t takes experts k t .. k t + k - 1 (mod E).
    Counted token by token over a long run of tokens, against the cycle groups_hit averages."""
    def by_tokens(e, k, g, tokens=1000):
        return np.mean([len({((k * t + j) % e) // (e // g) for j in range(k)}) for t in range(tokens)])
    for e, k, g in ((6, 2, 2), (128, 8, 8), (128, 4, 64), (128, 4, 8), (256, 8, 64), (12, 5, 4)):
        model = replace(MIXTRAL, num_experts=e, experts_per_token=k)
        assert groups_hit(model, g, "contiguous") == pytest.approx(by_tokens(e, k, g), abs=0.01), (e, k, g)
    # by hand: 6 experts in 2 groups of 3, top-2 starts 0, 2, 4: groups {0}, {0, 1}, {1}
    assert groups_hit(replace(MIXTRAL, num_experts=6, experts_per_token=2), 2, "contiguous") == pytest.approx(4 / 3)
    # Qwen3-30B-A3B under EP 8: a token's 8 experts sit on one rank of 16, where learned
    # routing reaches 8 (1 - C(112, 8) / C(128, 8)) ranks
    qwen = replace(MIXTRAL, num_experts=128, experts_per_token=8)
    assert groups_hit(qwen, 8, "contiguous") == 1.0 and groups_hit(qwen, 8) > 5
    # DeepSeek-V3's routing groups do not bound the gate that ignores them
    dsv3 = load_model(str(CONFIGS / "deepseek-v3.json"))
    assert groups_hit(dsv3, np.array([1, 8, 64]), "contiguous") == pytest.approx([1.0, 1.0, 2.0])


def test_contiguous_routing_shrinks_deepeps_exchange_only():
    qwen = replace(MIXTRAL, num_experts=128, experts_per_token=8)
    # DeepEP: one row per rank a token reaches, 1 (contiguous) against groups_hit (learned)
    row = 4096 * qwen.hidden_size * 2
    assert ep_comm_s(qwen, 4096, 2, 1.0, H100, 8, 8, 1, 1, "deepep", "contiguous") == pytest.approx(
        2 * H100.collective_time_s("all_to_all", row, 8, 8))
    assert ep_comm_s(qwen, 4096, 2, 1.0, H100, 8, 8, 1, 1, "deepep") == pytest.approx(
        2 * H100.collective_time_s("all_to_all", float(groups_hit(qwen, 8)) * row, 8, 8))
    # the all-to-all dispatcher sends every routed row wherever the experts sit
    assert ep_comm_s(qwen, 4096, 2, 1.0, H100, 16, 8, 1, 1, "alltoall", "contiguous") == pytest.approx(
        ep_comm_s(qwen, 4096, 2, 1.0, H100, 16, 8, 1, 1))


def test_active_experts_occupancy():
    assert active_experts(8, 2, 1) == pytest.approx(2)                 # one token: its k experts
    assert active_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert active_experts(256, 8, 10 ** 6) == pytest.approx(256)


def test_expert_memory_by_hand():
    # ep 8: each rank holds one of the 8 experts of every layer, the rest whole
    assert stage_params(MIXTRAL, 1, 1, 32, True, True, 8, 1) == pytest.approx(TOTAL - EXPERTS + EXPERTS / 8)
    # ep 2 x etp 4 = 8-way sharded experts; attention over tp 4, norms and router replicated
    replicated = 32 * (2 * 4096 + 8 * 4096) + 4096
    assert stage_params(MIXTRAL, 4, 1, 32, True, True, 2, 4) == pytest.approx(
        (TOTAL - EXPERTS - replicated) / 4 + replicated + EXPERTS / 8)
    # ZeRO-1: the experts' optimizer states shard over the expert data-parallel group
    # (64 / 8 = 8 ranks), the rest over all 64 data-parallel ranks
    result = simulate(MIXTRAL, plan(dp=64, ep=8, zero=1, recompute="full"), Cluster(64, 8), H100)
    dense, experts = TOTAL - EXPERTS, EXPERTS / 8
    assert result.stages[0].memory.optimizer_bytes == pytest.approx(
        optimizer_bytes_per_param("bf16", True) * (dense / 64 + experts / 8))
    assert result.stages[0].memory.weights_bytes == pytest.approx(2 * (dense + experts))


def test_expert_gemms_run_at_the_per_expert_shape():
    # 4096 tokens x top-2 on ep 8 ranks: each rank's one expert gets the 8192 rows its
    # 8-rank EP group routes to it (balanced); at ep 1 each of 8 experts gets 1024
    def experts(shard):
        return [op for op in layer_ops(MIXTRAL, shard) if op.name == "expert_up"][0]
    up = experts(Shard(1, 4096, ep=8, etp=1))
    assert (up.m, up.batch, up.n, up.k) == (8192, 1, 2 * 14336, 4096)
    up = experts(Shard(1, 4096))
    assert (up.m, up.batch) == (1024, 8)
    assert experts(Shard(1, 4096, ep=8, etp=1, capacity=1.25)).m == 8192 * 1.25


def test_exchange_replaces_the_experts_half_of_tp_communication():
    # tp 2 with SP and ep 1, etp 2: the experts' gather/scatter over ETP is what the dense
    # MLP's TP all-gather/reduce-scatter was; the attention's stays TP
    base = plan(tp=2, dp=32, sp=True)
    sim = simulate(MIXTRAL, base, Cluster(64, 8), H100)
    b = sim.breakdown_s
    # besides the layers', TP moves the embedding's, the head's and the loss's
    edges = base.num_microbatches * sum(tp_edge_comm_s(MIXTRAL, base.micro_batch * 4096, True, 2, H100, 2, 2))
    assert b["ep_comm"] > 0 and b["tp_comm"] - edges == pytest.approx(b["ep_comm"], rel=1e-9)


def test_fp8_gemms_at_twice_the_bf16_rate():
    # a large compute-bound GEMM: same efficiency at the fp8 peak (2 x bf16, H100 datasheet)
    lat = H100.gemm["bf16"].latency_s
    t16 = H100.gemm_time_s(8192, 8192, 8192, "bf16") - lat
    t8 = H100.gemm_time_s(8192, 8192, 8192, "fp8") - lat
    assert t16 / t8 == pytest.approx(1979 / 989)
    # a weight-read-bound one (one token): half the bytes of the weight
    w16 = H100.gemm_time_s(1, 8192, 8192, "bf16") - lat
    w8 = H100.gemm_time_s(1, 8192, 8192, "fp8") - lat
    assert w16 / w8 == pytest.approx(2.0, rel=1e-3)


def test_fp8_cast_passes_by_hand():
    model = ZOO["llama-2-7b"]
    ops = layer_ops(model, Shard(1, 4096, fp8="tensorwise"))
    fp8 = [op for op in ops if op.fp8]
    assert {op.name for op in fp8} == {"qkv_proj", "out_proj", "mlp_up", "mlp_down"}
    assert not any(op.fp8 for op in ops if op.attention_core)
    cast = [op for op in ops if op.name == "fp8_cast"][0]
    t, h, f = 4096, 4096, 11008
    inputs = t * h + t * h + t * h + t * f                  # X of qkv, out, up, down
    weights = h * 3 * h + h * h + h * 2 * f + f * h
    grads = t * 3 * h + t * h + t * 2 * f + t * h           # dY of each
    assert cast.bytes_moved == FP8_CAST_BYTES["tensorwise"] * (inputs + weights)
    assert cast.bwd_bytes == FP8_CAST_BYTES["tensorwise"] * grads
    fwd, bwd_in, _, _ = _op_arrays([cast], H100, "fp8")
    assert bwd_in[0] == pytest.approx(H100.memory_bound_time_s(cast.bwd_bytes, "bf16", "add"))
    assert all(op.kind != GEMM or not op.fp8 for op in ops if op.name == "fp8_cast")


def test_fp8_training_is_faster_but_not_twice():
    model, cluster = ZOO["llama-3-8b"], Cluster(8, 8)
    kw = dict(global_batch=16, seq_len=8192, dp=8, zero=3, micro_batch=2)
    bf16 = simulate(model, Plan(**kw), cluster, H100)
    fp8 = simulate(model, Plan(**kw, dtype="fp8"), cluster, H100)
    delayed = simulate(model, Plan(**kw, dtype="fp8", fp8_recipe="delayed"), cluster, H100)
    assert 1.1 < bf16.step_time_s / fp8.step_time_s < 2.0
    assert delayed.step_time_s < fp8.step_time_s   # no separate amax pass
    # bf16 weights kept; with torchao's bf16 inputs kept for backward, the same activations
    torchao = simulate(model, Plan(**kw, dtype="fp8", fp8_saved_dtype="bf16"), cluster, H100)
    assert torchao.peak_memory_bytes == bf16.peak_memory_bytes > fp8.peak_memory_bytes


def test_fp8_refused_where_the_profile_has_none():
    with pytest.raises(PlanError, match="a100-80gb has no fp8"):
        simulate(ZOO["llama-2-7b"], Plan(global_batch=8, seq_len=2048, dp=8, dtype="fp8"), Cluster(8, 8), A100)


def _moe_run(run_id: str, micro_batch: int, measured_s: float) -> PublishedRun:
    fixed = {"global_batch": 64, "seq_len": 4096, "dp": 8, "tp": 1, "pp": 1, "cp": 1, "ep": 8, "zero": 1,
             "micro_batch": micro_batch, "recompute": "none", "dtype": "bf16"}
    return PublishedRun(run_id, "synthetic", MIXTRAL, "h100-80gb", Cluster(8, 8), fixed, measured_s, None, "")


def test_the_host_gap_fit_recovers_a_known_gap_from_the_fit_half_only():
    """Runs measured as meshplan predicts them with a 2 ms host gap per MoE block forward: the fit
    finds 2 ms from the fit-half rows (ids hashed there) and ignores a held-out row that
    says otherwise."""
    truth = 2e-3
    at_truth = replace(H100, overhead=replace(H100.overhead, moe_host_gap_s=truth))
    runs = [_moe_run(run_id, mb, predict(_moe_run(run_id, mb, 1.0), at_truth).step_time_s)
            for run_id, mb in (("synthetic-moe-2", 1), ("synthetic-moe-5", 2), ("synthetic-moe-6", 4))]
    held_out = _moe_run("synthetic-moe-0", 1, 100.0)
    assert all(run.fit_half for run in runs) and not held_out.fit_half
    gap_s, terms = fit_moe_host_gap(runs + [held_out])
    assert [t[0] for t in terms] == [run.id for run in runs] and all(g > 0 for *_, g in terms)
    assert gap_s == pytest.approx(truth, rel=1e-3)
