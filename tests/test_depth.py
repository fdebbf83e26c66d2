"""Tests of utils.depth: block importance, selection strategies, block removal (CH02, CH04)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from tiny_families import FAMILIES as ATTENTION_FAMILIES
from transformers import AutoModelForCausalLM

from utils import load_model, load_texts, make_dataloader
from utils.architectures import tiny_config
from utils.depth import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    angular_distances,
    block_importance,
    can_fold_linear_replacements,
    choose_blocks_to_remove,
    fold_linear_replacements,
    linear_replacements,
    prune_depth,
    remove_blocks,
    weight_norms,
)
from utils.structure import decoder_blocks, output_of

FAMILIES = {**ATTENTION_FAMILIES, "gpt2": "distilbert/distilgpt2"}  # the tokenizer fixture: tests/conftest.py


def _tiny(model_id, tokenizer, **overrides):
    config = tiny_config(model_id, len(tokenizer), special_token_ids={
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id})
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def loader(tokenizer):
    return make_dataloader(load_texts("wikitext", n=6), tokenizer, batch_size=3, max_length=48)


def _attention_indices(model):
    return [[m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for block in decoder_blocks(model)]


# --- importance -------------------------------------------------------------------------------

def test_block_importance_shape_and_range(tokenizer, loader):
    model = _tiny(FAMILIES["llama"], tokenizer)
    scores = block_importance(model, loader, progress=False)
    assert len(scores) == model.config.num_hidden_layers
    assert all(0.0 <= s <= 2.0 for s in scores)


def test_block_importance_ignores_padding(tokenizer):
    model = _tiny(FAMILIES["llama"], tokenizer)
    texts = load_texts("wikitext", n=2)
    alone = make_dataloader(texts[:1], tokenizer, batch_size=1, max_length=40)
    padded = make_dataloader([texts[0], "Hi"], tokenizer, batch_size=2, max_length=40)
    short = make_dataloader(["Hi"], tokenizer, batch_size=1, max_length=40)
    # Token-weighted: the padded batch equals the two texts scored one by one, weighted by length.
    n_long = int(next(iter(alone))["attention_mask"].sum())
    n_short = int(next(iter(short))["attention_mask"].sum())
    a = block_importance(model, alone, progress=False)
    s = block_importance(model, short, progress=False)
    both = block_importance(model, padded, progress=False)
    expected = [(x * n_long + y * n_short) / (n_long + n_short) for x, y in zip(a, s)]
    assert both == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "gpt2"])
def test_block_importance_equals_optipfair(family, tokenizer, loader):
    """Same hooks, same formula: with average='batches' we reproduce optipfair exactly; the default
    'tokens' differs only in weighting batches by their number of real tokens."""
    optipfair = pytest.importorskip("optipfair")
    model = _tiny(FAMILIES[family], tokenizer)
    theirs = list(optipfair.analyze_layer_importance(model, loader, show_progress=False).values())
    ours = block_importance(model, loader, average="batches", progress=False)
    assert ours == pytest.approx(theirs, abs=1e-6)
    # The relationship with the default: per-batch means weighted by real tokens.
    per_batch = [block_importance(model, [b], progress=False) for b in loader]
    weights = [int(b["attention_mask"].sum()) for b in loader]
    weighted = [sum(w * s[i] for w, s in zip(weights, per_batch)) / sum(weights) for i in range(len(ours))]
    assert block_importance(model, loader, progress=False) == pytest.approx(weighted, abs=1e-6)


def test_block_importance_bad_inputs(tokenizer, loader):
    model = _tiny(FAMILIES["llama"], tokenizer)
    with pytest.raises(ValueError, match="average"):
        block_importance(model, loader, average="mean", progress=False)
    with pytest.raises(ValueError, match="no real token"):
        block_importance(model, [], progress=False)
    with pytest.raises(ValueError, match="decoder blocks"):
        block_importance(torch.nn.Linear(2, 2), loader, progress=False)


def test_block_importance_costs_about_one_forward(tokenizer):
    """Hooks only: a scoring pass costs about one plain forward pass (loose bound for noisy CPUs)."""
    model = _tiny(FAMILIES["qwen3"], tokenizer)
    dl = make_dataloader(load_texts("wikitext", n=8), tokenizer, batch_size=8, max_length=96)
    batches = list(dl)

    def plain():
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    plain()
    block_importance(model, batches, progress=False)
    timings = {"plain": [], "scored": []}
    for _ in range(3):
        start = time.perf_counter()
        plain()
        timings["plain"].append(time.perf_counter() - start)
        start = time.perf_counter()
        block_importance(model, batches, progress=False)
        timings["scored"].append(time.perf_counter() - start)
    ratio = min(timings["scored"]) / min(timings["plain"])
    assert ratio < 2.0, f"block_importance took {ratio:.2f}x a forward pass"


def test_angular_distances_and_weight_norms(tokenizer, loader):
    model = _tiny(FAMILIES["llama"], tokenizer)
    distances = angular_distances(model, loader, 3, progress=False)
    assert len(distances) == model.config.num_hidden_layers - 3 + 1
    assert all(0.0 <= d <= 1.0 for d in distances)
    # Over one block, angular distance is arccos of the block's cosine similarity.
    one = angular_distances(model, loader, 1, progress=False)
    cos = [1 - s for s in block_importance(model, loader, progress=False)]
    assert one == pytest.approx([torch.arccos(torch.tensor(c)).item() / torch.pi for c in cos], abs=1e-5)
    norms = weight_norms(model)
    assert len(norms) == model.config.num_hidden_layers and all(n > 0 for n in norms)


# --- choosing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_returns_n_sorted_valid_indices(strategy, tokenizer, loader):
    model = _tiny(FAMILIES["gemma3"], tokenizer)
    before = copy.deepcopy(model.state_dict())
    chosen = choose_blocks_to_remove(model, loader, 4, strategy=strategy, progress=False)
    assert len(chosen) == 4 and chosen == sorted(set(chosen))
    assert all(0 <= i < 18 for i in chosen)
    # The model is left unchanged (the iterative strategy removes blocks temporarily).
    assert model.config.num_hidden_layers == 18 and len(decoder_blocks(model)) == 18
    assert _attention_indices(model) == [[i] * len(ix) for i, ix in enumerate(_attention_indices(model))]
    assert len(model.config.layer_types) == 18
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_strategies_fixed_choices(tokenizer, loader):
    model = _tiny(FAMILIES["llama"], tokenizer)  # 16 blocks
    assert choose_blocks_to_remove(model, None, 3, strategy="last") == [13, 14, 15]
    assert choose_blocks_to_remove(model, None, 4, strategy="middle") == [6, 7, 8, 9]
    scores = block_importance(model, loader, progress=False)
    assert choose_blocks_to_remove(model, loader, 2, strategy="cosine", progress=False) == sorted(
        sorted(range(16), key=lambda i: scores[i])[:2])
    protected = choose_blocks_to_remove(model, loader, 15 - 1, strategy="cosine_protected", progress=False)
    assert 0 not in protected and 15 not in protected
    window = choose_blocks_to_remove(model, loader, 3, strategy="angular_window", progress=False)
    assert window == list(range(window[0], window[0] + 3))
    first = choose_blocks_to_remove(model, loader, 1, strategy="iterative", progress=False)
    assert first == choose_blocks_to_remove(model, loader, 1, strategy="cosine", protect=[0, -1], progress=False)
    assert 3 not in choose_blocks_to_remove(model, loader, 5, strategy="cosine", protect=[3], progress=False)


def test_choose_bad_inputs(tokenizer, loader):
    model = _tiny(FAMILIES["llama"], tokenizer)
    with pytest.raises(ValueError, match="Valid strategies: last, middle"):
        choose_blocks_to_remove(model, loader, 2, strategy="random")
    for n in (0, -1, 16, 2.5):
        with pytest.raises(ValueError, match="between 1 and 15"):
            choose_blocks_to_remove(model, loader, n, strategy="last")
    with pytest.raises(ValueError, match="needs calibration data"):
        choose_blocks_to_remove(model, None, 2, strategy="cosine")
    with pytest.raises(ValueError, match="not a block index"):
        choose_blocks_to_remove(model, loader, 2, strategy="cosine", protect=[16])
    with pytest.raises(ValueError, match="protected"):
        choose_blocks_to_remove(model, loader, 2, strategy="last", protect=[-1])
    with pytest.raises(ValueError, match="protected"):
        choose_blocks_to_remove(model, loader, 15, strategy="cosine_protected")


# --- removing ---------------------------------------------------------------------------------

def _greedy(model, ids, use_cache, n=12):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "gpt2"])
def test_remove_blocks_round_trip(family, tokenizer, tmp_path):
    overrides = {}
    if family == "gemma3":
        overrides = {"sliding_window": 6}  # short window: the sliding-window cache really slides
    if family == "qwen3":
        overrides = {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 20}
    model = _tiny(FAMILIES[family], tokenizer, **overrides)
    if family == "qwen3":  # layer_types is computed at init: rebuild with the overrides in effect
        config = model.config
        config.layer_types = ["sliding_attention" if i >= 20 else "full_attention" for i in range(28)]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    total = model.config.num_hidden_layers
    types_before = list(getattr(model.config, "layer_types", None) or [])
    removed = [1, 2, total - 4] if total > 6 else [1, 3]
    kept = [i for i in range(total) if i not in removed]
    kept_blocks = [decoder_blocks(model)[i] for i in kept]

    assert remove_blocks(model, removed) is model
    assert len(decoder_blocks(model)) == len(kept) == model.config.num_hidden_layers
    assert all(a is b for a, b in zip(decoder_blocks(model), kept_blocks))
    assert _attention_indices(model) == [[i] * len(ix) for i, ix in enumerate(_attention_indices(model))]
    assert all(_attention_indices(model))  # every block has an attention with a layer_idx
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in kept]
    if family == "gemma3":
        assert [b.self_attn.is_sliding for b in decoder_blocks(model)] == [
            t == "sliding_attention" for t in model.config.layer_types]
    if family == "qwen3":
        assert model.config.max_window_layers == sum(1 for i in kept if i < 20)
        assert [b.self_attn.sliding_window is not None for b in decoder_blocks(model)] == [
            t == "sliding_attention" for t in model.config.layer_types]
    if family == "gpt2":
        assert model.config.n_layer == len(kept)

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 8]])
    with_cache, without = _greedy(model, ids, True), _greedy(model, ids, False)
    assert torch.equal(with_cache, without)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(kept)
    if types_before:
        assert reloaded.config.layer_types == model.config.layer_types
    assert _attention_indices(reloaded) == _attention_indices(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(_greedy(reloaded, ids, True), with_cache)


def test_remove_blocks_matches_skipping_them(tokenizer):
    """A pruned model computes exactly what the full model computes with those blocks bypassed."""
    model = _tiny(FAMILIES["llama"], tokenizer)
    pruned = remove_blocks(copy.deepcopy(model), [4, 5])
    handles = [decoder_blocks(model)[i].register_forward_hook(
        lambda mod, args, out: args[0]) for i in (4, 5)]
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        got = pruned(ids, use_cache=False).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_remove_blocks_bad_inputs(tokenizer):
    model = _tiny(FAMILIES["llama"], tokenizer)
    with pytest.raises(ValueError, match="out of range.*0..15"):
        remove_blocks(model, [16])
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(model, [-1])
    with pytest.raises(ValueError, match="more than once"):
        remove_blocks(model, [3, 3])
    with pytest.raises(ValueError, match="Cannot remove all 16"):
        remove_blocks(model, list(range(16)))
    with pytest.raises(ValueError, match="empty"):
        remove_blocks(model, [])
    assert model.config.num_hidden_layers == 16 and len(decoder_blocks(model)) == 16


@pytest.mark.slow
def test_default_strategy_beats_one_shot_on_real_model(monkeypatch):
    """Quality bar on SmolLM2-135M: the default selection of 6 of 30 blocks keeps held-out perplexity
    lower than one-shot cosine selection (calibrated on wikitext train, evaluated on wikitext test)."""
    from utils import perplexity

    monkeypatch.setenv("RLLM_PROFILE", "cpu")
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    calib = make_dataloader(load_texts("wikitext", split="train", n=16), tok, batch_size=8, max_length=128)
    held_out = make_dataloader(load_texts("wikitext", split="test", n=16), tok, batch_size=8, max_length=128)
    ppl = {}
    for strategy in ("cosine", DEFAULT_STRATEGY):
        chosen = choose_blocks_to_remove(model, calib, 6, strategy=strategy, progress=False)
        ppl[strategy] = perplexity(remove_blocks(copy.deepcopy(model), chosen), held_out, progress=False)
    assert ppl[DEFAULT_STRATEGY] < ppl["cosine"]


# --- linear replacement of a removed run (ReplaceMe) -------------------------------------------

def _states(model, loader, p, last):
    """Real-token rows of block p's MLP output m, block p's output x and block ``last``'s output y."""
    blocks, got = decoder_blocks(model), {"m": [], "x": [], "y": []}
    masks = []
    hooks = [blocks[p].mlp.register_forward_hook(lambda mod, a, out: got["m"].append(out)),
             blocks[p].register_forward_hook(lambda mod, a, out: got["x"].append(output_of(out))),
             blocks[last].register_forward_hook(lambda mod, a, out: got["y"].append(output_of(out)))]
    with torch.no_grad():
        for batch in loader:
            masks.append(batch["attention_mask"].reshape(-1).bool())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: torch.cat([t.reshape(-1, t.shape[-1])[m] for t, m in zip(v, masks)]).double() for k, v in got.items()}


