"""Expert-parallel serving (vLLM --enable-expert-parallel) against hand computations and a
Monte Carlo of top-k routing: per-rank expert memory, the busiest rank's load and decode
weight reads, the legality rules, the search's choice and the vLLM export."""
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import numpy as np
import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import vllm
from meshplan.planner.exports.checkpoint import checkpoint_of
from meshplan.planner.serve_search import explain_inference, search_inference
from meshplan.simulator.memory import memory_reserve_bytes
from meshplan.simulator.model_spec import ZOO, load_model
from meshplan.simulator import rules
from meshplan.simulator.plan import Cluster
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.serve_experts import expected_max_binomial, expert_load

H100, A100 = load_profile("h100-80gb"), load_profile("a100-80gb")
CONFIGS = Path(__file__).parent / "data" / "hf_configs"
MIXTRAL = load_model(str(CONFIGS / "mixtral-8x7b.json"))
QWEN2_MOE = load_model(str(CONFIGS / "qwen2-57b-a14b.json"))
# Mixtral 8x7B per layer: attention 4096 x (2 x 4096 + 2 x 1024); router 4096 x 8 and two
# norms, replicated; 8 experts of gate, up, down 4096 x 14336; vocabulary 32000, untied.
ATTENTION, REPLICATED, EXPERTS = 4096 * (2 * 4096 + 2 * 1024), 4096 * 8 + 2 * 4096, 8 * 3 * 4096 * 14336


def serve(model, hw=H100, **kw):
    plan = InferencePlan(**{"batch": 1, "prompt_len": 512, "gen_len": 64, "dtype": "fp16", **kw})
    return simulate_inference(model, plan, Cluster(plan.num_gpus, 8), hw)


def test_expert_memory_per_rank_by_hand():
    # tp 2 x replicas 4: vLLM runs the MoE layers over all 8 ranks, so each holds 1/8 of the
    # expert weights, sharded (each expert's width / 8) or whole (one expert per rank)
    per_rank = 32 * (ATTENTION / 2 + REPLICATED + EXPERTS / 8) + 2 * 32000 * 4096 / 2 + 4096
    for ep in (False, True):
        assert serve(MIXTRAL, tp=2, replicas=4, expert_parallel=ep).weights_bytes == 2 * per_rank
    # one replica over tp 2: four whole experts per rank, or half of each of the eight
    half = 32 * (ATTENTION / 2 + REPLICATED + EXPERTS / 2) + 2 * 32000 * 4096 / 2 + 4096
    assert serve(MIXTRAL, tp=2, expert_parallel=True).weights_bytes == serve(MIXTRAL, tp=2).weights_bytes == 2 * half
    # int4 narrows the experts a rank holds (and the attention), not the router or the vocabulary
    narrowed = 32 * (ATTENTION / 2 + EXPERTS / 8)
    int4 = serve(MIXTRAL, tp=2, replicas=4, expert_parallel=True, quantization="int4")
    assert int4.weights_bytes == pytest.approx(2 * per_rank - narrowed * (2 - (0.5 + 4 / 128)))


