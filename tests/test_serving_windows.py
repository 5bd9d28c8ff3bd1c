"""Serving sliding-window models as vLLM's hybrid KV cache manager does, against hand counts:
a sliding-window layer keeps its last window of tokens (ceil((w - 1) / 16) + 1 blocks of 16),
a full-attention layer the whole context, the prefill step every prompt token; decode reads
min(context, window) keys in a sliding-window layer; the largest batch that fits rises."""
import dataclasses
import math
from pathlib import Path

import pytest

from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.serve_search import search_inference
from meshplan.simulator.memory import memory_reserve_bytes
from meshplan.simulator.model_spec import ZOO, load_model
from meshplan.simulator.plan import Cluster
from meshplan.simulator.serve import (InferencePlan, kv_bytes_per_sequence, kv_tokens_per_sequence,
                                      simulate_inference, window_kept_tokens)

A100, H100 = load_profile("a100-80gb"), load_profile("h100-80gb")
CONFIGS = Path(__file__).parent / "data" / "hf_configs"
MISTRAL = load_model(str(CONFIGS / "mistral-7b-v0.1.json"))   # 32 layers, all local, window 4096
GEMMA2 = load_model(str(CONFIGS / "gemma2-9b.json"))          # 42 layers, even ones local, 4096
GEMMA3 = load_model(str(CONFIGS / "gemma3-12b-text.json"))    # 48 layers, 5 local : 1 global, 1024
GPT_OSS = load_model(str(CONFIGS / "gpt-oss-20b.json"))       # 24 layers, even ones local, 128
LIMIT = A100.memory_bytes - memory_reserve_bytes(A100.memory_bytes)


def _serve(model, hw=A100, gpus=1, **kw):
    return simulate_inference(model, InferencePlan(**{"batch": 1, **kw}), Cluster(gpus, 8), hw)


def test_blocks_a_window_keeps():
    # vLLM's SlidingWindowSpec: ceil((w - 1) / block) + 1 blocks of 16 tokens
    assert window_kept_tokens(4096) == 16 * (256 + 1) == 4112
    assert window_kept_tokens(128) == 16 * (8 + 1) == 144
    assert window_kept_tokens(1024) == 16 * (64 + 1) == 1040
    assert window_kept_tokens(17) == 16 * 2 and window_kept_tokens(1) == 16


def test_mistral_at_32k_keeps_the_window_and_fits_seven_times_the_batch():
    # 32 layers x 4112 tokens (the 4096-token window and vLLM's spare block) x K and V x 8 KV
    # heads x 128 x 2 bytes, not 32 x 32768 x ...
    r = _serve(MISTRAL, prompt_len=1024, gen_len=31744)
    assert r.kv_cache_bytes == 32 * 4112 * 2 * 8 * 128 * 2 == 538_968_064
    # largest batch: weights 2 bytes x 7,241,732,096 parameters; per sequence its KV and its
    # prefill's activations (1024 tokens x 2 bytes x (2 x 4096 + 48 x 128 QKV + 32 x 128 + 3 x
    # 14336 MLP) and the fp32 logits of its last position)
    weights, act = 2 * 7_241_732_096, 1024 * 2 * (2 * 4096 + 48 * 128 + 32 * 128 + 3 * 14336) + 4 * 32000
    assert r.weights_bytes == weights
    assert r.max_batch == math.floor((LIMIT - weights) / (538_968_064 + act)) == 99
    full = _serve(dataclasses.replace(MISTRAL, sliding_window=None, local_layers=()),
                  prompt_len=1024, gen_len=31744)
    assert full.kv_cache_bytes == 32 * 32768 * 4096
    assert full.max_batch == math.floor((LIMIT - weights) / (32 * 32768 * 4096 + act)) == 14
    assert _serve(MISTRAL, batch=99, prompt_len=1024, gen_len=31744).fits
    assert not _serve(MISTRAL, batch=100, prompt_len=1024, gen_len=31744).fits


