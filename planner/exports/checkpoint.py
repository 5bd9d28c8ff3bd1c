"""What an export needs to know about the checkpoint beyond the shapes the cost model uses:
its Hugging Face id, stored dtype, RoPE base and scaling, and norm epsilon. Read from the HF
config.json the model came from, or, for the zoo, from the released config.json files.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshplan.core.errors import ModelError
from meshplan.simulator.hf_config import StoredWeights, stored_weights
from meshplan.simulator.model_spec import ZOO, ModelSpec
from meshplan.core.io import read_json

# HF config "torch_dtype" -> the plan's dtype names.
HF_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class RopeScaling:
    """HF rope_scaling (rope_parameters from transformers 5): its rope_type and factor, and
    the band of Llama 3.1's ("llama3"), the one scaling the training exports carry."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Checkpoint:
    """`hf_id`: the checkpoint's Hugging Face repository (None: none is known); `dtype`: the
    dtype its weights are stored in (plan spelling, None: unknown); `rope_theta`: RoPE base
    (None without RoPE); `norm_eps`: epsilon of RMSNorm/LayerNorm; `stored`: how its
    quantization_config stores the weights (None: 16-bit)."""

    hf_id: str | None
    dtype: str | None
    rope_theta: float | None
    rope_scaling: RopeScaling | None
    norm_eps: float
    stored: StoredWeights | None = None


_LLAMA2 = dict(dtype="fp16", rope_theta=10000.0, rope_scaling=None, norm_eps=1e-5)
_LLAMA3 = dict(dtype="bf16", rope_theta=500000.0, rope_scaling=None, norm_eps=1e-5)
# Released config.json files of meta-llama/Llama-2-{7,13,70}b-hf, Meta-Llama-3-{8,70}B and
# Llama-3.1-405B on huggingface.co (tests/data/hf_configs holds the 7B and 3.1-8B ones).
ZOO_CHECKPOINTS = {
    "llama-2-7b": Checkpoint("meta-llama/Llama-2-7b-hf", **_LLAMA2),
    "llama-2-13b": Checkpoint("meta-llama/Llama-2-13b-hf", **_LLAMA2),
    "llama-2-70b": Checkpoint("meta-llama/Llama-2-70b-hf", **_LLAMA2),
    "llama-3-8b": Checkpoint("meta-llama/Meta-Llama-3-8B", **_LLAMA3),
    "llama-3-70b": Checkpoint("meta-llama/Meta-Llama-3-70B", **_LLAMA3),
    "llama-3-405b": Checkpoint("meta-llama/Llama-3.1-405B", **{
        **_LLAMA3, "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)}),
}


def checkpoint_of(model_arg: str, model: ModelSpec) -> Checkpoint:
    """The checkpoint facts of `--model`: a zoo name, an HF config.json, or a ModelSpec JSON
    (which names no checkpoint). Models without one (GPT-3, Megatron's GPT family) get the
    architecture's defaults: no id, no stored dtype, LayerNorm epsilon 1e-5."""
    if model_arg in ZOO:
        return ZOO_CHECKPOINTS.get(model_arg, _unreleased(model))
    try:
        config = read_json(model_arg)
    except ValueError as exc:
        raise ModelError("model", f"cannot read {model_arg} ({exc})", "pass an HF config.json")
    if "num_layers" in config:  # a ModelSpec JSON
        return _unreleased(model)
    # transformers 5 writes rope_parameters (rope_theta inside, rope_type "default": unscaled),
    # Gemma 3's per layer type: the scaled one stands for them
    parameters = config.get("rope_parameters") or {}
    per_type = [v for v in parameters.values() if isinstance(v, dict)]
    if per_type:
        parameters = next((v for v in per_type if v.get("rope_type", "default") != "default"), per_type[0])
    scaling = config.get("rope_scaling") or parameters or None
    kind = scaling and scaling.get("rope_type", scaling.get("type", "default"))
    return Checkpoint(
        hf_id=config.get("_name_or_path") or None,
        dtype=HF_DTYPES.get(config.get("torch_dtype") or config.get("dtype")),
        rope_theta=(float(config.get("rope_theta", parameters.get("rope_theta", 10000.0)))
                    if model.position_embedding == "rope" else None),
        rope_scaling=None if kind in (None, "default") else RopeScaling(
            kind, float(scaling.get("factor", 1.0)), float(scaling.get("low_freq_factor", 1.0)),
            float(scaling.get("high_freq_factor", 4.0)),
            int(scaling.get("original_max_position_embeddings", 8192))),
        norm_eps=float(config.get("rms_norm_eps", config.get("layer_norm_epsilon", 1e-5))),
        stored=stored_weights(config))


def _unreleased(model: ModelSpec) -> Checkpoint:
    return Checkpoint(hf_id=None, dtype=None,
                      rope_theta=10000.0 if model.position_embedding == "rope" else None,
                      rope_scaling=None, norm_eps=1e-5)
