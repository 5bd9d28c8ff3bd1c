"""Parameter counts against published counts; HF config parsing (the real configs of
tests/data/hf_configs); bad input."""
import json
from pathlib import Path

import pytest

from meshplan.cli import main
from meshplan.core.errors import ModelError
from meshplan.simulator.model_spec import ZOO, LayerKind, ModelSpec, from_hf_config, load_model, read_model


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


PUBLISHED_MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "published" / "models"


@pytest.mark.parametrize("name,published", [
    ("mpt-7b", 6_658_859_008), ("mpt-13b", 12_853_954_560), ("mpt-30b", 29_975_214_080),
    ("mpt-70b", 64_862_437_376)])
def test_published_mpt_configs_read_as_the_benchmarked_mptconfig(name, published):
    # llm-foundry scripts/train/benchmarking/README.md at 5e85bd62d, NumParams at seq 2048;
    # its pretrain YAMLs keep MPTConfig's defaults there: learned positions (alibi off),
    # biases (no_bias False), tied embeddings, and no dropout (resid, emb and attn pdrop 0.0)
    spec = read_model(str(PUBLISHED_MODELS / f"{name}.json")).spec
    assert spec.num_params() == published
    assert (spec.dropout, spec.bias, spec.position_embedding, spec.tied_embeddings) == (
        False, True, "learned", True)


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


CONFIGS = Path(__file__).parent / "data" / "hf_configs"


def _real(name: str) -> ModelSpec:
    return load_model(str(CONFIGS / name))


def test_mixtral_is_read_as_experts_never_dense():
    # Mistral AI's Mixtral-8x7B announcement: 46.7B total, 12.9B used per token
    model = _real("mixtral-8x7b.json")
    assert model.num_params() / 1e9 == pytest.approx(46.7, abs=0.05)
    assert model.num_params(active=True) / 1e9 == pytest.approx(12.9, abs=0.05)
    assert model.layer_kinds() == ((LayerKind(moe=True), 32),)
    assert (model.num_experts, model.experts_per_token, model.moe_ffn_hidden_size) == (8, 2, 14336)


def test_deepseek_v3_dense_then_moe_layers_with_latent_attention():
    # DeepSeek-V3 technical report sec 4.2: 671B total, 37B activated per token (without the
    # multi-token-prediction module, which Hugging Face's model leaves out as well)
    model = _real("deepseek-v3.json")
    assert model.layer_kinds() == ((LayerKind(), 3), (LayerKind(moe=True), 58))
    assert model.num_params() == 671_026_404_352
    assert model.num_params(active=True) / 1e9 == pytest.approx(37.5, abs=0.1)
    assert (model.kv_lora_rank, model.q_lora_rank, model.head_dim, model.value_head_dim) == (512, 1536, 192, 128)
    assert (model.num_shared_experts, model.shared_expert_ffn_size, model.router) == (1, 2048, "sigmoid")


def test_gpt_oss_reads_as_biased_experts_in_every_layer():
    # gpt-oss model card (OpenAI 2025) Table 1: gpt-oss-20b has 20.91B parameters, 3.61B
    # active per token, counting the unembedding but not the embedding
    model = _real("gpt-oss-20b.json")
    assert model.num_params() / 1e9 == pytest.approx(20.91, abs=0.005)
    assert (model.num_params(active=True) - model.embedding_params()) / 1e9 == pytest.approx(3.61, abs=0.005)
    assert model.layer_kinds() == ((LayerKind(local=True, moe=True), 12), (LayerKind(moe=True), 12))
    assert (model.num_experts, model.experts_per_token, model.sliding_window, model.head_dim) == (32, 4, 128, 64)
    assert model.bias and model.router_bias and model.attn_sinks and model.swiglu_limit == 7.0


def test_deepseek_v2_lite_softmax_router_without_query_low_rank():
    # DeepSeek-V2 paper (arXiv 2405.04434) appendix B: V2-Lite has 15.7B parameters, 2.4B activated
    # (the embedding not counted)
    model = _real("deepseek-v2-lite.json")
    assert model.num_params() / 1e9 == pytest.approx(15.7, abs=0.05)
    assert (model.num_params(active=True) - model.embedding_params()) / 1e9 == pytest.approx(2.4, abs=0.06)
    assert model.layer_kinds() == ((LayerKind(), 1), (LayerKind(moe=True), 26))
    assert (model.router, model.norm_topk_prob, model.q_lora_rank, model.num_shared_experts) == ("softmax", False, 0, 2)


