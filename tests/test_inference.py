"""Serving simulator and serving search against independent numbers: KV-cache sizes by hand,
the bandwidth bound of batch-1 decode, FLOP-rate bounds of prefill, memory capacity."""
import pytest

from meshplan.hw_profiles.profile import load_profile
from meshplan.core.errors import PlanError
from meshplan.planner.serve_search import explain_inference, search_inference
from meshplan.simulator.serve import InferencePlan, kv_elements_per_token, simulate_inference
from meshplan.simulator.memory import memory_reserve_bytes
from meshplan.simulator.model_spec import ZOO, ModelSpec
from meshplan.simulator.plan import Cluster

A100 = load_profile("a100-80gb")
L70, L7, L3_8 = ZOO["llama-2-70b"], ZOO["llama-2-7b"], ZOO["llama-3-8b"]


def run(model, gpus=4, **kw):
    kw = {"batch": 1, "prompt_len": 128, "gen_len": 128, **kw}
    return simulate_inference(model, InferencePlan(**kw), Cluster(gpus, 8), A100)


# ---- KV cache ----

def test_kv_elements_per_token_gqa_and_mha():
    assert kv_elements_per_token(L70) == 2 * 8 * 128  # GQA, 8 KV heads: K and V of each
    assert kv_elements_per_token(L7) == 2 * 32 * 128  # MHA


def test_kv_heads_replicate_when_tp_exceeds_them():
    assert kv_elements_per_token(L70, 4) == 2 * 2 * 128
    assert kv_elements_per_token(L70, 8) == kv_elements_per_token(L70, 16) == 2 * 1 * 128


def test_kv_cache_bytes_at_full_context():
    r = run(L70, tp=4, batch=8, prompt_len=2048, gen_len=128)
    assert r.kv_cache_bytes == 8 * (2048 + 128) * 327_680 / 4
    fp8 = run(L70, tp=4, batch=8, prompt_len=2048, gen_len=128, kv_dtype="fp8")
    assert fp8.kv_cache_bytes == r.kv_cache_bytes / 2
    assert fp8.max_batch > r.max_batch


# ---- decode ----

def test_batch1_decode_is_weight_bandwidth_plus_allreduce_latency():
    r = run(L70, tp=4)
    # Per-device weights read each step: layers' attention + MLP and the LM head, over TP.
    weights = 2 * (80 * (L70.attention_params() + L70.mlp_params()) + L70.vocab_size * 8192) / 4
    read_s = weights / (A100.hbm_bytes_per_s * A100.gemm["fp16"].hbm_eff)
    allreduce_s = 2 * 80 * A100.collective_time_s("all_reduce", 8192 * 2, 4, 4)
    assert r.tpot_s == pytest.approx(read_s + allreduce_s, rel=0.15)
    assert r.tpot_s > read_s + allreduce_s
    # The rest is the kernel-launch floor: per layer 4 weight GEMMs (QKV, out, gate-up, down),
    # one attention kernel, 7 elementwise kernels (2 norms, rope, KV append, activation,
    # 2 residual adds); plus the LM head GEMM.
    gemm_lat, mem_lat = A100.gemm["fp16"].latency_s, A100.memory_bound["fp16"].latency_s
    launches_s = 80 * (5 * gemm_lat + 7 * mem_lat) + gemm_lat
    assert r.tpot_s == pytest.approx(read_s + allreduce_s + launches_s, rel=0.05)
    parts = r.breakdown["decode_step_s"]
    assert parts["weights_read"] > 0.7 * r.tpot_s and parts["kv_read"] == 0.0


def test_decode_kv_read_grows_with_context_at_memory_bound_rate():
    short = run(L70, tp=4, batch=32, prompt_len=128)
    long = run(L70, tp=4, batch=32, prompt_len=2048)
    extra_bytes = 32 * (2048 - 128) * 327_680 / 4
    expected = extra_bytes / (A100.hbm_bytes_per_s * A100.memory_bound["fp16"].hbm_eff)
    assert long.tpot_s - short.tpot_s == pytest.approx(expected, rel=0.05)


def test_more_tp_lowers_tpot_at_batch1():
    tpots = [run(L70, gpus=tp, tp=tp).tpot_s for tp in (2, 4, 8)]
    assert tpots[0] > tpots[1] > tpots[2]


def test_pipeline_keeps_latency_and_multiplies_decode_throughput():
    one = run(L70, gpus=4, tp=4, batch=8)
    two = run(L70, gpus=8, tp=4, pp=2, batch=16)  # two micro-batches of 8 in flight
    assert two.tpot_s == pytest.approx(one.tpot_s, rel=0.1)
    assert 1.7 < two.decode_tokens_per_s / one.decode_tokens_per_s < 2.05


