"""Exports against the frameworks' own validation (the `exports` extra):

- torchtitan 0.3 (PyPI): ConfigManager.parse_args (tyro over Trainer.Config, with each config's
  __post_init__), ParallelDims.from_config, torch's schedule classes, the flavor's model built
  on the meta device for the pipeline stages' module names, and the batch and sequence
  arithmetic Trainer.__init__ asserts.
- torchtitan 0.2: the same through its TOML ConfigManager, from an unpacked torchtitan 0.2.x at
  $TORCHTITAN_0_2_PATH (one torchtitan installs at a time), else skipped.
- Megatron-LM: parse_args + validate_args + core_transformer_config_from_args of a source
  checkout at $MEGATRON_LM_PATH (no PyPI package ships megatron/training), else skipped;
  Megatron-DeepSpeed likewise at $MEGATRON_DEEPSPEED_PATH.
- DeepSpeed (PyPI): DeepSpeedConfig of the ds_config, with the data-parallel size from an mpu
  as Megatron-DeepSpeed supplies it, and without one.
- vLLM (PyPI, --no-deps): the `vllm serve` parser, validate_parsed_serve_args, EngineArgs and
  the ParallelConfig / CacheConfig that vLLM builds from them.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.exports import dictated, export, train_job, vllm
from meshplan.planner.exports.checkpoint import checkpoint_of
from meshplan.simulator.model_spec import load_model
from meshplan.simulator.partition import even_partition
from meshplan.simulator.plan import Cluster, Plan
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.train import simulate

HF = os.path.join(os.path.dirname(__file__), "data", "hf_configs")
MIXTRAL, QWEN3_MOE = os.path.join(HF, "mixtral-8x7b.json"), os.path.join(HF, "qwen3-30b-a3b.json")
A100, H100 = load_profile("a100-80gb"), load_profile("h100-80gb")
PATHS = {"HF_ASSETS_PATH": "/data/hf", "DATA_PATH": "/data/tokens", "CHECKPOINT_PATH": "/data/ckpt",
         "TOKENIZER_MODEL": "/data/tokenizer"}


def plan(global_batch=64, seq_len=4096, **knobs) -> Plan:
    return Plan(global_batch=global_batch, seq_len=seq_len, **knobs)


def artifact(target, model_arg, gpus, p, version=None):
    model = load_model(model_arg)
    hw = H100 if p.dtype == "fp8" else A100  # FP8 GEMMs: H100 (A100 has none)
    result = simulate(model, p, Cluster(gpus, 8), hw)
    return export(target, train_job(model, result, hw, checkpoint_of(model_arg, model), version))


def filled(args) -> list[str]:
    """The export's arguments with the user's paths filled in, as the shell would."""
    out = []
    for word in args:
        for name, value in PATHS.items():
            word = word.replace("${" + name + "}", value)
        out.append(word)
    return out


# Pipeline (interleaved; uneven), TP+SP with selective recompute, CP: torchtitan shards with
# FSDP (ZeRO-3), Megatron-LM with its distributed optimizer (ZeRO-1).
LLAMA3_70B_LAYOUTS = [
    dict(dp=2, tp=4, pp=8, sp=True, recompute="full", schedule="interleaved", virtual_stages=2),
    dict(dp=4, tp=8, pp=2, sp=True, recompute="selective"),
    dict(dp=2, tp=4, pp=8, sp=True, layer_partition=(9, 10, 10, 10, 10, 11, 11, 9)),
    dict(dp=2, tp=4, pp=8, sp=True, layer_partition=(0, 13, 14, 13, 14, 13, 13, 0)),  # E and L alone
    dict(seq_len=8192, dp=4, tp=4, cp=4, sp=True),
]
# torchtitan's selective checkpointing is per-op (recompute op)
# torchtitan's default: no resharding after forward under a pipeline (torch.distributed.pipelining
# keeps the weights gathered between micro-batches)
TORCHTITAN_PLANS = [("llama-3-70b", 64, plan(zero=3, reshard_after_forward=knobs.get("pp", 1) == 1, **{
    **knobs, "recompute": ("op" if knobs.get("recompute") == "selective" else knobs.get("recompute", "none"))}))
    for knobs in LLAMA3_70B_LAYOUTS] + [
    ("llama-3-70b", 64, plan(dp=32, cp=2, zero=3, recompute="full")),
    ("llama-3-70b", 64, plan(dp=64, zero=0, recompute="full")),
    ("llama-3-70b", 64, plan(dp=8, tp=8, sp=True, zero=0, recompute="op")),
    ("llama-3-8b", 16, plan(seq_len=8192, dp=4, tp=2, pp=2, sp=True, zero=3, schedule="gpipe",
                            reshard_after_forward=False)),
    ("llama-3-8b", 16, plan(global_batch=32, seq_len=8192, dp=2, pp=8, zero=3, schedule="interleaved",
                            virtual_stages=2, micro_batch=1, reshard_after_forward=False)),
    # ZB-V: torchtitan's ZBVZeroBubble places the 16 stages on the 8 ranks in a V itself
    ("llama-3-8b", 16, plan(global_batch=32, seq_len=8192, dp=2, pp=8, zero=3, schedule="zb-v",
                            virtual_stages=2, micro_batch=1, reshard_after_forward=False)),
    ("llama-3-8b", 16, plan(dp=16, zero=2, micro_batch=2)),
    ("llama-3-70b", 64, plan(seq_len=8192, dp=1, tp=8, pp=8, sp=True, zero=3, recompute="full",
                             reshard_after_forward=False, schedule="interleaved", virtual_stages=3,
                             layer_partition=(3,) * 8 + (4,) * 8 + (3,) * 8)),
    ("llama-3-8b", 16, plan(seq_len=8192, dp=2, tp=2, cp=4, sp=True, zero=3, recompute="full")),
    # Qwen3-30B-A3B (MoE): EP over FSDP and TP ranks, async TP, no resharding after forward
    (QWEN3_MOE, 64, plan(dp=16, tp=4, sp=True, zero=3, ep=8, etp=1, tp_overlap=True, recompute="full")),
    (QWEN3_MOE, 64, plan(dp=32, pp=2, zero=3, ep=16, reshard_after_forward=False)),
    ("llama-3-70b", 64, plan(dp=8, tp=8, sp=True, zero=3, tp_overlap=True)),
]
# torchtitan 0.2 only: its float8 converter with tensorwise scaling, and DeepEP
TORCHTITAN_0_2_PLANS = TORCHTITAN_PLANS + [
    ("llama-3-70b", 64, plan(dp=8, tp=8, sp=True, zero=3, dtype="fp8", fp8_saved_dtype="bf16")),
    (QWEN3_MOE, 64, plan(dp=16, tp=4, sp=True, zero=3, ep=8, etp=4, moe_dispatcher="deepep")),
]
# both: full bf16 training (training.dtype bfloat16), no fp32 master weights
PURE_BF16 = ("llama-3-8b", 16, plan(dp=16, zero=3, master_weights=False, moments_dtype="bf16"))
TORCHTITAN_0_2_PLANS = TORCHTITAN_0_2_PLANS + [PURE_BF16]
# torchtitan 0.3 only: AdamW's moments in bf16 (optimizer.implementation fused_opt_states_bf16)
TORCHTITAN_PLANS = TORCHTITAN_PLANS + [("llama-3-8b", 16, plan(dp=16, zero=3, moments_dtype="bf16")), PURE_BF16]
# compiled, torchtitan compiles the loss with the model (what a search for it prices: exports.dictated)
TORCHTITAN_PLANS, TORCHTITAN_0_2_PLANS = (
    [(m, gpus, dataclasses.replace(p, **dictated("torchtitan", {}))) for m, gpus, p in plans]
    for plans in (TORCHTITAN_PLANS, TORCHTITAN_0_2_PLANS))
MEGATRON_PLANS = [("llama-3-70b", 64, plan(zero=1, **knobs)) for knobs in LLAMA3_70B_LAYOUTS] + [
    ("llama-3-70b", 64, plan(dp=32, cp=2, zero=3, recompute="full")),
    ("llama-3-70b", 64, plan(dp=64, zero=3, recompute="selective")),
    ("llama-2-13b", 64, plan(dp=8, tp=8, placement=("tp", "cp", "pp", "dp"))),
    ("llama-2-13b", 64, plan(global_batch=128, dp=8, tp=2, pp=4, sp=True, schedule="interleaved",
                             virtual_stages=5, recompute="full")),
    ("gpt3-175b", 64, plan(seq_len=2048, dp=1, tp=8, pp=8, sp=True, zero=1, dtype="fp16", recompute="full")),
    ("gpt3-175b", 64, plan(seq_len=2048, dp=64, zero=3, recompute="full")),
    ("llama-3-405b", 64, plan(seq_len=8192, dp=1, tp=8, pp=8, sp=True, zero=1, recompute="full",
                              schedule="interleaved", virtual_stages=3, layer_partition=(5,) * 18 + (6,) * 6)),
    ("llama-3-8b", 16, plan(global_batch=32, seq_len=8192, dp=4, tp=2, pp=2, sp=True, zero=1, attention="naive")),
    # Mixtral 8x7B with EP 8 on 64 GPUs: FP8, TP overlap, padded capacity; DeepEP; bf16 reduction
    (MIXTRAL, 64, plan(dp=8, tp=2, pp=4, sp=True, zero=1, ep=8, etp=1, moe_capacity_factor=1.25,
                       dtype="fp8", fp8_recipe="tensorwise", tp_overlap=True)),
    (MIXTRAL, 64, plan(dp=8, tp=8, sp=True, zero=1, ep=8, etp=1, moe_dispatcher="deepep",
                       grad_reduce_dtype="bf16")),
    (QWEN3_MOE, 64, plan(dp=64, zero=3, ep=8)),
    (QWEN3_MOE, 64, plan(dp=64, zero=1, ep=8, recompute="norm_act")),
    (QWEN3_MOE, 64, plan(dp=64, zero=3, reshard_after_forward=False)),
    # the experts' all-to-all overlapped across micro-batches: interleaved with DeepEP, and pp 1
    (MIXTRAL, 64, plan(dp=8, tp=2, pp=4, sp=True, zero=1, ep=8, etp=1, schedule="interleaved", virtual_stages=2,
                       moe_dispatcher="deepep", moe_a2a_overlap=True)),
    (QWEN3_MOE, 64, plan(dp=64, zero=1, ep=8, moe_a2a_overlap=True)),
]
DEEPSPEED_PLANS = [
    ("llama-2-13b", 64, plan(mlp_kernel="eager", dp=4, tp=4, pp=4, sp=True, zero=1, recompute="full")),
    ("llama-2-13b", 64, plan(mlp_kernel="eager", dp=8, tp=8, sp=True, zero=1, recompute="selective")),
    ("llama-2-13b", 64, plan(mlp_kernel="eager", dp=64, zero=3, recompute="full")),
    ("llama-2-13b", 64, plan(mlp_kernel="eager", dp=16, tp=4, zero=2)),
    ("llama-2-13b", 64, plan(mlp_kernel="eager", dp=8, pp=8, zero=0, micro_batch=1)),
    ("llama-2-70b", 64, plan(mlp_kernel="eager", dp=2, tp=8, pp=4, sp=True, zero=1, recompute="full")),
    ("llama-2-70b", 64, plan(mlp_kernel="eager", dp=8, tp=8, sp=True, zero=3, recompute="full")),
    ("llama-2-7b", 16, plan(mlp_kernel="eager", global_batch=32, dp=4, tp=2, pp=2, zero=1, dtype="fp16")),
    ("gpt3-175b", 64, plan(mlp_kernel="eager", seq_len=2048, dp=1, tp=8, pp=8, sp=True, zero=1, dtype="fp16", recompute="full")),
    ("gpt3-175b", 64, plan(mlp_kernel="eager", seq_len=2048, dp=64, zero=3, recompute="full")),
    ("llama-3-70b", 64, plan(mlp_kernel="eager", dp=4, tp=8, pp=2, sp=True, zero=1, recompute="selective", layer_partition=(40, 40))),
    (MIXTRAL, 64, plan(mlp_kernel="eager", dp=8, tp=8, sp=True, zero=1, ep=8, moe_capacity_factor=1.25)),
    (MIXTRAL, 64, plan(mlp_kernel="eager", dp=64, zero=2, ep=8, grad_reduce_dtype="bf16")),
    # bf16 weights, gradients and moments: bf16_master_weights_and_grads + bf16_optimizer_states
    ("llama-2-13b", 64, plan(mlp_kernel="eager", dp=64, zero=3, recompute="full", master_weights=False,
                             moments_dtype="bf16")),
]


def ids(plans):
    return [f"{os.path.basename(m).removesuffix('.json')}-dp{p.dp}-tp{p.tp}-pp{p.pp}-cp{p.cp}-ep{p.ep}"
            f"-z{p.zero}-{p.recompute}-v{p.virtual_stages}-{p.dtype}" for m, _, p in plans]


# ---- torchtitan 0.3 ----

@pytest.mark.parametrize("model_arg,gpus,p", TORCHTITAN_PLANS, ids=ids(TORCHTITAN_PLANS))
def test_torchtitan_0_3_accepts(model_arg, gpus, p):
    manager = pytest.importorskip("torchtitan.config.manager")
    parallel_dims = pytest.importorskip("torchtitan.distributed.parallel_dims")
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    import torch

    e = artifact("torchtitan", model_arg, gpus, p)
    config = manager.ConfigManager().parse_args(filled(e.args))
    dims = parallel_dims.ParallelDims.from_config(config.parallelism, gpus)
    assert (dims.dp_shard * dims.dp_replicate, dims.tp, dims.pp, dims.cp, dims.ep) == (p.dp, p.tp, p.pp, p.cp, p.ep)
    assert dims.dp_shard * dims.cp * dims.tp % dims.ep == 0  # the experts' FSDP axis, efsdp
    assert config.model_spec.flavor in ("8B", "70B", "405B", "30B-A3B")
    assert (config.compile.enable_async_tensor_parallel, config.training.mixed_precision_reduce) == \
        (p.tp_overlap, "float32")
    assert (config.optimizer.implementation == "fused_opt_states_bf16") == (p.moments_dtype == "bf16" and p.master_weights)
    assert config.training.dtype == ("float32" if p.master_weights else "bfloat16")
    assert config.parallelism.fsdp_reshard_after_forward == (
        "never" if p.zero == 2 or not p.reshard_after_forward else "always" if p.zero == 3 else "default")
    policy = config.activation_checkpoint  # activation-checkpoint:none leaves no policy
    assert (type(policy).__qualname__.split(".")[0] if policy else "none") == {
        "full": "FullAC", "op": "SelectiveAC", "none": "none"}[p.recompute]
    # Trainer.__init__'s asserts (inline there): batch and sequence divisibility
    training, par = config.training, config.parallelism
    assert training.global_batch_size % (training.local_batch_size * p.dp) == 0
    divisor = (p.tp if par.enable_sequence_parallel else 1) * (2 * p.cp if p.cp > 1 else 1)
    assert training.seq_len % divisor == 0
    if p.pp > 1:
        schedule = schedules.get_schedule_class(par.pipeline_parallel_schedule)
        stages = par.module_fqns_per_model_part
        per_rank = len(stages) // p.pp
        assert len(stages) % p.pp == 0
        assert issubclass(schedule, schedules.PipelineScheduleSingle) == (per_rank == 1)
        assert training.local_batch_size % par.pipeline_parallel_microbatch_size == 0
        with torch.device("meta"):
            model = config.model_spec.model.build()
        names = [name for stage in stages for name in stage]
        for name in names:
            model.get_submodule(name)  # raises on a name the model does not have
        modules = [n for n, _ in model.named_children() if n != "layers"]
        assert sorted(names) == sorted(modules + [f"layers.{i}" for i in range(len(model.layers))])
        if p.layer_partition:
            assert [sum(n.startswith("layers.") for n in s) for s in stages] == list(p.layer_partition)


# ---- subprocess validators (a source checkout or another torchtitan, not importable here) ----

def run_checker(code: str, path_env: str, env: dict, *argv: str) -> subprocess.CompletedProcess:
    root = os.environ[path_env]
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), root, *argv], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def checkout(path_env: str, what: str, why: str = "no package on PyPI ships it") -> None:
    if not os.environ.get(path_env):
        pytest.skip(f"{what}: set {path_env} to run this check ({why})")


MEGATRON_WHY = ("a Megatron-LM source checkout: PyPI's megatron-core ships megatron/core only, "
                "not megatron/training/arguments.py")
MEGATRON_CHECK = """
    import sys
    sys.path.insert(0, sys.argv[1])
    arch = int(sys.argv[2])
    sys.argv = ["pretrain_gpt.py"] + sys.argv[3:]
    import megatron.training.arguments as arguments
    arguments.get_device_arch_version = lambda: arch  # the GPU's, asked of CUDA: none here
    arguments.torch.cuda.get_device_capability = lambda *a: (arch, 0)  # --moe-grouped-gemm asks it
    import megatron.core.transformer.transformer_config as transformer_config
    transformer_config.is_te_min_version = lambda *a, **k: True  # Transformer Engine: a GPU install's
    args = arguments.parse_args()
    arguments.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    args.apply_rope_fusion = False  # a Transformer Engine kernel: not installed on CPU
    config = arguments.core_transformer_config_from_args(args)
    print("validated", args.data_parallel_size, config.num_layers)
