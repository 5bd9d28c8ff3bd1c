"""Hugging Face config.json -> ModelSpec fields, one reader per `model_type`.

Each reader follows the architecture's modelling code in transformers 5.x (its config
class's defaults fill keys a config leaves out, as `AutoConfig` does). Every key of a config
is either read, or known to change no cost (returned as the ignored keys), or reported: keys
that would change the cost but are not modelled, unknown keys and bad values are gathered
into one error that names all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshplan.core.errors import Issue, ModelError

# Bounds on a model's sizes, far above any real model's (405B: 126 layers, 16384 wide) and
# low enough that per-layer loops and int64 products of sizes stay bounded.
MAX_SIZE, MAX_LAYERS = 2 ** 24, 2 ** 14

# Keys any config may carry that say nothing about the architecture: names, versions,
# token ids, the checkpoint's dtype (the plan's dtype sets the simulated precision),
# initialisation and norm epsilons, generation defaults, output switches. Accepted silently.
BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
    "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "initializer_range", "initializer_factor", "rms_norm_eps",
    "layer_norm_eps", "layer_norm_epsilon", "use_cache", "id2label", "label2id", "torchscript",
    "return_dict", "use_return_dict", "output_hidden_states", "output_attentions",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
})
# Keys any config may carry that could look like they matter but change no cost, listed as
# ignored: auxiliary-loss knobs, RoPE frequencies and scaling (they change the angles, not
# the work), the KV-cache class, a classification head's dropout.
NO_COST = frozenset({
    "output_router_logits", "router_aux_loss_coef", "router_z_loss_coef", "pretraining_tp",
    "rope_theta", "rope_scaling", "rope_parameters", "rope_type", "original_max_position_embeddings",
    "cache_implementation", "classifier_dropout",
})


# ModelSpec fields -> the config keys they are read from (HF's standard names and aliases),
# so that a check on the spec names the key a user would edit.
SPEC_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "multi_query_group_num", "num_attention_heads", "n_head"),
    "ffn_hidden_size": ("intermediate_size", "ffn_dim", "n_inner"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_experts": ("num_local_experts", "n_routed_experts", "num_experts"),
    "experts_per_token": ("num_experts_per_tok", "moe_topk", "top_k_experts"),
    "moe_ffn_hidden_size": ("moe_intermediate_size", "intermediate_size"),
    "route_groups": ("n_group",),
    "route_group_topk": ("topk_group",),
}


@dataclass(frozen=True)
class Parsed:
    """One config read into ModelSpec fields: the keys ignored because they change no cost,
    the issues found (unknown keys, unmodelled features, bad values), and whether a bad size
    was replaced by 1 to read on (then checks on the spec would report its consequences), and
    the sizes the config leaves out that its architecture's defaults gave (key, value)."""

    fields: dict
    ignored: tuple[str, ...]
    issues: tuple[Issue, ...]
    substituted: bool
    defaulted: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class StoredWeights:
    """How a checkpoint stores its weights (its quantization_config): the quant_method, and
    the serving quantization it is in meshplan's terms (serve.InferencePlan.quantization,
    with its group size where the method has groups); quantization None: a method meshplan
    does not price (MXFP4, bitsandbytes, GPTQ without groups, ...)."""

    method: str
    quantization: str | None = None
    group_size: int | None = None