@pytest.mark.parametrize("damping", [0.1, 1.0])
def test_linear_replacement_is_the_ridge_least_squares_solution(tokenizer, loader, damping):
    model = _tiny(FAMILIES["llama"], tokenizer)
    T = linear_replacements(model, [5, 6, 7], loader, damping=damping, progress=False)[4].double()
    s = _states(model, loader, 4, 7)
    m, target = s["m"], s["y"] - (s["x"] - s["m"])
    lam = damping * (m.T @ m).diagonal().mean()
    eye = torch.eye(T.shape[0], dtype=T.dtype)
    gradient = m.T @ (m @ T - target) + lam * (T - eye)  # zero at the minimum of the ridge objective
    assert gradient.abs().max() < 1e-4 * (m.T @ target).abs().max()
    # the map never fits the calibration tokens worse than the plain cut (T = I is feasible)
    assert (m @ T - target).pow(2).sum() <= (m - target).pow(2).sum()
    huge = linear_replacements(model, [5, 6, 7], loader, damping=1e9, progress=False)[4]
    torch.testing.assert_close(huge, torch.eye(T.shape[0]), atol=1e-6, rtol=0)


def test_fold_makes_the_mlp_output_m_times_T(tokenizer):
    for family in ("llama", "gpt2"):
        model = _tiny(FAMILIES[family], tokenizer)
        mlp = decoder_blocks(model)[2].mlp
        hidden = model.config.hidden_size
        x = torch.randn(3, 5, hidden)
        T = torch.randn(hidden, hidden) / hidden ** 0.5
        with torch.no_grad():
            expected = mlp(x) @ T
            fold_linear_replacements(model, {2: T})
            torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-4)