"""


@pytest.mark.parametrize("model_arg,gpus,p", MEGATRON_PLANS, ids=ids(MEGATRON_PLANS))
def test_megatron_accepts(model_arg, gpus, p):
    checkout("MEGATRON_LM_PATH", "Megatron-LM's validate_args", MEGATRON_WHY)
    e = artifact("megatron", model_arg, gpus, p)
    env = {"WORLD_SIZE": str(gpus), "RANK": "0", **dict(e.env)}
    out = run_checker(MEGATRON_CHECK, "MEGATRON_LM_PATH", env, "9", *filled(e.args))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["validated", str(p.dp), str(load_model(model_arg).num_layers)]


def test_megatron_accepts_deepseek_shaped_experts(tmp_path):
    """DeepSeek-V3's experts (3 dense layers first, one shared expert, sigmoid router) behind
    grouped-query attention, EP 64 with the DeepEP dispatcher."""
    checkout("MEGATRON_LM_PATH", "Megatron-LM's validate_args", MEGATRON_WHY)
    spec = dataclasses.asdict(load_model(os.path.join(HF, "deepseek-v3.json")))
    spec.update(name="deepseek-v3-gqa", num_kv_heads=8, head_dim=128, q_lora_rank=0, kv_lora_rank=0,
                qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    path = tmp_path / "deepseek-v3-gqa.json"
    path.write_text(json.dumps(spec))
    p = plan(dp=8, tp=8, sp=True, zero=1, ep=64, etp=1, moe_dispatcher="deepep", dtype="fp8")
    e = artifact("megatron", str(path), 64, p)
    out = run_checker(MEGATRON_CHECK, "MEGATRON_LM_PATH", {"WORLD_SIZE": "64", "RANK": "0", **dict(e.env)},
                      "9", *filled(e.args))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["validated", "8", str(spec["num_layers"])]


def test_megatron_needs_the_environment_it_exports():
    """validate_args refuses a TP plan without CUDA_DEVICE_MAX_CONNECTIONS=1 (before
    Blackwell), and an FSDP plan with it."""
    checkout("MEGATRON_LM_PATH", "Megatron-LM's validate_args", MEGATRON_WHY)
    tp = artifact("megatron", "llama-3-70b", 64, plan(dp=8, tp=8, sp=True, zero=1))
    fsdp = artifact("megatron", "llama-3-70b", 64, plan(dp=64, zero=3, recompute="full"))
    assert dict(tp.env) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} and fsdp.env == ()
    for e, env in ((tp, {}), (fsdp, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})):
        out = run_checker(MEGATRON_CHECK, "MEGATRON_LM_PATH", {"WORLD_SIZE": "64", **env}, "9", *filled(e.args))
        assert out.returncode != 0 and "CUDA_DEVICE_MAX_CONNECTIONS" in out.stderr


MEGATRON_DEEPSPEED_CHECK = """
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.argv = ["pretrain_gpt.py"] + sys.argv[2:]
    from megatron.arguments import parse_args, validate_args
    args = parse_args()
    validate_args(args, {})
    print("validated", args.data_parallel_size)