def stored_weights(config: dict) -> StoredWeights | None:
    """The checkpoint's stored weights from its quantization_config (None: 16-bit). vLLM
    serves them as stored: FP8 ones ("fp8", e.g. DeepSeek-V3's 128x128 blocks) as FP8
    GEMMs, AWQ's 4-bit and GPTQ's 4- and 8-bit groups as weight-only kernels."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "unknown"))
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size"))
    if method == "fp8":
        return StoredWeights(method, "fp8")
    if method in ("awq", "gptq") and bits in (4, 8) and isinstance(group, int) and group > 0:
        return StoredWeights(f"{method} {bits}-bit", f"int{bits}", group)
    return StoredWeights(method if bits is None else f"{method} {bits}-bit")


_NO_DEFAULT = object()


class _Config:
    """One config's keys as a reader sees them: each key read is remembered, defaults (the
    architecture's, when the config names its model_type) fill missing ones, and problems
    are collected rather than raised one by one."""

    def __init__(self, config: dict, source: str, defaults: dict):
        self.config, self.source, self.defaults = config, source, defaults
        self.read: set[str] = set()
        self.issues: list[Issue] = []
        self.substituted = False  # a bad size was replaced by 1 to read on
        self.defaulted: dict[str, int] = {}  # sizes the architecture's defaults gave

    def first(self, keys: tuple[str, ...], default=None):
        """The value of the first of `keys` (aliases) the config has (an explicit null means
        `default`), else the architecture's default of the first it has one for."""
        self.read.update(keys)
        for key in keys:
            if key in self.config:
                return default if self.config[key] is None else self.config[key]
        return next((self.defaults[k] for k in keys if self.defaults.get(k) is not None), default)

    def get(self, key: str, default=None):
        return self.first((key,), default)

    def size(self, keys: str | tuple[str, ...], default=_NO_DEFAULT) -> int:
        """A positive integer; a missing one without a default is reported."""
        keys = (keys,) if isinstance(keys, str) else keys
        value = self.first(keys)
        if value is None and default is not _NO_DEFAULT:
            return default
        if value is not None and not any(k in self.config for k in keys):
            self.defaulted[keys[0]] = value
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE:
            problem = "missing key" if value is None else f"expected a positive integer up to {MAX_SIZE}, got {value!r}"
            self.issues.append((self._field(keys[0]), problem, f"set \"{keys[0]}\" to a positive integer"))
            self.substituted = True
            return 1
        return value

    def number(self, key: str) -> float | None:
        """A positive finite number, or None when the key is missing or null."""
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            self.issues.append((self._field(key), f"expected a positive number, got {value!r}",
                                f"set \"{key}\" to a positive number"))
            return None
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self.get(key, default))

    def dropout(self, *keys: str) -> bool:
        return any([float(self.get(k) or 0) > 0 for k in keys])

    def refuse(self, key: str, problem: str,
               fix: str = "plan a model without it (nothing else in this config stops it)") -> None:
        """`key` would change the cost in a way meshplan does not model."""
        self.read.add(key)
        self.issues.append((self._field(key), f"{problem}; meshplan does not model it", fix))

    def _field(self, key: str) -> str:
        return f"{self.source}:{key}"

    def finish(self, fields: dict, ignorable: frozenset[str]) -> Parsed:
        """The reading: the keys ignored because they change no cost (bookkeeping left out),
        every issue found and every unknown key."""
        unknown = sorted(set(self.config) - self.read - BOOKKEEPING - NO_COST - ignorable)
        issues = self.issues + [
            (self._field(k), "unknown key: meshplan cannot tell whether it changes the cost",
             "remove it if it does not change the architecture") for k in unknown]
        return Parsed(fields, tuple(sorted(set(self.config) - self.read - BOOKKEEPING)), tuple(issues),
                      self.substituted, tuple(sorted(self.defaulted.items())))

    def spec_issues(self, issues) -> list[Issue]:
        """ModelSpec's `issues` with the config key each field was read from where the config
        has it (HF's standard names), those of keys already reported left out."""
        named = {field for field, _, _ in self.issues}
        out = []
        for field, problem, fix in issues:
            key = next((k for k in SPEC_KEYS.get(field, (field,)) if k in self.config), None)
            name = self._field(key) if key else f"{self.source} (model field {field})"
            if name not in named:
                out.append((name, problem, fix))
        return out


def _activation(c: _Config, *keys: str) -> str:
    act = str(c.first(keys, "silu"))
    if act in ("silu", "swish"):
        return "silu"
    if act.startswith("gelu"):
        return "gelu"
    c.refuse(keys[0], f"activation {act!r}")
    return "silu"


def _rotary_pct(c: _Config) -> float:
    """partial_rotary_factor (top level or in rope_parameters) or GPT-NeoX's rotary_pct."""
    keys = ("partial_rotary_factor", "rotary_pct")
    rope = c.config.get("rope_parameters") or {}
    if not set(keys) & set(c.config) and "partial_rotary_factor" in rope:
        return float(rope["partial_rotary_factor"])
    return float(c.first(keys, 1.0))


def _local_layers(c: _Config, layers: int, window: int | None, rule) -> tuple[int, ...]:
    """Layers with sliding-window attention: from `layer_types` when the config lists them,
    else by the architecture's rule(i); none without a window."""
    types = c.get("layer_types")
    if types is not None and not isinstance(types, list):
        c.issues.append((c._field("layer_types"), f"expected a list, got {types!r}",
                         "list \"full_attention\" or \"sliding_attention\" for each layer"))
        return ()
    if types is not None:
        odd = sorted({str(t) for t in types if t not in ("full_attention", "sliding_attention")})
        if odd or len(types) != layers:
            c.refuse("layer_types", f"{odd or len(types)} (layers of another kind, or not one per layer)")
        picked = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        picked = tuple(i for i in range(layers) if rule(i))
    return picked if window else ()


