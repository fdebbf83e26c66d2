"""The signed, behavioural bias measures and their controls (utils.bias: stereotype_scores, awareness_scores,
swap_sensitivity, typical_magnitudes, matched_random_neurons) and the intervals that go with them
(utils.evaluation.mean_interval, clustered utils.benchmarks.bootstrap_ci)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import utils
from utils import benchmarks, bias, evaluation


def _stereo_probes():
    return [
        {"target_prompt": "The woman looked at the engine and said it was", "other_prompt":
         "The man looked at the engine and said it was", "stereo": " hard", "anti": " easy"},
        {"target_prompt": "The old tenant opened the new phone and found it", "other_prompt":
         "The young tenant opened the new phone and found it", "stereo": " confusing", "anti": " simple to use"},
        {"target_prompt": "In the exam the girl did", "other_prompt": "In the exam the boy did",
         "stereo": " badly", "anti": " well"},
    ]


def _aware_probes():
    return [
        {"target_prompt": "The woman told the neighbours that", "other_prompt": "The man told the neighbours that",
         "target_answer": " she", "other_answer": " he"},
        {"target_prompt": "When the mother came home,", "other_prompt": "When the father came home,",
         "target_answer": " she", "other_answer": " he"},
    ]


def _continuation_logprob(model, tok, prompt, continuation):
    """log p(continuation | prompt), by hand: one forward pass over prompt + continuation."""
    context = tok(prompt)["input_ids"]
    whole = tok(prompt + continuation)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole)))


# --- stereotype_scores ---------------------------------------------------------------------------

def test_stereotype_scores_are_the_double_difference_of_log_probabilities(models):
    model, tok = models()
    probes = _stereo_probes()
    ours = bias.stereotype_scores(model, tok, probes, batch_size=3)
    assert ours.shape == (len(probes),)
    for score, p in zip(ours, probes):
        lp = {(prompt, c): _continuation_logprob(model, tok, p[prompt], p[c])
              for prompt in ("target_prompt", "other_prompt") for c in ("stereo", "anti")}
        by_hand = (lp["target_prompt", "stereo"] - lp["target_prompt", "anti"]) \
            - (lp["other_prompt", "stereo"] - lp["other_prompt", "anti"])
        assert float(score) == pytest.approx(by_hand, abs=1e-3)


def test_stereotype_scores_flip_with_the_groups_or_the_continuations_and_vanish_without_a_group_word(models):
    model, tok = models()
    probes = _stereo_probes()
    base = bias.stereotype_scores(model, tok, probes)
    swapped_groups = [{**p, "target_prompt": p["other_prompt"], "other_prompt": p["target_prompt"]} for p in probes]
    swapped_answers = [{**p, "stereo": p["anti"], "anti": p["stereo"]} for p in probes]
    torch.testing.assert_close(bias.stereotype_scores(model, tok, swapped_groups), -base, atol=1e-4, rtol=0)
    torch.testing.assert_close(bias.stereotype_scores(model, tok, swapped_answers), -base, atol=1e-4, rtol=0)
    same = [{**p, "other_prompt": p["target_prompt"]} for p in probes]
    assert bias.stereotype_scores(model, tok, same).abs().max() < 1e-4
    assert not torch.allclose(base, torch.zeros_like(base))  # a random model still reacts to the word


# --- awareness_scores ------------------------------------------------------------------------------

def test_awareness_counts_the_right_answer_after_each_prompt(models):
    model, tok = models()
    probes = _aware_probes()
    scores = bias.awareness_scores(model, tok, probes)
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 0.5, 1.0}
    # swapping the two answers turns every right answer into a wrong one
    flipped = [{**p, "target_answer": p["other_answer"], "other_answer": p["target_answer"]} for p in probes]
    torch.testing.assert_close(bias.awareness_scores(model, tok, flipped), 1 - scores)
    # two identical prompts: exactly one of the two answers is right, whatever the model prefers
    blind = [{**p, "other_prompt": p["target_prompt"]} for p in probes]
    assert bias.awareness_scores(model, tok, blind).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("bad, match", [
    ({"target_prompt": "a", "other_prompt": "b", "stereo": " x", "anti": " y"}, "single record"),
    ([], "empty"),
    ([{"target_prompt": "a", "other_prompt": "b", "stereo": " x"}], "lacks"),
    ([{"target_prompt": "a", "other_prompt": "b", "stereo": "x", "anti": " y"}], "starting with a space"),
    ([{"target_prompt": "a", "other_prompt": "b", "stereo": " ", "anti": " y"}], "non-empty"),
])
def test_stereotype_scores_reject_bad_probes_clearly(models, bad, match):
    model, tok = models()
    with pytest.raises((TypeError, ValueError), match=match):
        bias.stereotype_scores(model, tok, bad)


def test_awareness_scores_need_the_answer_fields(models):
    model, tok = models()
    with pytest.raises(ValueError, match="awareness"):
        bias.awareness_scores(model, tok, _stereo_probes())


# --- swap_sensitivity ---------------------------------------------------------------------------------

def test_swap_sensitivity_equals_next_token_divergence_and_accepts_unequal_lengths(models):
    model, tok = models()
    pairs = [{"target_prompt": "The blue car was parked by the", "other_prompt": "The red car was parked by the"},
             {"target_prompt": "On Monday the shop", "other_prompt": "On Monday the shop"}]
    pairs = [p for p in pairs if bias.equal_length(tok, p)]
    torch.testing.assert_close(bias.swap_sensitivity(model, tok, pairs), bias.next_token_divergence(model, tok, pairs))
    uneven = [{"target_prompt": "The cat sat", "other_prompt": "The enormous orange cat from next door sat"}]
    assert not bias.equal_length(tok, uneven[0])
    with pytest.raises(ValueError, match="different lengths"):
        bias.next_token_divergence(model, tok, uneven)
    value = bias.swap_sensitivity(model, tok, uneven)
    swapped = [{"target_prompt": uneven[0]["other_prompt"], "other_prompt": uneven[0]["target_prompt"]}]
    torch.testing.assert_close(bias.swap_sensitivity(model, tok, swapped), value, atol=1e-6, rtol=1e-4)
    assert float(value) > 0
    same = [{"target_prompt": "The cat sat", "other_prompt": "The cat sat"}]
    assert float(bias.swap_sensitivity(model, tok, same)) == pytest.approx(0.0, abs=1e-6)


# --- typical magnitudes and the size-matched control ------------------------------------------------------

def _pairs(tok):
    from tests.test_bias import _pairs as pairs_of
    return pairs_of(tok)


def test_relative_scores_reuse_given_typical_magnitudes(models):
    model, tok = models()
    pairs = _pairs(tok)
    typical = bias.typical_magnitudes(model, tok, pairs)
    assert typical.shape == (model.config.num_hidden_layers, model.config.intermediate_size) and (typical >= 0).all()
    torch.testing.assert_close(bias.relative_bias_scores(model, tok, pairs, typical=typical),
                               bias.relative_bias_scores(model, tok, pairs))


def test_matched_random_neurons_draw_the_same_count_from_the_same_size_bins():
    magnitudes = torch.arange(400, dtype=torch.float).view(2, 200).flip(1)  # layer rows, decreasing size
    like = {0: [0, 1, 2, 150], 1: [100, 101]}
    control = bias.matched_random_neurons(like, magnitudes, seed=3, bins=10)
    assert {k: len(v) for k, v in control.items()} == {k: len(v) for k, v in like.items()}
    for layer, ids in control.items():
        assert not set(ids) & set(like[layer])
        rank = magnitudes[layer].argsort().argsort()  # 0 = smallest
        wanted = sorted(int(rank[i]) * 10 // 200 for i in like[layer])
        assert sorted(int(rank[i]) * 10 // 200 for i in ids) == wanted
    assert control == bias.matched_random_neurons(like, magnitudes, seed=3, bins=10)
    assert control != bias.matched_random_neurons(like, magnitudes, seed=4, bins=10)


def test_matched_random_neurons_fall_back_to_the_nearest_bin_when_one_is_used_up():
    magnitudes = torch.arange(20, dtype=torch.float).view(1, 20)
    like = {0: [18, 19]}  # the top bin (of 10) holds exactly these two
    control = bias.matched_random_neurons(like, magnitudes, seed=0, bins=10)
    assert sorted(control[0]) == [16, 17]


@pytest.mark.parametrize("like, magnitudes, match", [
    ([1, 2], torch.ones(2, 10), "dict"),
    ({0: [1]}, torch.ones(10), "n_layers"),
    ({5: [1]}, torch.ones(2, 10), "outside"),
    ({0: [1, 2, 3, 4, 5, 6]}, torch.ones(2, 10), "only 4 others"),
])
def test_matched_random_neurons_reject_bad_input(like, magnitudes, match):
    with pytest.raises((TypeError, ValueError), match=match):
        bias.matched_random_neurons(like, magnitudes, seed=0)


# --- intervals ---------------------------------------------------------------------------------------------

def test_mean_interval_gives_the_mean_or_the_ratio_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    values = rng.normal(-1.0, 1.0, 200)
    out = evaluation.mean_interval(values, seed=1)
    assert out["value"] == pytest.approx(values.mean()) and out["low"] < out["value"] < out["high"]
    assert out["verdict"] == "below 0" and out["n"] == 200 and out["clusters"] == 200
    assert evaluation.mean_interval(rng.normal(0, 1, 50))["verdict"] == "within noise"
    base = rng.uniform(1, 2, 200)
    ratio = evaluation.mean_interval(0.1 * base, baseline=base)
    assert ratio["value"] == pytest.approx(0.1) and ratio["low"] == pytest.approx(0.1) == ratio["high"]


def test_resampling_clusters_widens_the_interval_of_clustered_data():
    rng = np.random.default_rng(0)
    cluster_means = rng.normal(0.3, 1.0, 12)
    values = np.repeat(cluster_means, 10) + rng.normal(0, 0.05, 120)
    labels = np.repeat(np.arange(12), 10).tolist()
    flat = evaluation.mean_interval(values)
    clustered = evaluation.mean_interval(values, clusters=labels)
    assert clustered["value"] == pytest.approx(flat["value"]) and clustered["clusters"] == 12
    assert clustered["high"] - clustered["low"] > 2 * (flat["high"] - flat["low"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(values=[]), "empty"),
    (dict(values=[1.0, 2.0], baseline=[1.0]), "one per item"),
    (dict(values=[1.0, float("nan")]), "finite"),
    (dict(values=[1.0, 2.0], clusters=["a"]), "one label per item"),
    (dict(values=[1.0, -1.0], baseline=[1.0, -1.0]), "sums to 0"),
    (dict(values=[1.0, 2.0], n_boot=5), "n_boot"),
])
def test_mean_interval_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluation.mean_interval(**kwargs)


def test_bootstrap_ci_can_resample_whole_scenarios():
    items = [{"query": "q", "label": 0, "choices": ["a", "b"]} for _ in range(60)]
    predictions = [0] * 30 + [1] * 30  # scenario k's 10 items all right or all wrong
    scenarios = [k // 10 for k in range(60)]
    flat = benchmarks.bootstrap_ci(items, predictions, seed=0)["acc"]
    clustered = benchmarks.bootstrap_ci(items, predictions, seed=0, clusters=scenarios)["acc"]
    assert clustered[1] - clustered[0] > 1.5 * (flat[1] - flat[0])
    assert flat == benchmarks.bootstrap_ci(items, predictions, seed=0, clusters=list(range(60)))["acc"]
    with pytest.raises(ValueError, match="one label per item"):
        benchmarks.bootstrap_ci(items, predictions, clusters=[0, 1])
    compared = benchmarks.paired_comparison(items, predictions, [0] * 60, clusters=scenarios)
    assert compared["difference"] == pytest.approx(0.5) and compared["ci"][0] > 0


# --- measure_behaviour / behaviour_changes ------------------------------------------------------------------

def _probe_set():
    stereo = [{**p, "template": f"t{k % 2}"} for k, p in enumerate(_stereo_probes())]
    aware = [{**p, "template": f"a{k}"} for k, p in enumerate(_aware_probes())]
    neutral = [{"target_prompt": "The blue car stopped by the", "other_prompt": "The green car stopped by the",
                "template": "n0"},
               {"target_prompt": "On Monday the baker", "other_prompt": "On Friday the baker", "template": "n1"}]
    return {"stereotype": stereo, "awareness": aware, "neutral": neutral}


def test_measure_behaviour_collects_each_measure_and_an_unchanged_model_changes_nothing(models):
    model, tok = models()
    probes = _probe_set()
    base = bias.measure_behaviour(model, tok, probes)
    assert set(base) == set(bias.BEHAVIOUR_MEASURES)
    torch.testing.assert_close(base["stereotype"], bias.stereotype_scores(model, tok, probes["stereotype"]))
    torch.testing.assert_close(base["neutral_swap"], bias.swap_sensitivity(model, tok, probes["neutral"]))
    changes = bias.behaviour_changes(base, base, probes)
    for name, c in changes.items():
        assert c["value"] == pytest.approx(0.0, abs=1e-9) and c["verdict"] == "within noise", name
    assert changes["stereotype"]["clusters"] == 2 and changes["stereotype"]["n"] == 3


def test_behaviour_changes_measure_a_real_edit(models):
    model, tok = models()
    probes = _probe_set()
    base = bias.measure_behaviour(model, tok, probes, measures=["stereotype", "neutral_swap"])
    neurons = {layer: list(range(0, model.config.intermediate_size, 2)) for layer in range(2)}
    with bias.zero_neurons(model, neurons):
        new = bias.measure_behaviour(model, tok, probes, measures=["stereotype", "neutral_swap"])
    changes = bias.behaviour_changes(base, new, probes)
    assert changes["stereotype"]["value"] == pytest.approx(float((new["stereotype"] - base["stereotype"]).mean()))
    relative = float((new["neutral_swap"] - base["neutral_swap"]).sum() / base["neutral_swap"].sum())
    assert changes["neutral_swap"]["value"] == pytest.approx(relative, rel=1e-6)
    assert changes["stereotype"]["value"] != 0.0


def test_behaviour_functions_reject_bad_input(models):
    model, tok = models()
    probes = _probe_set()
    with pytest.raises(ValueError, match="Unknown measure"):
        bias.measure_behaviour(model, tok, probes, measures=["fairness"])
    with pytest.raises(ValueError, match="needs the 'neutral' probes"):
        bias.measure_behaviour(model, tok, {"stereotype": probes["stereotype"]}, measures=["neutral_swap"])
    base = bias.measure_behaviour(model, tok, probes, measures=["stereotype"])
    with pytest.raises(ValueError, match="new has no"):
        bias.behaviour_changes(base, {}, probes)
    with pytest.raises(ValueError, match="same probes"):
        bias.behaviour_changes(base, {"stereotype": base["stereotype"][:2]}, probes)


# --- stereotype_attribution -----------------------------------------------------------------------------------

def test_attribution_is_the_derivative_of_the_stereotype_score_along_each_neuron(models):
    """Scaling a neuron's up_proj row by s scales its activation by s on every token, so
    dS/ds at s=1 is exactly sum_t a * dS/da: the attribution. A central finite difference must agree."""
    model, tok = models()
    probes = _stereo_probes()
    attribution = bias.stereotype_attribution(model, tok, probes, batch_size=4)
    assert attribution.shape == (model.config.num_hidden_layers, model.config.intermediate_size)
    assert all(p.grad is None for p in model.parameters())
    flat = attribution.abs().flatten().topk(3).indices.tolist() + [0]
    width, eps = model.config.intermediate_size, 1e-2
    for index in flat:
        neuron = {index // width: [index % width]}
        with bias.scale_neurons(model, neuron, 1 + eps):
            up = float(bias.stereotype_scores(model, tok, probes).double().mean())
        with bias.scale_neurons(model, neuron, 1 - eps):
            down = float(bias.stereotype_scores(model, tok, probes).double().mean())
        derivative = (up - down) / (2 * eps)
        assert derivative == pytest.approx(float(attribution.flatten()[index]), rel=2e-2, abs=2e-4)


def test_attribution_does_not_depend_on_the_batch_size_and_rejects_bad_probes(models):
    model, tok = models()
    probes = _stereo_probes()
    torch.testing.assert_close(bias.stereotype_attribution(model, tok, probes, batch_size=4),
                               bias.stereotype_attribution(model, tok, probes, batch_size=12), atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="lacks"):
        bias.stereotype_attribution(model, tok, _aware_probes())


def test_attribution_works_on_frozen_weights(models):
    model, tok = models()
    probes = _stereo_probes()[:1]
    expected = bias.stereotype_attribution(model, tok, probes)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        torch.testing.assert_close(bias.stereotype_attribution(model, tok, probes), expected)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


# --- splitting by template, the default ranking ----------------------------------------------------------------

def test_split_templates_keeps_each_template_on_one_side_and_balances_axes():
    probes = [{"axis": axis, "template": f"{axis}-{t}", "k": k} for axis in ("a", "b") for t in range(5)
              for k in range(3)]
    first, second = bias.split_templates(probes)
    assert len(first) + len(second) == len(probes)
    assert not {p["template"] for p in first} & {p["template"] for p in second}
    for axis in ("a", "b"):
        assert sorted({p["template"] for p in first if p["axis"] == axis}) == [f"{axis}-0", f"{axis}-2", f"{axis}-4"]
    with pytest.raises(ValueError, match="template"):
        bias.split_templates([{"axis": "a"}])
    with pytest.raises(ValueError, match="every"):
        bias.split_templates(probes, every=1)


def test_fair_pruning_scores_give_each_ranking(models):
    model, tok = models()
    pairs = _pairs(tok)
    torch.testing.assert_close(bias.fair_pruning_scores(model, tok, "relative", pairs=pairs),
                               bias.relative_bias_scores(model, tok, pairs))
    probes = _stereo_probes()
    attribution = bias.fair_pruning_scores(model, tok, "attribution", probes=probes)
    torch.testing.assert_close(attribution, bias.stereotype_attribution(model, tok, probes).clamp(min=0))
    assert (attribution >= 0).all() and attribution.max() > 0
    with pytest.raises(ValueError, match="Known: relative, attribution, targeted"):
        bias.fair_pruning_scores(model, tok, "loudest")
    texts = utils.make_dataloader(["The river ran past the old mill.", "A cat slept on the warm step."], tok,
                                  batch_size=2, max_length=16)
    targeted = bias.fair_pruning_scores(model, tok, "targeted", probes=probes, texts=texts)
    torch.testing.assert_close(targeted, bias.targeted_scores(bias.stereotype_attribution(model, tok, probes),
                                                              bias.text_loss_attribution(model, texts)))
    general = list(bias.general_text_loader(tok, n=3, max_length=16))
    assert sum(len(b["input_ids"]) for b in general) == 3 and general[0]["input_ids"].shape[1] <= 16


def test_text_loss_attribution_is_the_derivative_of_the_loss_in_each_neurons_scale(models):
    """|dL/ds_i| at s = 1, where every neuron's activation is multiplied by s_i: an independent computation."""
    from utils.width import glu_mlps

    model, tok = models()
    texts = utils.make_dataloader(["The river ran past the old mill and on to the sea.", "A cat slept."], tok,
                                  batch_size=2, max_length=16)
    batch = next(iter(texts))
    scales = [torch.ones(m.down_proj.in_features, requires_grad=True) for m in glu_mlps(model)]
    handles = [m.down_proj.register_forward_pre_hook(lambda mod, inp, s=s: (inp[0] * s,))
               for m, s in zip(glu_mlps(model), scales)]
    try:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        expected = torch.stack([g.abs() for g in torch.autograd.grad(loss, scales)])
    finally:
        for h in handles:
            h.remove()
    got = bias.text_loss_attribution(model, texts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no batch"):
        bias.text_loss_attribution(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        bias.text_loss_attribution(model, [{"text": "x"}])


def test_attributions_leave_no_hooks_and_restore_the_training_mode(models):
    """Both attribution scores share one hook set-up: after them (even after a bad batch) the model has no
    hook left, is back in training mode if it was, and its embeddings give outputs without a graph."""
    from utils.width import glu_mlps

    model, tok = models()
    texts = utils.make_dataloader(["The river ran past the old mill."], tok, batch_size=1, max_length=16)

    def hooks():
        return sum(len(m.down_proj._forward_pre_hooks) for m in glu_mlps(model)) + \
            len(model.get_input_embeddings()._forward_hooks)

    before = hooks()
    model.train()
    try:
        bias.stereotype_attribution(model, tok, _stereo_probes()[:1])
        bias.text_loss_attribution(model, texts)
        with pytest.raises(ValueError, match="input_ids"):
            bias.text_loss_attribution(model, [{"text": "x"}])
        assert hooks() == before and model.training
    finally:
        model.eval()
    with torch.no_grad():
        assert not model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_targeted_scores_arithmetic_and_bad_inputs():
    stereo = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    loss = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    out = bias.targeted_scores(stereo, loss)
    med = loss.median()
    torch.testing.assert_close(out, stereo.clamp(min=0) / (loss + med))
    assert out[0, 1] == 0  # pushes against the stereotype: never removed first
    with pytest.raises(ValueError, match="same shape"):
        bias.targeted_scores(stereo, loss[:1])
    with pytest.raises(ValueError, match=">= 0"):
        bias.targeted_scores(stereo, -loss)


def test_first_templates_keeps_whole_templates_per_axis():
    probes = [{"axis": axis, "template": f"{axis}-{t}", "k": k} for axis in ("a", "b") for t in range(4)
              for k in range(2)]
    kept = bias.first_templates(probes, 1)
    assert {p["template"] for p in kept} == {"a-0", "b-0"} and len(kept) == 4
    assert bias.first_templates(probes, None) == probes
    with pytest.raises(ValueError, match="positive integer"):
        bias.first_templates(probes, 0)
    with pytest.raises(ValueError, match="template"):
        bias.first_templates([{"axis": "a"}], 1)


def test_final_state_bias_per_pair_averages_back_to_the_token_mean(models):
    model, tok = models()
    pairs = _pairs(tok)
    per_pair = bias.final_state_bias(model, tok, pairs, per_pair=True)
    assert per_pair.shape == (len(pairs),) and (per_pair > 0).all()
    lengths = torch.tensor([len(tok(p["target_prompt"])["input_ids"]) for p in pairs], dtype=torch.float)
    assert float((per_pair * lengths).sum() / lengths.sum()) == pytest.approx(bias.final_state_bias(model, tok, pairs),
                                                                            rel=1e-5)