def test_replicas_multiply_throughput_and_latency_adds_up():
    one = run(L70, gpus=4, tp=4, batch=8)
    two = run(L70, gpus=8, tp=4, replicas=2, batch=8)
    assert two.throughput_tokens_per_s == pytest.approx(2 * one.throughput_tokens_per_s)
    assert one.latency_s == pytest.approx(one.ttft_s + 127 * one.tpot_s)
    assert one.throughput_tokens_per_s == pytest.approx(8 * 128 / one.latency_s)


# ---- prefill ----

def test_pipeline_stages_waiting_for_a_micro_batch_leave_the_cores_to_the_busy_ones():
    """CPU ranks beyond the cores share them (cost.per_rank_profile), but a prefill stage
    without a micro-batch waits and takes no core: with one micro-batch only one stage of
    pp2 computes at a time, so two ranks on one core prefill as on two cores; with two, the
    middle slot of three has both stages busy and costs the extra of sharing there once."""
    from dataclasses import replace
    from meshplan.simulator.cost import per_rank_profile

    def cpu(cores):
        return replace(A100, extra={**A100.extra, "cores_per_node": cores, "neighbour_slowdown": 1.0})

    def ttft(cores, batch):
        return simulate_inference(L3_8, InferencePlan(batch=batch, prompt_len=512, gen_len=8, pp=2),
                                  Cluster(2, 8), cpu(cores)).ttft_s
    assert ttft(1, 1) == pytest.approx(ttft(2, 1))
    # the extra of the busy slot: the last stage's micro-batch on a shared core, less alone
    alone, shared = (simulate_inference(L3_8, InferencePlan(batch=1, prompt_len=512, gen_len=8),
                                        Cluster(1, 8), per_rank_profile(cpu(1), ranks)).breakdown["prefill_s"]
                     for ranks in (1, 2))
    # about half the whole model's extra: the last stage holds half the layers and the head
    extra = (shared["compute"] - alone["compute"]) / 2
    assert ttft(1, 2) - ttft(2, 2) == pytest.approx(extra, rel=0.1)
    assert ttft(2, 2) < ttft(1, 2) < 2 * ttft(2, 2)


def test_ttft_superlinear_at_long_prompts():
    ttft = {s: run(L3_8, gpus=1, prompt_len=s, gen_len=1).ttft_s for s in (4095, 8191)}
    assert ttft[8191] > 2.05 * ttft[4095]


def test_prefill_flop_rate_is_plausible():
    r = run(L70, tp=4, prompt_len=2048, gen_len=1)
    # Linear layers: 2 FLOPs per weight per token; causal attention: half of 4*s^2*h per layer.
    flops = 2 * 80 * (L70.attention_params() + L70.mlp_params()) * 2048 + 80 * 2 * 2048 ** 2 * 8192
    rate = flops / r.ttft_s / 4
    assert 0.45 * 312e12 < rate < 0.8 * 312e12


# ---- memory ----

def test_max_batch_decreases_with_context_and_is_the_fitting_edge():
    edges = [run(L70, tp=4, prompt_len=p).max_batch for p in (512, 1024, 2048, 3968)]
    assert edges == sorted(edges, reverse=True) and len(set(edges)) == 4
    for kw in ({"tp": 4}, {"tp": 4, "pp": 2, "gpus": 8}, {"tp": 2, "pp": 4, "gpus": 8}):
        edge = run(L70, prompt_len=2048, **kw).max_batch
        assert run(L70, prompt_len=2048, batch=edge, **kw).fits
        assert not run(L70, prompt_len=2048, batch=edge + 1, **kw).fits


def test_max_batch_bounded_by_kv_capacity():
    r = run(L70, tp=4, prompt_len=2048)
    limit = A100.memory_bytes - memory_reserve_bytes(A100.memory_bytes)
    weights = 2 * (80 * (L70.attention_params() + L70.mlp_params()) + 2 * L70.vocab_size * 8192) / 4
    assert r.max_batch <= (limit - weights) / ((2048 + 128) * 327_680 / 4)


# ---- search ----

def test_search_ranks_by_throughput_and_by_latency():
    best = search_inference(L70, Cluster(8, 8), A100, 512, 128)
    per_gpu = [r.throughput_tokens_per_s for _, r in best]
    assert per_gpu == sorted(per_gpu, reverse=True)
    fastest = search_inference(L70, Cluster(8, 8), A100, 512, 128, objective="latency")
    plan, result = fastest[0]
    assert plan.batch == 1 and plan.tp == 8
    assert all(result.latency_s <= r.latency_s for _, r in fastest)