def _attention_core(c: _Config) -> dict:
    """Sizes every reader shares."""
    layers = c.size("num_hidden_layers")
    hidden = c.size("hidden_size")
    heads = c.size("num_attention_heads")
    fields = dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                  num_kv_heads=c.size("num_key_value_heads", heads),
                  ffn_hidden_size=c.size("intermediate_size"), vocab_size=c.size("vocab_size"),
                  max_seq_len=c.size("max_position_embeddings", 4096),
                  tied_embeddings=c.flag("tie_word_embeddings"))
    head_dim = c.get("head_dim")
    if head_dim is not None:
        fields["head_dim"] = c.size("head_dim")
    return fields


def _window(c: _Config, key: str = "sliding_window") -> int | None:
    value = c.get(key)
    if value is None or value == 0:
        return None
    return c.size(key)


def _qwen_window(c: _Config) -> int | None:
    """Qwen configs carry a window that applies only with use_sliding_window."""
    window = _window(c)
    return window if c.flag("use_sliding_window") else None


def _llama(c: _Config) -> dict:
    fields = _attention_core(c)
    attn_bias, mlp_bias = c.flag("attention_bias"), c.flag("mlp_bias")
    if mlp_bias and not attn_bias:
        c.refuse("mlp_bias", "MLP biases without attention biases")
    return dict(fields, activation=_activation(c, "hidden_act"), bias=attn_bias and mlp_bias,
                qkv_bias=attn_bias, out_bias=attn_bias, dropout=c.dropout("attention_dropout"))


def _mistral(c: _Config) -> dict:
    fields = _attention_core(c)
    window = _window(c)
    return dict(fields, activation=_activation(c, "hidden_act"), dropout=c.dropout("attention_dropout"),
                sliding_window=window, local_layers=_local_layers(c, fields["num_layers"], window, lambda i: True))


def _mixtral(c: _Config) -> dict:
    fields = _mistral(c)
    return dict(fields, num_experts=c.size(("num_local_experts", "num_experts")),
                experts_per_token=c.size("num_experts_per_tok"),
                moe_ffn_hidden_size=fields["ffn_hidden_size"])


def _qwen2(c: _Config) -> dict:
    fields = _attention_core(c)
    window = _qwen_window(c)
    first = c.get("max_window_layers", fields["num_layers"])
    return dict(fields, activation=_activation(c, "hidden_act"), qkv_bias=True,
                dropout=c.dropout("attention_dropout"), sliding_window=window,
                local_layers=_local_layers(c, fields["num_layers"], window, lambda i: i >= first))


def _qwen3(c: _Config) -> dict:
    fields = _attention_core(c)
    window = _qwen_window(c)
    first = c.get("max_window_layers", fields["num_layers"])
    bias = c.flag("attention_bias")
    return dict(fields, activation=_activation(c, "hidden_act"), qkv_bias=bias, out_bias=bias,
                qk_norm=True, dropout=c.dropout("attention_dropout"), sliding_window=window,
                local_layers=_local_layers(c, fields["num_layers"], window, lambda i: i >= first))


def _qwen_moe(c: _Config, layers: int) -> dict:
    """Experts of Qwen2-MoE / Qwen3-MoE: a layer is dense when listed in mlp_only_layers or
    off the decoder_sparse_step."""
    step = c.size("decoder_sparse_step", 1)
    only = set(c.get("mlp_only_layers") or ())
    return dict(num_experts=c.size(("num_experts", "num_local_experts")),
                experts_per_token=c.size("num_experts_per_tok"),
                moe_ffn_hidden_size=c.size("moe_intermediate_size"),
                norm_topk_prob=c.flag("norm_topk_prob"),  # Qwen2MoeConfig / Qwen3MoeConfig default
                dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step))


def _qwen2_moe(c: _Config) -> dict:
    fields = _attention_core(c)
    layers = fields["num_layers"]
    window = _qwen_window(c)
    last = c.get("max_window_layers", layers)
    shared = c.get("shared_expert_intermediate_size") or 0
    return dict(fields, **_qwen_moe(c, layers), activation=_activation(c, "hidden_act"),
                qkv_bias=c.flag("qkv_bias", True), dropout=c.dropout("attention_dropout"),
                num_shared_experts=1 if shared else 0,
                shared_expert_ffn_size=c.size("shared_expert_intermediate_size") if shared else 0,
                shared_expert_gate=bool(shared), sliding_window=window,
                local_layers=_local_layers(c, layers, window, lambda i: (i + 1) % 2 and i < last))


