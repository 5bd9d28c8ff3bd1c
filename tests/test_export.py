"""Exports: the key names each target documents, values that reproduce the plan (hand-checked
here; tests/test_export_conformance.py runs the frameworks' own validation), the pipeline
split in each target's knobs, the checkpoint's facts, and refusals that name target and knob."""
import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import check, dictated, export, supported, train_job, vllm
from meshplan.planner.exports.checkpoint import checkpoint_of
from meshplan.planner.exports.megatron import layout
from meshplan.planner.exports.torchtitan import stage_modules
from meshplan.planner.space import candidate_table, row_plan
from meshplan.simulator.model_spec import ZOO, load_model
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.train import simulate
from tests.cli import meshplan

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests/data/hf_configs"
A100, H100 = load_profile("a100-80gb"), load_profile("h100-80gb")
L13, L70 = ZOO["llama-2-13b"], ZOO["llama-3-70b"]
CLUSTER = Cluster(64, 8)

# pytorch/torchtitan v0.2.2 torchtitan/config/job_config.py (TOML JobConfig) field names.
TORCHTITAN_0_2_KEYS = {
    "job": {"description"}, "model": {"name", "flavor"},
    "training": {"local_batch_size", "global_batch_size", "seq_len", "mixed_precision_param",
                 "mixed_precision_reduce", "dataset"},
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree",
                    "fsdp_reshard_after_forward", "tensor_parallel_degree",
                    "enable_async_tensor_parallel", "context_parallel_degree",
                    "pipeline_parallel_degree", "pipeline_parallel_schedule",
                    "pipeline_parallel_microbatch_size", "module_fqns_per_model_part",
                    "expert_parallel_degree", "expert_tensor_parallel_degree", "expert_parallel_comm_backend"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
    "compile": {"enable", "components"},
    "quantize": {"linear"},
}
# deepspeed.ai/docs/config-json
DEEPSPEED_KEYS = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization",
                  "optimizer", "gradient_clipping", "steps_per_print", "bf16", "fp16",
                  "activation_checkpointing", "communication_data_type"}


MIXTRAL, QWEN3_MOE = str(HF / "mixtral-8x7b.json"), str(HF / "qwen3-30b-a3b.json")


def job(model_arg, gpus=64, version=None, seq_len=4096, hw=A100, **knobs):
    model = load_model(model_arg)
    result = simulate(model, Plan(global_batch=64, seq_len=seq_len, **knobs), Cluster(gpus, 8), hw)
    return train_job(model, result, hw, checkpoint_of(model_arg, model), version)


def titan_job(model_arg, **knobs):
    """job() of a plan as a search for torchtitan prices it (exports.dictated: its loss compiled)."""
    return job(model_arg, **{**dictated("torchtitan", knobs), **knobs})


