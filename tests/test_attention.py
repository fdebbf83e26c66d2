"""Tests of utils.attention: sublayer importance, attention removal, decode speed (CH08).

The bypass (utils.bypass) is tested in test_bypass.py.

The KV-cache helpers (utils.kv_cache) are tested in test_kv_cache.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_families import FAMILIES, _tiny
from transformers import AutoConfig, AutoModelForCausalLM

from utils import block_importance, load_model, load_texts, make_dataloader, remove_blocks
from utils.architectures import tiny_config
from utils.attention import (
    CONFIG_FIELD,
    RemovedAttention,
    apply_recorded_surgery,
    attention_importance,
    choose_attention_to_remove,
    mlp_importance,
    remove_attention,
    removed_attention,
    sublayer_importance,
)
from utils.kv_cache import cache_bytes, kv_bytes_per_token, make_cache
from utils.structure import decoder_blocks


def _generate(model, prompt, **kwargs):
    return model.generate(**prompt, max_new_tokens=12, do_sample=False, **kwargs)


# --- importance -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_sublayer_importance_matches_hand_computation(family, tokenizer, loader):
    model = _tiny(family, tokenizer)
    scores = sublayer_importance(model, loader, progress=False)
    n = len(decoder_blocks(model))
    assert len(scores["attention"]) == len(scores["mlp"]) == n
    assert scores["block"] == pytest.approx(block_importance(model, loader, progress=False), abs=1e-6)
    # By hand, on one batch: the residual entering the MLP's norm is the stream after the attention.
    batch = next(iter(loader))
    seen = {}
    block = decoder_blocks(model)[3]
    norm = block.pre_feedforward_layernorm if family == "gemma3" else block.post_attention_layernorm
    handles = [block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
               norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0])),
               block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o if torch.is_tensor(o) else o[0]))]
    with torch.no_grad():
        model(**batch, use_cache=False)
    for h in handles:
        h.remove()
    real = batch["attention_mask"].bool()
    cos_att = torch.nn.functional.cosine_similarity(seen["in"], seen["mid"], dim=-1)[real].mean().item()
    cos_mlp = torch.nn.functional.cosine_similarity(seen["mid"], seen["out"], dim=-1)[real].mean().item()
    one = sublayer_importance(model, [batch], progress=False)
    assert one["attention"][3] == pytest.approx(1 - cos_att, abs=1e-5)
    assert one["mlp"][3] == pytest.approx(1 - cos_mlp, abs=1e-5)
    assert attention_importance(model, loader, progress=False) == pytest.approx(scores["attention"])
    assert mlp_importance(model, loader, progress=False) == pytest.approx(scores["mlp"])


def test_sublayer_importance_ignores_padding(tokenizer):
    model = _tiny("llama", tokenizer)
    text = load_texts("wikitext", n=1)[0]
    alone = sublayer_importance(model, make_dataloader([text], tokenizer, batch_size=1, max_length=30),
                                progress=False)
    short = sublayer_importance(model, make_dataloader(["Hi there"], tokenizer, batch_size=1, max_length=30),
                                progress=False)
    both = sublayer_importance(model, make_dataloader([text, "Hi there"], tokenizer, batch_size=2, max_length=30),
                               progress=False)
    n_long = len(tokenizer(text, truncation=True, max_length=30)["input_ids"])
    n_short = len(tokenizer("Hi there")["input_ids"])
    expected = [(a * n_long + b * n_short) / (n_long + n_short) for a, b in zip(alone["attention"], short["attention"])]
    assert both["attention"] == pytest.approx(expected, abs=1e-5)


def test_importance_bad_inputs(tokenizer, loader):
    model = _tiny("llama", tokenizer)
    with pytest.raises(ValueError, match="average"):
        sublayer_importance(model, loader, average="mean", progress=False)
    with pytest.raises(ValueError, match="no real token"):
        sublayer_importance(model, [], progress=False)
    with pytest.raises(ValueError, match="decoder blocks"):
        attention_importance(torch.nn.Linear(2, 2), loader, progress=False)


def test_choose_attention_to_remove(tokenizer, loader):
    model = _tiny("llama", tokenizer)
    scores = attention_importance(model, loader, progress=False)
    chosen = choose_attention_to_remove(model, loader, 4, progress=False)
    assert chosen == sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:4])
    assert 0 not in choose_attention_to_remove(model, None, 4, scores=[0.0] + scores[1:], protect=0)
    remove_attention(model, chosen[:2])
    again = choose_attention_to_remove(model, None, 3, scores=scores)
    assert not set(again) & set(chosen[:2])
    with pytest.raises(ValueError, match="between 1 and"):
        choose_attention_to_remove(model, loader, 0)
    with pytest.raises(ValueError, match="calibration data"):
        choose_attention_to_remove(model, None, 2)
    with pytest.raises(ValueError, match="entries"):
        choose_attention_to_remove(model, None, 2, scores=[0.1, 0.2])


# --- removal: equivalences, cache, round trips --------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("indices", [[2, 5, 7], [0, 1, 5]], ids=["middle", "block0"])
def test_removed_attention_equals_zeroed_o_proj_and_cache_is_exact(family, indices, tokenizer, loader, prompt):
    base = _tiny(family, tokenizer)
    removed = remove_attention(copy.deepcopy(base), indices)
    portable = remove_attention(copy.deepcopy(base), indices, portable=True)
    batch = next(iter(loader))
    with torch.no_grad():
        torch.testing.assert_close(removed(**batch).logits, portable(**batch).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(removed(**batch).logits, base(**batch).logits)
    assert removed_attention(removed) == removed_attention(portable) == sorted(indices)
    blocks = decoder_blocks(removed)
    for i in indices:
        assert isinstance(blocks[i].self_attn, RemovedAttention)
        assert not any(f"layers.{i}.self_attn" in k for k in removed.state_dict())
    kept = [i for i in range(len(blocks)) if i not in indices]
    assert [blocks[i].self_attn.layer_idx for i in kept] == list(range(len(kept)))
    # Greedy generation: with and without cache, dynamic and static cache, all identical.
    no_cache = _generate(removed, prompt, use_cache=False)
    assert torch.equal(_generate(removed, prompt), no_cache)
    assert torch.equal(_generate(removed, prompt, cache_implementation="static"), no_cache)
    static = make_cache(removed, "static", max_cache_len=prompt["input_ids"].shape[1] + 12)
    assert len(static.layers) == len(kept)
    assert torch.equal(_generate(removed, prompt, cache=static), no_cache)
    assert torch.equal(_generate(portable, prompt, use_cache=False), no_cache)
    # The dynamic cache holds exactly L - k entries' worth of keys and values.
    cache = make_cache(removed)
    with torch.no_grad():
        removed(**prompt, cache=cache, use_cache=True)
    full = make_cache(base)
    with torch.no_grad():
        base(**prompt, cache=full, use_cache=True)
    assert len(cache.layers) == len(kept)
    if family != "gemma3":  # (sliding-window entries hold a window, not the whole text)
        n = prompt["input_ids"].shape[1]
        assert cache_bytes(cache) == kv_bytes_per_token(removed) * n
        assert cache_bytes(full) == kv_bytes_per_token(base) * n
        assert cache_bytes(cache) * len(blocks) == cache_bytes(full) * len(kept)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_reload_round_trip(family, tokenizer, loader, tmp_path):
    base = _tiny(family, tokenizer)
    model = remove_attention(copy.deepcopy(base), [0, 3, 6])
    model.save_pretrained(tmp_path / "cut")
    config = AutoConfig.from_pretrained(tmp_path / "cut")
    assert getattr(config, CONFIG_FIELD) == [0, 3, 6]
    assert config.per_layer_config[3].skip == ["attention"]  # transformers' native field names
    fresh = AutoModelForCausalLM.from_config(config).eval()
    apply_recorded_surgery(fresh)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "cut" / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is saved once
    fresh.tie_weights()
    fresh.load_state_dict(model.state_dict(), strict=True)  # the same keys, none missing, none unexpected
    batch = next(iter(loader))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    assert removed_attention(fresh) == [0, 3, 6]
    apply_recorded_surgery(fresh)  # idempotent
    assert removed_attention(fresh) == [0, 3, 6]
    # utils.load_model(folder) re-applies the recorded removal (registered config surgery) before loading the
    # weights strictly: plain from_pretrained (which would warn about the missing attention weights) is not used.
    tokenizer.save_pretrained(tmp_path / "cut")
    from utils import models

    def no_from_pretrained(*args, **kwargs):
        raise AssertionError("load_model used from_pretrained for a model with a recorded removal")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_from_pretrained)
        loaded, _ = load_model(str(tmp_path / "cut"), device="cpu")
    assert removed_attention(loaded) == [0, 3, 6]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    # portable=True: plain from_pretrained, exact logits (and no speed-up: every module is still there).
    portable = remove_attention(copy.deepcopy(base), [0, 3, 6], portable=True)
    portable.save_pretrained(tmp_path / "portable")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "portable").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    assert removed_attention(plain) == [0, 3, 6]
    apply_recorded_surgery(plain)  # nothing to do: the zeroed o_proj is in the weights
    assert not any(isinstance(b.self_attn, RemovedAttention) for b in decoder_blocks(plain))


def test_load_model_refuses_weights_that_do_not_match_the_record(tokenizer, tmp_path):
    model = remove_attention(_tiny("llama", tokenizer), [2, 4])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    setattr(config, CONFIG_FIELD, [2, 4, 5])  # edited after saving: block 5's attention weights are in the file
    config.save_pretrained(tmp_path)
    mismatch = r"do not match the architecture.*unexpected \['model.layers.5.input_layernorm"
    with pytest.raises(ValueError, match=mismatch):
        load_model(str(tmp_path), device="cpu")
    for file in tmp_path.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path), device="cpu")


def test_remove_attention_then_blocks_keeps_records_and_cache(tokenizer, prompt):
    model = remove_attention(_tiny("llama", tokenizer), [3, 5, 9])
    remove_blocks(model, [1, 5])
    assert removed_attention(model) == [2, 7]
    assert getattr(model.config, CONFIG_FIELD) == [2, 7]
    assert sorted(int(k) for k in model.config.to_dict()["per_layer_config"]) == [2, 7]
    blocks = decoder_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in (2, 7)]
    assert [blocks[i].self_attn.layer_idx for i in kept] == list(range(len(kept)))
    assert torch.equal(_generate(model, prompt), _generate(model, prompt, use_cache=False))


def test_remove_attention_bad_inputs(tokenizer):
    model = _tiny("llama", tokenizer)
    n = len(decoder_blocks(model))
    with pytest.raises(ValueError, match="out of range"):
        remove_attention(model, [n])
    with pytest.raises(ValueError, match="out of range"):
        remove_attention(model, [-1])
    with pytest.raises(ValueError, match="more than once"):
        remove_attention(model, [2, 2])
    with pytest.raises(ValueError, match="empty"):
        remove_attention(model, [])
    with pytest.raises(ValueError, match="all"):
        remove_attention(model, list(range(n)))
    remove_attention(model, [2])
    with pytest.raises(ValueError, match="already removed"):
        remove_attention(model, [2, 3])
    with pytest.raises(ValueError, match="portably or not"):
        remove_attention(_tiny_portable(tokenizer), [4])
    with pytest.raises(ValueError, match="Llama/Qwen 3/Gemma 3"):
        remove_attention(AutoModelForCausalLM.from_config(tiny_config("distilbert/distilgpt2", len(tokenizer))), [1])


def _tiny_portable(tokenizer):
    return remove_attention(_tiny("llama", tokenizer), [1], portable=True)


# --- decode speed ---------------------------------------------------------------------------

def test_decode_flops_count_matmuls_and_the_context_term(tokenizer):
    from utils.attention import decode_flops_per_token, ideal_decode_speedup, realised_share
    from utils.speed import matmul_parameters

    base = _tiny("llama", tokenizer)
    config = base.config
    per_attention = 4 * config.num_attention_heads * (getattr(config, "head_dim", None)
                                                      or config.hidden_size // config.num_attention_heads)
    blocks = len(decoder_blocks(base))
    assert decode_flops_per_token(base, 0) == 2 * matmul_parameters(base)
    assert decode_flops_per_token(base, 10) == 2 * matmul_parameters(base) + 10 * per_attention * blocks
    cut = remove_attention(copy.deepcopy(base), [2, 4])
    assert decode_flops_per_token(cut, 10) == 2 * matmul_parameters(cut) + 10 * per_attention * (blocks - 2)
    zeroed = remove_attention(copy.deepcopy(base), [2, 4], portable=True)  # still computes everything
    assert decode_flops_per_token(zeroed, 10) == decode_flops_per_token(base, 10)
    short, long = ideal_decode_speedup(base, cut, 0), ideal_decode_speedup(base, cut, 10_000)
    assert 1 < short < long  # the removed attentions' context term grows with the context
    assert realised_share(1.1, 1.2) == pytest.approx(0.5)
    assert realised_share(0.9, 1.2) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="context must be"):
        decode_flops_per_token(base, -1)
    with pytest.raises(ValueError, match="nothing was removed"):
        realised_share(1.05, 1.0)


def test_measure_decode_reports_each_model_and_rejects_bad_inputs(tokenizer):
    from utils.attention import measure_decode

    base = _tiny("llama", tokenizer)
    cut = remove_attention(copy.deepcopy(base), [1, 3])
    for cache in ("dynamic", "static"):
        out = measure_decode({"base": base, "cut": cut}, tokenizer, ["a short prompt", "another one"], new_tokens=3,
                             runs=2, warmup=0, cache=cache)
        assert out["cache"] == cache and out["batch_size"] == 2 and out["context"] == out["prompt_tokens"] + 1.5
        entry = out["models"]["cut"]
        assert entry["ideal"] > 1 and out["models"]["base"]["ideal"] == 1.0
        assert entry["decode_step_s"] > 0 and entry["decode_step_cpu_s"] >= 0
        assert entry["realised_share"] == pytest.approx((entry["speedup"] - 1) / (entry["ideal"] - 1))
        assert "decode" in out["compare"]["models"]["cut"]["speedup"]
    models = {"base": base, "cut": cut}
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        measure_decode(models, tokenizer, "hi", cache="paged")
    with pytest.raises(ValueError, match="compile=True needs cache='static'"):
        measure_decode(models, tokenizer, "hi", compile=True)
    with pytest.raises(ValueError, match="new_tokens must be"):
        measure_decode(models, tokenizer, "hi", new_tokens=1)
    with pytest.raises(ValueError, match="models is empty"):
        measure_decode({}, tokenizer, "hi")
    with pytest.raises(TypeError, match="not a torch model"):
        measure_decode({"base": base, "cut": "model"}, tokenizer, "hi")
    with pytest.raises(ValueError, match="is not one of the models"):
        measure_decode(models, tokenizer, "hi", base="other")
    with pytest.raises(ValueError, match="non-empty string"):
        measure_decode(models, tokenizer, [])
