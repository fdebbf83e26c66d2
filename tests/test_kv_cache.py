"""Tests of utils.kv_cache: building a cache that fits the model (also after attention removal), measuring
what it holds, perplexity read through it (CH08). Moved from test_attention.py with the module."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_families import _tiny
from transformers import DynamicCache

from utils.attention import remove_attention
from utils.kv_cache import (
    cache_arg,
    cache_bytes,
    cached_blocks,
    fit_cache,
    holds_cache,
    kv_bytes_per_token,
    make_cache,
    perplexity_through_cache,
    prompt_splits,
)

# --- which blocks hold an entry, and a cache that fits ----------------------------------------

def test_cached_blocks_and_cache_arg(tokenizer):
    model = _tiny("llama", tokenizer)
    n = model.config.num_hidden_layers
    assert cached_blocks(model) == list(range(n)) and cache_arg(model) == "cache"
    remove_attention(model, [1, 3])
    assert cached_blocks(model) == [i for i in range(n) if i not in (1, 3)]
    assert not holds_cache(model.model.layers[1]) and holds_cache(model.model.layers[0])
    assert holds_cache(torch.nn.Linear(2, 2))  # no attention marked holds_no_cache: an ordinary block
    with pytest.raises(ValueError, match="decoder blocks"):
        cached_blocks(torch.nn.Linear(2, 2))


def test_cache_built_from_config_is_fitted(tokenizer, prompt):
    model = remove_attention(_tiny("gemma3", tokenizer), [0, 5])
    cache = DynamicCache(config=model.config)  # one entry per block, typed by block
    assert len(cache.layers) == 18
    fit_cache(model, cache)
    assert len(cache.layers) == 16
    assert [layer.is_sliding for layer in cache.layers] == [
        t == "sliding_attention" for i, t in enumerate(model.config.layer_types) if i not in (0, 5)]
    with torch.no_grad():
        out = model(**prompt, use_cache=True)  # the decoder's pre-hook builds and fits the cache
    assert len(out.cache.layers) == 16


# --- what it holds, and perplexity through it ---------------------------------------------------

def test_cache_bytes_of_every_kind(tokenizer, prompt):
    model = _tiny("llama", tokenizer)
    n = prompt["input_ids"].shape[1]
    per_token = kv_bytes_per_token(model)
    dims = model.config
    assert per_token == 2 * dims.num_hidden_layers * dims.num_key_value_heads * dims.head_dim * 4
    sizes = {}
    for kind, kwargs in [("dynamic", {}), ("static", {"max_cache_len": 50}), ("quantized", {"backend": "fp8"})]:
        cache = make_cache(model, kind, **kwargs)
        with torch.no_grad():
            model(**prompt, cache=cache, use_cache=True)
        sizes[kind] = cache_bytes(cache)
    assert sizes["dynamic"] == per_token * n
    # allocated up front for 50 tokens (plus a position counter of a few bytes per entry)
    assert per_token * 50 <= sizes["static"] <= per_token * 50 + 16 * dims.num_hidden_layers
    # fp8: one byte per value plus one float32 scale per tensor
    assert sizes["quantized"] == per_token * n // 4 + 2 * 4 * dims.num_hidden_layers
    with pytest.raises(ValueError, match="max_cache_len"):
        make_cache(model, "static")
    with pytest.raises(ValueError, match="cache kind"):
        make_cache(model, "paged")
    with pytest.raises(TypeError, match="Cache"):
        cache_bytes([torch.zeros(3)])


def test_perplexity_through_cache(tokenizer, loader):
    model = _tiny("qwen3", tokenizer)
    # Through an exact cache, token by token == one forward pass scored on the same tokens.
    prefix = 8
    through = perplexity_through_cache(model, loader, prefix_tokens=prefix, progress=False)
    static = perplexity_through_cache(model, loader, prefix_tokens=prefix, cache="static", progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                seq = ids[mask.bool()][None]
                logits = model(input_ids=seq, use_cache=False).logits[0, prefix - 1:-1]
                nll += torch.nn.functional.cross_entropy(logits, seq[0, prefix:], reduction="sum").item()
                count += seq.shape[1] - prefix
    assert through == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert static == pytest.approx(through, rel=1e-4)
    one_by_one = perplexity_through_cache(model, loader, prefix_tokens=prefix, batch_size=1, per_text=True,
                                          progress=False)
    assert one_by_one["perplexity"] == pytest.approx(through, rel=1e-4)
    assert sum(one_by_one["tokens"]) == count and sum(one_by_one["nll"]) == pytest.approx(nll, rel=1e-4)
    # a share of each text as the prompt: the prompts differ in length
    half = perplexity_through_cache(model, loader, prefix_tokens=0.5, per_text=True, progress=False)
    lengths = [int(m.sum()) for b in loader for m in b["attention_mask"]]
    assert half["tokens"] == [n - round(0.5 * n) for n in lengths]
    fp8 = perplexity_through_cache(model, loader, prefix_tokens=prefix, cache="quantized", backend="fp8",
                                   progress=False)
    assert fp8 != through and fp8 == pytest.approx(through, rel=0.05)
    with pytest.raises(ValueError, match="prefix_tokens"):
        perplexity_through_cache(model, loader, prefix_tokens=0)
    with pytest.raises(ValueError, match="longer than"):
        perplexity_through_cache(model, loader, prefix_tokens=10_000)
    with pytest.raises(ValueError, match="cache="):
        perplexity_through_cache(model, loader, prefix_tokens=4, cache="paged")
    with pytest.raises(ValueError, match="share"):
        perplexity_through_cache(model, loader, prefix_tokens=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity_through_cache(model, loader, prefix_tokens=4, batch_size=0)


def test_prompt_splits(tokenizer, loader):
    splits = prompt_splits(loader, 8, "cpu")
    lengths = [int(m.sum()) for b in loader for m in b["attention_mask"]]
    assert [n for _, n in splits] == [8] * len(lengths) and [s.numel() for s, _ in splits] == lengths
    assert [n for _, n in prompt_splits(loader, 0.5, "cpu")] == [max(1, round(0.5 * n)) for n in lengths]
    with pytest.raises(ValueError, match="share"):
        prompt_splits(loader, 1.0, "cpu")
    with pytest.raises(ValueError, match="positive integer"):
        prompt_splits(loader, True, "cpu")
    with pytest.raises(ValueError, match="longer than"):
        prompt_splits(loader, 10_000, "cpu")
