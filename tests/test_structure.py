"""Tests of utils.structure: finding the blocks, the decoder, the text config, the MLP norm and the GLU MLPs of
the course's model families, reading hidden states in hooks, and clear errors where a model has none."""

from __future__ import annotations

import types

import pytest
import torch
from tiny_families import FAMILIES as ATTENTION_FAMILIES
from torch import nn
from transformers import AutoModelForCausalLM

import utils
from utils.architectures import tiny_config
from utils.structure import (
    BLOCK_PATHS,
    decoder,
    decoder_blocks,
    glu_mlps,
    hidden_of,
    mlp_input_norm,
    output_of,
    text_config,
)

FAMILIES = {**ATTENTION_FAMILIES, "gpt2": "distilbert/distilgpt2"}  # the tokenizer fixture: tests/conftest.py


@pytest.fixture(scope="module")
def models(tokenizer):
    built = {}
    for family, model_id in FAMILIES.items():
        torch.manual_seed(0)
        built[family] = AutoModelForCausalLM.from_config(tiny_config(model_id, len(tokenizer))).eval()
    return built


class NoBlocks(nn.Module):
    """A module with no decoder blocks anywhere in BLOCK_PATHS."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.layers = [nn.Linear(4, 4)]  # a plain list, not a ModuleList


def test_decoder_blocks_of_every_family(models):
    for family, model in models.items():
        blocks = decoder_blocks(model)
        expected = model.transformer.h if family == "gpt2" else model.model.layers
        assert blocks is expected and len(blocks) == model.config.num_hidden_layers
    assert BLOCK_PATHS[0] == "model.layers" and "transformer.h" in BLOCK_PATHS
    bare = nn.Module()
    bare.layers = nn.ModuleList([nn.Linear(2, 2)])
    assert decoder_blocks(bare) is bare.layers  # the last path: a bare stack of blocks


def test_decoder_blocks_without_blocks_is_a_clear_error():
    for model in (NoBlocks(), nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="Cannot find the decoder blocks of .*model.model.layers"):
            decoder_blocks(model)


def test_decoder_owns_the_blocks(models):
    for family, model in models.items():
        assert decoder(model) is (model.transformer if family == "gpt2" else model.model)
    bare = nn.Module()
    bare.layers = nn.ModuleList([nn.Linear(2, 2)])
    assert decoder(bare) is bare
    with pytest.raises(ValueError, match="decoder blocks"):
        decoder(NoBlocks())


def test_text_config(models):
    for model in models.values():
        assert text_config(model) is model.config.get_text_config()
    plain = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=8))  # no get_text_config
    assert text_config(plain) is plain.config
    with pytest.raises(AttributeError):
        text_config(nn.Linear(2, 2))  # no config at all


def test_mlp_input_norm(models):
    for family in ("llama", "qwen3"):
        block = decoder_blocks(models[family])[0]
        assert mlp_input_norm(block) is block.post_attention_layernorm
    block = decoder_blocks(models["gemma3"])[0]  # Gemma 3's post_attention_layernorm normalises the attention output
    assert mlp_input_norm(block) is block.pre_feedforward_layernorm
    with pytest.raises(AttributeError):
        mlp_input_norm(decoder_blocks(models["gpt2"])[0])


def test_glu_mlps(models):
    for family in ("llama", "gemma3", "qwen3"):
        model = models[family]
        assert glu_mlps(model) == [block.mlp for block in decoder_blocks(model)]
    with pytest.raises(ValueError, match="no gate_proj.*Use a Llama"):
        glu_mlps(models["gpt2"])
    fused = nn.Module()
    fused.mlp = nn.Module()
    fused.mlp.gate_up_proj = nn.Linear(2, 4)
    with pytest.raises(ValueError, match="gate_up_proj"):
        glu_mlps(fused)


def test_hidden_of_and_output_of_in_hooks(models, tokenizer):
    model = models["llama"]
    block = decoder_blocks(model)[1]
    seen = {}
    handles = [block.register_forward_pre_hook(
                   lambda mod, args, kwargs: seen.__setitem__("in", hidden_of(args, kwargs)), with_kwargs=True),
               block.register_forward_hook(lambda mod, args, output: seen.__setitem__("out", output_of(output)))]
    try:
        with torch.no_grad():
            out = model(**tokenizer(["A short prompt"], return_tensors="pt"), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(seen["in"], out.hidden_states[1])
    torch.testing.assert_close(seen["out"], out.hidden_states[2])


def test_hidden_of_and_output_of_bad_and_plain_inputs():
    x = torch.ones(1, 2, 3)
    assert hidden_of((x,), {}) is x and hidden_of((), {"hidden_states": x}) is x
    assert hidden_of((None,), {"hidden_states": x}) is x
    with pytest.raises(KeyError, match="hidden_states"):
        hidden_of((), {})
    assert output_of(x) is x and output_of((x, None)) is x


def test_old_paths_still_work():
    assert utils.depth.decoder_blocks is decoder_blocks
    assert utils.width.glu_mlps is glu_mlps and utils.glu_mlps is glu_mlps
    assert utils.structure.decoder is decoder
    assert utils.attention.make_cache is utils.kv_cache.make_cache is utils.make_cache
    assert utils.attention.perplexity_through_cache is utils.kv_cache.perplexity_through_cache
    assert utils.attention.cache_bytes is utils.cache_bytes
    assert utils.attention.kv_bytes_per_token is utils.kv_bytes_per_token
