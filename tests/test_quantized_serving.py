"""Serving with quantized weights, mixture-of-experts decode and latent attention's cache,
against hand computations."""
from functools import partial
import json
from dataclasses import replace
from pathlib import Path

import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import vllm
from meshplan.planner.exports.checkpoint import checkpoint_of
from meshplan.planner.serve_search import explain_inference, search_inference
from meshplan.simulator.model_spec import ZOO, load_model, read_hf_config
from meshplan.simulator.ops import Shard, layer_ops
from meshplan.simulator.plan import Cluster
from meshplan.simulator.quantize import quantized, quantized_weights, weight_bytes
from meshplan.simulator.serve import InferencePlan, kv_elements_per_token, simulate_inference
from tests import cli

H100, A100 = load_profile("h100-80gb"), load_profile("a100-80gb")
CONFIGS = Path(__file__).parent / "data" / "hf_configs"
LLAMA = ZOO["llama-2-7b"]
# Llama 2 7B: per layer Q, K, V, O (4 h^2) and gate, up, down (3 h f), h 4096, f 11008
LINEAR = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)


meshplan = partial(cli.meshplan, timeout=120)  # this file's hang guard, seconds


def serve(model, hw=H100, **kw):
    plan = InferencePlan(**{"batch": 1, "prompt_len": 512, "gen_len": 64, "dtype": "fp16", **kw})
    return simulate_inference(model, plan, Cluster(plan.num_gpus, 8), hw)


def test_weight_bytes_per_element():
    assert weight_bytes("int4", 128, 2) == 0.5 + 4 / 128      # 4 bits + fp16 scale and zero per 128
    assert weight_bytes("int8", 64, 2) == 1 + 4 / 64
    assert weight_bytes("fp8", 128, 2) == 1 and weight_bytes("none", 128, 2) == 2


def test_quantized_weight_memory_by_hand():
    assert quantized_weights(LLAMA, 1) * 32 == LINEAR
    full = serve(LLAMA).weights_bytes
    assert full == 2 * LLAMA.num_params()
    for q, per in (("int4", 0.5 + 4 / 128), ("int8", 1 + 4 / 128), ("fp8", 1.0)):
        assert serve(LLAMA, quantization=q).weights_bytes == pytest.approx(full - LINEAR * (2 - per))


def test_quantized_gemm_reads_narrow_weights():
    # one decode GEMM (one token, 4096 -> 11008) where memory binds: A and C at 2 bytes,
    # the int4 weight at 0.53 bytes per element
    slow = H100.scaled(hbm_bw=0.01)
    fit, bw = slow.gemm["fp16"], slow.hbm_bytes_per_s
    m, n, k, wb = 1, 11008, 4096, weight_bytes("int4", 128, 2)
    expected = fit.latency_s + (2 * (m * k + m * n) + wb * k * n) / (bw * fit.hbm_eff)
    assert slow.gemm_time_s(m, n, k, "fp16", weight_bytes=wb) == pytest.approx(expected)


