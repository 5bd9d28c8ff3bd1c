"""Every supported architecture against Hugging Face transformers itself (a test extra, never
a runtime dependency): the model transformers builds from the same config.json, on the meta
device so nothing is allocated, gives the exact parameter count, and
torch.utils.flop_counter.FlopCounterMode over its forward and backward gives the FLOPs per
token, which ours must match within 2%.

Attention masking: transformers runs eager attention here, which computes the full s x s
score matrix whatever the causal or sliding-window mask; our unfused count (Shard flash
False) does the same, and the sequences (16 tokens) are shorter than every window, so a
sliding window changes neither side. gpt-oss's attention sinks join each softmax as one
more logit per row (a concatenation, no matmul) and its clamped SwiGLU and biases are
elementwise: FlopCounterMode counts none of them, nor do our GEMM FLOPs. The FLOP checks
keep the first layers of each model, enough to hold every layer kind (DeepSeek's dense and
MoE layers, Gemma 3's and gpt-oss's local and global ones), to keep the file fast: FLOPs
per token are a sum over layers either way.
"""
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from meshplan.core.errors import ModelError
from meshplan.simulator.model_spec import from_hf_config, load_model
from meshplan.simulator.ops import Shard, head_ops, layer_ops, model_flops_per_step, total_flops

CONFIGS = Path(__file__).parent / "data" / "hf_configs"
MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma2",
               "gemma3_text", "phi3", "deepseek_v3", "gpt_oss", "gpt2", "gpt_neox")
REAL = sorted(p.name for p in CONFIGS.glob("*.json") if p.name != "gemma3-12b.json")
# Variants the real configs do not exercise: MLA without the query low rank (DeepSeek-V2-Lite
# style), dense layers inside MoE stacks by list and by step, Qwen2 sliding-window layers,
# DeepSeek-V2's defaults (num_experts_per_tok has none, so it is given) with its query low
# rank and group-limited routing, gpt-oss with full attention in every layer.
VARIANTS = {
    "deepseek_v3-no-q-lora": {"model_type": "deepseek_v3", "q_lora_rank": None},
    "deepseek_v2-group-limited": {"model_type": "deepseek_v2", "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                                  "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3},
    "gpt_oss-full-attention": {"model_type": "gpt_oss", "layer_types": ["full_attention"] * 36},
    "qwen2_moe-mlp-only-0": {"model_type": "qwen2_moe", "mlp_only_layers": [0]},
    "qwen3_moe-sparse-step-2": {"model_type": "qwen3_moe", "decoder_sparse_step": 2},
    "qwen2-windowed": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32,
                       "max_window_layers": 1},
}
CASES = MODEL_TYPES + tuple(REAL) + tuple(VARIANTS)
SEQ = 16


def _config(which: str) -> dict:
    if which.endswith(".json"):
        return json.loads((CONFIGS / which).read_text())
    return VARIANTS.get(which, {"model_type": which})


def _hf_model(config: dict):
    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        # batched_mm runs each token's experts_per_token experts as gathered GEMMs: static
        # shapes (meta tensors cannot be routed), the FLOPs of exactly the active experts
        return AutoModelForCausalLM.from_config(hf, attn_implementation="eager",
                                                experts_implementation="batched_mm")


@pytest.mark.parametrize("which", CASES)
def test_parameter_count_is_exact(which):
    config = _config(which)
    model = _hf_model(config)
    assert from_hf_config(config).num_params() == sum(p.numel() for p in model.parameters())


def _first_layers(config: dict) -> dict:
    """The config cut to its first layers, with every layer kind still present."""
    kind = config.get("model_type")
    key = "n_layer" if kind == "gpt2" else "num_hidden_layers"
    keep = {"gemma3_text": 6, "deepseek_v3": config.get("first_k_dense_replace", 3) + 1,
            "deepseek_v2": config.get("first_k_dense_replace", 0) + 1}.get(kind, 2)
    cut = {"layer_types": config["layer_types"][:keep]} if "layer_types" in config else {}
    return dict(config, **{key: keep}, **cut)