def _qwen3_moe(c: _Config) -> dict:
    fields = _attention_core(c)
    layers = fields["num_layers"]
    window = _qwen_window(c)
    bias = c.flag("attention_bias")
    return dict(fields, **_qwen_moe(c, layers), activation=_activation(c, "hidden_act"),
                qkv_bias=bias, out_bias=bias, qk_norm=True, dropout=c.dropout("attention_dropout"),
                sliding_window=window, local_layers=_local_layers(c, layers, window, lambda i: True))


def _gemma(c: _Config, every: int) -> dict:
    """Gemma 2 (every 2nd layer global) and Gemma 3 text (every `every`-th layer global)."""
    fields = _attention_core(c)
    if c.flag("use_bidirectional_attention"):
        c.refuse("use_bidirectional_attention", "bidirectional attention")
    window = _window(c)
    bias = c.flag("attention_bias")
    softcaps = {k: (float(c.get(key)) if c.get(key) else None)
                for k, key in (("attn_softcap", "attn_logit_softcapping"),
                               ("final_softcap", "final_logit_softcapping"))}
    return dict(fields, **softcaps, activation=_activation(c, "hidden_activation", "hidden_act"),
                qkv_bias=bias, out_bias=bias, sandwich_norm=True, dropout=c.dropout("attention_dropout"),
                sliding_window=window,
                local_layers=_local_layers(c, fields["num_layers"], window, lambda i: (i + 1) % every))


def _gemma2(c: _Config) -> dict:
    return _gemma(c, 2)


