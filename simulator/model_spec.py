"""ModelSpec: the shape of a decoder-only transformer, from an HF config.json or the zoo.

A model's layers may differ (dense or mixture-of-experts MLP, full or sliding-window
attention): `layer_kinds()` says which kinds it has and how many layers of each, so that
parameters and costs are summed per kind. Parameter counts follow the architecture exactly
(so they match published counts and Hugging Face's models); the zoo's sources are cited
beside each entry.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from meshplan.core.fields import from_fields
from meshplan.core.errors import Issue, ModelError
from meshplan.simulator import hf_config
from meshplan.core.io import read_json

ACTIVATIONS = ("silu", "gelu")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
# softmax over the experts' logits (Mixtral, Qwen) or a sigmoid score per expert (DeepSeek-V3)
ROUTERS = ("softmax", "sigmoid")
_SIZES = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
          "vocab_size", "max_seq_len")
_MOE = ("experts_per_token", "moe_ffn_hidden_size")
_MLA = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class LayerKind:
    """What sets a layer's cost apart from the other layers of its model."""

    local: bool = False  # sliding-window attention
    moe: bool = False    # routed experts in place of the dense MLP


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer. Sizes are element counts, not bytes.

    Attention is grouped-query (num_kv_heads of head_dim each), or multi-head latent
    attention when kv_lora_rank > 0 (DeepSeek-V2 sec 2.1: queries and keys/values
    projected down to a low rank, then up per head). The MLP is dense, or with num_experts
    > 0 a router choosing experts_per_token of num_experts experts of width
    moe_ffn_hidden_size, plus num_shared_experts always-on experts of width
    shared_expert_ffn_size, in every layer except `dense_layers` (which keep the dense MLP
    of width ffn_hidden_size). `local_layers` attend over the last `sliding_window` keys.
    With `bias` the experts carry biases too (gpt-oss)."""

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
    bias: bool = False               # biases on every linear layer of the blocks (GPT-2, GPT-NeoX)
    dropout: bool = False
    head_dim: int | None = None      # None: hidden_size / num_heads (MLA: nope + rope dims)
    qkv_bias: bool = False           # biases on Q, K and V only (Qwen2)
    out_bias: bool = False           # bias on the attention output projection
    qk_norm: bool = False            # a norm over each query and key head (Dehghani et al. 2023 sec 3.1)
    sandwich_norm: bool = False      # norms after attention and after the MLP too (Gemma 2 report sec 2.2)
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX-20B paper sec 2.1)
    rotary_pct: float = 1.0          # share of each head's dimensions that RoPE rotates
    sliding_window: int | None = None
    local_layers: tuple[int, ...] = ()
    attn_softcap: float | None = None   # tanh soft-capping of attention scores (Gemma 2 report sec 2.2)
    final_softcap: float | None = None  # ... and of the output logits
    attn_sinks: bool = False            # a learned logit per head in each softmax (gpt-oss model card sec 2)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_hidden_size: int = 0
    num_shared_experts: int = 0
    shared_expert_ffn_size: int = 0
    shared_expert_gate: bool = False    # a sigmoid gate on the shared experts (Qwen2-MoE)
    router: str = "softmax"
    router_bias: bool = False           # a bias on the router's logits (gpt-oss)
    # gpt-oss's clamped SwiGLU: gate clamped above and up both ways at this limit, then
    # (up + 1) * gate * sigmoid(1.702 gate); None: the plain activation
    swiglu_limit: float | None = None
    norm_topk_prob: bool = True         # chosen experts' weights renormalised to sum to 1 (Mixtral)
    routed_scaling: float = 1.0         # the routed experts' weights scaled (DeepSeek's routed_scaling_factor)
    # a bias per expert on the scores for choosing experts only (not their weights), moved
    # after each step against the experts' load: auxiliary-loss-free balancing (DeepSeek-V3
    # sec 2.1.2; its noaux_tc selection)
    router_choice_bias: bool = False
    # group-limited routing: the experts in route_groups groups of consecutive experts, each
    # token's chosen from its best route_group_topk groups (DeepSeek-V2 sec 2.2.3 device-
    # limited, DeepSeek-V3 sec 2.1.2 node-limited routing); 0: any expert
    route_groups: int = 0
    route_group_topk: int = 0
    dense_layers: tuple[int, ...] = ()
    q_lora_rank: int = 0             # 0: queries projected directly, without a low rank
    kv_lora_rank: int = 0            # > 0: multi-head latent attention
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        for field in ("local_layers", "dense_layers"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        # sizes first: the other checks do arithmetic on them
        issues = [_int_issue(f, getattr(self, f), positive=True) for f in _SIZES]
        issues += [_int_issue(f, getattr(self, f), positive=False)
                   for f in ("num_experts", "num_shared_experts", "shared_expert_ffn_size", "q_lora_rank",
                             "kv_lora_rank", "route_groups", "route_group_topk", *_MOE, *_MLA)]
        if self.head_dim is not None:
            issues.append(_int_issue("head_dim", self.head_dim, positive=True))
        _raise_any(issues)
        derived = self.head_dim is None
        if derived:
            object.__setattr__(self, "head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim
                               if self.kv_lora_rank else max(1, self.hidden_size // self.num_heads))
        # every other check, each issue gathered, so that one error names them all
        _raise_any([*self._shape_issues(derived), *self._layer_issues(), *self._moe_issues(),
                    *self._mla_issues()])

    def _shape_issues(self, derived_head_dim: bool):
        if derived_head_dim and not self.kv_lora_rank and self.hidden_size % self.num_heads:
            yield ("num_heads", f"{self.num_heads} does not divide hidden_size {self.hidden_size}",
                   "use a head count that divides hidden_size, or give head_dim")
        if self.num_heads % self.num_kv_heads:
            yield ("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads {self.num_heads}",
                   "use a KV head count that divides num_heads")
        for field, allowed in (("activation", ACTIVATIONS), ("norm", NORMS),
                               ("position_embedding", POSITIONS), ("router", ROUTERS)):
            if getattr(self, field) not in allowed:
                yield field, f"unknown value {getattr(self, field)!r}", f"use one of {', '.join(allowed)}"
        if not 0 < self.rotary_pct <= 1:
            yield "rotary_pct", f"{self.rotary_pct} is not in (0, 1]", "use a share in (0, 1]"
        if not _positive_number(self.routed_scaling):
            yield "routed_scaling", f"{self.routed_scaling!r} is not a positive number", "give a positive, finite scale"
        limit = self.swiglu_limit
        if limit is not None and not (self.gated_mlp and _positive_number(limit)):
            yield ("swiglu_limit", f"{self.swiglu_limit!r} (gated MLP: {self.gated_mlp})",
                   "give a positive, finite clamp on a gated MLP, or none")

    def _layer_issues(self):
        for field in ("local_layers", "dense_layers"):
            layers = getattr(self, field)
            if list(layers) != sorted(set(layers)) or any(
                    not isinstance(i, int) or not 0 <= i < self.num_layers for i in layers):
                yield (field, f"{list(layers)} are not distinct increasing layer indices below "
                       f"{self.num_layers}", "list each layer index once, in order")
        if self.local_layers and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            yield ("sliding_window", f"{self.sliding_window!r} with local layers",
                   "give the window (keys) of the sliding-window layers")

    def _moe_issues(self):
        if not self.num_experts:
            extra = [f for f in ("experts_per_token", "moe_ffn_hidden_size", "num_shared_experts",
                                 "dense_layers", "router_bias", "router_choice_bias") if getattr(self, f)]
            yield from ((f, "set on a model without experts", "set num_experts, or leave the expert fields out")
                        for f in extra)
            return
        missing = [f for f in _MOE if not getattr(self, f)]
        yield from ((f, "missing (0) with experts", f"set {f} to a positive integer") for f in missing)
        if self.experts_per_token > self.num_experts:
            yield ("experts_per_token", f"{self.experts_per_token} > {self.num_experts} experts",
                   "route each token to at most num_experts experts")
        if self.num_shared_experts and not self.shared_expert_ffn_size:
            yield "shared_expert_ffn_size", "missing with shared experts", "give the shared experts' MLP width"
        groups, top = self.route_groups, self.route_group_topk
        if groups and not (self.num_experts % groups == 0 and 1 <= top <= groups
                           and top * self.num_experts // groups >= self.experts_per_token):
            yield ("route_group_topk", f"{top} of {groups} groups of the {self.num_experts} experts "
                   f"cannot hold {self.experts_per_token} experts per token",
                   "give groups that divide the experts and keep enough of them per token")

    def _mla_issues(self):
        if not self.kv_lora_rank:
            return
        yield from ((f, "missing (0) with latent attention", f"set {f} to a positive integer")
                    for f in _MLA if not getattr(self, f))
        if self.num_kv_heads != self.num_heads:
            yield ("num_kv_heads", f"{self.num_kv_heads} != num_heads {self.num_heads} with latent attention",
                   "latent attention has one key/value head per query head")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.kv_lora_rank else self.head_dim

    @property
    def shared_ffn_size(self) -> int:
        """Width of the shared experts run as one MLP (as Hugging Face and Megatron-LM do)."""
        return self.num_shared_experts * self.shared_expert_ffn_size

    def layer_kind(self, index: int) -> LayerKind:
        return LayerKind(index in self.local_layers,
                         bool(self.num_experts) and index not in self.dense_layers)

    def layer_kinds(self) -> tuple[tuple[LayerKind, int], ...]:
        """(kind, number of layers of that kind), in order of first appearance."""
        return _layer_kinds(self)

    # ---- parameter counts (elements) ----
    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def _norm(self, width: int) -> int:
        return width * (2 if self.norm == "layernorm" else 1)

    def attention_params(self) -> int:
        """Projections with their biases, plus QK-norms or MLA's latent norms, plus the
        attention sinks."""
        h, hd, heads = self.hidden_size, self.head_dim, self.num_heads
        if self.kv_lora_rank:
            rope, v, q, kv = self.qk_rope_head_dim, self.v_head_dim, self.q_lora_rank, self.kv_lora_rank
            query = (h * q + self._norm(q) + q * heads * hd) if q else h * heads * hd
            latent = h * (kv + rope) + self._norm(kv) + kv * heads * (self.qk_nope_head_dim + v)
            return query + latent + heads * v * h
        qkv = (heads + 2 * self.num_kv_heads) * hd
        weights = h * qkv + heads * hd * h  # Q, K, V, output projections
        biases = (qkv if self.bias or self.qkv_bias else 0) + (h if self.bias or self.out_bias else 0)
        sinks = heads if self.attn_sinks else 0
        return weights + biases + sinks + (2 * self._norm(hd) if self.qk_norm else 0)

    def mlp_params(self, ffn: int | None = None) -> int:
        """One MLP of width `ffn` (default: the dense MLP's)."""
        h, f = self.hidden_size, self.ffn_hidden_size if ffn is None else ffn
        mats = 3 if self.gated_mlp else 2  # gated: gate, up, down (Shazeer 2020, GLU variants)
        return mats * h * f + ((f * (mats - 1) + h) if self.bias else 0)

    def moe_params(self, active: bool = False) -> int:
        """Router, experts (only the experts_per_token a token runs, if `active`) and shared
        experts with their gate."""
        experts = self.experts_per_token if active else self.num_experts
        shared = self.mlp_params(self.shared_ffn_size) if self.num_shared_experts else 0
        return (self.router_params() + experts * self.mlp_params(self.moe_ffn_hidden_size)
                + shared + (self.hidden_size if self.shared_expert_gate else 0))

    def router_params(self) -> int:
        return self.num_experts * (self.hidden_size + (1 if self.router_bias else 0))

    def layer_params(self, kind: LayerKind, active: bool = False) -> int:
        mlp = self.moe_params(active) if kind.moe else self.mlp_params()
        return self.attention_params() + mlp + (4 if self.sandwich_norm else 2) * self.norm_params()

    def layer_replicated_params(self, kind: LayerKind) -> int:
        """Parameters of a layer that tensor parallelism does not shard (Megatron-LM): the
        norms, QK-norms, MLA's down-projections and latent norms, the router and the shared
        experts' gate."""
        h = self.hidden_size
        norms = (4 if self.sandwich_norm else 2) * self.norm_params()
        if self.kv_lora_rank:
            q, kv = self.q_lora_rank, self.kv_lora_rank
            norms += (h * q + self._norm(q) if q else 0) + h * (kv + self.qk_rope_head_dim) + self._norm(kv)
        elif self.qk_norm:
            norms += 2 * self._norm(self.head_dim)
        router = self.router_params() + (h if self.shared_expert_gate else 0)
        return norms + (router if kind.moe else 0)

    def embedding_params(self) -> int:
        pos = self.max_seq_len * self.hidden_size if self.position_embedding == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    def head_params(self) -> int:
        """Final norm plus the LM head (zero extra weights when tied to the embedding)."""
        return self.norm_params() + (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)

    def num_params(self, active: bool = False) -> int:
        """All parameters, or (`active`) those one token runs through: the experts it is
        routed to rather than all of them."""
        layers = sum(n * self.layer_params(kind, active) for kind, n in self.layer_kinds())
        return self.embedding_params() + layers + self.head_params()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return from_fields(cls, data, "model.", ModelError, "model")


def _positive_number(value) -> bool:
    """A positive, finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


@functools.lru_cache(maxsize=64)
def _layer_kinds(model: ModelSpec) -> tuple[tuple[LayerKind, int], ...]:
    """ModelSpec.layer_kinds, once per model (the cost model asks for it per candidate)."""
    counts: dict[LayerKind, int] = {}
    for i in range(model.num_layers):
        kind = model.layer_kind(i)
        counts[kind] = counts.get(kind, 0) + 1
    return tuple(counts.items())


def _int_issue(field: str, value, positive: bool) -> Issue | None:
    """The issue with a size field that is not an integer in range, else None."""
    top = hf_config.MAX_LAYERS if field == "num_layers" else hf_config.MAX_SIZE
    if not isinstance(value, int) or isinstance(value, bool) or not (1 if positive else 0) <= value <= top:
        bound = "a positive" if positive else "a non-negative"
        return (field, f"must be {bound} integer up to {top}, got {value!r}",
                f"set {field} to {bound} integer up to {top}")
    return None


def _raise_any(issues: list) -> None:
    """One ModelError naming every issue in `issues` (None entries are no issue)."""
    found = [i for i in issues if i is not None]
    if found:
        raise ModelError.of(found)


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


@dataclass(frozen=True)
class LoadedModel:
    """A model as loaded, with the config keys that were read but change no cost, how the
    checkpoint stores its weights (None: 16-bit, or not a checkpoint's config) and the sizes
    it leaves out that its architecture's defaults gave, as transformers' AutoConfig fills
    them ((key, value))."""

    spec: ModelSpec
    ignored_keys: tuple[str, ...] = ()
    stored: hf_config.StoredWeights | None = None
    defaulted: tuple[tuple[str, int], ...] = ()


def from_hf_config(config: dict, name: str = "custom", source: str = "config") -> ModelSpec:
    """The ModelSpec of an HF config.json (hf_config.parse reads it)."""
    return read_hf_config(config, name, source).spec


def read_hf_config(config: dict, name: str = "custom", source: str = "config") -> LoadedModel:
    """The config's ModelSpec; one error naming every issue of the config and of the model it
    describes (the model's checks left out where a bad size had to be replaced to read on,
    or where the reader stopped short of a whole model)."""
    parsed, reader = hf_config.parse(config, source)
    issues = list(parsed.issues)
    spec = None
    required = {f.name for f in dataclasses.fields(ModelSpec) if f.default is dataclasses.MISSING} - {"name"}
    if not parsed.substituted and required <= set(parsed.fields):
        try:
            spec = ModelSpec(name=name, **parsed.fields)
        except ModelError as exc:
            issues += reader.spec_issues(exc.issues)
    if issues:
        raise ModelError.of(issues)
    return LoadedModel(spec, parsed.ignored, hf_config.stored_weights(config), parsed.defaulted)


def read_model(name_or_path: str) -> LoadedModel:
    """A zoo name, an HF config.json path, or a ModelSpec JSON path."""
    if name_or_path in ZOO:
        return LoadedModel(ZOO[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise ModelError("model", f"{name_or_path!r} is neither a file nor a zoo model",
                         f"pass a config.json path or one of {', '.join(ZOO)}")
    try:
        config = read_json(path)
    except ValueError as exc:
        raise ModelError(str(path), f"not valid JSON ({exc})", "pass an HF-style config.json")
    if not isinstance(config, dict):
        raise ModelError(str(path), "top level is not a JSON object", "pass an HF-style config.json")
    if "num_layers" in config:
        return LoadedModel(ModelSpec.from_dict(config))
    name = path.parent.name if path.name == "config.json" else path.stem
    return read_hf_config(config, name=name or "custom", source=str(path))


def load_model(name_or_path: str) -> ModelSpec:
    return read_model(name_or_path).spec