"""


class DataParallelMPU:
    """The part of Megatron-DeepSpeed's mpu that DeepSpeedConfig asks: the data-parallel size."""

    def __init__(self, size):
        self.size = size

    def get_data_parallel_world_size(self):
        return self.size


@pytest.fixture(scope="module")
def deepspeed_comm():
    """A one-rank gloo group: DeepSpeedConfig asks the mpu only once a group exists.

    Without the shared-memory allreduce that DeepSpeed's CPU backend JIT-compiles on its first
    init in a virtualenv (70-75 s here, 2026-12-03): reading a config never reduces anything.
    """
    comm = pytest.importorskip("deepspeed.comm")
    backend = pytest.importorskip("deepspeed.comm.torch")
    import socket
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "build_shm_op", lambda: None)
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                              init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield comm
    dist.destroy_process_group()


@pytest.mark.parametrize("model_arg,gpus,p", DEEPSPEED_PLANS, ids=ids(DEEPSPEED_PLANS))
def test_deepspeed_config_accepts(model_arg, gpus, p, deepspeed_comm):
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    e = artifact("deepspeed", model_arg, gpus, p)
    config = json.loads(dict(e.files)["ds_config.json"])
    with_mpu = ds_config.DeepSpeedConfig(config, mpu=DataParallelMPU(p.dp))
    assert with_mpu.train_batch_size == p.global_batch
    assert with_mpu.zero_optimization_stage == p.zero
    alone = ds_config.DeepSpeedConfig(config)  # no mpu: the group's one rank is all of DP
    assert alone.train_batch_size == p.micro_batch * p.num_microbatches
    assert (config.get("activation_checkpointing") is not None) == (p.recompute == "full")
    assert config["optimizer"]["type"] == "AdamW"
    bf16 = with_mpu.bfloat16_config
    assert (bf16.bf16_master_weights_and_grads, bf16.bf16_optimizer_states) == (not p.master_weights,) * 2


