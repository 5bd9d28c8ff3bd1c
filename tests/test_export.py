"""Exports: the key names each target documents, values that reproduce the plan, and the
refusals that name the target and the knob."""
import json
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from meshplan.hw_profiles.profile import load_profile
from meshplan.core.errors import PlanError
from meshplan.planner.export import check, export, supported
from meshplan.planner.space import candidate_table, row_plan
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.train import simulate

A100 = load_profile("a100-80gb")
LLAMA = ZOO["llama-2-13b"]
CLUSTER = Cluster(64, 8)

# pytorch/torchtitan torchtitan/config/job_config.py (TOML JobConfig) field names.
TORCHTITAN_KEYS = {
    "training": {"local_batch_size", "global_batch_size", "seq_len", "mixed_precision_param"},
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree",
                    "fsdp_reshard_after_forward", "tensor_parallel_degree",
                    "enable_async_tensor_parallel", "context_parallel_degree",
                    "pipeline_parallel_degree", "pipeline_parallel_schedule",
                    "pipeline_parallel_microbatch_size", "pipeline_parallel_layers_per_stage",
                    "pipeline_parallel_first_stage_less_layers",
                    "pipeline_parallel_last_stage_less_layers"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
}
# NVIDIA/Megatron-LM megatron/training/arguments.py flags.
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
    "--micro-batch-size", "--global-batch-size", "--seq-length", "--num-layers", "--hidden-size",
    "--ffn-hidden-size", "--num-attention-heads", "--max-position-embeddings",
    "--group-query-attention", "--num-query-groups", "--swiglu", "--normalization",
    "--position-embedding-type", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--sequence-parallel", "--num-layers-per-virtual-pipeline-stage",
    "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
    "--use-distributed-optimizer", "--use-torch-fsdp2", "--use-tp-pp-dp-mapping",
    "--use-flash-attn", "--bf16", "--fp16"}
# deepspeed.ai/docs/config-json
DEEPSPEED_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "zero_optimization", "bf16", "fp16"}


def result(**knobs):
    plan = Plan(global_batch=64, seq_len=4096, **knobs)
    return simulate(LLAMA, plan, CLUSTER, A100)


def megatron_flags(text: str) -> dict:
    flags = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        parts = line.strip().rstrip("\\").split()
        flags[parts[0]] = parts[1] if len(parts) > 1 else None
    return flags


def test_torchtitan_keys_and_values():
    r = result(dp=4, tp=4, pp=4, sp=True, zero=3, recompute="full", micro_batch=2,
               schedule="interleaved", virtual_stages=2)
    config = tomllib.loads(export("torchtitan", LLAMA, r))
    for section, keys in config.items():
        assert set(keys) <= TORCHTITAN_KEYS[section], section
    par = config["parallelism"]
    assert (par["data_parallel_shard_degree"], par["data_parallel_replicate_degree"]) == (4, 1)
    assert (par["tensor_parallel_degree"], par["pipeline_parallel_degree"]) == (4, 4)
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_layers_per_stage"] * 4 * 2 == LLAMA.num_layers
    assert par["enable_async_tensor_parallel"] is False
    assert config["training"]["local_batch_size"] == 64 // 4  # micro-batches x micro-batch size
    assert config["training"]["global_batch_size"] == 64
    assert config["activation_checkpoint"]["mode"] == "full"


def test_torchtitan_schedule_names_are_torch_names():
    torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        r = result(dp=4, tp=4, pp=4, sp=True, schedule=schedule, virtual_stages=v)
        name = tomllib.loads(export("torchtitan", LLAMA, r))["parallelism"]["pipeline_parallel_schedule"]
        torch_schedules.get_schedule_class(name)  # raises on an unknown name


