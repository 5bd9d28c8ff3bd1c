"""Greedy generation with a KV cache: the single-process cached generation against a loop
that recomputes the whole sequence for every token (no cache), and every parallel serving
plan (TP, PP, TP x PP, replicas; real ranks through torchrun) against the single-process
run of the same model, seed and prompts: the generated tokens must be identical. Plus the
`run --mode inference` CLI: its --json keys, its record, and bad input refused in one line.

Plans of one world size share one launch (launch_serve_many) to keep the file fast.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from meshplan.executor import launch as launch_module
from meshplan.executor.generate import generate, greedy, prompt_tokens
from meshplan.executor.model import build_model
from meshplan.executor.launch import check_serve, launch_serve_many
from meshplan.executor.options import ServeOptions
from meshplan.executor.records import ServeRecord
from meshplan.cli import main
from meshplan.core.errors import PlanError
from meshplan.simulator import rules
from meshplan.simulator.serve import InferencePlan, kv_tokens_per_sequence
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan

SEED, PROMPT_LEN, GEN_LEN = 0, 24, 12
LLAMA = ModelSpec("tiny-llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=256, vocab_size=512, max_seq_len=128)
GPT = ModelSpec("tiny-gpt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                ffn_hidden_size=256, vocab_size=256, max_seq_len=64, gated_mlp=False,
                activation="gelu", norm="layernorm", position_embedding="learned", bias=True)
FAST = ServeOptions(warmup=0, repeats=1, seed=SEED)
# Layers 0 and 2 attend over an 8-token window; their caches keep vLLM's 2 blocks of 16
# positions (simulator.serve.window_kept_tokens), so prompts of 40 drop old positions.
WINDOWED = dataclasses.replace(LLAMA, name="tiny-windowed", sliding_window=8, local_layers=(0, 2))
WIN_PROMPT, WIN_GEN = 40, 16
# QK-norm, a head width other than hidden/heads and Q/K/V biases (Qwen3, Qwen2), the keys
# normed before they are cached
# gpt-oss's: sinks, biases everywhere (the experts' too), a clamped SwiGLU, a windowed layer
OSS = ModelSpec("tiny-oss", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                vocab_size=256, max_seq_len=64, num_experts=4, experts_per_token=2, moe_ffn_hidden_size=64,
                bias=True, router_bias=True, swiglu_limit=0.5, attn_sinks=True, sliding_window=8,
                local_layers=(0,))
# DeepSeek's latent attention: the cache keeps the latent and the RoPE key, decode absorbed
MLA = ModelSpec("tiny-mla", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, ffn_hidden_size=128,
                vocab_size=256, max_seq_len=64, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12)
# Gemma 2's: scores and logits soft-capped, sandwich norms, every other layer over a window
GEMMA2 = dataclasses.replace(WINDOWED, name="tiny-gemma2", attn_softcap=2.0, final_softcap=5.0, sandwich_norm=True)
QWEN3 = ModelSpec("tiny-qwen3", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32,
                  ffn_hidden_size=128, vocab_size=256, max_seq_len=64, qk_norm=True, qkv_bias=True)


def recompute_greedy(model, prompts: torch.Tensor, gen_len: int) -> torch.Tensor:
    """Greedy generation without a cache: every token reruns the whole sequence so far."""
    seq, tokens = prompts, []
    with torch.no_grad():
        for _ in range(gen_len):
            tokens.append(greedy(model(seq)))
            seq = torch.cat([seq, tokens[-1][:, None]], dim=1)
    return torch.stack(tokens, dim=1)


def single_process(model: ModelSpec, plan: InferencePlan) -> torch.Tensor:
    prompts = prompt_tokens(plan.replicas * plan.batch, plan.prompt_len, model.vocab_size, SEED)
    return generate(build_model(model, SEED).eval(), prompts, plan.gen_len)


@pytest.mark.parametrize("model", [LLAMA, GPT, MLA, GEMMA2], ids=lambda m: m.name)
def test_cached_generation_equals_recompute(model):
    net = build_model(model, SEED).eval()
    prompts = prompt_tokens(3, PROMPT_LEN, model.vocab_size, SEED)
    cached = generate(net, prompts, GEN_LEN)
    assert cached.shape == (3, GEN_LEN)
    assert torch.equal(cached, recompute_greedy(net, prompts, GEN_LEN))
    assert len(cached.unique()) > 3  # the check is not vacuous: the tokens vary


@pytest.mark.parametrize("model", [LLAMA, GPT, MLA, GEMMA2], ids=lambda m: m.name)
def test_cached_logits_equal_full_forward(model):
    """Each decode step's logits are the full forward's logits at that position (RoPE or
    learned positions continue from the cache; the decode query attends over every cached
    key)."""
    net = build_model(model, SEED).eval()
    seq = prompt_tokens(2, PROMPT_LEN + 4, model.vocab_size, SEED)
    cache = net.new_cache(seq.shape[1])
    with torch.no_grad():
        full = net(seq)
        steps = [net(seq[:, :PROMPT_LEN], cache)] + [net(seq[:, i:i + 1], cache)
                                                     for i in range(PROMPT_LEN, seq.shape[1])]
    assert cache.length == seq.shape[1]
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full[:, PROMPT_LEN - 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [LLAMA, GPT, MLA], ids=lambda m: m.name)
def test_a_rewound_cache_decodes_as_the_first_time(model):
    """The decode probe's step (machine_load.decode_step) rewinds the cache to the prompt:
    a token decoded after rewinding gets the logits of a cache that never saw the later
    positions, and the cache holds the prompt plus that token again."""
    net = build_model(model, SEED).eval()
    seq = prompt_tokens(2, PROMPT_LEN + 3, model.vocab_size, SEED)
    cache = net.new_cache(seq.shape[1])
    with torch.no_grad():
        net(seq[:, :PROMPT_LEN], cache)
        first = net(seq[:, PROMPT_LEN:PROMPT_LEN + 1], cache)
        for i in range(PROMPT_LEN + 1, seq.shape[1]):
            net(seq[:, i:i + 1], cache)
        cache.rewind(PROMPT_LEN)
        again = net(seq[:, PROMPT_LEN:PROMPT_LEN + 1], cache)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert cache.length == PROMPT_LEN + 1
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.rewind(PROMPT_LEN + 2)
    with pytest.raises(ValueError, match="sliding-window"):
        build_model(WINDOWED, SEED).new_cache(8).rewind(0)


def test_windowed_cache_keeps_the_window_and_generates_as_recompute():
    # the cache keeps 32 positions in the window layers; recompute attends over the whole
    # sequence under the window mask
    net = build_model(WINDOWED, SEED).eval()
    prompts = prompt_tokens(3, WIN_PROMPT, WINDOWED.vocab_size, SEED)
    cached = generate(net, prompts, WIN_GEN)
    assert torch.equal(cached, recompute_greedy(net, prompts, WIN_GEN))
    # the window matters: the same weights attending over every position generate otherwise
    unwindowed = build_model(dataclasses.replace(WINDOWED, sliding_window=None, local_layers=()), SEED)
    assert not torch.equal(cached, generate(unwindowed.eval(), prompts, WIN_GEN))


def test_windowed_cached_logits_equal_full_forward_and_cache_holds_the_window():
    net = build_model(WINDOWED, SEED).eval()
    seq = prompt_tokens(2, WIN_PROMPT + WIN_GEN, WINDOWED.vocab_size, SEED)
    cache = net.new_cache(seq.shape[1])
    with torch.no_grad():
        full = net(seq)
        steps = [net(seq[:, :WIN_PROMPT], cache)] + [net(seq[:, i:i + 1], cache)
                                                     for i in range(WIN_PROMPT, seq.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, WIN_PROMPT - 1:], rtol=1e-5, atol=1e-5)
    # K and V x 2 sequences x 2 KV heads x 32 dims x 4 bytes per position: layers 1 and 3
    # hold all 56 positions, layers 0 and 2 the last 32
    assert [cache.layers[k].nbytes for k in "0123"] == [2 * 2 * 2 * 32 * 4 * n for n in (32, 56, 32, 56)]
    # what serving predicts for a 40-token prompt and 17 generated tokens: the full layers at
    # the context (the executor never writes the last token's K and V), the window layers 32
    assert kv_tokens_per_sequence(WINDOWED, WIN_PROMPT, WIN_PROMPT + WIN_GEN + 1) == 2 * 57 + 2 * 32


def test_executor_serves_and_trains_sliding_windows():
    plan = InferencePlan(batch=2, prompt_len=WIN_PROMPT, gen_len=WIN_GEN, tp=2)
    assert not rules.violations(rules.EXECUTOR_SERVING, plan, WINDOWED, Cluster(2, 2))
    train = Plan(dp=1, tp=2, micro_batch=1, global_batch=1, seq_len=64)
    assert not rules.violations(rules.EXECUTOR_TRAINING, train.fields(), WINDOWED, Cluster(2, 2))
    # under every CP exchange, the ring's blocks too (tests/test_ring_attention.py)
    for comm in ("p2p", "alltoall", "allgather", "a2a"):
        ring = Plan(cp=2, cp_comm=comm, micro_batch=1, global_batch=1, seq_len=64)
        assert not rules.violations(rules.EXECUTOR_TRAINING, ring.fields(), WINDOWED, Cluster(2, 2)), comm


def _plan(**fields) -> InferencePlan:
    return InferencePlan(**{"batch": 4, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
                            "dtype": "fp32", **fields})


WORLD_2 = [("tp2", LLAMA, _plan(tp=2)), ("pp2-uneven-microbatches", LLAMA, _plan(pp=2, batch=3)),
           ("replicas2", LLAMA, _plan(replicas=2)),
           ("tp2-windowed", WINDOWED, _plan(tp=2, prompt_len=WIN_PROMPT, gen_len=WIN_GEN)),
           ("tp2-qwen3", QWEN3, _plan(tp=2)),
           # sinks split with the heads, each expert's width with its biases (the output's
           # added once to the summed partial outputs)
           ("tp2-oss", OSS, _plan(tp=2)),
           ("tp2-mla", MLA, _plan(tp=2)),
           ("tp2-gemma2", GEMMA2, _plan(tp=2, prompt_len=WIN_PROMPT, gen_len=WIN_GEN)),
           # the last stage's head a copy of the first stage's embedding
           ("pp2-tied", dataclasses.replace(GPT, tied_embeddings=True), _plan(pp=2))]
WORLD_4 = [("tp2-pp2", LLAMA, _plan(tp=2, pp=2)), ("pp2-replicas2", LLAMA, _plan(pp=2, replicas=2)),
           ("tp2-pp2-windowed", WINDOWED, _plan(tp=2, pp=2, prompt_len=WIN_PROMPT, gen_len=WIN_GEN))]


@pytest.mark.slow
@pytest.mark.parametrize("world, jobs", [(2, WORLD_2), (4, WORLD_4)], ids=["world2", "world4"])
def test_parallel_generation_equals_single_process(world, jobs):
    records = launch_serve_many([(m, p) for _, m, p in jobs], Cluster(world, world), FAST)
    for (name, model, plan), record in zip(jobs, records):
        expected = single_process(model, plan)
        assert torch.equal(torch.tensor(record.tokens), expected), name
        assert record.world_size == world


@pytest.mark.parametrize("model, fields, field", [
    (LLAMA, dict(tp=4), "plan.tp"),  # divides the 4 heads, not the 2 KV heads
    (LLAMA, dict(gen_len=1), "plan.gen_len"),
    (LLAMA, dict(tp=3), "plan.tp"),
])
def test_executor_refusals_name_the_field(model, fields, field):
    plan = _plan(**fields)
    with pytest.raises(PlanError) as err:
        check_serve(model, plan, Cluster(plan.num_gpus, plan.num_gpus), FAST)
    assert err.value.field == field


@pytest.fixture()
def config_json(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA.to_dict()))
    return str(path)


def test_bad_tp_exits_2_with_one_line_and_launches_nothing(config_json, capsys, monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("torchrun was started for a refused plan")
    monkeypatch.setattr(launch_module, "torchrun", fail)
    code = main(["run", "--mode", "inference", "--model", config_json, "--tp", "3",
                 "--batch", "4", "--prompt-len", "16", "--gen-len", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("meshplan run: error: --tp: 3 does not divide the 4 attention heads")


def test_validate_unknown_serving_plan_exits_2(capsys):
    code = main(["validate", "--mode", "inference", "--plans", "nope"])
    assert code == 2
    assert "unknown serving suite plan 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_inference_json_keys_and_record(config_json, tmp_path):
    record_path = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meshplan.cli", "run", "--mode", "inference", "--model",
         config_json, "--hardware", "local", "--gpus", "2", "--tp", "2", "--batch", "4",
         "--prompt-len", "16", "--gen-len", "6", "--warmup", "1", "--repeats", "2", "--json",
         "--record", str(record_path), "--no-probe"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["plan"]["tp"] == 2 and out["plan"]["replicas"] == 1 and out["world_size"] == 2
    assert out["dtype"] == "fp32" and out["dtype_requested"] == "fp16"  # fp32 on CPU
    assert out["profile"] == "local" and out["device"] == "cpu"
    for key in ("ttft_s", "tpot_s", "latency_s", "throughput_tokens_per_s", "peak_memory_bytes"):
        assert isinstance(out[f"predicted_{key}"], float) and out[f"predicted_{key}"] > 0, key
        assert out[f"measured_{key}"] > 0, key
    assert len(out["measured_ttft_samples_s"]) == 2
    assert out["measured_latency_s"] == pytest.approx(
        out["measured_ttft_s"] + 5 * out["measured_tpot_s"])
    assert out["measured_throughput_tokens_per_s"] == pytest.approx(
        4 * 6 / out["measured_latency_s"])
    # Each TP rank holds half of the 2 KV heads: 4 layers x K and V x 4 sequences x
    # (16 + 6 - 1) positions x 1 head x 32 dims x 4 bytes.
    assert out["measured_kv_cache_bytes"] == 4 * 2 * 4 * 21 * 1 * 32 * 4
    assert len(out["measured_memory_by_rank"]) == 2
    expected = single_process(LLAMA, InferencePlan(batch=4, prompt_len=16, gen_len=6))
    assert out["generated_tokens"] == expected.tolist()
    record = ServeRecord.from_json(json.loads(record_path.read_text()))
    assert record.summary_json() == out
