"""vLLM: the `vllm serve` arguments of a serving plan (vLLM engine arguments,
vllm/engine/arg_utils.py, checked at vLLM 0.33.0).

- --gpu-memory-utilization is the planner's budget: the memory limit it planned within, as a
  share of the device (vLLM's default of 0.92 would plan a different KV cache).
- --max-num-batched-tokens lets one scheduler step hold a pipeline micro-batch's whole
  prompts: the planner priced each micro-batch's prefill as one pass, and its activations
  as vLLM's profiling pass at that size sizes them; vLLM would otherwise chunk prefills to
  its default budget.
- --dtype is the checkpoint's own dtype when it has the plan's width (a bf16 checkpoint is
  served in bf16, not cast to fp16), else the plan's.
- The model is the checkpoint's Hugging Face id (config.json's _name_or_path, the zoo's
  released checkpoint) or --model-id; a model with neither is refused.
- Mixture-of-experts models run their MoE layers over the TP x DP ranks: every expert
  sharded over them (vLLM's default), or with --enable-expert-parallel, given when the plan
  sets expert_parallel, whole experts spread over them. The plan prices vLLM's default
  --all2all-backend (allgather_reducescatter), so none is named.
- Weight-only int4 / int8 serve as --quantization awq / gptq, which load a checkpoint
  quantized so: the released 16-bit one cannot be, so its place is a path the user
  supplies unless --model-id names one; fp8 quantizes the 16-bit checkpoint on load.
  A checkpoint stored quantized as the plan prices (its quantization_config) loads as it
  is, vLLM reading the method from its config; one stored otherwise needs the weights the
  plan prices, from --model-id or a path the user supplies.
"""
from __future__ import annotations

import math

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.planner.exports import Export
from meshplan.planner.exports.checkpoint import Checkpoint
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import DTYPE_BYTES, Cluster
from meshplan.simulator.serve import InferenceResult

# vLLM --dtype spellings (engine arguments: auto, half, float16, bfloat16, float, float32).
VLLM_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# vLLM --quantization methods (vLLM docs, "Quantization"): INT4 weight-only as AWQ, INT8
# weight-only as GPTQ's 8-bit, FP8 with dynamic per-token activation scales.
VLLM_QUANTIZATION = {"int4": "awq", "int8": "gptq", "fp8": "fp8"}
PREQUANTIZED = ("int4", "int8")


def export(result: InferenceResult, model: ModelSpec, checkpoint: Checkpoint, hw: HardwareProfile,
           model_id: str | None = None) -> Export:
    """`vllm serve` for the plan of `result`; --max-model-len is prompt_len + gen_len."""
    plan = result.plan
    plan.validate(model, Cluster(plan.num_gpus, plan.num_gpus))
    max_len = plan.prompt_len + plan.gen_len  # within the model's positions (rules.SERVING)
    if plan.kv_dtype not in (plan.dtype, "fp8"):
        raise PlanError("plan.kv_dtype", f"vLLM stores the KV cache in the model dtype or fp8, not "
                        f"{plan.kv_dtype}", f"use --kv-dtype {plan.dtype} or fp8")
    name = model_id or checkpoint.hf_id
    user_paths = ()
    kept = checkpoint.stored.quantization if checkpoint.stored else "none"
    as_stored = plan.quantization == kept and not model_id
    on_load = plan.quantization == "fp8" and kept == "none"  # vLLM quantizes 16-bit weights
    if not (as_stored or on_load or model_id):
        if plan.quantization in PREQUANTIZED:
            method = VLLM_QUANTIZATION[plan.quantization]
            weights = f"quantized with {method.upper()} ({plan.quantization}, group size {plan.quant_group_size})"
        else:
            weights = f"with {'16-bit' if plan.quantization == 'none' else plan.quantization} weights"
        name, user_paths = "${QUANTIZED_CHECKPOINT}", (("QUANTIZED_CHECKPOINT", (
            f"Hugging Face id or folder of {model.name} {weights}"
            + (f" (this one stores {checkpoint.stored.method})" if checkpoint.stored else "")),),)
    if not name:
        raise PlanError("emit.vllm", f"{model.name} names no checkpoint (no _name_or_path in its "
                        "config, no released weights in the zoo)", "pass --model-id with the Hugging "
                        "Face id or local folder of the weights")
    stored = checkpoint.dtype
    dtype = stored if stored and DTYPE_BYTES[stored] == DTYPE_BYTES[plan.dtype] else plan.dtype
    # floor to 3 decimals so that vLLM stays within the planner's budget
    share = math.floor(result.memory_limit_bytes / hw.memory_bytes * 1000) / 1000
    args = [name, "--tensor-parallel-size", str(plan.tp), "--pipeline-parallel-size", str(plan.pp),
            "--max-num-seqs", str(plan.batch), "--max-model-len", str(max_len),
            "--max-num-batched-tokens", str(max(plan.micro_batch * plan.prompt_len, plan.batch)),
            "--dtype", VLLM_DTYPES[dtype], "--gpu-memory-utilization", f"{share:g}"]
    if plan.replicas > 1:
        args += ["--data-parallel-size", str(plan.replicas)]
    if plan.kv_dtype == "fp8":
        args += ["--kv-cache-dtype", "fp8"]
    if plan.quantization != "none" and not as_stored:
        args += ["--quantization", VLLM_QUANTIZATION[plan.quantization]]
    if plan.expert_parallel:
        args += ["--enable-expert-parallel"]
    header = (f"meshplan plan: {model.name} served on {plan.num_gpus} x {hw.name}: TTFT "
              f"{result.ttft_s * 1e3:.1f} ms, TPOT {result.tpot_s * 1e3:.2f} ms predicted")
    notes = (() if dtype == plan.dtype else
             (f"serving in the checkpoint's {dtype} (planned as {plan.dtype}, same width)",)) + (
        (f"the checkpoint's {checkpoint.stored.method} weights load as stored (vLLM reads its "
         "quantization_config)",) if as_stored and checkpoint.stored else ())
    return Export("vllm", header, (), (), ("vllm", "serve"), tuple(args), user_paths, notes)