def test_megatron_flags_and_values():
    r = result(dp=4, tp=4, pp=4, sp=True, zero=1, recompute="full", micro_batch=2,
               schedule="interleaved", virtual_stages=2)
    flags = megatron_flags(export("megatron", LLAMA, r))
    assert set(flags) <= MEGATRON_FLAGS
    assert flags["--tensor-model-parallel-size"] == "4" and flags["--pipeline-model-parallel-size"] == "4"
    assert flags["--num-layers-per-virtual-pipeline-stage"] == str(LLAMA.num_layers // 8)
    assert flags["--recompute-granularity"] == "full" and flags["--recompute-method"] == "uniform"
    assert "--use-distributed-optimizer" in flags and "--sequence-parallel" in flags
    assert flags["--micro-batch-size"] == "2" and flags["--global-batch-size"] == "64"


def test_deepspeed_keys_and_values():
    r = result(dp=8, tp=8, zero=2, micro_batch=2)
    config = json.loads(export("deepspeed", LLAMA, r))
    assert set(config) <= DEEPSPEED_KEYS
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * \
        config["gradient_accumulation_steps"] * 8
    assert config["zero_optimization"] == {"stage": 2} and config["bf16"] == {"enabled": True}


def test_plan_export_round_trips():
    r = result(dp=4, tp=4, pp=4, sp=True, schedule="zb-h1")
    assert Plan.from_dict(json.loads(export("plan", LLAMA, r))) == r.plan


@pytest.mark.parametrize("target,knobs,knob", [
    ("torchtitan", dict(dp=4, tp=4, pp=4, sp=True, schedule="zb-h1"), "schedule"),
    ("torchtitan", dict(dp=8, tp=8, zero=1), "zero"),
    ("torchtitan", dict(dp=8, tp=8), "sp"),
    ("megatron", dict(dp=8, tp=4, pp=2, schedule="gpipe"), "schedule"),
    ("megatron", dict(dp=8, tp=8, zero=2), "zero"),
    ("megatron", dict(dp=4, tp=4, pp=4, zero=3), "zero"),
    ("megatron", dict(dp=4, tp=4, pp=4, schedule="interleaved", virtual_stages=3), "virtual_stages"),
    ("megatron", dict(dp=8, tp=8, placement=("dp", "tp", "cp", "pp")), "placement"),
    ("deepspeed", dict(dp=4, tp=4, cp=4), "cp"),
    ("deepspeed", dict(dp=4, tp=4, pp=4, zero=2), "zero"),
])
def test_refusals_name_target_and_knob(target, knobs, knob):
    plan = Plan(global_batch=64, seq_len=4096, **knobs)
    with pytest.raises(PlanError) as err:
        check(target, LLAMA, plan)
    assert err.value.field == f"emit.{target}" and err.value.problem.startswith(knob)


def test_search_restriction_agrees_with_check():
    table = candidate_table(LLAMA, CLUSTER, {"global_batch": 64, "seq_len": 4096})
    rows = np.random.default_rng(0).choice(len(table), 300, replace=False)
    for target in ("torchtitan", "megatron", "deepspeed"):
        mask = supported(target, LLAMA, table)
        for i in rows:
            try:
                check(target, LLAMA, row_plan(table, int(i)))
                ok = True
            except PlanError:
                ok = False
            assert ok == mask[i], (target, row_plan(table, int(i)))


def meshplan(*args):
    return subprocess.run([sys.executable, "-m", "meshplan.cli", *args], capture_output=True,
                          text=True, timeout=300)


BASE = ["--model", "llama-2-13b", "--gpus", "64", "--global-batch", "64", "--seq-len", "4096"]


def test_cli_emit_prints_only_the_config(tmp_path):
    out = meshplan("plan", *BASE, "--emit", "torchtitan")
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["training"]["global_batch_size"] == 64
    out = meshplan("plan", *BASE, "--emit", "megatron")
    assert out.returncode == 0 and set(megatron_flags(out.stdout)) <= MEGATRON_FLAGS
    out = meshplan("plan", *BASE, "--emit", "plan")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(out.stdout)
    sim = meshplan("simulate", "--model", "llama-2-13b", "--gpus", "64", "--plan", str(plan_file), "--json")
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["plan"] == json.loads(out.stdout)


def test_cli_emit_refusal_is_one_line():
    out = meshplan("plan", *BASE, "--pp", "2", "--schedule", "zb-h1", "--emit", "megatron")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--emit megatron" in lines[0] and "schedule" in lines[0]
    assert re.search(r"1f1b|interleaved", lines[0])
