"""ModelSpec: the shape of a decoder-only transformer, from an HF config.json or the zoo.

Parameter counts follow the architecture exactly (so they match published counts);
the zoo's sources are cited beside each entry.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from meshplan.core.fields import from_fields
from meshplan.core.errors import ModelError

ACTIVATIONS = ("silu", "gelu")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer. Sizes are element counts, not bytes."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_len: int
    gated_mlp: bool = True
    activation: str = "silu"
    norm: str = "rmsnorm"
    position_embedding: str = "rope"
    tied_embeddings: bool = False
    bias: bool = False
    dropout: bool = False

    def __post_init__(self):
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                      "ffn_hidden_size", "vocab_size", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(field, f"must be a positive integer, got {value!r}",
                                 f"set {field} to a positive integer")
        if self.hidden_size % self.num_heads:
            raise ModelError("num_heads", f"{self.num_heads} does not divide hidden_size "
                             f"{self.hidden_size}", "use a head count that divides hidden_size")
        if self.num_heads % self.num_kv_heads:
            raise ModelError("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads "
                             f"{self.num_heads}", "use a KV head count that divides num_heads")
        for field, allowed in (("activation", ACTIVATIONS), ("norm", NORMS),
                               ("position_embedding", POSITIONS)):
            if getattr(self, field) not in allowed:
                raise ModelError(field, f"unknown value {getattr(self, field)!r}",
                                 f"use one of {', '.join(allowed)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- parameter counts (elements) ----
    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def attention_params(self) -> int:
        h, kv = self.hidden_size, self.kv_dim
        weights = h * h + 2 * h * kv + h * h  # Q, K, V, output projections
        return weights + ((h + 2 * kv + h) if self.bias else 0)

    def mlp_params(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        mats = 3 if self.gated_mlp else 2  # gated: gate, up, down (Shazeer 2020, GLU variants)
        return mats * h * f + ((f * (mats - 1) + h) if self.bias else 0)

    def layer_params(self) -> int:
        return self.attention_params() + self.mlp_params() + 2 * self.norm_params()

    def embedding_params(self) -> int:
        pos = self.max_seq_len * self.hidden_size if self.position_embedding == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    def head_params(self) -> int:
        """Final norm plus the LM head (zero extra weights when tied to the embedding)."""
        return self.norm_params() + (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)

    def num_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.head_params()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return from_fields(cls, data, "model.", ModelError, "model")

def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, seq, tied=False) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, kv_heads, ffn, vocab, seq, tied_embeddings=tied)


def _gpt(name, layers, hidden, heads, vocab=51200, seq=2048) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, heads, 4 * hidden, vocab, seq, gated_mlp=False,
                     activation="gelu", norm="layernorm", position_embedding="learned",
                     tied_embeddings=True, bias=True, dropout=True)


# Sizes: GPT-3 from Brown et al. 2020 Table 2.1; Llama 2 from Touvron et al. 2023 and the
# released config.json files; Llama 3 / 3.1 from the released config.json files;
# Megatron GPT family from Narayanan et al. 2021 Table 1 (vocab 51200, seq 2048).
ZOO: dict[str, ModelSpec] = {m.name: m for m in (
    _gpt("gpt3-175b", 96, 12288, 96, vocab=50257),
    _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
    _llama("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
    _llama("llama-3-405b", 126, 16384, 128, 8, 53248, 128256, 131072),
    _gpt("megatron-gpt-1.7b", 24, 2304, 24),
    _gpt("megatron-gpt-3.6b", 30, 3072, 32),
    _gpt("megatron-gpt-7.5b", 36, 4096, 32),
    _gpt("megatron-gpt-18b", 40, 6144, 48),
    _gpt("megatron-gpt-39b", 48, 8192, 64),
    _gpt("megatron-gpt-76b", 60, 10240, 80),
    _gpt("megatron-gpt-146b", 80, 12288, 96),
    _gpt("megatron-gpt-310b", 96, 16384, 128),
    _gpt("megatron-gpt-530b", 105, 20480, 128),
    _gpt("megatron-gpt-1t", 128, 25600, 160),
)}

_LLAMA_KEYS = {"num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
               "vocab_size"}
_GPT2_KEYS = {"n_layer", "n_embd", "n_head", "vocab_size"}
# Keys that HF configs carry but that do not change the cost model.
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "rms_norm_eps", "layer_norm_epsilon",
    "rope_theta", "rope_scaling", "use_cache", "pretraining_tp", "attention_dropout",
    "attention_bias", "mlp_bias", "hidden_act", "activation_function", "resid_pdrop",
    "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "scale_attn_weights", "n_ctx",
    "task_specific_params", "_name_or_path", "head_dim", "tie_word_embeddings",
    "max_position_embeddings", "num_key_value_heads", "n_inner", "n_positions",
    "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx", "id2label", "label2id",
    "torchscript", "return_dict", "output_hidden_states", "output_attentions",
}


def _require_int(config: dict, key: str, source: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{source}:{key}", f"expected a positive integer, got {value!r}",
                         f"set \"{key}\" to a positive integer")
    return value


def _check_keys(config: dict, source: str, style_keys: set[str]) -> None:
    unknown = sorted(set(config) - _IGNORED_KEYS - style_keys)
    if unknown:
        raise ModelError(f"{source}:{unknown[0]}", "unknown config key",
                         "remove it, or use a llama-style or gpt2-style HF config.json")


def from_hf_config(config: dict, name: str = "custom", source: str = "config") -> ModelSpec:
    """Llama-style (num_hidden_layers, ...) or gpt2-style (n_layer, ...) HF config."""
    if _LLAMA_KEYS <= set(config):
        _check_keys(config, source, _LLAMA_KEYS)
        heads = _require_int(config, "num_attention_heads", source)
        kv_heads = config.get("num_key_value_heads") or heads
        hidden = _require_int(config, "hidden_size", source)
        head_dim = config.get("head_dim")
        if head_dim not in (None, hidden // heads):
            raise ModelError(f"{source}:head_dim", f"{head_dim} != hidden_size/num_attention_heads",
                             "meshplan models head_dim = hidden_size / num_attention_heads")
        act = str(config.get("hidden_act", "silu"))
        return ModelSpec(
            name=name, num_layers=_require_int(config, "num_hidden_layers", source),
            hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
            ffn_hidden_size=_require_int(config, "intermediate_size", source),
            vocab_size=_require_int(config, "vocab_size", source),
            max_seq_len=config.get("max_position_embeddings") or 4096,
            gated_mlp=True, activation="gelu" if act.startswith("gelu") else "silu",
            norm="rmsnorm", position_embedding="rope",
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            bias=bool(config.get("attention_bias", False)),
            dropout=float(config.get("attention_dropout") or 0) > 0)
    if _GPT2_KEYS <= set(config):
        _check_keys(config, source, _GPT2_KEYS)
        hidden = _require_int(config, "n_embd", source)
        inner = config.get("n_inner")
        return ModelSpec(
            name=name, num_layers=_require_int(config, "n_layer", source),
            hidden_size=hidden, num_heads=_require_int(config, "n_head", source),
            num_kv_heads=_require_int(config, "n_head", source),
            ffn_hidden_size=inner if inner is not None else 4 * hidden,  # n_inner null means 4*n_embd
            vocab_size=_require_int(config, "vocab_size", source),
            max_seq_len=config.get("n_positions") or 1024, gated_mlp=False, activation="gelu",
            norm="layernorm", position_embedding="learned",
            # HF's default is tied; Megatron-LM's GPT runs are usually untied.
            tied_embeddings=bool(config.get("tie_word_embeddings", True)), bias=True,
            dropout=any(float(config.get(k) or 0) > 0 for k in ("resid_pdrop", "attn_pdrop")))
    missing = sorted(_LLAMA_KEYS - set(config)) if "hidden_size" in config else sorted(
        _GPT2_KEYS - set(config))
    raise ModelError(f"{source}:{missing[0]}", "missing key",
                     f"add {', '.join(missing)} (llama-style) or n_layer/n_embd/n_head/vocab_size "
                     "(gpt2-style)")


def load_model(name_or_path: str) -> ModelSpec:
    """A zoo name, an HF config.json path, or a ModelSpec JSON path."""
    if name_or_path in ZOO:
        return ZOO[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ModelError("model", f"{name_or_path!r} is neither a file nor a zoo model",
                         f"pass a config.json path or one of {', '.join(ZOO)}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(str(path), f"not valid JSON ({exc})", "pass an HF-style config.json")
    if not isinstance(config, dict):
        raise ModelError(str(path), "top level is not a JSON object", "pass an HF-style config.json")
    if "num_layers" in config:
        return ModelSpec.from_dict(config)
    name = path.parent.name if path.name == "config.json" else path.stem
    return from_hf_config(config, name=name or "custom", source=str(path))