@pytest.fixture(scope="module")
def deepseek_shaped(tmp_path_factory) -> str:
    """DeepSeek-V3's experts (256 routed, top 8 from the best 4 of 8 groups, one shared,
    sigmoid router, 3 dense layers first) behind grouped-query attention, as a ModelSpec JSON."""
    spec = dataclasses.asdict(load_model(str(HF / "deepseek-v3.json")))
    spec.update(name="deepseek-v3-gqa", num_kv_heads=8, head_dim=128, q_lora_rank=0, kv_lora_rank=0,
                qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    path = tmp_path_factory.mktemp("models") / "deepseek-v3-gqa.json"
    path.write_text(json.dumps(spec))
    return str(path)


def flags(args) -> dict:
    """--flag value pairs of an argument list (value None for a switch)."""
    out, key = {}, None
    for word in args:
        if word.startswith("--"):
            key, out[word] = word, None
        elif key is not None and out[key] is None:
            out[key] = word
    return out


def test_checkpoint_facts_from_the_config_and_the_zoo():
    llama31 = checkpoint_of(str(HF / "llama-3.1-8b.json"), load_model(str(HF / "llama-3.1-8b.json")))
    assert (llama31.rope_theta, llama31.rope_scaling.factor, llama31.norm_eps, llama31.dtype) == \
        (500000.0, 8.0, 1e-5, "bf16")
    assert llama31.hf_id is None  # this config.json carries no _name_or_path
    llama2 = checkpoint_of(str(HF / "llama-2-7b.json"), load_model(str(HF / "llama-2-7b.json")))
    assert (llama2.hf_id, llama2.dtype, llama2.rope_theta) == ("meta-llama/Llama-2-7b-hf", "fp16", 10000.0)
    assert checkpoint_of("llama-3-70b", L70).rope_theta == 500000.0
    assert checkpoint_of("gpt3-175b", ZOO["gpt3-175b"]).hf_id is None


def test_torchtitan_0_3_arguments():
    j = titan_job("llama-3-70b", dp=4, tp=4, pp=4, sp=True, zero=3, recompute="full", micro_batch=2,
                  schedule="interleaved", virtual_stages=2, reshard_after_forward=False)
    e = export("torchtitan", j)
    f = flags(e.args)
    assert (f["--module"], f["--config"]) == ("llama3", "llama3_70b")
    assert (f["--parallelism.data-parallel-shard-degree"], f["--parallelism.data-parallel-replicate-degree"]) == ("4", "1")
    assert f["--parallelism.pipeline-parallel-schedule"] == "Interleaved1F1B"
    assert f["--training.local-batch-size"] == str(64 // 4)  # micro-batches x micro-batch size
    assert "--training.disable-cuda-graphs" in f and "--compile.no-enable-async-tensor-parallel" in f
    assert e.args[-1] == "activation-checkpoint:full"
    stages = e.args[e.args.index("--parallelism.module-fqns-per-model-part") + 1:][:8]
    assert [s.count("layers.") for s in stages] == list(j.partition) and len(j.partition) == 8
    assert {name for name, _ in e.user_paths} == {"HF_ASSETS_PATH", "DATA_PATH"}


def test_torchtitan_0_2_toml():
    e = export("torchtitan", titan_job("llama-3-70b", version="0.2", dp=4, tp=4, pp=4, sp=True, zero=2,
                                 recompute="op"))
    config = tomllib.loads(dict(e.files)["torchtitan-job.toml"])
    for section, keys in config.items():
        assert set(keys) <= TORCHTITAN_0_2_KEYS[section], section
    assert config["model"] == {"name": "llama3", "flavor": "70B"}  # not the 6-layer debugmodel
    assert config["parallelism"]["fsdp_reshard_after_forward"] == "never"
    assert config["activation_checkpoint"] == {"mode": "selective", "selective_ac_option": "op"}
    stages = config["parallelism"]["module_fqns_per_model_part"]
    assert stages[0][0] == "tok_embeddings" and stages[-1][-2:] == ["norm", "output"]


def test_stage_modules_and_megatron_layout_by_hand():
    assert stage_modules((2, 1), "lm_head") == [["tok_embeddings", "layers.0", "layers.1"],
                                               ["layers.2", "norm", "lm_head"]]
    assert layout((9, 10, 11)) == "Et*9|t*10|t*11L"
    # end stages of the embedding or the head alone (Megatron-LM's docs: "Et*3|(tt|)*29,m|L")
    assert layout((0, 2, 2, 0)) == "E|t*2|t*2|L"
    assert stage_modules((0, 1, 0), "output") == [["tok_embeddings"], ["layers.0"], ["norm", "output"]]


def test_megatron_arguments_and_environment():
    j = job("llama-3-70b", dp=2, tp=4, pp=8, sp=True, zero=1, recompute="full",
            layer_partition=(9, 10, 10, 10, 10, 11, 11, 9))
    e = export("megatron", j)
    f = flags(e.args)
    assert f["--rotary-base"] == "500000" and f["--norm-epsilon"] == "1e-05"  # Megatron's default is 10000
    assert f["--num-query-groups"] == "8" and f["--attention-dropout"] == "0.0"
    assert f["--pipeline-model-parallel-layout"] == "Et*9|t*10|t*10|t*10|t*10|t*11|t*11|t*9L"
    assert "--use-distributed-optimizer" in f and "--sequence-parallel" in f
    assert dict(e.env) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    even = flags(export("megatron", job("llama-3-70b", dp=2, tp=4, pp=8, sp=True, schedule="interleaved",
                                        virtual_stages=2, layer_partition=(5,) * 16)).args)
    assert even["--num-virtual-stages-per-pipeline-rank"] == "2" and "--pipeline-model-parallel-layout" not in even


def test_megatron_fsdp_forms():
    untied = export("megatron", job("llama-3-70b", dp=64, zero=3))
    assert {"--use-torch-fsdp2", "--no-gradient-accumulation-fusion", "--untie-embeddings-and-output-weights"} \
        <= set(flags(untied.args)) and untied.env == ()
    # flat buffers are Megatron-FSDP, which shards tied embeddings; FSDP2's per-parameter shards refuse them
    tied = flags(export("megatron", job("gpt3-175b", seq_len=2048, dp=64, zero=3, recompute="full",
                                        fsdp_layout="flat")).args)
    assert "--use-megatron-fsdp" in tied and tied["--data-parallel-sharding-strategy"] == "optim_grads_params"
    assert "--untie-embeddings-and-output-weights" not in tied
    with pytest.raises(PlanError, match="fsdp_layout flat"):
        export("megatron", job("gpt3-175b", seq_len=2048, dp=64, zero=3, recompute="full"))


def test_megatron_rope_scaling_from_a_llama_3_1_config():
    f = flags(export("megatron", job(str(HF / "llama-3.1-8b.json"), gpus=8, dp=1, tp=8, sp=True)).args)
    assert "--use-rope-scaling" in f and f["--rope-scaling-factor"] == "8.0"


def test_deepspeed_config_and_command():
    e = export("deepspeed", job("llama-2-13b", dp=4, tp=4, pp=4, sp=True, zero=1, recompute="full", micro_batch=2,
                                mlp_kernel="eager"))
    config = json.loads(dict(e.files)["ds_config.json"])
    assert set(config) <= DEEPSPEED_KEYS and "train_batch_size" not in config
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 4 == 64
    assert config["activation_checkpointing"]["partition_activations"] is True
    assert config["optimizer"]["type"] == "AdamW"
    f = flags(e.args)
    assert {"--sequence-parallel", "--deepspeed", "--deepspeed-activation-checkpointing"} <= set(f)
    assert f["--deepspeed_config"] == "ds_config.json" and f["--zero-stage"] == "1"
    assert f["--rotary-position-embeddings-theta"] == "10000"


def test_mlp_kernel_and_elementwise_reach_each_target():
    # Megatron-LM fuses SwiGLU unless told not to, and its norms and RoPE always; torchtitan
    # fuses them all when compiled and none otherwise; Megatron-DeepSpeed has no fused
    # SwiGLU, so a fused plan is refused there
    assert "--no-bias-swiglu-fusion" in flags(export("megatron", job("llama-2-13b", dp=8, tp=8, sp=True,
                                                                      mlp_kernel="eager")).args)
    assert "--no-bias-swiglu-fusion" not in flags(export("megatron", job("llama-2-13b", dp=8, tp=8, sp=True)).args)
    with pytest.raises(PlanError) as err:
        check("megatron", L13, Plan(global_batch=64, seq_len=4096, dp=8, tp=8, mlp_kernel="eager",
                                    elementwise="eager"))
    assert err.value.problem.startswith("elementwise")
    fused = flags(export("torchtitan", titan_job("llama-3-70b", dp=8, tp=8, sp=True)).args)
    eager = flags(export("torchtitan", titan_job("llama-3-70b", dp=8, tp=8, sp=True, mlp_kernel="eager",
                                                 elementwise="eager")).args)
    assert "--compile.enable" in fused and "--compile.enable" not in eager
    with pytest.raises(PlanError) as err:  # uncompiled, everything elementwise is eager
        check("torchtitan", L70, Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, mlp_kernel="eager"))
    assert err.value.problem.startswith("mlp_kernel")
    with pytest.raises(PlanError) as err:
        check("deepspeed", L13, Plan(global_batch=64, seq_len=4096, dp=8, tp=8))
    assert err.value.problem.startswith("mlp_kernel")
    with pytest.raises(PlanError) as err:  # async TP compiles, which fuses
        check("torchtitan", L70, Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, tp_overlap=True,
                                      mlp_kernel="eager", elementwise="eager"))
    assert err.value.problem.startswith("elementwise")