def _gemma3_text(c: _Config) -> dict:
    every = c.size("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
    return dict(_gemma(c, every), qk_norm=True)


def _gemma3(c: _Config) -> dict:
    c.refuse("vision_config", "the SigLIP vision tower and its projector",
             "to plan the text decoder, save text_config as its own config.json (model_type gemma3_text)")
    return {}


def _phi3(c: _Config) -> dict:
    fields = _attention_core(c)
    if c.flag("attention_bias"):
        c.refuse("attention_bias", "attention biases in Phi-3")
    window = _window(c)
    return dict(fields, activation=_activation(c, "hidden_act"), rotary_pct=_rotary_pct(c),
                dropout=c.dropout("attention_dropout", "resid_pdrop", "embd_pdrop"), sliding_window=window,
                local_layers=_local_layers(c, fields["num_layers"], window, lambda i: True))


def _deepseek_v3(c: _Config, method: str = "noaux_tc") -> dict:
    fields = _attention_core(c)
    fields["num_kv_heads"] = fields["num_heads"]  # latent attention: one K/V head per query head
    fields.pop("head_dim", None)                  # HF's head_dim is the RoPE part, qk_rope_head_dim
    layers = fields["num_layers"]
    if c.flag("attention_bias"):
        c.refuse("attention_bias", "biases in latent attention")
    router = c.get("scoring_func", "sigmoid")
    if router not in ("sigmoid", "softmax"):
        c.refuse("scoring_func", f"router scoring {router!r}")
    # DeepSeek's modelling code: "greedy" over all experts; "group_limited_greedy" (V2) and
    # "noaux_tc" (V3) within the best topk_group of n_group groups
    method = c.get("topk_method", method)
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        c.refuse("topk_method", f"expert selection {method!r}")
    n_group = c.get("n_group")
    c.get("topk_group")  # read either way: greedy selection leaves it unused
    groups = {} if method == "greedy" or (n_group or 1) == 1 else dict(
        route_groups=c.size("n_group"), route_group_topk=c.size("topk_group"))
    first, freq = c.get("first_k_dense_replace", 0), c.size("moe_layer_freq", 1)
    experts = c.get("n_routed_experts")
    moe = dict(num_experts=c.size("n_routed_experts"), experts_per_token=c.size("num_experts_per_tok"),
               moe_ffn_hidden_size=c.size("moe_intermediate_size"),
               num_shared_experts=c.get("n_shared_experts") or 0,
               shared_expert_ffn_size=c.size("moe_intermediate_size"),
               router=router, norm_topk_prob=c.flag("norm_topk_prob"),
               routed_scaling=c.number("routed_scaling_factor") or 1.0, router_choice_bias=method == "noaux_tc",
               **groups,
               # DeepSeek's modelling code: MoE from first_k_dense_replace on, every moe_layer_freq
               dense_layers=tuple(i for i in range(layers) if i < first or i % freq)) if experts else {}
    q_rank = c.get("q_lora_rank")
    return dict(fields, **moe, activation=_activation(c, "hidden_act"), dropout=c.dropout("attention_dropout"),
                q_lora_rank=c.size("q_lora_rank") if q_rank else 0, kv_lora_rank=c.size("kv_lora_rank"),
                qk_nope_head_dim=c.size("qk_nope_head_dim"), qk_rope_head_dim=c.size("qk_rope_head_dim"),
                v_head_dim=c.size("v_head_dim"))


def _deepseek_v2(c: _Config) -> dict:
    """DeepSeek-V2 is DeepSeek-V3's shape with a softmax router (scoring and scaling cost
    nothing here), greedy selection unless its config says group-limited, and no
    expert-bias correction term."""
    if c.flag("mlp_bias"):
        c.refuse("mlp_bias", "biases on the dense and shared-expert MLPs only")
    return _deepseek_v3(c, "greedy")


def _gpt_oss(c: _Config) -> dict:
    """gpt-oss: every layer's MLP is experts with biases behind a router with a bias, the
    experts run a clamped SwiGLU, attention has biases and a sink logit per head, and the
    layers listed sliding in layer_types (every other one by default) attend over a window."""
    fields = _attention_core(c)
    layers = fields["num_layers"]
    if not c.flag("attention_bias", True):
        c.refuse("attention_bias", "gpt-oss attention without biases (its experts keep them)")
    window = _window(c)
    return dict(fields, bias=True, attn_sinks=True, router_bias=True, swiglu_limit=c.number("swiglu_limit"),
                dropout=c.dropout("attention_dropout"), num_experts=c.size(("num_local_experts", "num_experts")),
                experts_per_token=c.size(("num_experts_per_tok", "experts_per_token")),
                moe_ffn_hidden_size=fields["ffn_hidden_size"], sliding_window=window,
                local_layers=_local_layers(c, layers, window, lambda i: (i + 1) % 2))


def _gpt2(c: _Config) -> dict:
    hidden = c.size("n_embd")
    if c.flag("add_cross_attention"):
        c.refuse("add_cross_attention", "cross-attention layers")
    return dict(num_layers=c.size("n_layer"), hidden_size=hidden, num_heads=c.size("n_head"),
                num_kv_heads=c.size("n_head"),
                ffn_hidden_size=c.size("n_inner", 4 * hidden),  # n_inner null means 4 * n_embd
                vocab_size=c.size("vocab_size"), max_seq_len=c.size("n_positions", 1024),
                gated_mlp=False, activation=_activation(c, "activation_function"), norm="layernorm",
                position_embedding="learned",
                # HF's default is tied; Megatron-LM's GPT runs are usually untied.
                tied_embeddings=c.flag("tie_word_embeddings", True), bias=True,
                dropout=c.dropout("resid_pdrop", "attn_pdrop", "embd_pdrop"))


def _gpt_neox(c: _Config) -> dict:
    fields = _attention_core(c)
    if not c.flag("attention_bias", True):
        c.refuse("attention_bias", "GPT-NeoX attention without biases (its MLP keeps them)")
    return dict(fields, gated_mlp=False, activation=_activation(c, "hidden_act"), norm="layernorm",
                bias=True, rotary_pct=_rotary_pct(c), parallel_residual=c.flag("use_parallel_residual", True),
                dropout=c.dropout("hidden_dropout", "attention_dropout", "hidden_dropout_prob",
                                  "attention_probs_dropout_prob"))


# transformers 5.x config class defaults of the keys the readers use (AutoConfig fills them in).
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, max_position_embeddings=2048)
_QWEN = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, max_position_embeddings=32768, max_window_layers=28,
             sliding_window=4096)
_QWEN_MOE = dict(_QWEN, hidden_size=2048, num_hidden_layers=24, decoder_sparse_step=1,
                 num_experts_per_tok=4, num_experts=60, moe_intermediate_size=1408)
_GEMMA = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
              num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
              sliding_window=4096, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
