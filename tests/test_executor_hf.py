"""The executor's decoder against Hugging Face's: a tiny config of each architecture is read
by meshplan (model_spec.from_hf_config) and built by transformers, the transformers model's
weights are copied into the executor's, and both give the same logits. This checks the
features the executor builds from the reading (QK-norm, any head width, Q/K/V biases,
sliding windows, GPT-NeoX's partial rotary, parallel residual and fused QKV, DeepSeek's
latent attention, its sigmoid group-limited router with its choice bias and scaled weights,
gpt-oss's attention sinks, clamped SwiGLU and expert biases) mean what the architecture means.

RoPE: transformers rotates the two halves of each head's (rotated) dimensions against each
other, the executor consecutive pairs (Meta's Llama); the copy permutes the query and key
rows (and their biases and QK-norm weights) between the two, as Meta's checkpoint converter
does, which leaves every score the same."""
from __future__ import annotations

import pytest
import torch

from meshplan.executor.model import build_model
from meshplan.simulator.model_spec import from_hf_config

transformers = pytest.importorskip("transformers")

SEQ, BATCH = 24, 2
# small, and the executor's fixed RoPE base and norm epsilon
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, rope_theta=10000.0,
              tie_word_embeddings=False)
CONFIGS = {
    "qwen3": dict(COMMON, model_type="qwen3", num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                  attention_bias=False),
    "qwen2": dict(COMMON, model_type="qwen2", num_key_value_heads=2, rms_norm_eps=1e-5),
    "mistral": dict(COMMON, model_type="mistral", num_key_value_heads=2, rms_norm_eps=1e-5, sliding_window=8),
    # latent attention, queries through a low rank or not; every layer dense (the MoE layers
    # from first_k_dense_replace on), the router greedy softmax; RoPE interleaved as the
    # executor's (rope_interleave)
    "deepseek_v3": dict(COMMON, model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=2,
                        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
                        topk_group=1, scoring_func="softmax", topk_method="greedy", rms_norm_eps=1e-5),
    "deepseek_v3_direct_q": dict(COMMON, model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=None,
                                 kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                 first_k_dense_replace=2, n_routed_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, n_group=1, topk_group=1, scoring_func="softmax",
                                 topk_method="greedy", rms_norm_eps=1e-5),
    # DeepSeek-V3's MoE after a dense first layer: the sigmoid router choosing among the best
    # 2 of 4 groups (each group scored by its best two experts) under the choice bias, the
    # weights scaled by the default routed_scaling_factor (2.5), a shared expert
    "deepseek_v3_moe": dict(COMMON, model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=24,
                            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                            first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, n_group=4, topk_group=2, n_shared_experts=1,
                            rms_norm_eps=1e-5),
    # gpt-oss: a sink logit per head, biases everywhere, every other layer over a window, a
    # biased router and experts with biases running the clamped SwiGLU
    "gpt_oss": dict(COMMON, model_type="gpt_oss", intermediate_size=32, num_key_value_heads=2, head_dim=32,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=8, rms_norm_eps=1e-5,
                    swiglu_limit=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_neox": dict(COMMON, model_type="gpt_neox", num_attention_heads=4, rotary_pct=0.5, hidden_act="gelu_new",
                     layer_norm_eps=1e-5, use_parallel_residual=True),
}


def _pairs(width: int, rotated: int) -> torch.Tensor:
    """Index of the transformers dimension for each executor dimension of one head: the
    first `rotated` interleaved from their two halves, the rest as they are."""
    half = rotated // 2
    order = torch.arange(width)
    order[:rotated] = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    return order


def _heads(t: torch.Tensor, width: int, order: torch.Tensor) -> torch.Tensor:
    """Rows (or entries) of t grouped in heads of `width`, each head's permuted by `order`."""
    return t.reshape(-1, width, *t.shape[1:])[:, order].reshape(t.shape)