def test_plan_export_round_trips():
    j = job("llama-2-13b", dp=4, tp=4, pp=4, sp=True, schedule="zb-h1")
    assert Plan.from_dict(json.loads(dict(export("plan", j).files)["plan.json"])) == j.plan


@pytest.mark.parametrize("target,model,knobs,knob", [
    ("torchtitan", L70, dict(dp=4, tp=4, pp=4, sp=True, schedule="zb-h1"), "schedule"),
    ("torchtitan", L70, dict(dp=8, tp=8, sp=True, zero=1), "zero"),
    ("torchtitan", L70, dict(dp=8, tp=8), "sp"),
    ("torchtitan", L13, dict(dp=8, tp=8, sp=True), "model"),  # no llama3 flavor of this shape
    ("megatron", L13, dict(dp=8, tp=4, pp=2, schedule="gpipe"), "schedule"),
    ("megatron", L13, dict(dp=8, tp=4, pp=2, schedule="zb-v", virtual_stages=2), "schedule"),
    ("deepspeed", L13, dict(dp=8, tp=4, pp=2, schedule="zb-v", virtual_stages=2), "schedule"),
    ("megatron", L13, dict(dp=8, tp=8, zero=2), "zero"),
    ("megatron", L13, dict(dp=4, tp=4, pp=4, zero=3), "zero"),
    ("megatron", L13, dict(dp=8, tp=8, placement=("dp", "tp", "cp", "pp")), "placement"),
    ("deepspeed", L13, dict(dp=4, tp=4, cp=4), "cp"),
    ("deepspeed", L13, dict(dp=4, tp=4, pp=4, zero=2), "zero"),
    ("deepspeed", L13, dict(dp=4, tp=4, pp=4, layer_partition=(9, 11, 11, 9)), "layer_partition"),
])
def test_refusals_name_target_and_knob(target, model, knobs, knob):
    with pytest.raises(PlanError) as err:
        check(target, model, Plan(global_batch=64, seq_len=4096, **{**dictated(target, knobs), **knobs}))
    assert err.value.field == f"emit.{target}" and err.value.problem.startswith(knob)


def test_deepspeed_takes_its_own_uneven_split_and_names_it():
    """DeepSpeed splits 40 layers over 3 stages as 14,13,13 (the remainder to the first
    stages): that split exports, any other is refused naming it, and so is the split meshplan
    prices by default (balanced against the embedding and head) where pp does not divide."""
    knobs = dict(dp=2, tp=4, pp=3, layer_partition=(14, 13, 13))
    plan = Plan(global_batch=64, seq_len=4096, **{**dictated("deepspeed", knobs), **knobs})
    check("deepspeed", L13, plan)
    for split, why in (((13, 14, 13), "not as 13,14,13"), (None, "where the split priced without "
                                                                 "--layer-partition balances the embedding and head")):
        with pytest.raises(PlanError) as err:
            check("deepspeed", L13, dataclasses.replace(plan, layer_partition=split))
        assert err.value.problem.endswith(f"the 40 transformer layers over 3 stages as 14,13*2, the "
                                          f"remainder to the first stages, {why}")


def test_version_specific_refusals():
    plan = Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, zero=0, cross_entropy="compiled")
    check("torchtitan", L70, plan)  # 0.3 replicates with FSDP's replicate axis
    with pytest.raises(PlanError) as err:
        check("torchtitan", L70, plan, version="0.2")  # 0.2 has DDP on a 1-D mesh only
    assert err.value.problem.startswith("zero")
    bf16_moments = Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, zero=3, moments_dtype="bf16",
                        cross_entropy="compiled")
    check("torchtitan", L70, bf16_moments)  # 0.3: optimizer.implementation fused_opt_states_bf16
    with pytest.raises(PlanError) as err:
        check("torchtitan", L70, bf16_moments, version="0.2")
    assert err.value.problem.startswith("moments_dtype")
    pure_bf16 = dataclasses.replace(bf16_moments, master_weights=False)  # training.dtype bfloat16 in both
    for version in ("0.3", "0.2"):
        check("torchtitan", L70, pure_bf16, version=version)
    with pytest.raises(PlanError) as err:
        check("torchtitan", L70, plan, version="0.1")
    assert "0.1" in err.value.problem and "0.3, 0.2" in err.value.fix


@pytest.mark.parametrize("model_arg,samples", [("llama-3-70b", 300), (QWEN3_MOE, 200)])
def test_search_restriction_agrees_with_check(model_arg, samples):
    model = load_model(model_arg)
    table = candidate_table(model, CLUSTER, {"global_batch": 64, "seq_len": 4096})
    rows = np.random.default_rng(0).choice(len(table), samples, replace=False)
    for target, version in (("torchtitan", None), ("torchtitan", "0.2"), ("megatron", None), ("deepspeed", None)):
        mask = supported(target, model, table, version)
        for i in rows:
            try:
                check(target, model, row_plan(table, int(i)), version)
                ok = True
            except PlanError:
                ok = False
            assert ok == mask[i], (target, row_plan(table, int(i)))


