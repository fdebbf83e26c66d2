"""Tests of utils.bypass: Adaptive Attention Bypass decided after or during the prefill, its calibration to a
budget per decoded token, and the one-pass quality evaluation that stands in for reading through the cache (CH08)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tiny_families import FAMILIES, _tiny

from utils.attention import decode_flops_per_token, ideal_decode_speedup, measure_decode, remove_attention
from utils.bypass import (
    PromptSignal,
    ScorePredictor,
    attention_bypass,
    calibrate_scale,
    calibrate_threshold,
    check_weights,
    complexity_score,
    decisions,
    default_protected,
    embedding_spread,
    matched_counts,
    perplexity_with_skips,
    prompt_attention_scores,
    ranked_rule,
)
from utils.kv_cache import cache_bytes, make_cache, perplexity_through_cache
from utils.structure import decoder_blocks


def _generate(model, prompt, **kwargs):
    return model.generate(**prompt, max_new_tokens=12, do_sample=False, **kwargs)


def _fixed(blocks):
    return lambda signal: list(blocks)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bypass_that_skips_nothing_is_the_base_model(family, tokenizer, prompt):
    model = _tiny(family, tokenizer)
    reference = _generate(model, prompt)
    with attention_bypass(model, threshold=0.0) as bypass:  # scores are >= 0: nothing is below 0
        assert torch.equal(_generate(model, prompt), reference)
        assert torch.equal(_generate(model, prompt, cache_implementation="static"), reference)
    assert len(bypass.history) == 2 and bypass.mean_skipped == 0
    assert bypass.history[0]["prompt_tokens"] == prompt["input_ids"].shape[1]
    assert 0 < bypass.history[0]["spread"] <= 2
    # the hooks and patched forwards are gone after the block
    assert torch.equal(_generate(model, prompt), reference)
    assert all("forward" not in vars(b.self_attn) for b in decoder_blocks(model))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bypass_after_prefill_skips_with_zero_contribution(family, tokenizer, prompt):
    model = _tiny(family, tokenizer)
    protected = default_protected(model)
    assert 0 in protected
    if family == "gemma3":
        assert 5 in protected  # the first full-attention block
    seen = []
    block = decoder_blocks(model)[3]
    norm = block.pre_feedforward_layernorm if family == "gemma3" else block.post_attention_layernorm
    handles = [block.register_forward_pre_hook(lambda m, a: seen.append(("in", a[0].clone()))),
               norm.register_forward_pre_hook(lambda m, a: seen.append(("mid", a[0].clone())))]
    try:
        with attention_bypass(model, rule=_fixed([0, 3, 4])) as bypass:
            seen.clear()
            out = _generate(model, prompt)
    finally:
        for h in handles:
            h.remove()
    assert bypass.history[-1]["skipped"] == [3, 4]  # block 0 is protected
    # prefill: the attention of block 3 changes the stream; decode: it adds exactly zero
    assert not torch.equal(seen[0][1], seen[1][1])
    decode = seen[2:]
    assert decode and all(torch.equal(decode[i][1], decode[i + 1][1]) for i in range(0, len(decode), 2))
    assert out.shape[1] == prompt["input_ids"].shape[1] + 12
    with attention_bypass(model, rule=_fixed([3, 4])):
        skipped = _generate(model, prompt, return_dict_in_generate=True, output_logits=True).logits
    full = _generate(model, prompt, return_dict_in_generate=True, output_logits=True).logits
    torch.testing.assert_close(skipped[0], full[0])  # the first new token comes from the (full) prefill
    assert not torch.allclose(skipped[1], full[1])


def _prefill_cache(model, ids, **bypass):
    kv = make_cache(model)
    with attention_bypass(model, **bypass) as state:
        model(input_ids=ids, use_cache=True, cache=kv)
    return kv, state


def test_decision_after_prefill_frees_the_skipped_prompt_cache(tokenizer, prompt):
    model = _tiny("llama", tokenizer)
    ids = prompt["input_ids"]
    full, _ = _prefill_cache(model, ids, threshold=0.0)
    kept, _ = _prefill_cache(model, ids, rule=_fixed([2, 5]), free_cache=False)
    freed, state = _prefill_cache(model, ids, rule=_fixed([2, 5]))
    assert state.history[0]["decided_at"] == len(decoder_blocks(model))
    assert cache_bytes(kept) == cache_bytes(full)
    n = len(decoder_blocks(model))
    assert cache_bytes(freed) == cache_bytes(full) * (n - 2) // n
    assert freed.layers[2].get_seq_length() == 0 and freed.layers[3].get_seq_length() == ids.shape[1]
    # freeing changes nothing the model computes: nothing reads those entries again
    with attention_bypass(model, rule=_fixed([2, 5])):
        with_free = _generate(model, prompt)
    with attention_bypass(model, rule=_fixed([2, 5]), free_cache=False):
        assert torch.equal(_generate(model, prompt), with_free)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decision_before_prefill_equals_static_removal_and_never_allocates(family, tokenizer, prompt):
    model = _tiny(family, tokenizer)
    chosen = [2, 3] if family != "gemma3" else [2, 7]
    static = remove_attention(copy.deepcopy(model), chosen)
    reference = _generate(static, prompt)
    with attention_bypass(model, rule=_fixed(chosen), decide_after=0) as state:
        assert torch.equal(_generate(model, prompt), reference)  # prefill and decode skip: the static model
        assert torch.equal(_generate(model, prompt, use_cache=False), reference)
    assert state.history[0]["skipped"] == chosen and state.history[0]["decided_at"] == 0
    assert all(math.isnan(s) for s in state.history[0]["scores"])
    kv, _ = _prefill_cache(model, prompt["input_ids"], rule=_fixed(chosen), decide_after=0)
    assert all(kv.layers[i].get_seq_length() == 0 for i in chosen)


def test_decision_during_prefill_sees_the_first_blocks_only(tokenizer, prompt):
    model = _tiny("llama", tokenizer)
    seen = []

    def rule(signal):
        seen.append(signal)
        return [1, 2, 4, 5]  # 1 and 2 already ran: they cannot be skipped any more
    kv, state = _prefill_cache(model, prompt["input_ids"], rule=rule, decide_after=3)
    assert seen[0].decided_at == 3 and seen[0].tokens == prompt["input_ids"].shape[1]
    assert all(math.isfinite(s) for s in seen[0].scores[:3]) and all(math.isnan(s) for s in seen[0].scores[3:])
    assert state.history[0]["skipped"] == [4, 5]
    assert kv.layers[4].get_seq_length() == 0 and kv.layers[2].get_seq_length() > 0


def test_bad_bypass_arguments(tokenizer):
    model = _tiny("llama", tokenizer)
    n = len(decoder_blocks(model))
    with pytest.raises(ValueError, match="exactly one"):
        with attention_bypass(model):
            pass
    with pytest.raises(ValueError, match="threshold"):
        with attention_bypass(model, threshold=float("nan")):
            pass
    with pytest.raises(ValueError, match="decide_after"):
        with attention_bypass(model, rule=_fixed([]), decide_after=n + 1):
            pass
    with pytest.raises(ValueError, match="needs every score"):
        with attention_bypass(model, threshold=0.1, decide_after=2):
            pass
    with pytest.raises(ValueError, match="protect"):
        with attention_bypass(model, threshold=0.1, protect=[99]):
            pass


def test_threshold_calibration_with_removed_attention_and_per_token_weights(tokenizer, loader):
    model = remove_attention(_tiny("llama", tokenizer), [4])
    rows = prompt_attention_scores(model, loader, prefix_tokens=8, progress=False)
    assert len(rows) == 4 and math.isnan(rows[0]["scores"][4])
    assert all(r["prompt_tokens"] == 8 and r["scored_tokens"] > 0 for r in rows)
    protect = default_protected(model)
    threshold = calibrate_threshold(rows, 3, protect=protect)
    counts = [sum(1 for i, s in enumerate(r["scores"]) if i not in protect and s < threshold) for r in rows]
    assert sum(counts) / len(counts) == 3
    with attention_bypass(model, threshold=threshold) as bypass:
        perplexity_through_cache(model, loader, prefix_tokens=8, batch_size=1, progress=False)
    assert bypass.mean_skipped == 3
    assert all(4 not in h["skipped"] and 0 not in h["skipped"] for h in bypass.history)
    # weighted by decoded tokens: a prompt that is followed by more tokens counts more
    weights = [1, 1, 1, 97]
    weighted = calibrate_threshold(rows, 3, protect=protect, weights=weights)
    counts = [sum(1 for i, s in enumerate(r["scores"]) if i not in protect and s < weighted) for r in rows]
    assert abs(np.average(counts, weights=weights) - 3) < 0.5
    assert calibrate_threshold(rows, 0, protect=protect) < min(min(s for s in r["scores"] if s == s) for r in rows)
    with pytest.raises(ValueError, match="mean_skipped"):
        calibrate_threshold(rows, 99, protect=protect)
    with pytest.raises(ValueError, match="weights"):
        calibrate_threshold(rows, 3, protect=protect, weights=[1, 2])
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold([], 3, protect=protect)


def test_calibrate_scale_and_ranked_rule():
    lengths = np.array([10, 20, 30, 40])
    scale = calibrate_scale(lengths, 2, limit=6)
    assert np.clip(np.round(scale * lengths), 0, 6).mean() == pytest.approx(2)
    weighted = calibrate_scale(lengths, 2, limit=6, weights=[0, 0, 0, 1])
    assert np.clip(np.round(weighted * 40), 0, 6) == 2
    rule = ranked_rule([5, 2, 7], lambda s: s.tokens / 10)
    assert rule(PromptSignal(tokens=20, scores=[], spread=0.0, decided_at=0)) == [5, 2]
    assert rule(PromptSignal(tokens=99, scores=[], spread=0.0, decided_at=0)) == [5, 2, 7]
    with pytest.raises(ValueError, match="non-negative"):
        calibrate_scale([-1, 2], 1, limit=3)
    with pytest.raises(ValueError, match="mean_skipped"):
        calibrate_scale(lengths, 7, limit=6)


def test_matched_counts_reach_the_realised_budget_per_token():
    tokens = [5, 40, 12, 33, 8, 21, 17, 50]
    counts = matched_counts(tokens, 6.4, limit=10)
    assert set(counts) <= {6, 7}
    assert np.average(counts, weights=tokens) == pytest.approx(6.4, abs=0.2)
    assert matched_counts(tokens, 6.4, limit=10, seed=0) == counts  # seeded
    assert matched_counts(tokens, 3, limit=10) == [3] * len(tokens)
    assert matched_counts(tokens, 10, limit=10) == [10] * len(tokens)
    assert matched_counts([1, 1, 1, 1], 2.5, limit=4).count(3) == 2  # equal weights: half get one more
    with pytest.raises(ValueError, match="mean_skipped"):
        matched_counts(tokens, 11, limit=10)
    with pytest.raises(ValueError, match="limit"):
        matched_counts(tokens, 1, limit=-1)
    with pytest.raises(ValueError, match="weights"):
        matched_counts([], 1, limit=3)


def test_check_weights_gives_ones_or_the_weights_and_rejects_bad_ones():
    np.testing.assert_array_equal(check_weights(None, 3), np.ones(3))
    np.testing.assert_array_equal(check_weights([0, 2, 5], 3), np.array([0.0, 2.0, 5.0]))
    for bad in ([1, 2], [1, -1, 2], [0, 0, 0], [1, float("nan"), 1], [1, float("inf"), 1]):
        with pytest.raises(ValueError, match="finite, non-negative number per prompt"):
            check_weights(bad, 3)
    for bad_n in (-1, 2.0, True):
        with pytest.raises(ValueError, match="number of prompts"):
            check_weights(None, bad_n)
    with pytest.raises(ValueError, match="weights"):  # no prompt at all: nothing to weigh
        check_weights(None, 0)
    rows = [[0.1, 0.5, 0.3], [0.2, 0.4, 0.6]]
    with pytest.raises(ValueError, match="finite"):  # a NaN weight used to give a NaN threshold
        calibrate_threshold(rows, 1, protect=(), weights=[1, float("nan")])


def test_embedding_spread_and_complexity_score():
    torch.manual_seed(0)
    x = torch.randn(7, 16)
    unit = torch.nn.functional.normalize(x, dim=-1)
    cos = unit @ unit.T
    brute = 1 - (cos.sum() - cos.diagonal().sum()) / (7 * 6)
    assert embedding_spread(x) == pytest.approx(float(brute), abs=1e-6)
    assert embedding_spread(x[:1]) == 0.0
    assert embedding_spread(x[:1].repeat(4, 1)) == pytest.approx(0.0, abs=1e-6)
    short = complexity_score(PromptSignal(tokens=5, scores=[], spread=0.5, decided_at=0))
    long = complexity_score(PromptSignal(tokens=500, scores=[], spread=0.5, decided_at=0))
    assert 0 <= short < long <= 1
    assert complexity_score(PromptSignal(tokens=10**6, scores=[], spread=2.0, decided_at=0)) == 1.0
    with pytest.raises(ValueError, match="length_weight"):
        complexity_score(PromptSignal(tokens=5, scores=[], spread=0.5, decided_at=0), length_weight=2)


def test_score_predictor_learns_a_linear_relation_and_decides_early():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        first = rng.uniform(0.1, 0.5)
        rows.append({"prompt_tokens": int(rng.integers(5, 50)), "spread": 0.3,
                     "scores": [0.9, first, 2 * first, 0.5 - first + 0.01 * rng.standard_normal()]})
    predictor = ScorePredictor(early=2).fit(rows)
    signal = PromptSignal(tokens=20, scores=[0.9, 0.2, float("nan"), float("nan")], spread=0.3, decided_at=2)
    predicted = predictor.predict(signal)
    assert predicted[:2] == [0.9, 0.2]
    assert predicted[2] == pytest.approx(0.4, abs=1e-2) and predicted[3] == pytest.approx(0.3, abs=3e-2)
    assert predictor.rule(0.35)(signal) == [3]
    with pytest.raises(RuntimeError, match="fit"):
        ScorePredictor(early=1).predict(signal)
    with pytest.raises(ValueError, match="early"):
        ScorePredictor(early=-1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_one_pass_evaluation_equals_reading_through_the_cache(family, tokenizer, loader):
    model = _tiny(family, tokenizer)
    protect = default_protected(model)
    ranking = [i for i in (6, 3, 2, 4, 1) if i not in protect]
    rule = ranked_rule(ranking, lambda s: int(s.spread * 1e4) % 4)  # a different count per prompt
    prefix = 0.5
    for decide_after, skip_from in ((None, "decode"), (0, "all")):
        with attention_bypass(model, rule=rule, decide_after=decide_after) as state:
            slow = perplexity_through_cache(model, loader, prefix_tokens=prefix, batch_size=1, per_text=True,
                                            decode_first=True, progress=False)
        skips = [h["skipped"] for h in state.history]
        assert len({len(s) for s in skips}) > 1  # the texts really skip different amounts
        fast = perplexity_with_skips(model, loader, prefix_tokens=prefix, skips=skips, skip_from=skip_from,
                                     progress=False)
        assert fast["tokens"] == slow["tokens"]
        np.testing.assert_allclose(fast["nll"], slow["nll"], rtol=1e-4, atol=1e-3)
        rows = prompt_attention_scores(model, loader, prefix_tokens=prefix, decode_first=True, progress=False)
        assert decisions(rows, rule, protect=protect, decided_at=decide_after) == skips
    nothing = perplexity_with_skips(model, loader, prefix_tokens=prefix, skips=[[]] * len(skips), progress=False)
    base = perplexity_through_cache(model, loader, prefix_tokens=prefix, per_text=True, decode_first=True,
                                    progress=False)
    np.testing.assert_allclose(nothing["nll"], base["nll"], rtol=1e-4, atol=1e-3)
    assert all(b > 0 for b in base["cache_bytes"])
    with pytest.raises(ValueError, match="one list of blocks per text"):
        perplexity_with_skips(model, loader, prefix_tokens=prefix, skips=[[]])
    with pytest.raises(ValueError, match="skip_from"):
        perplexity_with_skips(model, loader, prefix_tokens=prefix, skips=skips, skip_from="prefill")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity_through_cache(model, loader, prefix_tokens=1, decode_first=True, progress=False)


def test_bypass_decode_timing_with_prefill_once(tokenizer):
    base = _tiny("llama", tokenizer)
    skip = [2, 3, 5]
    assert decode_flops_per_token(base, 50, skip=skip) == decode_flops_per_token(
        remove_attention(copy.deepcopy(base), skip), 50)
    bypassed = copy.deepcopy(base)
    static = remove_attention(copy.deepcopy(base), skip)
    ideal = ideal_decode_speedup(base, static, 20)
    with attention_bypass(bypassed, rule=_fixed(skip)) as state:
        out = measure_decode({"base": base, "bypass": bypassed, "static": static}, tokenizer,
                             ["a prompt of some length for the test"], new_tokens=4, runs=2, warmup=0,
                             prefill="once", ideals={"bypass": ideal})
    assert out["prefill"] == "once" and state.history[0]["skipped"] == skip
    entry = out["models"]["bypass"]
    assert entry["ideal"] == ideal and entry["decode_step_s"] > 0 and entry["tokens_per_s"] > 0
    assert entry["realised_share"] == pytest.approx((entry["speedup"] - 1) / (ideal - 1))
    assert out["models"]["static"]["ideal"] > 1
    seen = []  # the untimed prefill asks for the last position's logits only (a 128k vocabulary: GBs otherwise)
    handle = base.register_forward_hook(lambda m, args, kwargs, output: seen.append(output.logits.shape[1]),
                                        with_kwargs=True)
    try:
        measure_decode({"base": base}, tokenizer, ["a prompt of some length"], new_tokens=2, runs=1, warmup=0,
                       prefill="once")
    finally:
        handle.remove()
    assert seen and set(seen) == {1}
    with pytest.raises(ValueError, match="prefill must be"):
        measure_decode({"base": base}, tokenizer, "hi", prefill="never")
    with pytest.raises(ValueError, match="dynamic cache"):
        measure_decode({"base": base}, tokenizer, "hi", prefill="once", cache="static")
    with pytest.raises(ValueError, match="ideals names"):
        measure_decode({"base": base}, tokenizer, "hi", ideals={"other": 1.2})


def test_prompt_cache_bytes_measures_what_the_bypass_keeps(tokenizer, loader):
    from utils.kv_cache import prompt_cache_bytes

    model = _tiny("llama", tokenizer)
    n = len(decoder_blocks(model))
    full = prompt_cache_bytes(model, loader, prefix_tokens=8, progress=False)
    with attention_bypass(model, rule=_fixed([2, 5, 6])):
        after = prompt_cache_bytes(model, loader, prefix_tokens=8, progress=False)
    with attention_bypass(model, rule=_fixed([2, 5, 6]), decide_after=0):
        early = prompt_cache_bytes(model, loader, prefix_tokens=8, progress=False)
    assert len(full) == 4 and all(b > 0 for b in full)
    assert after == early == [b * (n - 3) // n for b in full]
    with pytest.raises(ValueError, match="decode_steps"):
        prompt_cache_bytes(model, loader, prefix_tokens=8, decode_steps=-1)
