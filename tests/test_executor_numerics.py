"""The executor's numerics: every plan kind, run on real ranks (torchrun, gloo, CPU), gives
the losses and first-step gradients of a plain single-process run of the same model, seed
and data, computed here in the test process.

Tolerances (fp32 throughout): loss rtol 1e-5 (observed <= 2e-7); gradients
|g - g_ref| <= 1e-5 * max|g_ref| + 1e-4 * |g_ref| per element (observed <= 4e-7 of the
largest gradient). The absolute part is scaled by the model's largest gradient because
sharded and reduced sums change fp32 rounding at ~1e-7 of the magnitudes summed, and some
gradients are zero in exact arithmetic (the key bias: softmax is shift invariant), so a
purely relative test would compare rounding noise with rounding noise.

Plans of one world size share one launch (launch_many) to keep the file fast.
"""
from __future__ import annotations

from contextlib import contextmanager
import json
from dataclasses import replace
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from meshplan.executor import data as batches
from meshplan.executor.adamw import MomentsAdamW
from meshplan.executor.launch import launch_train_many
from meshplan.executor.loss import eager_cross_entropy as loss_fn
from meshplan.executor.options import RunOptions
from meshplan.executor.model import build_model
from meshplan.executor.moe import MoE, route_in_turn, update_expert_bias
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, Plan

pytestmark = pytest.mark.slow

