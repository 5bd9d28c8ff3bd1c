"""Parameter counts against published counts; HF config parsing; bad input."""
import json

import pytest

from meshplan.core.errors import ModelError
from meshplan.simulator.model_spec import ZOO, ModelSpec, from_hf_config, load_model


@pytest.mark.parametrize("name,published", [
    ("llama-2-7b", 6_738_415_616),      # HF model card / safetensors index of meta-llama/Llama-2-7b-hf
    ("llama-2-70b", 68_976_648_192),    # meta-llama/Llama-2-70b-hf
    ("llama-3-8b", 8_030_261_248),      # meta-llama/Meta-Llama-3-8B
    ("llama-3-405b", 405_853_388_800),  # meta-llama/Llama-3.1-405B
])
def test_llama_param_counts_exact(name, published):
    assert ZOO[name].num_params() == published


def test_gpt3_175b_param_count():
    # Brown et al. 2020 Table 2.1 reports 175.0B; the architecture gives 174.6B.
    assert ZOO["gpt3-175b"].num_params() == pytest.approx(175.0e9, rel=0.003)


@pytest.mark.parametrize("name,layers,hidden,billions", [
    ("megatron-gpt-1.7b", 24, 2304, 1.7), ("megatron-gpt-18b", 40, 6144, 18.4),
    ("megatron-gpt-146b", 80, 12288, 145.6), ("megatron-gpt-1t", 128, 25600, 1008.0)])
def test_megatron_family_matches_narayanan_closed_form(name, layers, hidden, billions):
    # Narayanan et al. 2021 sec 5.1: P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12lh)), V=51200, s=2048
    l, h, V, s = layers, hidden, 51200, 2048
    # ... plus the final LayerNorm (2h), which the paper's formula leaves out
    closed = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h)) + 2 * h
    assert ZOO[name].num_params() == pytest.approx(closed, rel=1e-9)
    assert ZOO[name].num_params() / 1e9 == pytest.approx(billions, rel=0.03)


def test_llama_config_json(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
              "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "hidden_act": "silu", "model_type": "llama"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model = load_model(str(path))
    assert model.num_params() == 6_738_415_616
    assert model.gated_mlp and model.norm == "rmsnorm" and not model.tied_embeddings


def test_gpt2_config_n_inner_null_means_4h():
    config = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None, "vocab_size": 50257,
              "n_positions": 1024, "activation_function": "gelu_new", "resid_pdrop": 0.1}
    model = from_hf_config(config, name="gpt2")
    assert model.ffn_hidden_size == 3072
    assert model.num_params() == 124_439_808  # GPT-2 small, tied head (HF gpt2 card: 124M)


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100,
                                "n_experts": 8}))
    with pytest.raises(ModelError, match="n_experts"):
        load_model(str(path))


def test_missing_and_malformed_keys():
    with pytest.raises(ModelError, match="num_attention_heads"):
        from_hf_config({"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                        "vocab_size": 100})
    with pytest.raises(ModelError, match="n_layer"):
        from_hf_config({"n_layer": "two", "n_embd": 64, "n_head": 4, "vocab_size": 100})


def test_unknown_model_name_lists_zoo():
    with pytest.raises(ModelError, match="llama-2-7b"):
        load_model("no-such-model")


def test_spec_json_round_trip(tmp_path):
    spec = ZOO["llama-3-70b"]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert load_model(str(path)) == spec
    assert ModelSpec.from_dict(spec.to_dict()) == spec


GPT2_SMALL = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12,
              "vocab_size": 50257, "n_positions": 1024, "n_ctx": 1024}


@pytest.mark.parametrize("tie, expected", [
    (None, 124_439_808),                     # HF's default: tied (openai-community/gpt2, 124M)
    (True, 124_439_808),
    (False, 124_439_808 + 50257 * 768),      # Megatron's usual GPT: a separate LM head
])
def test_gpt2_style_honours_tie_word_embeddings(tie, expected):
    config = dict(GPT2_SMALL, **({} if tie is None else {"tie_word_embeddings": tie}))
    assert from_hf_config(config).num_params() == expected