def test_weight_only_kernel_reads_at_the_memory_roof_and_computes_in_16_row_tiles():
    # the A100's up projection of Llama 2 7B (4096 -> 11008) with int4 weights, as Marlin runs
    # it: up to batch 32 bound by the bytes it moves, at 128 by its tensor cores over whole
    # 16-row tiles at the fitted large-GEMM efficiency (no cuBLAS small-m loss)
    fit, n, k, wb = A100.gemm["fp16"], 11008, 4096, weight_bytes("int4", 128, 2)
    peak = A100.peak_flops["fp16"] * (1 - A100.sustained.gemm_loss)
    tile_flop_s = peak * fit.eff_max * n / (n + fit.n_half) * k / (k + fit.k_half)
    for m in (1, 7, 16, 32):
        memory = (2 * (m * k + m * n) + wb * k * n) / (A100.hbm_bytes_per_s * fit.hbm_eff)
        assert 2 * 16 * -(-m // 16) * n * k / tile_flop_s < memory
        assert A100.gemm_time_s(m, n, k, "fp16", weight_bytes=wb) == pytest.approx(fit.latency_s + memory)
    assert A100.gemm_time_s(128, n, k, "fp16", weight_bytes=wb) == pytest.approx(
        fit.latency_s + 2 * 128 * n * k / tile_flop_s)
    # the dequantisation overlaps the loads: it shows only where it is the longest of the three
    slow_cores = replace(A100, peak_flops={**A100.peak_flops, "fp32": 1e9})
    dequant = 2 * k * n
    assert slow_cores.gemm_time_s(1, n, k, "fp16", weight_bytes=wb, dequant_flops=dequant) == pytest.approx(
        fit.latency_s + dequant / 1e9)
    assert A100.gemm_time_s(1, n, k, "fp16", weight_bytes=wb, dequant_flops=dequant) == pytest.approx(
        A100.gemm_time_s(1, n, k, "fp16", weight_bytes=wb))


def test_narrower_weights_decode_faster_at_small_batch():
    # batch 7 on one A100: every decoder GEMM reads its weights, so int4 < int8 < fp16
    tpot = {q: serve(LLAMA, A100, batch=7, quantization=q).tpot_s for q in ("none", "int8", "int4")}
    assert tpot["int4"] < tpot["int8"] < tpot["none"]
    reads = {q: serve(LLAMA, A100, batch=7, quantization=q).breakdown["decode_step_s"]["weights_read"]
             for q in ("none", "int8", "int4")}
    # past the 4 weight GEMMs' launches in each of 32 layers and the 16-bit LM head, the
    # weight bytes scale (the activations' few bytes stay 16-bit)
    fixed = 4 * 32 * A100.gemm["fp16"].latency_s + A100.gemm_time_s(7, 32000, 4096, "fp16")
    for q in ("int8", "int4"):
        assert (reads[q] - fixed) / (reads["none"] - fixed) == pytest.approx(weight_bytes(q, 128, 2) / 2, rel=0.01)


def test_quantized_ops_dequantize_and_cast():
    ops = layer_ops(LLAMA, Shard(1, 1))
    int4 = quantized(ops, "int4", 128, 2)
    up = next(op for op in int4 if op.name == "mlp_up")
    assert up.weight_bytes == weight_bytes("int4", 128, 2) and up.dequant_flops == 2 * 4096 * 2 * 11008
    fp8 = quantized(ops, "fp8", 128, 2)
    assert all(op.fp8 for op in fp8 if op.weight) and not any(op.fp8 for op in fp8 if op.attention_core)
    cast = fp8[-1]
    # dynamic per-token activation scales: amax read (2 B), cast read (2 B) and write (1 B)
    assert cast.name == "act_quant" and cast.bytes_moved == 5 * (4096 + 4096 + 4096 + 11008)


def test_weight_bound_decode_speeds_up_with_narrower_weights():
    slow = H100.scaled(hbm_bw=0.05)   # every decode GEMM weight-read bound
    base = serve(LLAMA, slow).breakdown["decode_step_s"]["weights_read"]
    fp8 = serve(LLAMA, slow, quantization="fp8").breakdown["decode_step_s"]["weights_read"]
    # the 4 weight GEMMs of 32 layers read half the bytes past their launch latency (the
    # few activation bytes halve too); the LM head stays 16-bit
    launches = 4 * 32 * slow.gemm["fp16"].latency_s
    head = slow.gemm_time_s(1, 32000, 4096, "fp16")
    assert fp8 - launches - head == pytest.approx((base - launches - head) / 2, rel=1e-3)


def test_moe_decode_reads_the_experts_its_tokens_hit():
    mixtral = load_model(str(CONFIGS / "mixtral-8x7b.json"))
    slow = H100.scaled(hbm_bw=0.05)
    one, many = (serve(mixtral, slow, tp=2, batch=b).breakdown["decode_step_s"]["weights_read"]
                 for b in (1, 256))
    # a token reads 2 of 8 experts; 256 tokens hit all 8 (8 (1 - (3/4)^256) = 8): the expert
    # weights (45.1B of 46.7B) read grow ~4x
    experts, rest = 32 * 8 * 3 * 4096 * 14336, 46_702_792_704 - 32 * 8 * 3 * 4096 * 14336
    expected = (rest + experts) / (rest + experts / 4)
    assert many / one == pytest.approx(expected, rel=0.05)


def test_latent_attention_caches_the_compressed_latent():
    deepseek = load_model(str(CONFIGS / "deepseek-v3.json"))
    # kv_lora_rank 512 + qk_rope_head_dim 64 per token and layer, whole on every TP rank
    assert kv_elements_per_token(deepseek, 8) == 512 + 64
    # grouped-query attention: K and V of the KV heads a rank holds
    assert kv_elements_per_token(LLAMA, 2) == 2 * 16 * 128


def test_fp8_serving_refused_without_fp8_hardware():
    with pytest.raises(PlanError, match="fp8"):
        serve(LLAMA, A100, quantization="fp8")


def test_group_size_must_divide_the_sharded_widths():
    with pytest.raises(PlanError, match="quant_group_size"):
        serve(LLAMA, quantization="int4", quant_group_size=96)


def test_serving_search_picks_quantization_under_memory_and_exports_it():
    # Llama 2 70B on one H100: 16-bit weights (138 GB) cannot fit, int4 (~36 GB) can
    found = search_inference(ZOO["llama-2-70b"], Cluster(1, 8), H100, 512, 64)
    best = found[0][0]
    assert best.quantization in ("int4", "int8", "fp8") and found[0][1].fits
    model = ZOO["llama-2-70b"]
    e = vllm.export(found[0][1], model, checkpoint_of("llama-2-70b", model), H100)
    method = {"int4": "awq", "int8": "gptq", "fp8": "fp8"}[best.quantization]
    assert e.args[e.args.index("--quantization") + 1] == method
    if method != "fp8":  # the released 16-bit checkpoint cannot load as AWQ / GPTQ
        assert e.args[0] == "${QUANTIZED_CHECKPOINT}" and e.user_paths[0][0] == "QUANTIZED_CHECKPOINT"
        assert vllm.export(found[0][1], model, checkpoint_of("llama-2-70b", model), H100,
                           "org/llama-2-70b-awq").args[0] == "org/llama-2-70b-awq"


def read_model_config(config: dict):
    return read_hf_config(config, "llama-2-7b")


def test_stored_quantization_is_read_from_the_config():
    base = json.loads((CONFIGS / "llama-2-7b.json").read_text())
    cases = (({"quant_method": "fp8", "weight_block_size": [128, 128]}, ("fp8", "fp8", None)),
             ({"quant_method": "awq", "bits": 4, "group_size": 128}, ("awq 4-bit", "int4", 128)),
             ({"quant_method": "gptq", "bits": 8, "group_size": 64}, ("gptq 8-bit", "int8", 64)),
             ({"quant_method": "gptq", "bits": 4, "group_size": -1}, ("gptq 4-bit", None, None)),
             ({"quant_method": "mxfp4"}, ("mxfp4", None, None)))
    for config, (method, quantization, group) in cases:
        loaded = read_model_config({**base, "quantization_config": config})
        assert (loaded.stored.method, loaded.stored.quantization, loaded.stored.group_size) == (
            method, quantization, group)
        assert "quantization_config" not in loaded.ignored_keys
    assert read_model_config(base).stored is None


def test_serving_cli_serves_a_quantized_checkpoint_as_stored(tmp_path):
    # DeepSeek-V3's released weights are FP8 (quantization_config quant_method fp8)
    flags = ["--mode", "inference", "--hardware", "h100-80gb", "--gpus", "16", "--gpus-per-node", "8",
             "--tp", "8", "--pp", "2", "--batch", "8", "--prompt-len", "1000", "--gen-len", "100", "--json"]
    v3 = str(CONFIGS / "deepseek-v3.json")
    out = meshplan("simulate", "--model", v3, *flags)
    assert out.returncode == 0 and json.loads(out.stdout)["plan"]["quantization"] == "fp8"
    assert "serving the weights as stored, fp8" in out.stderr
    sixteen = meshplan("simulate", "--model", v3, *flags, "--quantization", "none")
    assert sixteen.returncode == 2 and "over the 75.0 GiB usable" in sixteen.stderr   # 1.3 TB of 16-bit weights
    # gpt-oss stores its experts in MXFP4, which meshplan does not price: the user chooses
    oss = str(CONFIGS / "gpt-oss-20b.json")
    small = ["--mode", "inference", "--hardware", "h100-80gb", "--gpus", "1", "--batch", "8", "--prompt-len",
             "1000", "--gen-len", "100", "--json"]
    refused = meshplan("simulate", "--model", oss, *small)
    assert refused.returncode == 2 and f"{oss}:quantization_config" in refused.stderr
    assert "mxfp4" in refused.stderr and "Traceback" not in refused.stderr
    chosen = meshplan("simulate", "--model", oss, *small, "--quantization", "int4", "--quant-group-size", "32")
    assert chosen.returncode == 0 and "stores the weights as mxfp4; pricing --quantization int4" in chosen.stderr


def test_vllm_export_loads_a_checkpoint_quantized_as_planned(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        **json.loads((CONFIGS / "llama-2-7b.json").read_text()), "_name_or_path": "org/llama-2-7b-awq",
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}))
    model, checkpoint = load_model(str(path)), checkpoint_of(str(path), load_model(str(path)))
    e = vllm.export(serve(model, H100, quantization="int4"), model, checkpoint, H100)
    assert e.args[0] == "org/llama-2-7b-awq" and "--quantization" not in e.args and not e.user_paths
    assert any("awq 4-bit weights load as stored" in note for note in e.notes)
    # 16-bit weights priced: this checkpoint cannot give them
    e = vllm.export(serve(model, H100), model, checkpoint, H100)
    assert e.args[0] == "${QUANTIZED_CHECKPOINT}" and "16-bit" in e.user_paths[0][1]