DEFAULTS = {
    "llama": _LLAMA,
    "mistral": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096),
    "mixtral": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen2": _QWEN,
    "qwen3": dict(_QWEN, head_dim=128),
    "qwen2_moe": dict(_QWEN_MOE, num_attention_heads=16, intermediate_size=5632,
                      shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(_QWEN_MOE, num_key_value_heads=4, intermediate_size=6144, num_experts_per_tok=8,
                      num_experts=128, moe_intermediate_size=768),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_GEMMA, vocab_size=262208, max_position_embeddings=131072),
    "gemma3": {},
    "phi3": dict(_LLAMA, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 max_position_embeddings=4096),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1,
                        n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, num_experts_per_tok=8, first_k_dense_replace=3,
                        max_position_embeddings=4096, norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
                        topk_group=4),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=2048, kv_lora_rank=512, q_lora_rank=1536,
                        n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, moe_intermediate_size=1407, norm_topk_prob=False, scoring_func="softmax",
                        routed_scaling_factor=1.0),
    "gpt_oss": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                    max_position_embeddings=131072, num_local_experts=128, num_experts_per_tok=4,
                    swiglu_limit=7.0),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    "gpt_neox": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                     intermediate_size=24576, hidden_act="gelu", max_position_embeddings=2048,
                     partial_rotary_factor=0.25),
}
READERS = {"llama": _llama, "mistral": _mistral, "mixtral": _mixtral, "qwen2": _qwen2, "qwen3": _qwen3,
           "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "gemma2": _gemma2,
           "gemma3_text": _gemma3_text, "gemma3": _gemma3, "phi3": _phi3, "deepseek_v3": _deepseek_v3,
           "deepseek_v2": _deepseek_v2, "gpt_oss": _gpt_oss, "gpt2": _gpt2, "gpt_neox": _gpt_neox}
# Keys of each architecture that change no cost (Mixtral always renormalises its top-k
# weights; the other MoE readers take norm_topk_prob into ModelSpec for the executor).
_MOE_ROUTING = {"router_jitter_noise"}
# The balancing loss and the EP size of DeepSeek's own code cost nothing; head_dim / qk_head_dim
# restate the latent sizes; the multi-token-prediction module is left out, as Hugging
# Face's DeepseekV3ForCausalLM and inference leave it out.
_DEEPSEEK = _MOE_ROUTING | {"ep_size",
                            "aux_loss_alpha", "seq_aux", "rope_interleave", "qk_head_dim", "num_nextn_predict_layers"}
IGNORED = {
    "gemma2": {"query_pre_attn_scalar", "sliding_window_size"},
    "gemma3_text": {"query_pre_attn_scalar", "rope_local_base_freq"},
    "gemma3": {"text_config", "boi_token_index", "eoi_token_index", "image_token_index", "mm_tokens_per_image"},
    "qwen2": {"use_mrope"},
    "mixtral": _MOE_ROUTING | {"norm_topk_prob"},
    "qwen2_moe": _MOE_ROUTING,
    "qwen3_moe": _MOE_ROUTING | {"max_window_layers"},  # Qwen3-MoE windows every layer
    "deepseek_v3": _DEEPSEEK,
    "deepseek_v2": _DEEPSEEK,
    # gpt-oss's experts run their clamped SwiGLU whatever hidden_act says; swiglu_alpha is
    # its sigmoid gain and initial_context_length YaRN's original context (elementwise /
    # angle changes only)
    "gpt_oss": _MOE_ROUTING | {"hidden_act", "swiglu_alpha", "initial_context_length"},
    "gpt2": {"summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
             "summary_first_dropout", "scale_attn_weights", "n_ctx", "reorder_and_upcast_attn",
             "scale_attn_by_inverse_layer_idx"},
    "gpt_neox": {"rotary_emb_base"},
}


def _guess_type(config: dict) -> str | None:
    """Configs without model_type: gpt2-style keys (n_layer, ...) or llama-style."""
    if "n_layer" in config or "n_embd" in config:
        return "gpt2"
    if "hidden_size" in config or "num_hidden_layers" in config:
        return "llama"
    return None


def parse(config: dict, source: str = "config") -> tuple[Parsed, _Config]:
    """The config's reading, and the reader (whose spec_issues names a ModelSpec check's
    fields by the config's keys)."""
    model_type = config.get("model_type") or _guess_type(config)
    if model_type not in READERS:
        raise ModelError(f"{source}:model_type", f"unknown model type {model_type!r}",
                         f"use a config of one of {', '.join(READERS)}")
    # Without a model_type the architecture is guessed: no defaults stand in for missing keys.
    defaults = DEFAULTS[model_type] if config.get("model_type") else {}
    c = _Config(config, source, defaults)
    fields = READERS[model_type](c)
    c.read.add("quantization_config")  # stored_weights reads it
    return c.finish(fields, frozenset(IGNORED.get(model_type, ()))), c
