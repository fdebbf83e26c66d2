"""Benchmark evaluation (utils.benchmarks): the scorer on hand-made items, lm-eval's standard error, paired
comparisons, the offline tasks, and run_lm_eval against our scorer on a tiny model (needs lm-eval)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import utils
from utils import benchmarks


def _item(query="The capital of France is", choices=("Paris.", "a small green frog that sings"), label=0):
    return {"query": query, "choices": list(choices), "label": label}


# --- the scorer ----------------------------------------------------------------------------

def test_score_choices_on_a_hand_made_item_equals_one_sequence_at_a_time(models):
    model, tok = models()
    item = _item()
    out = benchmarks.score_choices(model, tok, [item, item], batch_size=3, progress=False)
    for j, choice in enumerate(item["choices"]):
        context = tok(item["query"])["input_ids"]
        whole = tok(item["query"] + " " + choice)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
        ref = sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole)))
        assert out["loglik"][0][j] == pytest.approx(ref, abs=1e-4)
        assert out["loglik"][1][j] == pytest.approx(ref, abs=1e-4)  # batched with other rows: same number
    row = out["loglik"][0]
    assert out["pred"][0] == max(range(2), key=row.__getitem__)
    per_char = [row[j] / len(c) for j, c in enumerate(item["choices"])]
    assert out["pred_norm"][0] == max(range(2), key=per_char.__getitem__)


def test_norm_rule_can_differ_from_the_sum_rule():
    items = [_item(choices=("ab", "abcdefghij"))]
    # the long answer has the lower sum but the higher log-likelihood per character
    assert benchmarks.norm_predictions([[-3.0, -5.0]], items) == [1]
    assert max(range(2), key=[-3.0, -5.0].__getitem__) == 0


def test_context_question_items_use_mc_prompt(models):
    model, tok = models()
    bbq_like = {"context": "The river flows.", "question": "Where?", "choices": ["north", "south"], "label": 1}
    as_query = {"query": utils.mc_prompt(bbq_like), "choices": ["north", "south"], "label": 1}
    a = benchmarks.score_choices(model, tok, [bbq_like], progress=False)
    b = benchmarks.score_choices(model, tok, [as_query], progress=False)
    assert a == b
    assert utils.bias.score_choices is benchmarks.score_choices  # one scorer, two names (CH11 uses utils.bias)


def test_scorer_bad_inputs_say_what_to_do(models):
    model, tok = models()
    with pytest.raises(ValueError, match="items is empty"):
        benchmarks.score_choices(model, tok, [], progress=False)
    with pytest.raises(TypeError, match=r"wrap it as \[item\]"):
        benchmarks.score_choices(model, tok, _item(), progress=False)
    with pytest.raises(ValueError, match="at least two non-empty strings"):
        benchmarks.score_choices(model, tok, [_item(choices=("only one",))], progress=False)
    with pytest.raises(ValueError, match="give it a 'query' string"):
        benchmarks.score_choices(model, tok, [{"choices": ["a", "b"], "label": 0}], progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        benchmarks.score_choices(model, tok, [_item()], batch_size=0, progress=False)


# --- metrics and their noise -----------------------------------------------------------------

def test_accuracy_stderr_is_lm_evals_formula():
    items = [_item(label=i % 2) for i in range(5)]
    preds = [0, 1, 1, 1, 0]  # right on items 0, 1, 3, 4
    out = benchmarks.accuracy(items, preds)
    correct = [1, 1, 0, 1, 1]
    mean = sum(correct) / 5
    sample_sd = math.sqrt(sum((c - mean) ** 2 for c in correct) / 4)
    assert out["acc"] == pytest.approx(0.8)
    assert out["acc_stderr"] == pytest.approx(sample_sd / math.sqrt(5))
    lm_eval_metrics = pytest.importorskip("lm_eval.api.metrics", reason="lm-eval is not installed (pip install "
                                          "lm-eval); it is in requirements-dev")
    assert out["acc_stderr"] == pytest.approx(lm_eval_metrics.mean_stderr(correct))
    assert benchmarks.mean_stderr([1.0]) is None  # one item: spread unknown


def test_mc_metrics_and_bad_predictions():
    items = [_item(label=0), _item(label=1)]
    out = benchmarks.mc_metrics(items, {"pred": [0, 0], "pred_norm": [0, 1]})
    assert (out["acc"], out["acc_norm"], out["n"]) == (0.5, 1.0, 2)
    assert out["acc_norm_stderr"] == 0.0
    with pytest.raises(ValueError, match="one choice index per item"):
        benchmarks.accuracy(items, [0])
    with pytest.raises(ValueError, match="choice index 0-1"):
        benchmarks.accuracy(items, [0, 2])
    with pytest.raises(ValueError, match="output of score_choices"):
        benchmarks.mc_metrics(items, {"pred": [0, 0]})


def test_mcnemar_exact_values():
    assert benchmarks.mcnemar_exact(0, 0) == 1.0
    assert benchmarks.mcnemar_exact(5, 5) == 1.0
    assert benchmarks.mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 * P(X <= 0), X ~ Bin(6, 1/2)
    assert benchmarks.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    with pytest.raises(ValueError, match=">= 0"):
        benchmarks.mcnemar_exact(-1, 2)


def test_paired_comparison_resolves_a_real_difference_and_not_noise():
    items = [_item(label=0) for _ in range(200)]
    a = [0] * 100 + [1] * 100  # 50 % right
    b = [0] * 190 + [1] * 10  # 95 % right: B wins on 90 items, loses on none
    out = benchmarks.paired_comparison(items, a, b, n_boot=200)
    assert out["difference"] == pytest.approx(0.45)
    assert (out["only_a"], out["only_b"]) == (0, 90)
    assert out["resolved"] and out["ci"][0] > 0 and out["p_value"] < 1e-6
    same = [0, 1] * 100
    swapped = [1, 0] * 100  # as accurate as `same`, wrong on other items
    noise = benchmarks.paired_comparison(items, same, swapped, n_boot=200)
    assert noise["difference"] == 0.0 and not noise["resolved"] and noise["p_value"] > 0.5
    with pytest.raises(ValueError, match="pred_b"):
        benchmarks.paired_comparison(items, a, b[:-1])


def test_bootstrap_ci_moved_with_the_bbq_default_kept():
    items = utils.load_bias_benchmark()[:40]
    preds = [item["label"] if k % 3 else 0 for k, item in enumerate(items)]
    bbq = utils.bootstrap_ci(items, preds, n_boot=50)
    assert "s_dis" in bbq  # utils.bootstrap_ci keeps BBQ's scores as its default metric
    assert bbq == benchmarks.bootstrap_ci(items, preds, metric=utils.bbq_scores, n_boot=50)
    acc = benchmarks.bootstrap_ci(items, preds, n_boot=50)
    assert set(acc) == {"acc"} and acc["acc"][0] <= benchmarks.accuracy(items, preds)["acc"] <= acc["acc"][1]
    with pytest.raises(ValueError, match="n_boot"):
        benchmarks.bootstrap_ci(items, preds, n_boot=5)


# --- the offline tasks ---------------------------------------------------------------------

@pytest.mark.parametrize("name", benchmarks.LOCAL_TASKS)
def test_local_tasks_are_well_formed_and_seeded(name):
    items = benchmarks.local_task(name)
    assert len(items) >= 40
    for item in items:
        assert item["query"] and 0 <= item["label"] < len(item["choices"]) and len(set(item["choices"])) >= 2
    subset = benchmarks.local_task(name, n=10, seed=1)
    assert subset == benchmarks.local_task(name, n=10, seed=1) and len(subset) == 10
    assert all(s["query"] in {i["query"] for i in items} for s in subset)
    assert all(s in items for s in benchmarks.local_task(name, n=10))  # the same seed draws the same distractors


def test_cloze_keeps_the_true_ending_among_other_sentences_endings():
    items = benchmarks.local_task("wikitext_cloze")
    first = items[0]
    answer = first["choices"][first["label"]]
    assert len(answer.split()) == benchmarks.CLOZE_WORDS and answer[-1] in ".!?"
    labels = [item["label"] for item in items]
    assert len(set(labels)) == 4  # the right answer's position is shuffled


def test_local_task_and_profile_tasks(monkeypatch):
    with pytest.raises(ValueError, match="Known: wikitext_cloze"):
        benchmarks.local_task("arc_easy")
    with pytest.raises(ValueError, match="positive number"):
        benchmarks.local_task("bias_mc", n=0)
    assert utils.benchmark_tasks() == list(benchmarks.LOCAL_TASKS)
    monkeypatch.setenv("RLLM_PROFILE", "full")
    assert utils.benchmark_tasks() == list(benchmarks.STANDARD_TASKS)


def test_lm_eval_task_files(tmp_path):
    yaml = benchmarks.write_local_task(tmp_path, "my_task", [_item(), _item(label=1)], fewshot=True)
    text = yaml.read_text()
    assert 'doc_to_text: "{{query}}"' in text and "fewshot_split: test" in text
    assert len((tmp_path / "my_task.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        benchmarks.write_local_task(tmp_path, "bad-name", [_item()])


# --- lm-eval ---------------------------------------------------------------------------------

def test_run_lm_eval_says_how_to_install_when_missing(monkeypatch, models):
    model, tok = models()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ImportError, match=r"pip install 'lm-eval>=0.4.8'"):
        utils.run_lm_eval(model, tok, ["bias_mc"], limit=2)


def test_run_lm_eval_agrees_with_our_scorer_item_by_item(models):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval); it is in requirements-dev")
    model, tok = models()
    items = benchmarks.local_task("wikitext_cloze", n=8) + [_item(), _item(label=1)]
    ours = benchmarks.score_choices(model, tok, items, progress=False)
    theirs = utils.run_lm_eval(model, tok, {"hand_made": items}, batch_size=4)["hand_made"]
    assert theirs["pred"] == ours["pred"] and theirs["pred_norm"] == ours["pred_norm"]
    for a, b in zip(ours["loglik"], theirs["loglik"]):
        assert a == pytest.approx(b, abs=1e-4)
    mine = benchmarks.mc_metrics(items, ours)
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"):
        assert theirs[key] == pytest.approx(mine[key]), key
    lists = ("n", "loglik", "pred", "pred_norm", "per_item")
    assert all(isinstance(v, float) for k, v in theirs.items() if k not in lists)
    assert theirs["per_item"]["acc"] == [float(p == item["label"]) for p, item in zip(ours["pred"], items)]


def test_run_lm_eval_by_name_with_limit_and_fewshot(models):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval); it is in requirements-dev")
    model, tok = models()
    out = utils.run_lm_eval(model, tok, ["sms_spam_question"], limit=4, num_fewshot=1, batch_size=4)
    entry = out["sms_spam_question"]
    assert entry["n"] == 4 and 0.0 <= entry["acc"] <= 1.0 and entry["acc_stderr"] >= 0.0


def test_run_lm_eval_bad_inputs(models):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval); it is in requirements-dev")
    model, tok = models()
    with pytest.raises(TypeError, match=r"\['bias_mc'\]"):
        utils.run_lm_eval(model, tok, "bias_mc")
    with pytest.raises(ValueError, match="limit must be a positive number"):
        utils.run_lm_eval(model, tok, ["bias_mc"], limit=0)
    with pytest.raises(ValueError, match="num_fewshot"):
        utils.run_lm_eval(model, tok, ["bias_mc"], num_fewshot=-1)
    with pytest.raises(ValueError, match="tasks is empty"):
        utils.run_lm_eval(model, tok, [])


# --- several models on the same items (compare_models) --------------------------------------

def test_paired_difference_on_hand_made_scores():
    a, b = [1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]
    out = benchmarks.paired_difference(a, b, n_boot=200)
    assert out["difference"] == pytest.approx(3 / 8)
    assert out["only_a"] == 0 and out["only_b"] == 3
    assert out["p_value"] == pytest.approx(benchmarks.mcnemar_exact(0, 3))
    assert out["ci"][0] <= out["difference"] <= out["ci"][1]
    same = benchmarks.paired_difference(a, a, n_boot=50)
    assert same["difference"] == 0 and same["ci"] == (0.0, 0.0) and not same["resolved"]
    graded = benchmarks.paired_difference([0.5, 0.2, 0.9], [0.6, 0.3, 1.0], n_boot=100)
    assert graded["difference"] == pytest.approx(0.1) and graded["resolved"] and "p_value" not in graded
    with pytest.raises(ValueError, match="same items"):
        benchmarks.paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="same items"):
        benchmarks.paired_difference([], [])


def test_per_item_scores_follow_the_metric_names_and_filters():
    samples = [{"doc_id": 0, "filter": "none", "acc": 1.0, "acc_norm": 0.0},
               {"doc_id": 1, "filter": "none", "acc": 0.0, "acc_norm": 1.0}]
    assert benchmarks._per_item_scores(samples, {"acc": 0.5, "acc_norm": 0.5}) == {"acc": [1.0, 0.0],
                                                                                 "acc_norm": [0.0, 1.0]}
    filtered = [{"doc_id": 0, "filter": "strict-match", "exact_match": 1.0},
                {"doc_id": 0, "filter": "flexible-extract", "exact_match": 0.0}]
    out = benchmarks._per_item_scores(filtered, {"exact_match_strict-match": 1.0, "exact_match_flexible-extract": 0.0})
    assert out == {"exact_match_strict-match": [1.0], "exact_match_flexible-extract": [0.0]}


def test_compare_models_pairs_every_model_with_the_reference(models):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval); it is in requirements-dev")
    model, tok = models()
    other, _ = models()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))  # another model: its answers differ on some items
    built = []

    def build():  # a model given as a function is built when its turn comes
        built.append(True)
        return other

    out = benchmarks.compare_models({"base": model, "other": build, "same": model}, tok, ["sms_spam_question"],
                                    limit=6, n_boot=100, batch_size=4)
    rows = out["tasks"]["sms_spam_question"]
    assert out["reference"] == "base" and built == [True] and list(rows) == ["base", "other", "same"]
    direct = utils.run_lm_eval(model, tok, ["sms_spam_question"], limit=6, batch_size=4)["sms_spam_question"]
    assert rows["base"]["score"] == pytest.approx(direct["acc"]) and rows["base"]["n"] == 6
    assert rows["base"]["vs_reference"] is None
    assert rows["base"]["values"] == direct["per_item"]["acc"]  # kept, so paired_between can pair any two
    assert rows["same"]["vs_reference"]["difference"] == 0 and not rows["same"]["vs_reference"]["resolved"]
    diff = rows["other"]["score"] - rows["base"]["score"]
    assert rows["other"]["vs_reference"]["difference"] == pytest.approx(diff)
    table = benchmarks.comparison_table(out)
    assert table.count("\n") == 2 and "vs base" in table and ("within noise" in table or "beyond noise" in table)


def test_compare_models_bad_inputs(models):
    model, tok = models()
    with pytest.raises(ValueError, match="non-empty dict"):
        benchmarks.compare_models({}, tok, ["bias_mc"])
    with pytest.raises(ValueError, match="reference 'x' is not one of"):
        benchmarks.compare_models({"base": model}, tok, ["bias_mc"], reference="x")
    with pytest.raises(ValueError, match="what compare_models returned"):
        benchmarks.comparison_table({"rows": []})


def _comparison(values: dict[str, list[float]], reference: str = "base") -> dict:
    """A compare_models-shaped result built by hand (one task), without running lm-eval."""
    rows = {name: {"metric": "acc", "score": sum(v) / len(v), "ci": (0.0, 1.0), "n": len(v), "values": v,
                   "vs_reference": None if name == reference else benchmarks.paired_difference(values[reference], v)}
            for name, v in values.items()}
    return {"reference": reference, "tasks": {"bias_mc": rows}}


def test_paired_between_pairs_two_models_that_are_not_the_reference():
    comparison = _comparison({"base": [1, 1, 1, 1, 0, 1, 1, 0], "cut": [0, 0, 1, 0, 0, 0, 1, 0],
                              "recovered": [1, 0, 1, 1, 0, 1, 1, 0]})
    out = benchmarks.paired_between(comparison, "cut", "recovered", n_boot=200)
    direct = benchmarks.paired_difference([0, 0, 1, 0, 0, 0, 1, 0], [1, 0, 1, 1, 0, 1, 1, 0], n_boot=200)
    assert list(out) == ["bias_mc"] and out["bias_mc"] == direct
    assert out["bias_mc"]["difference"] == pytest.approx(3 / 8) and out["bias_mc"]["only_b"] == 3
    reverse = benchmarks.paired_between(comparison, "recovered", "cut", n_boot=200)["bias_mc"]
    assert reverse["difference"] == pytest.approx(-3 / 8)
    table = benchmarks.differences_table(out, "recovered vs cut")
    assert table.startswith("bias_mc") and "recovered vs cut: +0.375" in table
    assert table.endswith("beyond noise") or table.endswith("within noise")
    same = benchmarks.differences_table(benchmarks.paired_between(comparison, "base", "base", n_boot=50), "x")
    assert same.endswith("+0.000 [+0.000, +0.000] within noise")
    summary = benchmarks.comparison_summary(comparison)
    assert all("values" not in row for row in summary["tasks"]["bias_mc"].values())
    assert summary["tasks"]["bias_mc"]["cut"]["vs_reference"] == comparison["tasks"]["bias_mc"]["cut"]["vs_reference"]
    assert "values" in comparison["tasks"]["bias_mc"]["cut"]  # the original is left as it was


def test_paired_between_and_differences_table_bad_inputs():
    comparison = _comparison({"base": [1, 0, 1], "cut": [0, 0, 1]})
    with pytest.raises(ValueError, match="what compare_models returned"):
        benchmarks.paired_between({"rows": []}, "base", "cut")
    with pytest.raises(ValueError, match="what compare_models returned"):
        benchmarks.comparison_summary({"rows": []})
    with pytest.raises(ValueError, match="'recovered' is not one of the compared models"):
        benchmarks.paired_between(comparison, "cut", "recovered")
    del comparison["tasks"]["bias_mc"]["cut"]["values"]
    with pytest.raises(ValueError, match="no per-item values for 'cut'.*re-run compare_models"):
        benchmarks.paired_between(comparison, "base", "cut")
    with pytest.raises(ValueError, match="what paired_between returned"):
        benchmarks.differences_table({}, "x")
    with pytest.raises(ValueError, match="not a paired difference"):
        benchmarks.differences_table({"bias_mc": {"difference": 0.1}}, "x")


def test_run_lm_eval_skips_lm_evals_environment_report(models, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval); it is in requirements-dev")
    model, tok = models()
    lm_eval, _, _ = benchmarks._import_lm_eval()
    evaluator = sys.modules[lm_eval.simple_evaluate.__module__]
    calls = []
    monkeypatch.setattr(evaluator, "add_env_info", lambda storage: calls.append(storage))
    utils.run_lm_eval(model, tok, ["sms_spam_question"], limit=2, batch_size=2)
    assert calls == [] and evaluator.add_env_info is not None  # skipped during the call, restored after it
    evaluator.add_env_info({})
    assert len(calls) == 1


def test_check_models_names_and_reference():
    assert benchmarks.check_models({"a": 1, "b": 2}) == (["a", "b"], "a")
    assert benchmarks.check_models({"a": 1, "b": 2}, "b") == (["a", "b"], "b")
    with pytest.raises(ValueError, match="non-empty dict"):
        benchmarks.check_models([])
    with pytest.raises(ValueError, match="reference 'c' is not one of"):
        benchmarks.check_models({"a": 1}, "c")