def _monte_carlo(e, k, g, tokens, trials=300, seed=0):
    """Mean over trials of the busiest rank's routed rows and distinct experts when each
    token picks k distinct experts uniformly and rank r holds experts [r e/g, (r+1) e/g)."""
    rng = np.random.default_rng(seed)
    rows, experts = [], []
    for _ in range(trials):
        picks = np.argsort(rng.random((tokens, e)), axis=1)[:, :k]
        rows.append(np.bincount((picks // (e // g)).ravel(), minlength=g).max())
        hit = np.zeros(e, bool)
        hit[picks.ravel()] = True
        experts.append(hit.reshape(g, -1).sum(axis=1).max())
    return np.mean(rows), np.mean(experts)


@pytest.mark.parametrize("model,tp,tokens", [(MIXTRAL, 2, 1), (MIXTRAL, 4, 16), (MIXTRAL, 8, 256),
                                             (QWEN2_MOE, 4, 1), (QWEN2_MOE, 4, 8), (QWEN2_MOE, 2, 64)])
def test_busiest_rank_load_against_monte_carlo(model, tp, tokens):
    rows, experts = expert_load(model, tp, 1, True, tokens)
    mc_rows, mc_experts = _monte_carlo(model.num_experts, model.experts_per_token, tp, tokens)
    assert rows == pytest.approx(mc_rows, rel=0.07) and experts == pytest.approx(mc_experts, rel=0.07)
    # without expert parallelism every rank runs the whole group's rows and active experts
    k, e = model.experts_per_token, model.num_experts
    assert expert_load(model, tp, 1, False, tokens) == (tokens * k, pytest.approx(e * (1 - (1 - k / e) ** tokens)))


def test_expected_max_binomial_closed_forms():
    p = 0.3
    assert expected_max_binomial(1, p, 5) == pytest.approx(1 - (1 - p) ** 5)
    # P(max >= 1) + P(max >= 2) for Binomial(2, p)
    assert expected_max_binomial(2, p, 3) == pytest.approx(1 - (1 - p) ** 6 + 1 - (1 - p * p) ** 3)
    # many rows: the mean plus ~1.42 standard deviations, the expected maximum of 8 normals
    n, q = 10 ** 7, 1 / 8
    assert expected_max_binomial(n, q, 8) == pytest.approx(n * q + 1.4236 * (n * q * (1 - q)) ** 0.5, rel=1e-5)


def test_batch1_decode_reads_the_busiest_ranks_experts():
    slow = H100.scaled(hbm_bw=0.05)   # every expert GEMM weight-read bound
    sharded, whole = (serve(MIXTRAL, slow, tp=2, expert_parallel=ep).breakdown["decode_step_s"]["weights_read"]
                      for ep in (False, True))
    # sharded: each rank reads half of the 2 experts a token hits, 1 expert's weights; whole:
    # the busier of 2 ranks holding 4 experts, each hit with probability 1/4:
    # sum_j 1 - F(j-1)^2 over Binomial(4, 1/4)
    cdf = np.cumsum([0.75 ** 4, 4 * 0.25 * 0.75 ** 3, 6 * 0.25 ** 2 * 0.75 ** 2, 4 * 0.25 ** 3 * 0.75])
    busiest = float(np.sum(1 - cdf ** 2))
    assert busiest == pytest.approx(1.4617, abs=1e-4)
    expert_bytes = 3 * 4096 * 14336 * 2
    extra_s = 32 * (busiest - 1) * expert_bytes / (slow.hbm_bytes_per_s * slow.gemm["fp16"].hbm_eff)
    assert whole - sharded == pytest.approx(extra_s, rel=0.02)


def test_replicas_gather_tokens_for_the_moe_layers():
    one, two = serve(MIXTRAL, tp=4, batch=8), serve(MIXTRAL, tp=4, replicas=2, batch=8)
    assert one.breakdown["decode_step_s"]["moe_dispatch"] == 0.0
    # per MoE layer: all-gather of both replicas' hidden states and router logits, and the
    # reduce-scatter of the outputs, over the 2 replicas (ranks i and i + 4 of one node)
    gathered = 2 * 8 * 2
    layer_s = (H100.collective_time_s("all_gather", gathered * (4096 + 8), 2, 2)
               + H100.collective_time_s("reduce_scatter", gathered * 4096, 2, 2))
    assert two.breakdown["decode_step_s"]["moe_dispatch"] == pytest.approx(32 * layer_s)
    assert serve(ZOO["llama-2-7b"], replicas=2).breakdown["decode_step_s"]["moe_dispatch"] == 0.0


@pytest.mark.parametrize("model,kw,field,words", [
    (ZOO["llama-2-7b"], dict(tp=2, expert_parallel=True), "plan.expert_parallel", "no experts"),
    (MIXTRAL, dict(tp=1, replicas=3, expert_parallel=True), "plan.expert_parallel", "divide them"),
    (MIXTRAL, dict(tp=1, expert_parallel=True), "plan.expert_parallel", "more than 1"),
    (MIXTRAL, dict(tp=1, replicas=3), "plan.tp", "experts' width 14336"),
    (QWEN2_MOE, dict(tp=4, replicas=2, quantization="int4"), "plan.quant_group_size", "320"),
])
def test_refusals_name_the_fields(model, kw, field, words):
    with pytest.raises(PlanError) as err:
        serve(model, **kw)
    assert any(f == field and words in problem for f, problem, _ in err.value.issues)


def test_executor_refuses_what_it_would_run_otherwise():
    # its replicas are independent copies and its experts split over TP: neither is the
    # data-parallel MoE the plan prices
    def refused(model, **kw):
        return [f for f, _, _ in rules.violations(rules.EXECUTOR_SERVING, InferencePlan(1, 16, 8, **kw), model)]
    assert "plan.expert_parallel" in refused(MIXTRAL, tp=2, expert_parallel=True)
    assert "plan.replicas" in refused(MIXTRAL, replicas=2)
    assert "plan.replicas" not in refused(ZOO["llama-2-7b"], replicas=2)


def test_whole_experts_keep_quantization_groups_legal():
    # 2560 / 8 = 320 is not a multiple of 128: sharded int4 experts are refused, whole ones not
    assert serve(QWEN2_MOE, tp=4, replicas=2, quantization="int4", expert_parallel=True).fits


def test_search_picks_expert_parallel_where_memory_forces_quantization():
    # Qwen2-57B-A14B on 8 A100s of 16 GB (limit 0.95 x 16 - 1 GiB), one pipeline stage, so
    # tp x replicas = 8: its 16-bit weights cannot fit per rank, at least experts / 8,
    # shared experts and attention / tp (tp <= 4: 28 heads) ...
    hw = A100.scaled(memory=0.2)
    limit = hw.memory_bytes - memory_reserve_bytes(hw.memory_bytes)
    experts, shared = 28 * 64 * 3 * 3584 * 2560, 28 * 3 * 3584 * 20480
    attention = 28 * 3584 * (2 * 3584 + 2 * 512)
    assert 2 * (experts / 8 + (shared + attention) / 4) > limit
    # ... A100s run no fp8, and int8 / int4 groups of 128 do not divide the experts' width
    # sharded over 8 (320), so only whole experts quantized fit
    found = search_inference(QWEN2_MOE, Cluster(8, 8), hw, 512, 64, fixed={"pp": 1})
    assert all(p.expert_parallel and p.quantization in ("int8", "int4") for p, _ in found)
    assert "expert parallel over 8" in explain_inference(found)
    e = vllm.export(found[0][1], QWEN2_MOE, checkpoint_of(str(CONFIGS / "qwen2-57b-a14b.json"), QWEN2_MOE),
                    hw, "org/qwen2-57b-a14b-awq")
    assert "--enable-expert-parallel" in e.args


def test_search_weighs_both_expert_layouts_and_explains_the_choice():
    found = search_inference(MIXTRAL, Cluster(8, 8), H100, 1024, 128, fixed={"quantization": "none"})
    assert set(found.table.expert_parallel) == {False, True}
    text = explain_inference(found)
    assert text.splitlines()[-2].startswith("experts: ")
    assert ("best sharded" if found[0][0].expert_parallel else "best expert parallel") in text
    dense = search_inference(ZOO["llama-2-7b"], Cluster(2, 8), H100, 512, 64)
    assert not dense.table.expert_parallel.any() and "experts:" not in explain_inference(dense)


def test_vllm_export_carries_the_flag():
    for ep in (False, True):
        result = serve(MIXTRAL, tp=4, replicas=2, batch=16, expert_parallel=ep)
        args = vllm.export(result, MIXTRAL, checkpoint_of(str(CONFIGS / "mixtral-8x7b.json"), MIXTRAL), H100,
                           "mistralai/Mixtral-8x7B-v0.1").args
        assert ("--enable-expert-parallel" in args) == ep
        assert args[args.index("--data-parallel-size") + 1] == "2"


def test_cli_flag_and_its_vllm_spelling():
    base = [sys.executable, "-m", "meshplan.cli", "simulate", "--mode", "inference", "--model",
            str(CONFIGS / "mixtral-8x7b.json"), "--hardware", "h100-80gb", "--gpus", "8", "--tp", "8",
            "--batch", "4", "--prompt-len", "256", "--gen-len", "16"]
    for flag in ("--expert-parallel", "--enable-expert-parallel"):
        out = subprocess.run(base + [flag], capture_output=True, text=True)
        assert out.returncode == 0 and "expert-parallel" in out.stdout, out.stderr
    dense = subprocess.run(base[:7] + ["llama-2-7b"] + base[8:] + ["--expert-parallel"],
                           capture_output=True, text=True)
    assert dense.returncode == 2 and dense.stderr.count("\n") == 1
    assert dense.stderr.startswith("meshplan simulate: error: --expert-parallel: ")


def test_serving_pays_no_training_host_gap():
    # the GPU's wait for the host in an MoE block is a trainer's (vLLM captures routing in
    # CUDA graphs): serving times are the same with or without it in the profile
    no_gap = replace(H100, overhead=replace(H100.overhead, moe_host_gap_s=0.0))
    assert H100.overhead.moe_host_gap_s > 0
    for kw in (dict(tp=2), dict(tp=2, expert_parallel=True)):
        assert serve(MIXTRAL, **kw).to_json() == serve(MIXTRAL, no_gap, **kw).to_json()