def test_prune_depth_round_trip_and_cache(tokenizer, loader, tmp_path):
    model = _tiny(FAMILIES["llama"], tokenizer)
    plain = remove_blocks(copy.deepcopy(model), choose_blocks_to_remove(model, loader, 3, progress=False))
    pruned = prune_depth(copy.deepcopy(model), 3, loader, progress=False)
    assert pruned.config.num_hidden_layers == 13 == plain.config.num_hidden_layers
    assert pruned.config.removed_layers == plain.config.removed_layers
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 8]])
    with torch.no_grad():
        assert not torch.allclose(pruned(ids).logits, plain(ids).logits)  # the map changed something
    assert torch.equal(_greedy(pruned, ids, True), _greedy(pruned, ids, False))
    pruned.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=1e-5, rtol=0)
    off = prune_depth(copy.deepcopy(model), 3, loader, linear_replacement=False, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, plain(ids).logits, atol=0, rtol=0)


def test_linear_replacement_bad_inputs(tokenizer, loader):
    model = _tiny(FAMILIES["llama"], tokenizer)
    with pytest.raises(ValueError, match="Block 0 has no block before it"):
        linear_replacements(model, [0, 1], loader)
    with pytest.raises(ValueError, match="out of range"):
        linear_replacements(model, [3, 16], loader)
    with pytest.raises(ValueError, match="empty"):
        linear_replacements(model, [], loader)
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="damping must be a positive number"):
            linear_replacements(model, [3], loader, damping=bad)
    with pytest.raises(ValueError, match="dataloader is empty"):
        linear_replacements(model, [3], [])
    gemma = _tiny(FAMILIES["gemma3"], tokenizer)
    with pytest.raises(ValueError, match="linear_replacement=False"):
        prune_depth(gemma, 2, loader, progress=False)
    assert len(decoder_blocks(gemma)) == gemma.config.num_hidden_layers  # nothing was removed


def test_can_fold_linear_replacements_says_which_families_take_the_map(tokenizer, loader):
    for family in ("llama", "qwen3", "gpt2"):
        assert can_fold_linear_replacements(_tiny(FAMILIES[family], tokenizer)), family
    gemma = _tiny(FAMILIES["gemma3"], tokenizer)
    assert not can_fold_linear_replacements(gemma)
    n = len(decoder_blocks(gemma))
    pruned = prune_depth(gemma, 2, loader, linear_replacement=can_fold_linear_replacements(gemma), progress=False)
    assert len(decoder_blocks(pruned)) == n - 2 == pruned.config.num_hidden_layers