def test_slo_filtering():
    free = search_inference(L70, Cluster(8, 8), A100, 512, 128)
    tight = search_inference(L70, Cluster(8, 8), A100, 512, 128, slo_ttft_s=2.0, slo_tpot_s=0.03)
    assert free[0][1].tpot_s > 0.03
    assert all(r.ttft_s <= 2.0 and r.tpot_s <= 0.03 for _, r in tight)
    assert set(tight.table.status) >= {"ok", "ttft_slo", "tpot_slo"}
    text = explain_inference(tight)
    assert "winner" in text and "runner-up" in text and "miss the TPOT SLO" in text
    with pytest.raises(PlanError) as err:
        search_inference(L70, Cluster(8, 8), A100, 512, 128, slo_tpot_s=1e-3)
    assert err.value.field == "search.slo_tpot_ms"
    with pytest.raises(PlanError) as err:
        search_inference(L70, Cluster(8, 8), A100, 512, 128, slo_ttft_s=1e-3)
    assert err.value.field == "search.slo_ttft_ms"
    with pytest.raises(PlanError) as err:  # every bad argument at once
        search_inference(L70, Cluster(8, 8), A100, -5, 0, slo_ttft_s=-1.0, slo_tpot_s=0.0)
    assert {f for f, _, _ in err.value.issues} == {"search.slo_ttft_ms", "search.slo_tpot_ms",
                                                  "plan.prompt_len", "plan.gen_len"}
    with pytest.raises(PlanError) as err:  # one generated token has no TPOT to hold
        search_inference(L70, Cluster(8, 8), A100, 512, 1, slo_tpot_s=0.05)
    assert err.value.field == "search.slo_tpot_ms" and "one generated token" in err.value.problem


def test_search_fixed_knobs():
    found = search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"tp": 4, "batch": 16})
    assert {(p.tp, p.batch) for p, _ in found} == {(4, 16)}
    with pytest.raises(PlanError) as err:  # the rules a held knob breaks, each named
        search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"tp": 3})
    assert err.value.field == "cluster.num_gpus" and "plan.tp" in {f for f, _, _ in err.value.issues}
    with pytest.raises(PlanError) as err:
        search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"expert_parallel": True})
    assert err.value.field == "plan.expert_parallel"
    # a held batch over every layout's room names the batch and the most that fits, which does
    edge = max(r.max_batch for _, r in search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"batch": 1}))
    with pytest.raises(PlanError) as err:
        search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"batch": 4 * edge})
    assert err.value.field == "plan.batch" and f"--batch {edge} or fewer" in err.value.fix
    assert search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"batch": edge})
    with pytest.raises(PlanError):
        search_inference(L70, Cluster(8, 8), A100, 512, 128, fixed={"zero": 1})
    with pytest.raises(PlanError):
        search_inference(L70, Cluster(8, 8), A100, 512, 128, objective="cost")
    with pytest.raises(PlanError) as err:   # 16-bit weights do not fit one device (int4 would)
        search_inference(L70, Cluster(1, 8), A100, 512, 128, fixed={"quantization": "none"})
    assert err.value.field == "cluster.num_gpus"


# ---- plan validation ----

@pytest.mark.parametrize("model,kw,gpus,field", [
    (L70, {"tp": 3}, 3, "plan.tp"),                                   # 64 heads
    (ModelSpec("m", 4, 3072, 48, 12, 8192, 1000, 4096), {"tp": 8}, 8, "plan.tp"),  # 12 KV heads
    (L70, {"tp": 4}, 8, "cluster.num_gpus"),
    (ZOO["gpt3-175b"], {"tp": 8, "prompt_len": 2000, "gen_len": 100}, 8, "plan.prompt_len"),
    (L3_8, {"prompt_len": 8100, "gen_len": 100}, 1, "plan.prompt_len"),  # RoPE: 8192 positions too
    (L7, {"pp": 64}, 64, "plan.pp"),
])
def test_plan_errors(model, kw, gpus, field):
    with pytest.raises(PlanError) as err:
        run(model, gpus=gpus, **kw)
    assert err.value.field == field


def test_plan_fields_and_round_trip():
    for bad, field in (({"batch": 0}, "plan.batch"), ({"dtype": "fp8"}, "plan.dtype"),
                       ({"kv_dtype": "int4"}, "plan.kv_dtype")):
        with pytest.raises(PlanError) as err:
            InferencePlan(**{"batch": 1, "prompt_len": 8, "gen_len": 8, **bad})
        assert err.value.field == field
    plan = InferencePlan(4, 512, 64, tp=2, pp=2, replicas=2, dtype="bf16")
    assert plan.kv_dtype == "bf16"
    assert InferencePlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(PlanError):
        InferencePlan.from_dict({**plan.to_dict(), "cp": 2})
    out = run(L70, tp=4).to_json()
    for key in ("ttft_s", "tpot_s", "latency_s", "throughput_tokens_per_s", "kv_cache_bytes",
                "peak_memory_bytes", "max_batch", "fits", "plan", "breakdown"):
        assert key in out


def test_slow_rates_print_with_their_digits():
    from meshplan.core.units import rate_text
    assert rate_text(0.3875) == "0.388" and rate_text(42.17) == "42.2" and rate_text(123456.7) == "123,457"