def test_vllm_budget_dtype_and_model_id():
    plan = InferencePlan(64, 2048, 128, tp=4, replicas=2)  # planned in fp16, the search's default
    result = simulate_inference(L70, plan, Cluster(8, 8), H100)
    e = vllm.export(result, L70, checkpoint_of("llama-3-70b", L70), H100)
    f = flags(e.args)
    assert e.args[0] == "meta-llama/Meta-Llama-3-70B"
    assert f["--dtype"] == "bfloat16"  # the checkpoint's, not a cast to fp16
    share = float(f["--gpu-memory-utilization"])
    assert share * H100.memory_bytes <= result.memory_limit_bytes < (share + 0.001) * H100.memory_bytes
    assert (f["--max-model-len"], f["--max-num-seqs"], f["--data-parallel-size"]) == ("2176", "64", "2")
    assert f["--max-num-batched-tokens"] == str(64 * 2048)  # the batch's prompts, prefilled in one pass
    gpt3 = ZOO["gpt3-175b"]
    result = simulate_inference(gpt3, InferencePlan(8, 1024, 128, tp=8), Cluster(8, 8), H100)
    with pytest.raises(PlanError) as err:
        vllm.export(result, gpt3, checkpoint_of("gpt3-175b", gpt3), H100)
    assert "--model-id" in err.value.fix
    assert vllm.export(result, gpt3, checkpoint_of("gpt3-175b", gpt3), H100, "org/gpt3").args[0] == "org/gpt3"
    with pytest.raises(PlanError):
        vllm.export(simulate_inference(L70, InferencePlan(1, 8000, 800, tp=8), Cluster(8, 8), H100),
                    L70, checkpoint_of("llama-3-70b", L70), H100)