def _hf_flops_per_token(model) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per token of one sequence of SEQ tokens."""
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    with backward:
        out.logits.sum().backward()
    fwd = forward.get_total_flops()
    return fwd / SEQ, (fwd + backward.get_total_flops()) / SEQ


@pytest.mark.parametrize("which", CASES)
def test_flops_per_token_match_flop_counter(which):
    config = _first_layers(_config(which))
    spec = from_hf_config(config)
    shard = Shard(1, SEQ, flash=False)
    ours_fwd = (spec.num_layers * total_flops(layer_ops(spec, shard)) + total_flops(head_ops(spec, shard))) / SEQ
    ours_step = model_flops_per_step(spec, 1, SEQ) / SEQ
    hf_fwd, hf_step = _hf_flops_per_token(_hf_model(config))
    assert ours_fwd == pytest.approx(hf_fwd, rel=0.02)
    assert ours_step == pytest.approx(hf_step, rel=0.02)


def test_every_real_config_loads_by_path():
    for name in REAL:
        assert load_model(str(CONFIGS / name)).num_params() > 0


def test_gemma3_multimodal_wrapper_names_its_vision_tower():
    with pytest.raises(ModelError, match="vision_config.*text_config"):
        load_model(str(CONFIGS / "gemma3-12b.json"))


def test_router_renormalisation_is_read_from_the_config():
    """norm_topk_prob as each config sets it (Qwen2-57B-A14B false, Qwen3-30B-A3B true);
    Mixtral always renormalises its top-k weights."""
    read = {name: load_model(str(CONFIGS / f"{name}.json")).norm_topk_prob
            for name in ("qwen2-57b-a14b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "deepseek-v2-lite")}
    assert read == {"qwen2-57b-a14b": False, "qwen3-30b-a3b": True, "mixtral-8x7b": True,
                    "deepseek-v3": True, "deepseek-v2-lite": False}


def test_group_limited_routing_is_read_from_the_config():
    """n_group / topk_group where topk_method limits the groups (DeepSeek-V3's noaux_tc,
    DeepSeek-V2's group_limited_greedy), none under greedy selection; an unknown method is
    refused by name."""
    read = {which: (m.route_groups, m.route_group_topk)
            for which in ("deepseek-v3.json", "deepseek-v2-lite.json", "deepseek_v2-group-limited")
            for m in [from_hf_config(_config(which), which)]}
    assert read == {"deepseek-v3.json": (8, 4), "deepseek-v2-lite.json": (0, 0),
                    "deepseek_v2-group-limited": (8, 3)}
    with pytest.raises(ModelError) as err:
        from_hf_config({**_config("deepseek-v3.json"), "topk_method": "sinkhorn"}, "cfg")
    assert "topk_method" in str(err.value)
    with pytest.raises(ModelError) as err:  # one group of 32 experts cannot hold 33 per token
        from_hf_config({**_config("deepseek-v3.json"), "topk_group": 1, "num_experts_per_tok": 33}, "cfg")
    assert err.value.field == "config:topk_group"  # the config's key, not the spec's field


def test_routed_weights_scale_and_choice_bias_are_read_from_the_config():
    """routed_scaling_factor as each config sets it (DeepSeek-V3 2.5, V2-Lite 1.0) or as
    transformers defaults it (V3 2.5, V2 1.0); the choice bias where selection is noaux_tc
    (DeepSeek-V3's), not under V2's greedy selection; a scale that is not a positive number is
    refused by its key."""
    read = {which: (m.routed_scaling, m.router_choice_bias)
            for which in ("deepseek-v3.json", "deepseek-v2-lite.json", "deepseek_v3", "deepseek_v2-group-limited")
            for m in [from_hf_config(_config(which), which)]}
    assert read == {"deepseek-v3.json": (2.5, True), "deepseek-v2-lite.json": (1.0, False),
                    "deepseek_v3": (2.5, True), "deepseek_v2-group-limited": (1.0, False)}
    assert not from_hf_config({**_config("deepseek-v3.json"), "topk_method": "greedy"}, "cfg").router_choice_bias
    with pytest.raises(ModelError) as err:
        from_hf_config({**_config("deepseek-v3.json"), "routed_scaling_factor": -1}, "cfg")
    assert err.value.field == "config:routed_scaling_factor"