def test_gpt_oss_and_deepseek_v2_unmodelled_keys_in_one_error():
    oss = {"model_type": "gpt_oss", "attention_bias": False, "swiglu_limit": "7", "frobnicate": 1,
           "layer_types": ["sliding_attention", "chunked_attention"]}
    with pytest.raises(ModelError) as err:
        from_hf_config(oss, source="c.json")
    assert {f for f, _, _ in err.value.issues} == {
        "c.json:attention_bias", "c.json:swiglu_limit", "c.json:frobnicate", "c.json:layer_types"}
    v2 = {"model_type": "deepseek_v2", "mlp_bias": True, "attention_bias": True}
    with pytest.raises(ModelError) as err:  # no default for num_experts_per_tok: never read as dense
        from_hf_config(v2, source="c.json")
    assert {f for f, _, _ in err.value.issues} == {
        "c.json:mlp_bias", "c.json:attention_bias", "c.json:num_experts_per_tok"}


@pytest.mark.parametrize("name,window,local", [
    ("mistral-7b-v0.1.json", 4096, 32),   # every layer slides over 4096 keys
    ("mistral-nemo-12b.json", None, 0),   # "sliding_window": null
    ("qwen2-7b.json", None, 0),           # use_sliding_window false: the window is not used
    ("phi3-mini.json", 2047, 32),
    ("gemma2-9b.json", 4096, 21),         # even layers local, odd global
    ("gemma3-12b-text.json", 1024, 40),   # five local layers to each global one
])
def test_sliding_window_layers(name, window, local):
    model = _real(name)
    assert model.sliding_window == window and len(model.local_layers) == local


def test_explicit_head_dim_and_qwen_biases():
    nemo = _real("mistral-nemo-12b.json")
    assert nemo.head_dim == 128 and nemo.hidden_size // nemo.num_heads == 160
    qwen2, qwen3 = _real("qwen2-7b.json"), _real("qwen3-8b.json")
    assert qwen2.qkv_bias and not qwen2.out_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and not qwen3.qkv_bias