def _llama_like(hf: dict, spec) -> dict:
    """The executor's parameters from a Llama-layout transformers state dict."""
    order = _pairs(spec.head_dim, spec.head_dim)
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(spec.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for mine, theirs, rope in (("wq", "q_proj", True), ("wk", "k_proj", True), ("wv", "v_proj", False),
                                   ("wo", "o_proj", False)):
            for kind in ("weight", "bias"):
                key = f"{p}self_attn.{theirs}.{kind}"
                if key in hf:
                    out[f"{q}attention.{mine}.{kind}"] = _heads(hf[key], spec.head_dim, order) if rope else hf[key]
        for norm in ("q_norm", "k_norm"):
            if f"{p}self_attn.{norm}.weight" in hf:
                out[f"{q}attention.{norm}.weight"] = hf[f"{p}self_attn.{norm}.weight"][order]
        if f"{p}self_attn.sinks" in hf:
            out[f"{q}attention.sinks"] = hf[f"{p}self_attn.sinks"]
        out.update({f"{q}attention_norm.weight": hf[f"{p}input_layernorm.weight"],
                    f"{q}ffn_norm.weight": hf[f"{p}post_attention_layernorm.weight"]})
        out.update(_mlp(hf, f"{p}mlp.", f"{q}feed_forward."))
    return out


def _mlp(hf: dict, theirs: str, mine: str) -> dict:
    """A dense MLP's weights, or a DeepSeek MoE's: router, stacked experts (gate and up in one
    [E, 2f, h] tensor there, w1 and w3 [E, h, f] here) and shared experts."""
    dense = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    if f"{theirs}gate_proj.weight" in hf:
        return {f"{mine}{ours}.weight": hf[f"{theirs}{name}.weight"] for name, ours in dense.items()}
    if f"{theirs}router.weight" in hf:  # gpt-oss: [E, in, out] with biases, gate and up interleaved
        up_gate, up_gate_bias = hf[f"{theirs}experts.gate_up_proj"], hf[f"{theirs}experts.gate_up_proj_bias"]
        return {f"{mine}router.weight": hf[f"{theirs}router.weight"], f"{mine}router.bias": hf[f"{theirs}router.bias"],
                f"{mine}experts.w1": up_gate[..., ::2], f"{mine}experts.w3": up_gate[..., 1::2],
                f"{mine}experts.w1_bias": up_gate_bias[..., ::2], f"{mine}experts.w3_bias": up_gate_bias[..., 1::2],
                f"{mine}experts.w2": hf[f"{theirs}experts.down_proj"],
                f"{mine}experts.w2_bias": hf[f"{theirs}experts.down_proj_bias"]}
    gate, up = hf[f"{theirs}experts.gate_up_proj"].transpose(1, 2).chunk(2, dim=-1)
    out = {f"{mine}router.weight": hf[f"{theirs}gate.weight"], f"{mine}experts.w1": gate,
           f"{mine}experts.w3": up, f"{mine}experts.w2": hf[f"{theirs}experts.down_proj"].transpose(1, 2),
           f"{mine}expert_bias": hf[f"{theirs}gate.e_score_correction_bias"]}
    out.update({f"{mine}shared_experts.{ours}.weight": hf[f"{theirs}shared_experts.{name}.weight"]
                for name, ours in dense.items()})
    return out


def _deepseek(hf: dict, spec) -> dict:
    """The executor's parameters from DeepSeek-V3's latent attention and dense MLPs."""
    out = _llama_like({k: v for k, v in hf.items() if ".self_attn." not in k}, spec)
    names = {"q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "q_proj": "wq",
             "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
    for key, value in hf.items():
        if ".self_attn." in key:
            layer, _, rest = key.removeprefix("model.layers.").partition(".self_attn.")
            theirs, _, kind = rest.partition(".")
            out[f"layers.{layer}.attention.{names[theirs]}.{kind}"] = value
    return out


def _gpt_neox(hf: dict, spec) -> dict:
    """The executor's parameters from GPT-NeoX's: its fused query_key_value rows run head by
    head, [q | k | v] of each."""
    hd, heads = spec.head_dim, spec.num_heads
    order = _pairs(hd, int(hd * spec.rotary_pct))
    out = {"tok_embeddings.weight": hf["gpt_neox.embed_in.weight"], "output.weight": hf["lm_head.weight"],
           "norm.weight": hf["gpt_neox.final_layer_norm.weight"], "norm.bias": hf["gpt_neox.final_layer_norm.bias"]}
    for i in range(spec.num_layers):
        p, q = f"gpt_neox.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            fused = hf[f"{p}attention.query_key_value.{kind}"]
            parts = fused.reshape(heads, 3, hd, *fused.shape[1:])
            for j, (name, rope) in enumerate((("wq", True), ("wk", True), ("wv", False))):
                part = parts[:, j].reshape(heads * hd, *fused.shape[1:])
                out[f"{q}attention.{name}.{kind}"] = _heads(part, hd, order) if rope else part
            out.update({f"{q}attention.wo.{kind}": hf[f"{p}attention.dense.{kind}"],
                        f"{q}attention_norm.{kind}": hf[f"{p}input_layernorm.{kind}"],
                        f"{q}ffn_norm.{kind}": hf[f"{p}post_attention_layernorm.{kind}"],
                        f"{q}feed_forward.w1.{kind}": hf[f"{p}mlp.dense_h_to_4h.{kind}"],
                        f"{q}feed_forward.w2.{kind}": hf[f"{p}mlp.dense_4h_to_h.{kind}"]})
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_executor_decoder_gives_transformers_logits(arch):
    config = CONFIGS[arch]
    spec = from_hf_config(config, name=f"tiny-{arch}")
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    mine = build_model(spec, seed=0).eval()
    with torch.no_grad():  # DeepSeek's router and choice bias start at zero, every expert tied: spread them
        for name, param in theirs.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(0, 0.5)
        for name, bias in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                bias.uniform_(0.0, 0.5)
    hf = theirs.state_dict()
    if not spec.router_choice_bias:  # the dense-only configs' unused MoE gates
        hf = {k: v for k, v in hf.items() if not k.endswith("e_score_correction_bias")}
    copy = (_gpt_neox if arch == "gpt_neox" else _deepseek if arch.startswith("deepseek") else _llama_like)(hf, spec)
    assert sorted(copy) == sorted(mine.state_dict())
    mine.load_state_dict(copy)
    tokens = torch.randint(0, config["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mine(tokens), theirs(tokens).logits, rtol=1e-4, atol=1e-4)