def test_rope_scaling_only_the_frameworks_carry(tmp_path):
    """Llama 3.1's RoPE scaling, read from rope_scaling or transformers 5's rope_parameters,
    exports; another (yarn here) is refused by the training frameworks only: the plan JSON
    has no RoPE, and vLLM reads the checkpoint's own config."""
    config = json.loads((HF / "llama-3.1-8b.json").read_text())
    llama31 = checkpoint_of(str(HF / "llama-3.1-8b.json"), load_model(str(HF / "llama-3.1-8b.json")))
    assert (llama31.rope_scaling.rope_type, llama31.rope_scaling.factor, llama31.rope_theta) == ("llama3", 8.0, 5e5)
    v5 = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**config["rope_scaling"], "rope_theta": config["rope_theta"]}
    (tmp_path / "v5.json").write_text(json.dumps(v5))
    assert checkpoint_of(str(tmp_path / "v5.json"), load_model(str(tmp_path / "v5.json"))) == llama31
    yarn = {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    (tmp_path / "yarn.json").write_text(json.dumps(yarn))
    model = load_model(str(tmp_path / "yarn.json"))
    ckpt = checkpoint_of(str(tmp_path / "yarn.json"), model)
    for target in ("megatron", "torchtitan", "deepspeed"):
        plan = Plan(global_batch=8, seq_len=4096, dp=8, zero=3 if target == "torchtitan" else 1,
                    **dictated(target, {}, H100))
        job = train_job(model, simulate(model, plan, Cluster(8, 8), H100), H100, ckpt)
        with pytest.raises(PlanError) as err:
            export(target, job)
        assert err.value.field == "model.rope_scaling" and "yarn" in err.value.problem, target
    assert json.loads(export("plan", job).files[0][1])["dp"] == 8
    served = simulate_inference(model, InferencePlan(8, 2048, 128, tp=1, replicas=8), Cluster(8, 8), H100)
    assert vllm.export(served, model, ckpt, H100, "org/llama-yarn").args[0] == "org/llama-yarn"


BASE = ["--model", "llama-3-70b", "--gpus", "64", "--global-batch", "64", "--seq-len", "4096"]


def args_array(script: str) -> list[str]:
    return shlex.split(script.split("ARGS=(\n", 1)[1].split("\n)\n", 1)[0])


def test_cli_emit_prints_a_launch_script_and_what_to_add(tmp_path):
    out = meshplan("plan", *BASE, "--emit", "megatron")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/usr/bin/env bash") and "exec torchrun" in out.stdout
    assert flags(args_array(out.stdout))["--global-batch-size"] == "64"
    added = re.findall(r"add by hand: (\w+) =", out.stderr)
    assert added == ["CHECKPOINT_PATH", "TOKENIZER_MODEL", "DATA_PATH"]
    out = meshplan("plan", *BASE, "--emit", "torchtitan", "--target-version", "0.2", "--launch-script", "slurm")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=8" in out.stdout and "srun" in out.stdout
    toml = out.stdout.split("<<'MESHPLAN_EOF'\n", 1)[1].split("MESHPLAN_EOF")[0]
    assert tomllib.loads(toml)["model"]["flavor"] == "70B"
    out = meshplan("plan", *BASE, "--emit", "plan")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(out.stdout)
    sim = meshplan("simulate", "--model", "llama-3-70b", "--gpus", "64", "--plan", str(plan_file), "--json")
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["plan"] == json.loads(out.stdout)


def test_cli_emit_vllm():
    out = meshplan("plan", "--mode", "inference", "--model", "llama-3-70b", "--hardware", "h100-80gb",
                   "--gpus", "8", "--prompt-len", "1024", "--gen-len", "256", "--emit", "vllm")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == 'exec vllm serve "${ARGS[@]}"'
    assert args_array(out.stdout)[0] == "meta-llama/Meta-Llama-3-70B"
    out = meshplan("plan", "--mode", "inference", "--model", "gpt3-175b", "--hardware", "h100-80gb",
                   "--gpus", "16", "--prompt-len", "512", "--gen-len", "128", "--emit", "vllm")
    assert out.returncode == 2 and "--model-id" in out.stderr


def test_cli_emit_refusal_is_one_line():
    out = meshplan("plan", *BASE, "--pp", "2", "--schedule", "zb-h1", "--emit", "megatron")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--emit megatron" in lines[0] and "schedule" in lines[0]
    assert re.search(r"1f1b|interleaved", lines[0])


# ---- the knobs of MoE and FP8 plans ----

def test_megatron_moe_fp8_and_overlap_arguments():
    """Mixtral 8x7B on 64 H100s with EP 8: experts, placement, capacity, FP8, TP overlap."""
    e = export("megatron", job(MIXTRAL, hw=H100, dp=8, tp=2, pp=4, sp=True, zero=1, ep=8, etp=1,
                               moe_capacity_factor=1.25, dtype="fp8", fp8_recipe="delayed", tp_overlap=True))
    f = flags(e.args)
    assert (f["--num-experts"], f["--moe-router-topk"], f["--moe-ffn-hidden-size"]) == ("8", "2", "14336")
    assert (f["--expert-model-parallel-size"], f["--expert-tensor-parallel-size"]) == ("8", "1")
    assert f["--moe-token-dispatcher-type"] == "alltoall" and "--moe-grouped-gemm" in f
    assert f["--moe-expert-capacity-factor"] == "1.25" and "--moe-pad-expert-input-to-capacity" in f
    assert (f["--fp8-format"], f["--fp8-recipe"]) == ("hybrid", "delayed") and "--bf16" in f
    assert {"--tp-comm-overlap", "--accumulate-allreduce-grads-in-fp32"} <= set(f)
    assert f["--rotary-base"] == "1000000" and "--moe-layer-freq" not in f
    balanced = flags(export("megatron", job(MIXTRAL, dp=8, tp=8, sp=True, ep=8, grad_reduce_dtype="bf16")).args)
    assert "--moe-expert-capacity-factor" not in balanced and "--grad-reduce-in-bf16" in balanced
    assert balanced["--expert-tensor-parallel-size"] == "8" and "--fp8-format" not in balanced


def test_megatron_deepseek_shaped_experts(deepseek_shaped):
    m = load_model(deepseek_shaped)
    f = flags(export("megatron", job(deepseek_shaped, hw=H100, dp=8, tp=8, sp=True, zero=1, ep=64, etp=1,
                                     moe_dispatcher="deepep")).args)
    assert f["--moe-layer-freq"] == "[" + ",".join(["0"] * 3 + ["1"] * (m.num_layers - 3)) + "]"
    assert f["--moe-shared-expert-intermediate-size"] == "2048" and "--moe-shared-expert-gate" not in f
    assert f["--moe-router-score-function"] == "sigmoid" and f["--ffn-hidden-size"] == "18432"
    assert (f["--moe-router-num-groups"], f["--moe-router-group-topk"]) == ("8", "4")
    assert f["--moe-router-topk-scaling-factor"] == "2.5" and "--moe-router-enable-expert-bias" in f
    assert "--moe-router-pre-softmax" not in f
    # Qwen2-57B-A14B keeps its top-k softmax weights unnormalised, and has no bias to balance
    raw = flags(export("megatron", job(str(HF / "qwen2-57b-a14b.json"), hw=H100, dp=64, ep=8, zero=1)).args)
    assert "--moe-router-pre-softmax" in raw and "--moe-router-enable-expert-bias" not in raw
    assert "--moe-router-topk-scaling-factor" not in raw
    assert (f["--moe-token-dispatcher-type"], f["--moe-flex-dispatcher-backend"]) == ("flex", "deepep")
    assert f["--kv-channels"] == "128"  # 128 heads of 128 over a 7168 residual stream


def test_megatron_qwen3_attention_and_fsdp_without_reshard():
    f = flags(export("megatron", job(QWEN3_MOE, dp=64, zero=3, reshard_after_forward=False)).args)
    assert {"--qk-layernorm", "--use-torch-fsdp2", "--torch-fsdp2-no-reshard-after-forward"} <= set(f)
    assert f["--kv-channels"] == "128" and f["--expert-model-parallel-size"] == "1"
    ep = flags(export("megatron", job(QWEN3_MOE, dp=64, zero=3, ep=8, fsdp_layout="flat")).args)
    assert "--use-megatron-fsdp" in ep and "--use-torch-fsdp2" not in ep
    with pytest.raises(PlanError, match="fsdp_layout flat"):  # FSDP2 refuses EP
        export("megatron", job(QWEN3_MOE, dp=64, zero=3, ep=8))


def test_megatron_overlaps_the_expert_all_to_all():
    on = flags(export("megatron", job(QWEN3_MOE, dp=64, ep=8, moe_a2a_overlap=True)).args)
    assert "--overlap-moe-expert-parallel-comm" in on and "--delay-wgrad-compute" not in on
    assert "--overlap-moe-expert-parallel-comm" not in flags(export("megatron", job(QWEN3_MOE, dp=64, ep=8)).args)


def test_torchtitan_0_3_moe_flavor_and_knobs():
    e = export("torchtitan", titan_job(QWEN3_MOE, dp=16, tp=4, sp=True, zero=3, ep=8, etp=1, tp_overlap=True,
                                 reshard_after_forward=False))
    f = flags(e.args)
    assert (f["--module"], f["--config"]) == ("qwen3", "qwen3_30b_a3b")
    assert f["--parallelism.expert-parallel-degree"] == "8"
    assert "--parallelism.expert-tensor-parallel-degree" not in f  # 0.3 derives it from ep
    assert f["--parallelism.fsdp-reshard-after-forward"] == "never"
    assert {"--compile.enable", "--compile.enable-async-tensor-parallel"} <= set(f)
    assert f["--training.mixed-precision-reduce"] == "float32"
    resharded = flags(export("torchtitan", titan_job("llama-3-70b", dp=64, zero=3)).args)
    assert resharded["--parallelism.fsdp-reshard-after-forward"] == "always"
    with pytest.raises(PlanError, match="reshard_after_forward: torch.distributed.pipelining keeps"):
        export("torchtitan", titan_job("llama-3-70b", dp=8, pp=8, zero=3))
    assert "--parallelism.expert-parallel-degree" not in resharded


def test_torchtitan_0_3_float8_is_the_405b_recipe():
    f = flags(export("torchtitan", titan_job("llama-3-405b", seq_len=8192, hw=H100, dp=1, tp=8, pp=8, sp=True,
                                       zero=3, reshard_after_forward=False, recompute="full", dtype="fp8",
                                       fp8_recipe="rowwise",
                                       fp8_saved_dtype="bf16")).args)
    assert f["--config"] == "llama3_405b"


def test_torchtitan_0_2_moe_and_float8_toml():
    e = export("torchtitan", titan_job(QWEN3_MOE, version="0.2", dp=16, tp=4, sp=True, zero=3, ep=8, etp=4,
                                 moe_dispatcher="deepep", tp_overlap=True))
    config = tomllib.loads(dict(e.files)["torchtitan-job.toml"])
    assert config["model"] == {"name": "qwen3", "flavor": "30B-A3B"}
    par = config["parallelism"]
    assert (par["expert_parallel_degree"], par["expert_tensor_parallel_degree"]) == (8, 4)
    assert par["expert_parallel_comm_backend"] == "deepep" and par["enable_async_tensor_parallel"] is True
    assert config["compile"]["enable"] is True
    fp8 = tomllib.loads(dict(export("torchtitan", titan_job("llama-3-70b", version="0.2", hw=H100, dp=8, tp=8, sp=True,
                                                      zero=3, dtype="fp8", fp8_saved_dtype="bf16")).files)[
        "torchtitan-job.toml"])
    assert fp8["model"]["converters"] == ["quantize.linear.float8"]
    assert fp8["quantize"]["linear"]["float8"] == {"recipe_name": "tensorwise", "filter_fqns": ["output"]}
    for section, keys in fp8.items():
        assert set(keys) <= TORCHTITAN_0_2_KEYS[section] | {"converters"}, section


def test_deepspeed_moe_command_and_reduce_dtype():
    e = export("deepspeed", job(MIXTRAL, dp=8, tp=8, sp=True, zero=1, ep=8, moe_capacity_factor=1.5,
                                grad_reduce_dtype="bf16", mlp_kernel="eager"))
    f = flags(e.args)
    assert (f["--num-experts"], f["--topk"], f["--moe-expert-parallel-size"]) == ("8", "2", "8")
    assert (f["--expert-interval"], f["--moe-train-capacity-factor"]) == ("1", "1.5")
    assert {"--enable-expert-tensor-parallelism", "--create-moe-param-group"} <= set(f)
    assert json.loads(dict(e.files)["ds_config.json"])["communication_data_type"] == "bf16"


@pytest.mark.parametrize("target,model_arg,knobs,knob", [
    ("torchtitan", MIXTRAL, dict(dp=64, zero=3, ep=8), "model"),  # no torchtitan flavor of Mixtral
    ("torchtitan", "llama-3-70b", dict(dp=8, tp=8, sp=True, zero=3, grad_reduce_dtype="bf16"), "grad_reduce_dtype"),
    ("torchtitan", "llama-3-70b", dict(dp=8, tp=8, sp=True, zero=3, dtype="fp8"), "dtype"),
    ("torchtitan", "llama-3-405b", dict(dp=8, tp=8, sp=True, zero=3), "dtype"),  # its recipe is float8
    ("torchtitan", "llama-3-405b", dict(dp=8, tp=8, sp=True, zero=3, dtype="fp8"), "fp8_recipe"),
    ("torchtitan", QWEN3_MOE, dict(dp=64, zero=0, ep=8), "ep"),  # EP cannot span DDP replicas
    ("torchtitan", QWEN3_MOE, dict(dp=16, tp=4, sp=True, zero=3, ep=8, etp=4), "etp"),
    ("torchtitan", QWEN3_MOE, dict(dp=64, zero=3, ep=8, moe_capacity_factor=1.5), "moe_capacity_factor"),
    ("torchtitan", QWEN3_MOE, dict(dp=64, zero=3, ep=8, moe_dispatcher="deepep"), "moe_dispatcher"),
    ("megatron", MIXTRAL, dict(dp=8, tp=8, sp=True, ep=8, dtype="fp8", fp8_recipe="rowwise"), "fp8_recipe"),
    ("megatron", MIXTRAL, dict(dp=8, tp=8, sp=True, ep=8, moe_dispatcher="deepep", moe_capacity_factor=1.5),
     "moe_capacity_factor"),
    ("megatron", str(HF / "deepseek-v3.json"), dict(dp=8, tp=8, sp=True, ep=8), "model"),  # MLA
    ("megatron", "llama-2-13b", dict(dp=8, tp=8, dtype="fp16", grad_reduce_dtype="bf16"), "grad_reduce_dtype"),
    ("megatron", "gpt3-175b", dict(dp=64, zero=3, fsdp_layout="flat", reshard_after_forward=False),
     "reshard_after_forward"),
    ("megatron", QWEN3_MOE, dict(dp=64, zero=3, ep=8, fsdp_layout="flat", reshard_after_forward=False),
     "reshard_after_forward"),
    ("megatron", QWEN3_MOE, dict(dp=64, zero=3, ep=8), "fsdp_layout"),
    ("megatron", "llama-2-13b", dict(dp=8, tp=8, ddp_impl="replicate"), "ddp_impl"),  # the executor's
    ("torchtitan", "llama-3-70b", dict(dp=64, zero=3, fsdp_layout="flat"), "fsdp_layout"),
    ("deepspeed", "llama-2-13b", dict(dp=8, tp=8, dtype="fp8"), "dtype"),
    ("deepspeed", "llama-2-13b", dict(dp=8, tp=8, sp=True, tp_overlap=True), "tp_overlap"),
    ("deepspeed", "llama-2-13b", dict(dp=64, zero=3, reshard_after_forward=False), "reshard_after_forward"),
    ("deepspeed", "llama-2-13b", dict(dp=64, zero=3, fsdp_layout="flat"), "fsdp_layout"),
    ("deepspeed", MIXTRAL, dict(dp=4, tp=16, sp=True, ep=8, etp=1), "ep"),  # EP over DP ranks only
    ("deepspeed", MIXTRAL, dict(dp=8, tp=8, sp=True, ep=8, etp=1), "etp"),
    ("deepspeed", MIXTRAL, dict(dp=64, zero=3, ep=8), "zero"),
    ("deepspeed", MIXTRAL, dict(dp=64, ep=8, moe_dispatcher="deepep"), "moe_dispatcher"),
    ("deepspeed", QWEN3_MOE, dict(dp=64, ep=8), "model"),  # QK-norm
    ("torchtitan", QWEN3_MOE, dict(dp=64, zero=3, ep=8, etp=1, moe_a2a_overlap=True), "moe_a2a_overlap"),
    ("deepspeed", MIXTRAL, dict(dp=64, ep=8, moe_a2a_overlap=True), "moe_a2a_overlap"),
    ("torchtitan", QWEN3_MOE, dict(dp=64, zero=3, ep=8, etp=1, moe_routing="contiguous"), "moe_routing"),
    ("megatron", MIXTRAL, dict(dp=8, tp=8, sp=True, ep=8, moe_routing="contiguous"), "moe_routing"),
    ("deepspeed", MIXTRAL, dict(dp=64, ep=8, moe_routing="contiguous"), "moe_routing"),
    ("torchtitan", "llama-3-70b", dict(dp=8, tp=8, sp=True, zero=3, master_weights=False), "master_weights"),
    ("torchtitan", "llama-3-70b", dict(dp=8, tp=8, sp=True, zero=3, tp_overlap=True, tp_overlap_scope="both"),
     "tp_overlap_scope"),
    ("megatron", "llama-2-13b", dict(dp=8, tp=8, master_weights=False), "master_weights"),
    ("deepspeed", "llama-2-13b", dict(dp=8, tp=8, master_weights=False), "master_weights"),
    ("deepspeed", "llama-2-13b", dict(dp=8, tp=8, zero=0, master_weights=False, moments_dtype="bf16"),
     "master_weights"),
    ("megatron", "llama-2-13b", dict(dp=8, tp=8, zero=0, moments_dtype="bf16"), "moments_dtype"),
    ("deepspeed", "llama-2-13b", dict(dp=8, tp=8, moments_dtype="bf16"), "master_weights"),
    ("torchtitan", "llama-3-8b", dict(dp=2, cp=4, zero=3, cp_comm="p2p"), "cp_comm"),  # torch's rotation
    ("torchtitan", "llama-3-8b", dict(dp=2, cp=4, zero=3, cp_comm="alltoall"), "cp_comm"),  # 0.3: no option
    ("megatron", "llama-3-8b", dict(dp=2, cp=4, cp_comm="allgather"), "cp_comm"),
    ("torchtitan", "llama-3-8b", dict(dp=2, cp=4, zero=3, cp_comm="a2a"), "cp_comm"),
    ("torchtitan", "llama-3-70b", dict(dp=8, tp=8, sp=True, zero=3, kv_repeat=True), "kv_repeat"),
    ("megatron", "llama-3-70b", dict(dp=8, tp=8, kv_repeat=True), "kv_repeat"),
])
def test_new_knob_refusals_name_target_and_knob(target, model_arg, knobs, knob):
    with pytest.raises(PlanError) as err:
        check(target, load_model(model_arg),
              Plan(global_batch=64, seq_len=4096, **{**dictated(target, knobs), **knobs}))
    assert err.value.field == f"emit.{target}"
    assert any(problem.startswith(knob) for _, problem, _ in err.value.issues), err.value.issues


def test_cli_emit_for_a_model_the_target_cannot_build_names_only_the_model():
    # Gemma 2's sliding windows, sandwich norms and soft-capping: no plan of it runs on
    # Megatron-LM as exported, so the unrestricted winner's knobs (its ZeRO-2) are no fix
    gemma = str(Path(__file__).parent / "data" / "hf_configs" / "gemma2-9b.json")
    out = meshplan("plan", "--model", gemma, "--hardware", "h100-80gb", "--gpus", "64", "--global-batch", "256",
                   "--seq-len", "4096", "--emit", "megatron")
    error = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "--emit megatron: model:" in error and "sliding-window" in error
    assert "zero" not in error.lower()


def test_context_parallel_exchange_is_exported_as_priced():
    """The CP exchange the plan was priced with: Megatron-LM's --cp-comm-type p2p or a2a; torchtitan
    0.2's context_parallel_rotate_method (a search for torchtitan prices torch's default
    all-gather: exports.dictated); 0.3, which has no such option, runs that default."""
    for method in ("p2p", "a2a"):
        args = export("megatron", job("llama-3-8b", gpus=8, dp=2, cp=4, cp_comm=method)).args
        assert args[args.index("--cp-comm-type") + 1] == method
    assert "--cp-comm-type" not in export("megatron", job("llama-3-8b", gpus=8, dp=8)).args
    for method in ("allgather", "alltoall"):
        e = export("torchtitan", titan_job("llama-3-8b", gpus=8, version="0.2", dp=2, cp=4, zero=3,
                                           cp_comm=method))
        parallelism = tomllib.loads(dict(e.files)["torchtitan-job.toml"])["parallelism"]
        assert parallelism["context_parallel_rotate_method"] == method
    assert dictated("torchtitan", {})["cp_comm"] == "allgather"
    newest = export("torchtitan", titan_job("llama-3-8b", gpus=8, dp=2, cp=4, zero=3))
    assert not any("rotate" in a for a in newest.args)


def test_megatron_precision_aware_optimizer_flags():
    """bf16 moments export as Megatron-LM's precision-aware optimizer, inside its distributed
    optimizer (ZeRO 1); fp32 moments add no flag."""
    bf16 = export("megatron", job("llama-2-13b", gpus=64, dp=8, tp=8, zero=1, moments_dtype="bf16")).args
    fp32 = export("megatron", job("llama-2-13b", gpus=64, dp=8, tp=8, zero=1)).args
    at = bf16.index("--exp-avg-dtype")
    assert "--use-distributed-optimizer" in bf16 and "--use-precision-aware-optimizer" in bf16
    assert bf16[at:at + 4] == ("--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16")
    assert not [a for a in fp32 if "exp-avg" in a or "precision-aware" in a]


def test_deepspeed_bf16_weights_and_moments():
    """Without master weights and with bf16 moments, ZeRO keeps bf16 weights, gradients and
    Adam state (bf16_master_weights_and_grads, bf16_optimizer_states); with master weights
    neither is set."""
    pure = export("deepspeed", job("llama-2-13b", dp=64, zero=3, mlp_kernel="eager", master_weights=False,
                                   moments_dtype="bf16"))
    mixed = export("deepspeed", job("llama-2-13b", dp=64, zero=3, mlp_kernel="eager"))
    assert json.loads(dict(pure.files)["ds_config.json"])["bf16"] == {
        "enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    assert json.loads(dict(mixed.files)["ds_config.json"])["bf16"] == {"enabled": True}


def test_attention_kernel_per_framework():
    """Megatron-LM names each kernel (--attention-backend flash, fused for cuDNN's, unfused)
    and on Hopper runs cuDNN's unless told otherwise; Megatron-DeepSpeed and torchtitan have
    no cuDNN attention to run."""
    backend = {kernel: flags(export("megatron", job("llama-2-13b", hw=H100, dp=8, tp=8, sp=True,
                                                    attention=kernel)).args)["--attention-backend"]
               for kernel in ("flash", "cudnn", "naive")}
    assert backend == {"flash": "flash", "cudnn": "fused", "naive": "unfused"}
    # Megatron-LM's default backend lets Transformer Engine take cuDNN's kernel on Hopper:
    # a search for it prices that where the profile has the kernel's figures
    assert dictated("megatron", {}, H100) == {"attention": "cudnn"} and dictated("megatron", {}, A100) == {}
    hopper = [*BASE, "--hardware", "h100-80gb", "--emit", "megatron"]
    for extra, expected in (((), "fused"), (("--attention", "flash"), "flash")):
        out = meshplan("plan", *hopper, *extra)
        assert out.returncode == 0, out.stderr
        assert flags(args_array(out.stdout))["--attention-backend"] == expected
    plan = Plan(global_batch=64, seq_len=4096, dp=8, tp=8, sp=True, attention="cudnn")
    for target, model in (("deepspeed", L13), ("torchtitan", L70)):
        with pytest.raises(PlanError) as err:
            check(target, model, dataclasses.replace(plan, **dictated(target, {})))
        assert err.value.problem.startswith("attention") and "cudnn" in err.value.problem.lower()


def test_a_search_for_torchtitan_takes_the_faster_rotation_its_version_has():
    """torch's all-gather rotation is torchtitan's default (exports.dictated), not its only
    choice in 0.2: the search prices it first and tries all-to-all on the plans it re-ranks
    (exports.DEFAULTS_SEARCHED); 0.3 has no option. Llama 3 70B at 64K over tp 8 cp 8:
    the all-to-all ring hides its hops behind the later blocks, where the gather hides
    behind the local one alone."""
    base = ("plan", "--model", "llama-3-70b", "--hardware", "h100-80gb", "--gpus", "64", "--global-batch", "8",
            "--seq-len", "65536", "--tp", "8", "--cp", "8", "--emit", "torchtitan")
    toml = {}
    for version in ("0.2", "0.3"):
        out = meshplan(*base, "--target-version", version)
        assert out.returncode == 0, out.stderr
        toml[version] = out.stdout
    assert 'context_parallel_rotate_method = "alltoall"' in toml["0.2"] and "rotate" not in toml["0.3"]
    plan = dict(global_batch=8, seq_len=65536, tp=8, sp=True, cp=8, dp=1, micro_batch=1, zero=2,
                recompute="none", tp_overlap=True, **dictated("torchtitan", {}))
    gather, rotate = (simulate(ZOO["llama-3-70b"], Plan(**{**plan, "cp_comm": c}), Cluster(64, 8), H100)
                      for c in ("allgather", "alltoall"))
    assert rotate.step_time_s < gather.step_time_s
    held = meshplan(*base, "--target-version", "0.2", "--cp-comm", "allgather")
    assert 'context_parallel_rotate_method = "allgather"' in held.stdout