def test_every_unmodelled_and_unknown_key_in_one_error():
    config = {"model_type": "llama", "mlp_bias": True, "frobnicate": 1, "hidden_act": "relu",
              "num_hidden_layers": 0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(ModelError) as err:
        from_hf_config(config, source="c.json")
    fields = {field for field, _, _ in err.value.issues}
    assert fields == {"c.json:mlp_bias", "c.json:frobnicate", "c.json:hidden_act", "c.json:num_hidden_layers"}


def test_ignored_keys_are_listed_once():
    # bookkeeping (token ids, dtype, eps, versions) is accepted silently
    assert read_model(str(CONFIGS / "llama-3.1-8b.json")).ignored_keys == (
        "pretraining_tp", "rope_scaling", "rope_theta")
    assert read_model("llama-2-7b").ignored_keys == ()


def test_sizes_a_config_leaves_out_are_its_architectures_defaults_and_said(tmp_path, capsys):
    """transformers fills a key a config leaves out from the model type's config class, and
    so does meshplan, saying which sizes it took so (a released config that has them all
    gets no such note)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 8}))
    loaded = read_model(str(path))
    assert dict(loaded.defaulted) == {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000,
                                      "max_position_embeddings": 2048}
    assert (loaded.spec.hidden_size, loaded.spec.ffn_hidden_size, loaded.spec.vocab_size) == (4096, 11008, 32000)
    assert read_model(str(CONFIGS / "llama-3.1-8b.json")).defaulted == ()
    assert main(["simulate", "--model", str(path), "--gpus", "1", "--global-batch", "1", "--seq-len", "128",
                 "--json"]) == 0
    assert "hidden_size 4096, intermediate_size 11008, max_position_embeddings 2048" in capsys.readouterr().err


def test_cli_prints_parameters_and_the_ignored_keys_once(capsys):
    mixtral = str(CONFIGS / "mixtral-8x7b.json")
    flags = ["--model", mixtral, "--hardware", "h100-80gb", "--gpus", "64", "--global-batch", "256",
             "--seq-len", "4096", "--json"]
    assert main(["simulate", *flags, "--tp", "8", "--pp", "2", "--zero", "3"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result["params"], result["active_params"]) == (46_702_792_704, 12_879_925_248)
    assert err.count("\n") == 1 and "rope_theta" in err and "router_aux_loss_coef" in err
    assert main(["plan", *flags, "--top", "1"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans["params"] == plans["plans"][0]["params"] == 46_702_792_704
    serve = ["--mode", "inference", "--prompt-len", "512", "--gen-len", "64"]
    assert main(["simulate", *flags[:6], "--json", "--tp", "8", "--batch", "8", *serve]) == 0
    assert json.loads(capsys.readouterr().out)["active_params"] == 12_879_925_248


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(ModelError, match="mixtral"):
        from_hf_config({"model_type": "mamba", "hidden_size": 64})


@pytest.mark.parametrize("name", ["deepseek-v3.json", "gemma2-9b.json", "qwen2-57b-a14b.json", "gpt-oss-20b.json"])
def test_new_fields_json_round_trip(tmp_path, name):
    spec = _real(name)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert load_model(str(path)) == spec


@pytest.mark.parametrize("change,field", [
    ({"local_layers": (0,)}, "sliding_window"),
    ({"num_experts": 4, "experts_per_token": 5, "moe_ffn_hidden_size": 64}, "experts_per_token"),
    ({"dense_layers": (0,)}, "dense_layers"),
    ({"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}, "num_kv_heads"),
    ({"num_heads": 3, "num_kv_heads": 3}, "num_heads"),
    ({"router_bias": True}, "router_bias"),
    ({"swiglu_limit": float("nan")}, "swiglu_limit"),
    ({"swiglu_limit": 7.0, "gated_mlp": False}, "swiglu_limit"),
])
def test_inconsistent_spec_refused(change, field):
    base = dict(name="m", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=128, vocab_size=100, max_seq_len=64)
    with pytest.raises(ModelError) as err:
        ModelSpec(**{**base, **change})
    assert err.value.field == field



def test_every_inconsistency_of_a_spec_in_one_error():
    """The checks that follow the sizes report together, not the first of them alone."""
    with pytest.raises(ModelError) as err:
        ModelSpec("m", 2, 250, 8, 3, 128, 100, 64, activation="relu", rotary_pct=2.0, router_bias=True)
    assert [field for field, _, _ in err.value.issues] == [
        "num_heads", "num_kv_heads", "activation", "rotary_pct", "router_bias"]


def test_a_configs_key_and_model_problems_in_one_error_by_its_keys():
    """An unknown key, an unmodelled feature and KV heads that do not divide the heads: one
    error naming the three keys of the config; a bad size alone while it stands in for 1."""
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 100, "num_key_value_heads": 3,
              "frobnicate": 1, "hidden_act": "relu"}
    with pytest.raises(ModelError) as err:
        from_hf_config(config, source="c.json")
    assert {field for field, _, _ in err.value.issues} == {
        "c.json:frobnicate", "c.json:hidden_act", "c.json:num_key_value_heads"}
    with pytest.raises(ModelError) as err:
        from_hf_config({**config, "num_attention_heads": "four", "hidden_act": "silu", "frobnicate": None},
                       source="c.json")
    assert {field for field, _, _ in err.value.issues} == {"c.json:num_attention_heads", "c.json:frobnicate"}


@pytest.mark.parametrize("model_type", ["mistral", None])
def test_experts_under_a_dense_model_type_are_refused_not_dropped(model_type):
    config = json.loads((CONFIGS / "mixtral-8x7b.json").read_text())
    config.pop("model_type")
    if model_type:
        config["model_type"] = model_type
    with pytest.raises(ModelError) as err:
        from_hf_config(config, source="c.json")
    assert {"c.json:num_local_experts", "c.json:num_experts_per_tok"} <= {f for f, _, _ in err.value.issues}
