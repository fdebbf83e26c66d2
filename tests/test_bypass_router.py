"""Tests of utils.bypass_router: the per-block skip costs (the labels) and the learned router that decides after the
prefill, calibrated to a budget per decoded token (CH08, issue 27)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_families import _tiny

from utils.attention import remove_attention
from utils.bypass import (
    PromptSignal,
    as_signal,
    attention_bypass,
    decisions,
    default_protected,
    perplexity_with_skips,
    prompt_attention_scores,
)
from utils.bypass_router import CostRouter, skip_costs
from utils.kv_cache import perplexity_through_cache
from utils.structure import decoder_blocks


def _synthetic(n_prompts=40, n_blocks=6, seed=0):
    """Rows and costs with a known law: each block has its own base cost, and a block costs more on a prompt
    where it turns the stream more (cost = base + 0.1 x log score)."""
    rng = np.random.default_rng(seed)
    base = np.array([9.0, 0.5, 0.2, 0.8, 0.1, 0.4])[:n_blocks]
    rows, costs = [], []
    for _ in range(n_prompts):
        scores = np.exp(rng.uniform(-6, -1, n_blocks))
        rows.append({"prompt_tokens": int(rng.integers(5, 60)), "spread": float(rng.uniform(0.8, 0.95)),
                     "scores": scores.tolist(), "scored_tokens": int(rng.integers(5, 60))})
        costs.append((base + 0.1 * np.log(scores) + 0.001 * rng.standard_normal(n_blocks)).tolist())
    return rows, costs


def test_router_learns_which_blocks_cost_more_on_which_prompt():
    rows, costs = _synthetic()
    router = CostRouter(protect=[0]).fit(rows, costs)
    assert router.blocks == [1, 2, 3, 4, 5]
    signal = PromptSignal(tokens=20, scores=[0.5, 0.01, 0.2, 0.001, 0.3, 0.05], spread=0.9, decided_at=6)
    predicted = router.predict(signal)
    expected = np.array([0.5, 0.2, 0.8, 0.1, 0.4]) + 0.1 * np.log(signal.scores[1:])
    assert math.isnan(predicted[0])  # protected: never predicted, never skipped
    np.testing.assert_allclose(predicted[1:], expected, atol=0.02)
    assert router.ranking(signal) == [int(i) + 1 for i in np.argsort(expected)]
    assert router.rule(0.0)(signal) == sorted(int(i) + 1 for i in np.flatnonzero(expected < 0))
    assert "5 blocks" in repr(router)


@pytest.mark.parametrize("budget", [1, 2.5, 4])
def test_router_calibrated_on_training_rows_spends_the_budget_per_decoded_token(budget):
    rows, costs = _synthetic()
    router = CostRouter(protect=[0]).fit(rows, costs)
    plain = router.calibrate(rows, budget)
    counts = [len(s) for s in decisions(rows, router.rule(plain), protect=[0])]
    assert np.mean(counts) == pytest.approx(budget, abs=0.5 / len(rows))
    tokens = [r["scored_tokens"] for r in rows]
    weighted = router.calibrate(rows, budget, weights=tokens)
    skips = decisions(rows, router.rule(weighted), protect=[0])
    assert np.average([len(s) for s in skips], weights=tokens) == pytest.approx(budget, abs=max(tokens) / sum(tokens))
    assert all(0 not in s and set(s) <= set(range(6)) for s in skips)


def test_bad_router_inputs_get_clear_errors():
    rows, costs = _synthetic()
    signal = as_signal(rows[0])
    unfitted = CostRouter(protect=[0])
    for call in (lambda: unfitted.predict(signal), lambda: unfitted.calibrate(rows, 2), lambda: unfitted.rule(0.1)):
        with pytest.raises(ValueError, match="fit"):
            call()
    with pytest.raises(ValueError, match="one costs list per row"):
        CostRouter(protect=[0]).fit(rows, costs[:-1])
    with pytest.raises(ValueError, match="one entry per block"):
        CostRouter(protect=[0]).fit(rows, [c[:-1] for c in costs])
    with pytest.raises(ValueError, match="weights"):
        CostRouter(protect=[0]).fit(rows, costs, weights=[1, 2])
    with pytest.raises(ValueError, match="No block"):
        CostRouter(protect=range(6)).fit(rows, costs)
    with pytest.raises(ValueError, match="ridge"):
        CostRouter(protect=[0], ridge=-1)
    with pytest.raises(ValueError, match="list of block indices"):
        CostRouter(protect="auto")
    router = CostRouter(protect=[0]).fit(rows, costs)
    with pytest.raises(ValueError, match="mean_skipped"):
        router.calibrate(rows, 6)  # 5 blocks may be skipped
    with pytest.raises(ValueError, match="fitted on 6"):
        router.predict(PromptSignal(tokens=5, scores=[0.1] * 4, spread=0.9, decided_at=4))
    with pytest.raises(ValueError, match="after the prefill"):
        router.predict(as_signal(rows[0], decided_at=2))
    with pytest.raises(ValueError, match="threshold"):
        router.rule(float("nan"))


def test_skip_costs_are_single_block_passes_and_skip_protected_and_removed(tokenizer, loader):
    model = remove_attention(_tiny("llama", tokenizer), [5])
    n = len(decoder_blocks(model))
    costs = np.array(skip_costs(model, loader, prefix_tokens=0.5, progress=False))
    assert costs.shape == (4, n)
    assert np.isnan(costs[:, [0, 5]]).all() and np.isfinite(np.delete(costs, [0, 5], axis=1)).all()
    base = perplexity_with_skips(model, loader, prefix_tokens=0.5, skips=[[]] * 4, skip_from="decode",
                                 progress=False)
    one = perplexity_with_skips(model, loader, prefix_tokens=0.5, skips=[[3]] * 4, skip_from="decode",
                                progress=False)
    expected = (np.array(one["nll"]) - np.array(base["nll"])) / np.array(base["tokens"])
    np.testing.assert_allclose(costs[:, 3], expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="one-shot iterator"):
        skip_costs(model, iter(loader), prefix_tokens=0.5)
    with pytest.raises(ValueError, match="outside"):
        skip_costs(model, loader, prefix_tokens=0.5, protect=[99])


def test_router_rule_runs_in_the_live_bypass_and_matches_its_offline_decisions(tokenizer, loader):
    model = _tiny("gemma3", tokenizer)  # two protected blocks: 0 and the first full-attention block
    protect = default_protected(model)
    rows = prompt_attention_scores(model, loader, prefix_tokens=0.5, decode_first=True, progress=False)
    costs = skip_costs(model, loader, prefix_tokens=0.5, progress=False)
    tokens = [r["scored_tokens"] for r in rows]
    router = CostRouter(protect).fit(rows, costs, weights=tokens)
    rule = router.rule(router.calibrate(rows, 3, weights=tokens))
    with attention_bypass(model, rule=rule) as state:
        perplexity_through_cache(model, loader, prefix_tokens=0.5, batch_size=1, decode_first=True, progress=False)
    live = [h["skipped"] for h in state.history]
    n = len(decoder_blocks(model))
    assert live == decisions(rows, rule, protect=protect)
    assert all(not set(s) & set(protect) and set(s) <= set(range(n)) for s in live)
    assert np.average([len(s) for s in live], weights=tokens) == pytest.approx(3, abs=max(tokens) / sum(tokens))