@pytest.mark.parametrize("layers", [30, 40, 70, 80, 96, 126])
def test_deepspeed_splits_layers_as_the_export_rule_says(layers):
    """The split simulator/rules.py requires of a DeepSpeed pipeline is DeepSpeed's own:
    partition_balanced over the layer specs of Megatron-DeepSpeed's GPTModelPipe (input cast,
    embedding, the transformer layers, final norm, head, output cast), weighted 1 for a
    transformer layer as partition_method "type:transformer" weighs them."""
    utils = pytest.importorskip("deepspeed.runtime.utils")
    weights = [0, 0] + [1] * layers + [0, 0, 0]
    for pp in range(2, 17):
        bounds = utils.partition_balanced(weights, pp)
        split = tuple(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert split == even_partition(layers, pp), pp


@pytest.mark.parametrize("model_arg,gpus,p", DEEPSPEED_PLANS, ids=ids(DEEPSPEED_PLANS))
def test_megatron_deepspeed_accepts(model_arg, gpus, p):
    checkout("MEGATRON_DEEPSPEED_PATH", "Megatron-DeepSpeed's validate_args")
    e = artifact("deepspeed", model_arg, gpus, p)
    out = run_checker(MEGATRON_DEEPSPEED_CHECK, "MEGATRON_DEEPSPEED_PATH",
                      {"WORLD_SIZE": str(gpus), "RANK": "0", **dict(e.env)}, *filled(e.args))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["validated", str(p.dp)]


TORCHTITAN_0_2_CHECK = """
    import sys
    sys.path.insert(0, sys.argv[1])
    world = int(sys.argv[2])
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    config = ConfigManager().parse_args(sys.argv[3:])
    par = config.parallelism
    dims = ParallelDims(dp_replicate=par.data_parallel_replicate_degree,
                        dp_shard=par.data_parallel_shard_degree, cp=par.context_parallel_degree,
                        tp=par.tensor_parallel_degree, pp=par.pipeline_parallel_degree,
                        ep=par.expert_parallel_degree, etp=par.expert_tensor_parallel_degree,
                        world_size=world)
    print("validated", config.model.flavor, dims.dp_shard * dims.dp_replicate,
          len(par.module_fqns_per_model_part or [None]))
"""


@pytest.mark.parametrize("model_arg,gpus,p", TORCHTITAN_0_2_PLANS, ids=ids(TORCHTITAN_0_2_PLANS))
def test_torchtitan_0_2_accepts(model_arg, gpus, p, tmp_path):
    checkout("TORCHTITAN_0_2_PATH", "torchtitan 0.2's config manager",
             "an unpacked torchtitan 0.2.x wheel: the exports extra installs 0.3, and one torchtitan "
             "installs at a time")
    if p.zero == 0 and p.dp > 1 and max(p.tp, p.pp, p.cp) > 1:
        pytest.skip("torchtitan 0.2 replicates with DDP on a 1-D mesh only (refused, see test_export)")
    e = artifact("torchtitan", model_arg, gpus, p, version="0.2")
    for name, text in e.files:
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / w) if w.endswith(".toml") else w for w in filled(e.args)]
    out = run_checker(TORCHTITAN_0_2_CHECK, "TORCHTITAN_0_2_PATH", {}, str(gpus), *args)
    assert out.returncode == 0, out.stderr[-3000:]
    flavor, dp, stages = out.stdout.split()[-3:]
    assert int(dp) == p.dp and int(stages) == (p.pp * p.virtual_stages if p.pp > 1 else 1)