def test_serving_table_names_each_plans_weights():
    """Plans of one layout that differ only in their weights are told apart in the table."""
    out = meshplan("plan", "--mode", "inference", "--model", "llama-2-70b", "--hardware", "h100-80gb", "--gpus",
                   "1", "--batch", "8", "--prompt-len", "512", "--gen-len", "64", "--top", "3")
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if "weights" in line)
    column = [c.strip() for c in header.split("┃")].index("weights")
    rows = [[c.strip() for c in line.split("│")] for line in out.stdout.splitlines() if line.startswith("│")]
    found = search_inference(ZOO["llama-2-70b"], Cluster(1, 8), H100, 512, 64, fixed={"batch": 8})
    assert [row[column] for row in rows] == [p.dtype if p.quantization == "none" else p.quantization
                                             for p, _ in list(found)[:3]]
    assert len({row[column] for row in rows}) > 1


def test_explanation_says_when_the_search_quantized_the_weights():
    """A winner whose weights the search quantized says so, with the best 16-bit plan kept
    (none here: 138 GB of 16-bit weights on one H100); held weights need no such line."""
    found = search_inference(ZOO["llama-2-70b"], Cluster(1, 8), H100, 512, 64, fixed={"batch": 8})
    text = explain_inference(found)
    assert f"weights {found[0][0].quantization}: the search's choice" in text and "no fp16 plan is kept" in text
    held = search_inference(ZOO["llama-2-70b"], Cluster(1, 8), H100, 512, 64,
                            fixed={"batch": 8, "quantization": found[0][0].quantization})
    assert "the search's choice" not in explain_inference(held)
    # Llama 2 7B on one H100 at batch 8: weight reads dominate decode, int4 wins; the fp16
    # plan is named with its gap
    small = search_inference(LLAMA, Cluster(1, 8), H100, 512, 64, fixed={"batch": 8})
    (best, fast), (_, sixteen) = small[0], next(c for c in small if c[0].quantization == "none")
    assert best.quantization == "int4"
    line = next(line for line in explain_inference(small).splitlines() if "the search's choice" in line)
    gap = 1 - sixteen.throughput_tokens_per_s / fast.throughput_tokens_per_s
    assert line.endswith(f"{gap:.1%} lower throughput)") and "batch 8: " in line


def test_serving_plan_on_a_variant_says_what_its_profile_is():
    """H200 serving is priced with the H100's measured fits at 141 GB and 4.8 TB/s: --json
    says so, as the training explanation does; a measured profile's says nothing."""
    flags = ["plan", "--mode", "inference", "--model", "llama-2-7b", "--gpus", "1", "--batch", "8",
             "--prompt-len", "512", "--gen-len", "64", "--json"]
    derived = {hw: json.loads(meshplan(*flags, "--hardware", hw).stdout)["derived_profile"]
               for hw in ("h200-141gb", "h100-80gb")}
    assert derived["h200-141gb"].startswith("profile h200-141gb: not measured; h100-80gb's measured fits with "
                                            f"memory x{141 / 80:.3g}, hbm_bw x{4.8 / 3.35:.3g}")
    assert derived["h100-80gb"] is None