def test_gemma2_alternating_local_and_global():
    # 21 global layers hold 8192 tokens, 21 local ones 4112; 8 KV heads of 256 dims: 8192 bytes
    r = _serve(GEMMA2, prompt_len=1024, gen_len=7168)
    assert r.kv_cache_bytes == (21 * 8192 + 21 * 4112) * 8192 == 2_116_681_728
    # under the window the local layers hold the whole context, as the global ones do
    assert _serve(GEMMA2, prompt_len=1024, gen_len=1024).kv_cache_bytes == 42 * 2048 * 8192


def test_gpt_oss_alternating_128_token_window():
    # 12 full layers x 2048 + 12 sliding layers x 144; 8 KV heads of 64 dims: 2048 bytes
    r = _serve(GPT_OSS, H100, prompt_len=1024, gen_len=1024)
    assert r.kv_cache_bytes == (12 * 2048 + 12 * 144) * 2048 == 53_870_592
    # two stages of 12 layers, 6 of each kind: half each
    pp = _serve(GPT_OSS, H100, gpus=2, pp=2, prompt_len=1024, gen_len=1024)
    assert pp.kv_cache_bytes == (6 * 2048 + 6 * 144) * 2048


def test_prefill_holds_the_whole_prompt_in_every_layer():
    # an 8192-token prompt with 128 generated: the prefill step's 24 x 8192 exceeds the last
    # decode step's 12 x 8320 + 12 x 144
    r = _serve(GPT_OSS, H100, prompt_len=8192, gen_len=128)
    assert r.kv_cache_bytes == 24 * 8192 * 2048 == 402_653_184


def test_stage_counts_its_own_layers():
    # Gemma 3 layers 10..19 hold globals 11 and 17: 2 x context + 8 x 1040
    assert kv_tokens_per_sequence(GEMMA3, 512, 4096, range(10, 20)) == 2 * 4096 + 8 * 1040
    assert kv_tokens_per_sequence(GEMMA3, 512, 4096, range(0, 5)) == 5 * 1040


def test_dense_llama_unchanged():
    llama = ZOO["llama-2-70b"]
    plan = InferencePlan(batch=1, prompt_len=2048, gen_len=128, tp=4)
    assert kv_bytes_per_sequence(llama, plan) == 80 * 2176 * 2 * 2 * 128 * 2
    assert kv_tokens_per_sequence(llama, 2048, 2176) == 80 * 2176


def _kv_read_s(hw, layers_keys, batch, elements_per_token):
    """Memory-bound time of reading each layer's keys x K/V elements of `batch` sequences at 2 bytes."""
    rate = hw.hbm_bytes_per_s * hw.memory_bound["fp16"].hbm_eff
    return sum(n * batch * keys * elements_per_token * 2 for n, keys in layers_keys) / rate


def test_decode_reads_only_the_window():
    # one decode step (gen_len 2) past the window: every Mistral layer reads 4096 keys
    at_16k = _serve(MISTRAL, batch=32, prompt_len=16384, gen_len=2).breakdown["decode_step_s"]
    at_8k = _serve(MISTRAL, batch=32, prompt_len=8192, gen_len=2).breakdown["decode_step_s"]
    expected = _kv_read_s(A100, [(32, 4096)], 32, 2 * 8 * 128)
    assert at_16k["kv_read"] == pytest.approx(expected, rel=0.02)
    assert at_8k["kv_read"] == at_16k["kv_read"]
    # under the window the read grows with the context
    at_2k = _serve(MISTRAL, batch=32, prompt_len=2047, gen_len=2).breakdown["decode_step_s"]
    assert at_2k["kv_read"] == pytest.approx(_kv_read_s(A100, [(32, 2048)], 32, 2 * 8 * 128), rel=0.02)
    # gpt-oss: 12 layers read 128 keys, 12 the whole 8193
    oss = _serve(GPT_OSS, H100, batch=64, prompt_len=8192, gen_len=2).breakdown["decode_step_s"]
    assert oss["kv_read"] == pytest.approx(_kv_read_s(H100, [(12, 128), (12, 8193)], 64, 2 * 8 * 64),
                                           rel=0.02)


def test_search_reaches_the_larger_batch():
    search = search_inference(MISTRAL, Cluster(1, 8), A100, 1024, 31744, fixed={"quantization": "none"})
    assert search.table[search.table.fits].batch.max() == 99