STEPS, SEED, LR = 3, 0, 1e-3
LLAMA = ModelSpec("tiny-llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=128, vocab_size=256, max_seq_len=64)
GPT = ModelSpec("tiny-gpt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                ffn_hidden_size=256, vocab_size=256, max_seq_len=64, gated_mlp=False,
                activation="gelu", norm="layernorm", position_embedding="learned",
                tied_embeddings=True, bias=True)
# Qwen3's attention (QK-norm, a head width other than hidden/heads) with Qwen2's Q/K/V biases
QWEN3 = ModelSpec("tiny-qwen3", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32,
                  ffn_hidden_size=128, vocab_size=256, max_seq_len=64, qk_norm=True, qkv_bias=True)
# DeepSeek's latent attention, its queries through a low rank (MLA) or not (MLA_DIRECT)
MLA = ModelSpec("tiny-mla", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, ffn_hidden_size=128,
                vocab_size=256, max_seq_len=64, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12)
MLA_DIRECT = ModelSpec("tiny-mla-direct", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                       ffn_hidden_size=128, vocab_size=256, max_seq_len=64, kv_lora_rank=16, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=12)
# gpt-oss's attention: a sink logit per head, biases
SINKS = ModelSpec("tiny-sinks", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                  vocab_size=256, max_seq_len=64, attn_sinks=True, qkv_bias=True, out_bias=True)
# Gemma's sandwich norms and a sliding-window layer, GPT-NeoX's parallel residual and partial RoPE
SANDWICH = ModelSpec("tiny-sandwich", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                     ffn_hidden_size=128, vocab_size=256, max_seq_len=64, sandwich_norm=True,
                     parallel_residual=True, rotary_pct=0.5, sliding_window=8, local_layers=(0,), out_bias=True)
# ... soft-capped (Gemma 2): the scores in the unfused core, and the logits
SOFTCAP = replace(SANDWICH, name="tiny-softcap", attn_softcap=0.5, final_softcap=3.0)


def plan(**fields) -> Plan:
    return Plan(**{"global_batch": 8, "seq_len": 32, "dtype": "fp32", "micro_batch": 2, **fields})


# (id, model, plan): every plan kind of the executor, at world size 2 and 4.
WORLD_2 = [
    ("ddp", LLAMA, plan(dp=2)),
    ("zero1", LLAMA, plan(dp=2, zero=1)),
    ("zero2", LLAMA, plan(dp=2, zero=2)),
    ("zero3", LLAMA, plan(dp=2, zero=3)),
    ("zero3-sync-last", LLAMA, plan(dp=2, zero=3, grad_sync="last")),
    ("tp", LLAMA, plan(tp=2)),
    ("tp-sp", LLAMA, plan(tp=2, sp=True)),
    ("pp-gpipe", LLAMA, plan(pp=2, schedule="gpipe")),
    ("pp-1f1b", LLAMA, plan(pp=2, schedule="1f1b")),
    ("pp-interleaved", LLAMA, plan(pp=2, schedule="interleaved", virtual_stages=2)),
    ("pp-zb-h1", LLAMA, plan(pp=2, schedule="zb-h1")),
    # the V: rank 0 holds the embedding's stage and the head's, and returns the loss
    ("pp-zb-v", LLAMA, plan(pp=2, schedule="zb-v", virtual_stages=2)),
    # the first virtual stage the embedding alone, the last the head alone
    ("pp-interleaved-empty-ends", LLAMA, plan(pp=2, schedule="interleaved", virtual_stages=2,
                                              layer_partition=(0, 2, 2, 0))),
    ("recompute-full", LLAMA, plan(dp=2, recompute="full")),
    ("recompute-selective", LLAMA, plan(dp=2, recompute="selective", micro_batch=1)),
    ("recompute-op", LLAMA, plan(dp=2, recompute="op", micro_batch=1)),
    # the per-op policy keeping SP's reduce-scatter outputs and redoing its all-gathers, or
    # redoing TP's all-reduces
    ("tp-sp-recompute-op", LLAMA, plan(tp=2, sp=True, recompute="op")),
    ("tp-recompute-op", LLAMA, plan(tp=2, recompute="op")),
    ("mla-tp-recompute-op", MLA, plan(tp=2, recompute="op")),
    # Megatron-LM's module recompute: the norms' outputs freed and rebuilt in backward
    ("recompute-norm-act", LLAMA, plan(dp=2, recompute="norm_act")),
    ("tp-recompute-norm-act", LLAMA, plan(tp=2, recompute="norm_act")),
    # ... under SP the norms' gathers rebuilt with them, the sequence shards gathered again
    ("tp-sp-recompute-norm-act", LLAMA, plan(tp=2, sp=True, recompute="norm_act")),
    ("gpt-tied-tp-sp", GPT, plan(tp=2, sp=True, micro_batch=4)),
    # the head a copy of the embedding on the other rank, their gradients summed over the pair
    ("gpt-tied-pp-1f1b", GPT, plan(pp=2, schedule="1f1b")),
    # both copies on rank 0, summed there
    ("gpt-tied-pp-zb-v", GPT, plan(pp=2, schedule="zb-v", virtual_stages=2, layer_partition=(0, 1, 1, 0))),
    # context parallelism, Ulysses' all-to-all: RoPE and learned positions offset per shard
    ("cp-a2a", LLAMA, plan(cp=2, cp_comm="a2a")),
    ("gpt-cp-a2a-selective", GPT, plan(cp=2, cp_comm="a2a", recompute="selective", micro_batch=4)),
    # the per-op policy keeping Ulysses' all-to-alls' outputs
    ("cp-a2a-recompute-op", LLAMA, plan(cp=2, cp_comm="a2a", recompute="op")),
    # the ring (CPU flash attention's blocks) and the gather, on the load-balanced chunks; the
    # selective checkpoint redoes the gather in backward; the per-op policy keeps the ring's
    # output and redoes no exchange
    ("cp-p2p-recompute-op", LLAMA, plan(cp=2, recompute="op")),
    # QK-norm weights replicated over TP's heads, sandwich norms sequence-parallel; the
    # gather's mask with a sliding window
    ("qwen3-tp-sp", QWEN3, plan(tp=2, sp=True)),
    ("sandwich-tp-sp", SANDWICH, plan(tp=2, sp=True)),
    ("sandwich-cp-allgather", SANDWICH, plan(cp=2, cp_comm="allgather")),
    # Gemma 2's soft-capped scores (the unfused core) and logits (vocab-sharded under TP)
    ("softcap-tp-sp-naive", SOFTCAP, plan(tp=2, sp=True, attention="naive")),
    # the scores capped in the gather's and Ulysses' cores
    ("softcap-cp-allgather-naive", SOFTCAP, plan(cp=2, cp_comm="allgather", attention="naive")),
    ("softcap-cp-a2a-naive", SOFTCAP, plan(cp=2, cp_comm="a2a", attention="naive")),
    # latent attention: up-projections split by head, down-projections and latent norms
    # replicated with their gradients summed over TP
    ("mla-tp-sp", MLA, plan(tp=2, sp=True)),
    ("mla-pp-1f1b-selective", MLA, plan(pp=2, schedule="1f1b", recompute="selective")),
    # latent attention's narrower values padded for the ring's exchange; the sinks in the
    # gather's core (under the per-op policy, which gathers again in its recompute) and,
    # split by head, in Ulysses'
    ("mla-cp-p2p", MLA, plan(cp=2)),
    ("sinks-cp-allgather-recompute-op", SINKS, plan(cp=2, cp_comm="allgather", recompute="op")),
    # ... and Ulysses' core on whole sequences, a sliding window's bands with the sinks
    ("sinks-window-cp-a2a", replace(SINKS, sliding_window=8, local_layers=(0,)), plan(cp=2, cp_comm="a2a")),
    # the ring's blocks under a sliding window and the sinks joining its merge (the rings'
    # soft-capping and the other cases: tests/test_ring_attention.py)
    ("sinks-window-cp-p2p", replace(SINKS, sliding_window=8, local_layers=(0,)), plan(cp=2)),
    ("gpt-cp-allgather-selective", GPT, plan(cp=2, cp_comm="allgather", recompute="selective", micro_batch=4)),
    # the unfused attention core on head shards, against the reference's fused kernel
    ("tp-sp-naive-attention", LLAMA, plan(tp=2, sp=True, attention="naive")),
    # Adam's moments kept in bf16 beside the fp32 weights (executor/adamw.py)
    ("ddp-bf16-moments", LLAMA, plan(dp=2, moments_dtype="bf16")),
    ("zero1-bf16-moments", LLAMA, plan(dp=2, zero=1, moments_dtype="bf16")),
    ("zero3-bf16-moments", LLAMA, plan(dp=2, zero=3, moments_dtype="bf16")),
    ("tp-sp-bf16-moments", LLAMA, plan(tp=2, sp=True, moments_dtype="bf16")),
]
WORLD_4 = [
    ("dp-tp", LLAMA, plan(dp=2, tp=2)),
    ("dp-tp-sp-zero3", LLAMA, plan(dp=2, tp=2, sp=True, zero=3)),
    ("gpt-dp-tp-sp-zero2-full", GPT, plan(dp=2, tp=2, sp=True, zero=2, recompute="full")),
    ("dp-pp-1f1b-zero3", LLAMA, plan(dp=2, pp=2, zero=3, reshard_after_forward=False)),
    ("dp-pp-interleaved", LLAMA, plan(dp=2, pp=2, schedule="interleaved", virtual_stages=2,
                                      micro_batch=1)),
    ("tp-sp-pp-zb-h1", LLAMA, plan(tp=2, sp=True, pp=2, schedule="zb-h1")),
    # FSDP2 under a split backward (the weights kept gathered from forward, as the plan says)
    ("dp-pp-zb-h1-zero3", LLAMA, plan(dp=2, pp=2, zero=3, reshard_after_forward=False, schedule="zb-h1",
                                      micro_batch=1)),
    ("dp-pp-zb-v-zero3", LLAMA, plan(dp=2, pp=2, zero=3, reshard_after_forward=False, schedule="zb-v",
                                     virtual_stages=2, micro_batch=1)),
    # the copies vocabulary-sharded over TP and the data-parallel shards of FSDP2
    ("gpt-tied-dp-pp-interleaved-zero3", GPT, plan(dp=2, pp=2, zero=3, reshard_after_forward=False,
                                                   schedule="interleaved", virtual_stages=2,
                                                   layer_partition=(0, 1, 1, 0), micro_batch=1)),
    ("gpt-tied-tp-sp-pp-1f1b", GPT, plan(tp=2, sp=True, pp=2, schedule="1f1b")),
    # ZeRO-1 beside FSDP2's replicate: whole parameters (TP shards) owned by one dp rank each
    ("dp-tp-sp-zero1", LLAMA, plan(dp=2, tp=2, sp=True, zero=1)),
    # the embedding's stage alone is one parameter, which leaves one dp rank owning none
    ("dp-pp-interleaved-zero1", LLAMA, plan(dp=2, pp=2, zero=1, schedule="interleaved", virtual_stages=2,
                                            layer_partition=(0, 2, 2, 0), micro_batch=1)),
    # gradients averaged and ZeRO sharded over the dp x cp ranks
    ("dp-cp-a2a-zero3", LLAMA, plan(dp=2, cp=2, cp_comm="a2a", zero=3)),
    ("dp-cp-a2a-zero1", LLAMA, plan(dp=2, cp=2, cp_comm="a2a", zero=1)),
    # the CP group's heads split further over TP; FSDP2's replicate joins dp x cp with TP
    ("gpt-cp-tp-sp-a2a", GPT, plan(cp=2, tp=2, sp=True, cp_comm="a2a")),
    ("cp-pp-1f1b-a2a-full", LLAMA, plan(cp=2, pp=2, cp_comm="a2a", schedule="1f1b", recompute="full")),
    # a ring of four: blocks from earlier and later ranks; torch's all-to-all rotation
    ("cp4-p2p", LLAMA, plan(cp=4)),
    ("qwen3-dp-tp-zero3", QWEN3, plan(dp=2, tp=2, zero=3)),
    ("mla-direct-dp-tp-zero3", MLA_DIRECT, plan(dp=2, tp=2, zero=3)),
    ("mla-cp-tp-sp-allgather", MLA, plan(cp=2, tp=2, sp=True, cp_comm="allgather")),
    ("sinks-cp-tp-sp-a2a", replace(SINKS, num_heads=8, num_kv_heads=4), plan(cp=2, tp=2, sp=True, cp_comm="a2a")),
    ("dp-cp-alltoall-zero3", LLAMA, plan(dp=2, cp=2, cp_comm="alltoall", zero=3)),
    # the unfused ring on TP's head shards
    ("gpt-cp-tp-sp-p2p-naive", GPT, plan(cp=2, tp=2, sp=True, attention="naive")),
    ("tp-sp-pp-gpipe-selective", LLAMA, plan(tp=2, sp=True, pp=2, schedule="gpipe",
                                             recompute="selective", layer_partition=(1, 3))),
]


@contextmanager
def routing_scores(seen: list):
    """Appends to `seen` the scores of every routing decision made inside (MoE._choose's
    input: [tokens, experts])."""
    choose = MoE._choose

    def recorded(self, scores):
        seen.append(scores.detach().clone())
        return choose(self, scores)
    with patch.object(MoE, "_choose", recorded):
        yield


def _train(model: ModelSpec, plan: Plan, chunks: int = 1):
    """Single process on each step's whole batch, its loss summed over `chunks` equal slices
    of it: (losses, gradients of step 1 by name, each step's routing scores per MoE layer)."""
    torch.manual_seed(SEED)
    net = build_model(model, SEED)
    for layer in net.layers.values():  # the plan's attention kernel (soft-capping runs unfused only)
        layer.attention.core.kernel = plan.attention
    if plan.moe_routing == "contiguous":  # each rank's micro-batches of whole multiples of E / k tokens
        route_in_turn(net)
    optimizer = (torch.optim.AdamW(net.parameters(), lr=LR) if plan.moments_dtype == "fp32"
                 else MomentsAdamW(net.parameters(), lr=LR))
    losses, grads, step_scores = [], {}, []
    for step in range(STEPS):
        tokens = batches.global_batch(step, plan.global_batch, plan.seq_len, model.vocab_size, SEED)
        inputs, targets = batches.split_inputs_targets(tokens)
        seen = []
        with routing_scores(seen):
            loss = sum(loss_fn(net(x), y) for x, y in zip(inputs.chunk(chunks), targets.chunk(chunks))) / chunks
        layers = len(seen) // chunks  # chunk c's decisions, layer by layer, then chunk c + 1's
        step_scores.append([torch.cat(seen[j::layers]) for j in range(layers)])
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        optimizer.step()
        update_expert_bias([net], None)  # every token's rows counted here, as the ranks' summed
        optimizer.zero_grad()
    return losses, grads, step_scores


def first_near_tie(scores: list, reordered: list, top_k: int) -> int:
    """The first step after an update whose routing a distributed run may decide otherwise:
    some token's k-th and (k+1)-th best scores closer than twice the largest score the same
    training moves when its gradients are only summed in another order (a run's ranks sum
    them in yet another). Adam's normalised update carries that rounding to every weight:
    tiny-moe-gelu's scores move by up to 2.4e-5 after one step, tiny-moe's by 3e-8, and a
    token of the former at a gap of 6.6e-6 (dp2 tp2 sp ep2 etp2) routed the other way on an
    AMD EPYC VM and not on a Xeon one. len(scores) where there is none."""
    for step in range(1, len(scores)):
        for mine, other in zip(scores[step], reordered[step]):
            best = mine.topk(top_k + 1, dim=-1).values
            if (best[:, -2] - best[:, -1]).min() < 2 * (mine - other).abs().max():
                return step
    return len(scores)


def reference(model: ModelSpec, plan: Plan):
    """Single process, whole batch at once: (losses, gradients of step 1 by name, the first
    step whose routing is a near tie: first_near_tie)."""
    losses, grads, scores = _train(model, plan)
    if not scores[0] or model.num_experts <= model.experts_per_token:
        return losses, grads, len(losses)
    _, _, reordered = _train(model, plan, chunks=4)
    return losses, grads, first_near_tie(scores, reordered, model.experts_per_token)


def run_group(jobs, world_size: int, run_dir: Path):
    options = RunOptions(steps=STEPS, warmup=1, seed=SEED, lr=LR, run_dir=str(run_dir),
                         save_grads=True, progress=False)
    records = launch_train_many([(m, p) for _, m, p in jobs], Cluster(world_size, world_size), options)
    return {job_id: (i, record) for i, ((job_id, _, _), record) in enumerate(zip(jobs, records))}


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("world2")
    return run_dir, run_group(WORLD_2, 2, run_dir)


@pytest.fixture(scope="module")
def world_4(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("world4")
    return run_dir, run_group(WORLD_4, 4, run_dir)


def rank_gradients(run_dir: Path, job_index: int) -> dict:
    """Union of the ranks' gradients (pipeline stages hold disjoint parameters)."""
    grads = {}
    for path in sorted(run_dir.glob(f"grads{job_index}_rank*.pt")):
        grads.update(torch.load(path))
    return grads


def check_against_reference(run_dir: Path, job_index: int, record) -> None:
    """The run's losses and step-1 gradients against the single process's. From the first step
    whose routing is a near tie (first_near_tie) the losses are held to 1e-3: a token routed
    the other way moves the loss by about 1e-4 of itself."""
    ref_losses, ref_grads, tied = reference(record.model, record.plan)
    assert record.losses[:tied] == pytest.approx(ref_losses[:tied], rel=1e-5, abs=0)
    assert record.losses[tied:] == pytest.approx(ref_losses[tied:], rel=1e-3, abs=0)
    grads = rank_gradients(run_dir, job_index)
    assert sorted(grads) == sorted(ref_grads)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("job_id", [j[0] for j in WORLD_2])
def test_world_2_matches_single_process(world_2, job_id):
    run_dir, runs = world_2
    index, record = runs[job_id]
    assert record.world_size == 2 and record.plan.dtype == "fp32"
    check_against_reference(run_dir, index, record)


@pytest.mark.parametrize("job_id", [j[0] for j in WORLD_4])
def test_world_4_matches_single_process(world_4, job_id):
    run_dir, runs = world_4
    index, record = runs[job_id]
    assert record.world_size == 4
    check_against_reference(run_dir, index, record)


def test_memory_accounts_local_shards(world_2):
    """Parameter bytes against ModelSpec's closed-form count: whole on DDP, halved (up to
    FSDP2's padding of each tensor to a multiple of 2 rows) under ZeRO 3; optimizer state
    (AdamW: two fp32 moments and a scalar step per tensor) halved under ZeRO 1, and its
    moments halved again in bf16."""
    _, runs = world_2
    full_bytes = LLAMA.num_params() * 4
    ddp = runs["ddp"][1].memory_by_rank[0]
    assert ddp["parameters_bytes"] == full_bytes
    assert ddp["gradients_bytes"] == full_bytes
    num_tensors = len(list(build_model(LLAMA, SEED).parameters()))
    assert ddp["optimizer_bytes"] == 2 * full_bytes + 4 * num_tensors
    assert ddp["activations_bytes"] > 0
    # TP shards Q/K/V and the MLP of the same micro-batch: DTensors count their local shard
    tp = runs["tp"][1].memory_by_rank[0]
    assert 0 < tp["activations_bytes"] < ddp["activations_bytes"]
    assert ddp["peak_bytes"] == sum(ddp[k] for k in ("parameters_bytes", "gradients_bytes",
                                                     "optimizer_bytes", "activations_bytes"))
    zero3 = [m["parameters_bytes"] for m in runs["zero3"][1].memory_by_rank]
    assert sum(zero3) == pytest.approx(full_bytes, rel=0.02)
    zero1 = [m["optimizer_bytes"] for m in runs["zero1"][1].memory_by_rank]
    assert sum(zero1) == pytest.approx(ddp["optimizer_bytes"], rel=0.02)
    assert max(zero1) < 0.7 * ddp["optimizer_bytes"]
    # bf16 moments: two bytes each, the step counts as before
    assert runs["ddp-bf16-moments"][1].memory_by_rank[0]["optimizer_bytes"] == full_bytes + 4 * num_tensors
    # recompute norm_act under SP rebuilds the norms' gathers: the attention's and the MLP's
    # linears keep no gathered input (micro-batch 2 x 32 tokens, fp32), and the norms keep no
    # normed shard, so each layer keeps at least two whole inputs fewer (rebuilding the norm
    # alone frees its shards only)
    kept = {name: runs[name][1].memory_by_rank[0]["activations_bytes"]
            for name in ("tp-sp", "tp-sp-recompute-norm-act")}
    gathered = 2 * 32 * LLAMA.hidden_size * 4
    assert kept["tp-sp"] - kept["tp-sp-recompute-norm-act"] >= LLAMA.num_layers * 2 * gathered


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshplan.cli", "run", *args]


@pytest.fixture()
def config_json(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA.to_dict()))
    return str(path)


def test_two_nodes_with_rendezvous_match_single_process(config_json):
    """Two torchrun agents on 127.0.0.1 (one rank each) meet through a c10d rendezvous."""
    port = _free_port()
    common = ("--model", config_json, "--gpus", "2", "--dp", "2", "--global-batch", "8",
              "--micro-batch", "2", "--seq-len", "32", "--dtype", "fp32", "--steps", str(STEPS),
              "--warmup", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--json",
              "--no-probe")
    nodes = [subprocess.Popen(_cli(*common, "--node-rank", str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    ref_losses, _, _ = reference(LLAMA, plan(dp=2))
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-2000:]
        result = json.loads(out)
        assert result["world_size"] == 2
        assert result["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=0)


def test_dead_rank_ends_run_naming_it(config_json):
    """Rank 1 exits abruptly after step 1: the CLI fails, naming rank 1, as soon as torchrun
    sees the exit, not when rank 0's next collective times out (600 s here: a run that waited
    for it would outlive the test's 300 s). The bound leaves room for a loaded 2-core VM,
    where the launch alone has taken 25 s."""
    env = dict(os.environ, MESHPLAN_FAULT="1:1")
    start = time.monotonic()
    proc = subprocess.run(_cli("--model", config_json, "--gpus", "2", "--dp", "2",
                               "--global-batch", "8", "--seq-len", "32", "--steps", "50",
                               "--warmup", "1", "--no-probe", "--timeout-s", "600"),
                          env=env, capture_output=True, text=True, timeout=300)
    elapsed_s = time.monotonic() - start
    assert proc.returncode == 1
    assert elapsed_s < 150
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("meshplan run: run failed: rank 1 ")
    assert "exit code 17" in last
