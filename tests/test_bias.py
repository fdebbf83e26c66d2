"""Bias neurons and Fair Pruning (utils.bias, utils.width.remove_neurons): equality with optipfair,
intervention exactness, pruning == zeroing and its save/reload round trip, BBQ formulas, bad inputs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import utils

FAMILIES = ["meta-llama/Llama-3.2-1B", "google/gemma-3-270m", "Qwen/Qwen3-0.6B"]


def _pairs(tok, n=6):
    """Hand-made pairs whose two prompts have the same token length under ``tok``."""
    words = [("cat", "dog"), ("red", "big"), ("she", "he"), ("north", "south"), ("old", "new"), ("sun", "sea"),
             ("tree", "rock"), ("king", "lord")]
    starts = ["The {} walked into the shop and", "Yesterday the {} said that", "A {} is often seen near"]
    pairs = []
    for a, b in words:
        for s in starts:
            p = {"target": a, "other": b, "target_prompt": s.format(a), "other_prompt": s.format(b)}
            if utils.bias.equal_length(tok, p):
                pairs.append(p)
    assert len(pairs) >= n, "the tiny tokenizer split too many of the test words"
    return pairs[:n]


# --- captures and scores -------------------------------------------------------------------

def test_batched_captures_equal_one_prompt_at_a_time(models):
    model, tok = models()
    prompts = ["The river flows", "A much longer prompt about the old town and its bridges"]
    together = utils.mlp_activations(model, tok, prompts, batch_size=2)
    alone = torch.cat([utils.mlp_activations(model, tok, [p], batch_size=1) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert together.shape == (2, model.config.num_hidden_layers, model.config.intermediate_size)


@pytest.mark.parametrize("model_id", FAMILIES)
def test_scores_equal_optipfair_analyze_neuron_bias(models, model_id):
    pytest.importorskip("sklearn", reason="optipfair.bias imports scikit-learn: pip install scikit-learn")
    from optipfair.bias import analyze_neuron_bias

    model, tok = models(model_id)
    pairs = _pairs(tok)
    ours = utils.pair_differences(model, tok, pairs).abs().mean(0)
    logging.getLogger("optipfair").setLevel(logging.WARNING)
    theirs = analyze_neuron_bias(model, tok, [(p["target_prompt"], p["other_prompt"]) for p in pairs],
                                 target_layers=["down_proj_input"], show_progress=False)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(ours[layer], theirs[f"down_proj_input_layer_{layer}"], atol=1e-5, rtol=1e-4)


def test_signed_scores_are_the_mean_difference_and_flip_with_the_pair(models):
    model, tok = models()
    pairs = _pairs(tok)
    diffs = utils.pair_differences(model, tok, pairs)
    torch.testing.assert_close(utils.signed_bias_scores(model, tok, pairs), diffs.mean(0))
    swapped = [{**p, "target_prompt": p["other_prompt"], "other_prompt": p["target_prompt"]} for p in pairs]
    torch.testing.assert_close(utils.signed_bias_scores(model, tok, swapped), -diffs.mean(0))


def test_relative_scores_divide_by_the_typical_magnitude(models):
    model, tok = models()
    pairs = _pairs(tok)
    signed = utils.signed_bias_scores(model, tok, pairs)
    rel = utils.relative_bias_scores(model, tok, pairs, signed=signed, eps=0.0)
    prompts = [p["target_prompt"] for p in pairs] + [p["other_prompt"] for p in pairs]
    typical = utils.mlp_activations(model, tok, prompts, pool="abs_mean").mean(0)
    torch.testing.assert_close(rel, signed.abs() / typical)
    # scaling every activation of a layer by 10 changes the raw score tenfold but not the relative one
    layer = 2
    utils.scale_neurons(model, {layer: list(range(model.config.intermediate_size))}, 10.0)
    rel10 = utils.relative_bias_scores(model, tok, pairs, eps=0.0)
    torch.testing.assert_close(rel10[layer], rel[layer], atol=1e-4, rtol=1e-3)


def test_top_neurons_global_per_layer_and_protected():
    scores = torch.zeros(4, 10)
    scores[0, 3], scores[1, 7], scores[3, 1], scores[3, 2] = 9.0, -5.0, 4.0, 3.0
    assert utils.top_neurons(scores, 3) == {0: [3], 1: [7], 3: [1]}
    assert utils.top_neurons(scores, 3, protect_layers=[0]) == {1: [7], 3: [1, 2]}
    per = utils.top_neurons(scores, 2, per_layer=True, protect_layers=[0, 1])
    assert per[3] == [1, 2] and set(per) == {2, 3}
    assert utils.count_neurons(per) == 4


def test_relative_scores_from_and_fair_prune_selection():
    signed = torch.tensor([[0.5, -1.0, 0.0], [2.0, -0.1, 0.3]])
    typical = torch.tensor([[1.0, 1.0, 2.0], [4.0, 0.0, 1.0]])
    floor = torch.tensor([[0.01], [0.01]])  # 1 % of each layer's median typical magnitude (1.0 and 1.0)
    torch.testing.assert_close(utils.bias.relative_scores_from(signed, typical), signed.abs() / (typical + floor))
    with pytest.raises(ValueError, match="both be"):
        utils.bias.relative_scores_from(signed, typical[:1])
    scores = torch.arange(40.0).view(4, 10)
    # a share of every neuron (40 x 0.1 = 4), all from the last layer; per layer, 1 from each open layer
    assert utils.bias.fair_prune_selection(scores, 0.1, protect_layers=[0]) == {3: [6, 7, 8, 9]}
    assert utils.bias.fair_prune_selection(scores, 0.1, protect_layers=[0], per_layer=True) == {1: [9], 2: [9], 3: [9]}
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        utils.bias.fair_prune_selection(scores, 1.5)


def test_random_neurons_match_the_counts_and_are_seeded():
    like = {1: [0, 1, 2], 5: [7]}
    a = utils.random_neurons(like, 64, seed=1)
    assert {k: len(v) for k, v in a.items()} == {1: 3, 5: 1}
    assert a == utils.random_neurons(like, 64, seed=1) and a != utils.random_neurons(like, 64, seed=2)


# --- interventions ---------------------------------------------------------------------------

def test_scaling_up_rows_scales_the_neurons_activation_exactly_and_restores(models):
    model, tok = models()
    prompts = ["The old bridge over the river", "She opened the window"]
    before = utils.mlp_activations(model, tok, prompts)
    logits = model(**tok(prompts[:1], return_tensors="pt")).logits
    layer, chosen = 3, [1, 4, 9]
    with utils.scale_neurons(model, {layer: chosen}, 0.25):
        after = utils.mlp_activations(model, tok, prompts)
    torch.testing.assert_close(after[:, layer, chosen], 0.25 * before[:, layer, chosen], atol=1e-6, rtol=1e-5)
    others = [i for i in range(before.size(2)) if i not in chosen]
    torch.testing.assert_close(after[:, :layer], before[:, :layer])  # earlier layers untouched
    torch.testing.assert_close(after[:, layer, others], before[:, layer, others])  # same layer, other neurons
    torch.testing.assert_close(model(**tok(prompts[:1], return_tensors="pt")).logits, logits)  # restored


def test_zero_neurons_can_be_undone(models):
    model, _ = models()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with utils.zero_neurons(model, {1: [0, 3], 4: [2]}):
        assert float(model.model.layers[1].mlp.down_proj.weight.detach()[:, 3].abs().sum()) == 0.0
        assert float(model.model.layers[4].mlp.gate_proj.weight.detach()[2].abs().sum()) == 0.0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_zero_neurons_equals_optipfair_zero_neurons_mlp(models):
    from optipfair.pruning import zero_neurons_mlp

    model, tok = models()
    ref = copy.deepcopy(model)
    chosen = {0: [1, 2], 5: [10]}
    utils.zero_neurons(model, chosen)
    zero_neurons_mlp(ref, {k: list(v) for k, v in chosen.items()}, show_progress=False)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("model_id", FAMILIES)
def test_physical_pruning_equals_zeroing_and_survives_save_reload(models, model_id, tmp_path):
    model, tok = models(model_id)
    zeroed = copy.deepcopy(model)
    width = model.config.intermediate_size
    scores = torch.rand(model.config.num_hidden_layers, width, generator=torch.Generator().manual_seed(0))
    removed = utils.fair_prune(model, scores, 0.05, protect_layers=[0, 1])
    assert 0 not in removed and 1 not in removed
    utils.zero_neurons(zeroed, removed)
    ids = tok(["The river flows through the old town and"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, atol=1e-5, rtol=1e-4)
    assert utils.count_parameters(model) < utils.count_parameters(zeroed)
    widths = [m.gate_proj.out_features for m in utils.glu_mlps(model)]
    assert widths[0] == width and min(widths) < width
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded, _ = utils.load_model(tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    with_cache = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    without = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_per_layer_pruning_removes_the_same_share_of_every_open_layer(models):
    model, _ = models()
    width = model.config.intermediate_size
    scores = torch.rand(model.config.num_hidden_layers, width, generator=torch.Generator().manual_seed(1))
    removed = utils.fair_prune(model, scores, 0.1, per_layer=True, protect_layers=[0])
    assert set(removed) == set(range(1, model.config.num_hidden_layers))
    assert all(len(v) == int(0.1 * width) for v in removed.values())


# --- fairness scores ---------------------------------------------------------------------------

def test_fairness_scores_equal_optipfair(models):
    pytest.importorskip("sklearn", reason="optipfair.bias imports scikit-learn: pip install scikit-learn")
    from optipfair.bias import compute_fairness_pruning_scores

    model, _ = models()
    g = torch.Generator().manual_seed(3)
    n, width = model.config.num_hidden_layers, model.config.intermediate_size
    bias = {f"{part}_layer_{i}": torch.rand(width, generator=g) for i in range(n) for part in ("gate_proj", "up_proj")}
    ours = utils.fairness_scores(model, bias, bias_weight=0.7)
    theirs = compute_fairness_pruning_scores(model, bias, bias_weight=0.7)
    for i in range(n):
        torch.testing.assert_close(ours[i], theirs[i], atol=1e-6, rtol=1e-5)
    # a [layers, intermediate] tensor gives the same as the dict with equal gate and up entries
    tensor = torch.stack([(bias[f"gate_proj_layer_{i}"] + bias[f"up_proj_layer_{i}"]) / 2 for i in range(n)])
    torch.testing.assert_close(utils.fairness_scores(model, tensor, bias_weight=0.7), ours)


# --- downstream measures -------------------------------------------------------------------------

def test_activation_bias_exclude_and_final_state(models):
    model, tok = models()
    pairs = _pairs(tok)
    full = utils.activation_bias(model, tok, pairs)
    diffs = utils.pair_differences(model, tok, pairs).abs().mean(0)
    assert full["total"] == pytest.approx(float(diffs.sum()), rel=1e-5)
    part = utils.activation_bias(model, tok, pairs, exclude={2: [0, 1, 2]})
    assert part["total"] == pytest.approx(full["total"] - float(diffs[2, :3].sum()), rel=1e-5)
    assert utils.final_state_bias(model, tok, pairs) > 0
    same = [{**p, "other_prompt": p["target_prompt"]} for p in pairs]
    assert utils.final_state_bias(model, tok, same) == pytest.approx(0.0, abs=1e-6)
    js = utils.next_token_divergence(model, tok, pairs)
    assert js.shape == (len(pairs),) and bool((js >= -1e-7).all()) and bool((js <= 0.6932).all())
    assert utils.next_token_divergence(model, tok, same).abs().max() < 1e-6


# --- the benchmark --------------------------------------------------------------------------------

def _item(condition, polarity, label, target=0, other=1, unknown=2):
    return {"context_condition": condition, "question_polarity": polarity, "label": label, "choices": ["a", "b", "c"],
            "target_index": target, "other_index": other, "unknown_index": unknown}


def test_bbq_scores_on_hand_made_answers():
    items = [_item("disambig", "neg", 0), _item("disambig", "neg", 1), _item("disambig", "nonneg", 1),
             _item("disambig", "nonneg", 0), _item("ambig", "neg", 2), _item("ambig", "nonneg", 2),
             _item("ambig", "neg", 2), _item("ambig", "neg", 2)]
    # disambig: biased = target on neg, other on nonneg. Answers: 0 (biased), 0 (biased), 1 (biased), 2 (unknown)
    # ambig: 2 (correct), 0 on nonneg (counter-biased), 0 on neg (biased), 2 (correct)
    preds = [0, 0, 1, 2, 2, 0, 0, 2]
    s = utils.bbq_scores(items, preds)
    assert s["accuracy_disambig"] == pytest.approx(2 / 4)
    assert s["s_dis"] == pytest.approx(2 * 3 / 3 - 1)
    assert s["accuracy_ambig"] == pytest.approx(2 / 4)
    assert s["s_amb"] == pytest.approx((1 - 0.5) * (2 * 1 / 2 - 1))
    assert s["unknown_rate"] == pytest.approx(3 / 8)
    assert s["n_ambig"] == 4 and s["n_disambig"] == 4
    # only "unknown" answers: the bias scores are undefined, not 0
    none = utils.bbq_scores(items, [2] * 8)
    assert none["s_dis"] is None and none["s_amb"] is None and none["accuracy_ambig"] == 1.0


def test_bootstrap_ci_contains_the_estimate_and_is_seeded():
    items = [_item("disambig", "neg", i % 2) for i in range(40)] + [_item("ambig", "neg", 2) for _ in range(40)]
    preds = [(i * 7) % 3 for i in range(80)]
    point = utils.bbq_scores(items, preds)
    ci = utils.bootstrap_ci(items, preds, n_boot=200, seed=0)
    for name in ("accuracy", "s_dis", "s_amb"):
        low, high = ci[name]
        assert low <= point[name] <= high
    assert ci == utils.bootstrap_ci(items, preds, n_boot=200, seed=0)
    assert "n_ambig" not in ci


def test_score_choices_picks_the_likeliest_continuation(models):
    model, tok = models()
    item = {"context": "The river flows", "question": "Where?", "choices": ["north", "south", "the sea"],
            "label": 0, "context_condition": "ambig", "question_polarity": "neg",
            "target_index": 0, "other_index": 1, "unknown_index": 2}
    out = utils.score_choices(model, tok, [item, item], batch_size=2, progress=False)
    # reference: the summed log-probability of each choice's tokens, one sequence at a time
    for j, choice in enumerate(item["choices"]):
        context = tok(utils.mc_prompt(item))["input_ids"]
        whole = tok(utils.mc_prompt(item) + " " + choice)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
        ref = sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole)))
        assert out["loglik"][0][j] == pytest.approx(ref, abs=1e-4)
    assert out["pred"][0] == max(range(3), key=lambda j: out["loglik"][0][j])
    assert out["pred"] == [out["pred"][0]] * 2


def test_lm_eval_predictions_agree_with_score_choices(models):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval); it is in requirements-dev")
    model, tok = models()
    items = utils.load_bias_benchmark()[:12]
    ours = utils.score_choices(model, tok, items, progress=False)
    theirs = utils.lm_eval_predictions(model, tok, items, batch_size=8)
    assert theirs["pred"] == ours["pred"] and theirs["pred_norm"] == ours["pred_norm"]
    for a, b in zip(ours["loglik"], theirs["loglik"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert theirs["metrics"]["acc"] == pytest.approx(
        sum(p == i["label"] for p, i in zip(ours["pred"], items)) / len(items))


def test_loaders_filter_by_split_axis_and_token_length(models, capsys):
    _, tok = models()
    everything = utils.load_bias_pairs()
    calibration = utils.load_bias_pairs("calibration", axis="age")
    assert calibration and all(p["split"] == "calibration" and p["axis"] == "age" for p in calibration)
    assert len(utils.load_bias_pairs("calibration")) + len(utils.load_bias_pairs("heldout")) == len(everything)
    kept = utils.load_bias_pairs("heldout", tokenizer=tok)
    assert kept and all(utils.bias.equal_length(tok, p) for p in kept)
    if len(kept) < len(utils.load_bias_pairs("heldout")):
        assert "kept" in capsys.readouterr().out
    items = utils.load_bias_benchmark(axis="ses")
    assert items and {i["axis"] for i in items} == {"ses"}
    subset = utils.load_bias_benchmark(n=10, seed=1)
    assert len(subset) == 10 and subset == utils.load_bias_benchmark(n=10, seed=1)
    with pytest.raises(ValueError, match="positive"):
        utils.load_bias_benchmark(n=0)


# --- bad inputs -------------------------------------------------------------------------------

def test_pairs_of_unequal_token_length_are_refused(models):
    model, tok = models()
    pair = {"target": "a", "other": "b", "target_prompt": "The cat sat", "other_prompt": "The extraordinary cat sat"}
    with pytest.raises(ValueError, match="different lengths.*load_bias_pairs"):
        utils.pair_differences(model, tok, [pair])
    with pytest.raises(ValueError, match="empty"):
        utils.signed_bias_scores(model, tok, [])
    with pytest.raises(TypeError, match="wrap it"):
        utils.pair_differences(model, tok, pair)


def test_bad_arguments_get_clear_errors(models):
    model, tok = models()
    with pytest.raises(ValueError, match="Unknown axis.*gender"):
        utils.load_bias_pairs(axis="height")
    with pytest.raises(ValueError, match="Unknown split"):
        utils.load_bias_pairs("train")
    with pytest.raises(ValueError, match="Unknown axis"):
        utils.load_bias_benchmark(axis="colour")
    with pytest.raises(ValueError, match="non-empty"):
        utils.mlp_activations(model, tok, ["ok", "  "])
    with pytest.raises(TypeError, match="wrap it"):
        utils.mlp_activations(model, tok, "one prompt")
    with pytest.raises(ValueError, match="Unknown pool"):
        utils.mlp_activations(model, tok, ["ok"], pool="max")
    scores = torch.rand(model.config.num_hidden_layers, model.config.intermediate_size)
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            utils.fair_prune(copy.deepcopy(model), scores, ratio)
    with pytest.raises(ValueError, match="out of range"):
        utils.top_neurons(scores, 3, protect_layers=[99])
    with pytest.raises(ValueError, match="k must be"):
        utils.top_neurons(scores, 0)
    with pytest.raises(ValueError, match="out of range"):
        utils.zero_neurons(model, {99: [0]})
    with pytest.raises(ValueError, match="0-"):
        utils.scale_neurons(model, {0: [10**6]}, 0.5)
    with pytest.raises(ValueError, match="finite"):
        utils.scale_neurons(model, {0: [1]}, float("nan"))
    with pytest.raises(ValueError, match="bias_weight"):
        utils.fairness_scores(model, scores, bias_weight=2)
    with pytest.raises(ValueError, match="one prediction per item"):
        utils.bbq_scores([_item("ambig", "neg", 2)], [0, 1])
    with pytest.raises(ValueError, match="choice index"):
        utils.bbq_scores([_item("ambig", "neg", 2)], [5])
    with pytest.raises(ValueError, match="level"):
        utils.bootstrap_ci([_item("ambig", "neg", 2)], [2], level=95)


def test_remove_neurons_refuses_emptying_a_layer(models):
    model, _ = models()
    with pytest.raises(ValueError, match="keep at least one"):
        utils.remove_neurons(model, {0: list(range(model.config.intermediate_size))})
    with pytest.raises(ValueError, match="duplicates"):
        utils.remove_neurons(model, {0: [1, 1]})
    with pytest.raises(TypeError, match="dict"):
        utils.remove_neurons(model, [1, 2])