# ---- vLLM ----

SERVING_PLANS = [
    ("llama-3-70b", 8, InferencePlan(64, 2048, 128, tp=8)),
    ("llama-3-70b", 8, InferencePlan(32, 1024, 256, tp=4, replicas=2)),
    ("llama-3-70b", 8, InferencePlan(16, 1024, 256, tp=4, pp=2)),
    ("llama-3-70b", 16, InferencePlan(16, 4096, 512, tp=8, pp=2)),
    ("llama-3-70b", 8, InferencePlan(64, 2048, 128, tp=8, dtype="bf16", kv_dtype="fp8")),
    ("llama-3-8b", 8, InferencePlan(128, 1024, 128, tp=1, replicas=8)),
    ("llama-3-8b", 8, InferencePlan(64, 4096, 1024, tp=2, replicas=4)),
    ("llama-2-70b", 8, InferencePlan(32, 2048, 256, tp=8)),
    ("llama-2-13b", 4, InferencePlan(32, 2048, 256, tp=4)),
    ("llama-2-7b", 2, InferencePlan(64, 1024, 256, tp=1, pp=2)),
    ("llama-3-405b", 16, InferencePlan(8, 2048, 256, tp=8, pp=2, dtype="bf16", kv_dtype="fp8")),
]


@pytest.mark.parametrize("model_arg,gpus,p", SERVING_PLANS, ids=[f"{m}-{g}" for m, g, _ in SERVING_PLANS])
def test_vllm_accepts(model_arg, gpus, p, monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")  # this machine's platform: vLLM asks for one
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    cli_args = pytest.importorskip("vllm.entrypoints.common.cli_args")
    argparse_utils = pytest.importorskip("vllm.utils.argparse_utils")
    from vllm.config import CacheConfig, ParallelConfig

    model = load_model(model_arg)
    result = simulate_inference(model, p, Cluster(gpus, 8), H100)
    e = vllm.export(result, model, checkpoint_of(model_arg, model), H100)
    parser = cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser())
    args = parser.parse_args(list(e.args))
    args.model = args.model_tag  # as `vllm serve MODEL` does (entrypoints/cli/serve.py)
    cli_args.validate_parsed_serve_args(args)
    engine = arg_utils.AsyncEngineArgs.from_cli_args(args)
    parallel = ParallelConfig(tensor_parallel_size=engine.tensor_parallel_size,
                              pipeline_parallel_size=engine.pipeline_parallel_size,
                              data_parallel_size=engine.data_parallel_size)
    cache = CacheConfig(gpu_memory_utilization=engine.gpu_memory_utilization,
                        cache_dtype=engine.kv_cache_dtype, block_size=16)
    assert parallel.world_size == p.tp * p.pp and parallel.data_parallel_size == p.replicas
    assert cache.gpu_memory_utilization * H100.memory_bytes <= result.memory_limit_bytes
    assert engine.max_num_seqs == p.batch and engine.max_model_len == p.prompt_len + p.gen_len
    assert engine.model == checkpoint_of(model_arg, model).hf_id
    assert engine.dtype == {"llama-2": "float16"}.get(model_arg[:7], "bfloat16")


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_vllm_places_experts_as_planned(expert_parallel, monkeypatch):
    """Mixtral 8x7B over tp 4 x 2 replicas: every expert sharded over the 8 ranks (vLLM's
    default) or whole experts over them (--enable-expert-parallel), as the plan says; with no
    backend named vLLM runs the all2all backend the plan prices (serve_experts.py)."""
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    cli_args = pytest.importorskip("vllm.entrypoints.common.cli_args")
    argparse_utils = pytest.importorskip("vllm.utils.argparse_utils")
    model = load_model(MIXTRAL)
    p = InferencePlan(32, 2048, 256, tp=4, replicas=2, dtype="bf16", expert_parallel=expert_parallel)
    result = simulate_inference(model, p, Cluster(8, 8), H100)
    e = vllm.export(result, model, checkpoint_of(MIXTRAL, model), H100, "mistralai/Mixtral-8x7B-v0.1")
    args = cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser()).parse_args(list(e.args))
    args.model = args.model_tag
    cli_args.validate_parsed_serve_args(args)
    engine = arg_utils.AsyncEngineArgs.from_cli_args(args)
    assert (engine.tensor_parallel_size, engine.data_parallel_size) == (4, 2)
    assert engine.enable_expert_parallel is expert_parallel
    assert engine.all2all_backend == "allgather_reducescatter"
    assert engine.all2all_backend == "allgather_reducescatter"

