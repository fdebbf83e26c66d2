import pytest
import torch

from utils import ARCHITECTURES, build_on_meta, count_parameters, get_spec, real_config, tiny_config

# Published model sizes (model cards), in millions of parameters, and how close our count must be.
PUBLISHED_M = {
    "distilbert/distilgpt2": 82,
    "meta-llama/Llama-3.2-1B": 1236,
    "meta-llama/Llama-3.2-3B": 3213,
    "google/gemma-3-270m": 268,
    "Qwen/Qwen3-0.6B": 596,
    "microsoft/Phi-4-mini-instruct": 3836,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 135,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 362,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1711,
}


@pytest.mark.parametrize("model_id", list(ARCHITECTURES))
def test_meta_model_matches_published_size(model_id):
    model = build_on_meta(model_id)
    assert next(model.parameters()).device == torch.device("meta")
    millions = count_parameters(model) / 1e6
    assert abs(millions - PUBLISHED_M[model_id]) / PUBLISHED_M[model_id] < 0.01


@pytest.mark.parametrize("model_id", list(ARCHITECTURES))
def test_real_config_keeps_table_values(model_id):
    spec, config = get_spec(model_id), real_config(model_id)
    assert config.model_type == spec.model_type
    assert config.num_hidden_layers == spec.num_layers
    assert config.vocab_size == spec.vocab_size
    assert config.tie_word_embeddings == spec.tied_embeddings


@pytest.mark.parametrize("model_id", list(ARCHITECTURES))
def test_tiny_config_keeps_family_depth_and_attention_kind(model_id):
    spec = get_spec(model_id)
    config = tiny_config(model_id, 1024)
    assert config.model_type == spec.model_type
    assert config.num_hidden_layers == spec.num_layers
    assert config.hidden_size == 64
    if spec.model_type != "gpt2":
        kv, heads = config.num_key_value_heads, config.num_attention_heads
        kind = "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"
        assert kind == spec.attention_kind


def test_gemma_layer_types_pattern():
    types = real_config("google/gemma-3-270m").layer_types
    assert types.count("full_attention") == 3 and types[5] == "full_attention" and types[0] == "sliding_attention"


def test_attention_kinds():
    assert get_spec("meta-llama/Llama-3.2-1B").attention_kind == "GQA"
    assert get_spec("google/gemma-3-270m").attention_kind == "MQA"
    assert get_spec("distilbert/distilgpt2").attention_kind == "MHA"


def test_get_spec_is_case_insensitive_and_unknown_lists_models():
    assert get_spec("qwen/qwen3-0.6b").model_id == "Qwen/Qwen3-0.6B"
    with pytest.raises(KeyError, match="Known models"):
        get_spec("nobody/nothing")


def test_tiny_config_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_config("meta-llama/Llama-3.2-1B", 1024, hidden_size=50)


def test_tiny_config_drops_out_of_vocab_special_ids():
    config = tiny_config("distilbert/distilgpt2", 100, special_token_ids={"eos_token_id": 5000, "bos_token_id": 3})
    assert config.eos_token_id is None and config.bos_token_id == 3
