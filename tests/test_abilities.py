"""Instruction following vs reasoning (utils.abilities, CH05 section 7): the constraint checker and the number
reader on hand-made replies, the offline data (rebuilt by its script, every item answerable), generation and the
paired comparison on a tiny model, the claim's verdict, and the full-profile path (IFEval and GSM8K through
lm-eval) with lm-eval replaced at its boundary by samples shaped as lm-eval logs them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from utils import abilities, benchmarks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import build_ability_data  # noqa: E402

# --- the checker ---------------------------------------------------------------------------------

CASES = [  # (constraint, a reply that follows it, a reply that does not)
    ({"type": "uppercase"}, "THE SEA IS WIDE AND GREY.", "THE SEA is wide."),
    ({"type": "lowercase"}, "the sea is wide, 3 miles at least.", "The sea is wide."),
    ({"type": "word_count", "n": 4}, "Waves - crash on rocks.", "Waves crash on the rocks."),
    ({"type": "starts_with", "word": "Today"}, "\"Today, the market is busy.\"", "The market is busy today."),
    ({"type": "include_word", "word": "purple"}, "A PURPLE sky over the desert.", "A purpleish sky over the desert."),
    ({"type": "avoid_word", "word": "water"}, "The sea is salty and wide; waterproof boots help.",
     "The sea is full of Water."),
    ({"type": "json_keys", "keys": ["name", "colour"]}, '```json\n{"colour": "grey", "name": "Tom"}\n```',
     '{"name": "Tom", "colour": "grey", "age": 3}'),
]


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[c[0]["type"] for c in CASES])
def test_follows_constraint_on_hand_made_replies(constraint, good, bad):
    assert abilities.follows_constraint(good, constraint)
    assert not abilities.follows_constraint(bad, constraint)
    assert not abilities.follows_constraint("", constraint)  # an empty reply follows nothing
    assert not abilities.follows_constraint("  ... ", constraint)


def test_json_keys_needs_one_object():
    keys = {"type": "json_keys", "keys": ["a"]}
    assert not abilities.follows_constraint('["a"]', keys)
    assert not abilities.follows_constraint('Here it is: {"a": 1}', keys)
    assert not abilities.follows_constraint('{"a": 1', keys)


def test_checker_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="'type' is one of"):
        abilities.follows_constraint("hi", {"type": "rhymes"})
    with pytest.raises(ValueError, match="'type' is one of"):
        abilities.follows_constraint("hi", "uppercase")
    with pytest.raises(ValueError, match="'n', a positive integer"):
        abilities.follows_constraint("hi", {"type": "word_count", "n": 0})
    with pytest.raises(ValueError, match="'word', a non-empty string"):
        abilities.follows_constraint("hi", {"type": "starts_with", "word": " "})
    with pytest.raises(ValueError, match="'keys', a non-empty list of strings"):
        abilities.follows_constraint("{}", {"type": "json_keys", "keys": []})
    with pytest.raises(ValueError, match="reply as a string"):
        abilities.follows_constraint(None, {"type": "uppercase"})
    with pytest.raises(ValueError, match="reply as a string"):
        abilities.numeric_answer(12)


def test_numeric_answer_takes_the_last_number():
    assert abilities.numeric_answer("13 + 6 = 19, minus 1 is 18.") == 18.0
    assert abilities.numeric_answer("The total is 1,234 apples.") == 1234.0
    assert abilities.numeric_answer("It is -3.5") == -3.5
    assert abilities.numeric_answer("no idea") is None
    item = {"target": 18}
    assert abilities.score_response("arithmetic_reasoning", item, "So she has 18.") == 1.0
    assert abilities.score_response("arithmetic_reasoning", item, "18 apples, then 19") == 0.0
    assert abilities.score_response("arithmetic_reasoning", item, "") == 0.0
    with pytest.raises(ValueError, match="Unknown generation task"):
        abilities.score_response("gsm8k", item, "18")


# --- the data ------------------------------------------------------------------------------------

def test_ability_data_is_what_the_script_builds():
    assert build_ability_data.main(["--check"]) == 0, "run python scripts/build_ability_data.py and commit the result"


def _compliant_reply(constraint: dict) -> str:
    kind = constraint["type"]
    return {"uppercase": "A CALM SENTENCE.", "lowercase": "a calm sentence.",
            "word_count": " ".join(["word"] * constraint.get("n", 1)),
            "starts_with": f"{constraint.get('word')}, a calm sentence.",
            "include_word": f"A calm {constraint.get('word')} sentence.", "avoid_word": "A calm sentence.",
            "json_keys": "{" + ", ".join(f'"{k}": 1' for k in constraint.get("keys", [])) + "}"}[kind]


def test_every_instruction_can_be_followed_and_every_problem_is_right():
    prompts = abilities.load_generation_task("instruction_following")
    assert len(prompts) == len(build_ability_data.SUBJECTS) * len(build_ability_data.KINDS)
    assert {p["target"]["type"] for p in prompts} == set(abilities.CONSTRAINT_TYPES)
    for item in prompts:
        assert abilities.follows_constraint(_compliant_reply(item["target"]), item["target"]), item
    problems = abilities.load_generation_task("arithmetic_reasoning")
    records = {r["id"]: r for r in build_ability_data.build_arithmetic()}
    for item in problems:
        kind = records[item["id"]]["kind"]
        numbers = [int(x) for x in re.findall(r"\d+", item["prompt"])]
        expected = {"add": lambda a, b: a + b, "take_away": lambda a, b: a - b, "groups_of": lambda a, b: a * b,
                    "share": lambda a, b: a // b, "add_then_take_away": lambda a, b, c: a + b - c}[kind](*numbers)
        assert item["target"] == expected > 0 and item["prompt"].endswith(abilities.ARITHMETIC_SUFFIX)


def test_generation_task_subsets_are_seeded_and_bad_names_fail():
    a = abilities.load_generation_task("arithmetic_reasoning", n=10, seed=3)
    assert a == abilities.load_generation_task("arithmetic_reasoning", n=10, seed=3) and len(a) == 10
    assert a != abilities.load_generation_task("arithmetic_reasoning", n=10, seed=4)
    with pytest.raises(ValueError, match="Known: instruction_following, arithmetic_reasoning"):
        abilities.load_generation_task("ifeval")
    with pytest.raises(ValueError, match="positive number of items"):
        abilities.load_generation_task("instruction_following", n=0)


def test_missing_data_file_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(abilities, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="build_ability_data.py"):
        abilities.load_generation_task("arithmetic_reasoning")


# --- generation and comparison on a tiny model ----------------------------------------------------

def test_generate_responses_on_a_tiny_model(models):
    model, tok = models()
    prompts = ["Say hello.", "Describe the sea in exactly three words.", "What is 2 + 2?"]
    replies = abilities.generate_responses(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    # left padding: a prompt answered alone gets the same reply as inside a batch
    assert abilities.generate_responses(model, tok, prompts[1:2], max_new_tokens=4) == replies[1:2]
    assert "<|im_start|>user" in abilities.format_prompt(tok, "Say hello.")
    with pytest.raises(ValueError, match=r"wrap a single prompt as \[prompt\]"):
        abilities.generate_responses(model, tok, "Say hello.", max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        abilities.generate_responses(model, tok, prompts, max_new_tokens=0)


@pytest.fixture
def short_replies(monkeypatch):
    """4 new tokens per reply instead of 32: the tiny model's replies are noise either way."""
    for task in abilities.GENERATION_TASKS:
        monkeypatch.setitem(abilities.MAX_NEW_TOKENS, task, 4)


def test_compare_generation_has_compare_models_shape(models, short_replies):
    model, tok = models()
    out = abilities.compare_generation({"base": model, "copy": lambda: model}, tok, n=4, n_boot=50)
    assert out["reference"] == "base" and set(out["tasks"]) == set(abilities.GENERATION_TASKS)
    for task, rows in out["tasks"].items():
        assert rows["base"]["vs_reference"] is None and rows["base"]["n"] == 4
        vs = rows["copy"]["vs_reference"]
        assert vs["difference"] == 0.0 and not vs["resolved"]  # the same model: no difference
        assert rows["copy"]["metric"] == abilities.TASK_METRIC[task]
        assert out["responses"][task]["base"] == out["responses"][task]["copy"]
    assert "within noise" in benchmarks.comparison_table(out)
    with pytest.raises(ValueError, match="non-empty dict"):
        abilities.compare_generation({}, tok)
    with pytest.raises(ValueError, match="not one of the models"):
        abilities.compare_generation({"base": model}, tok, reference="pruned")
    with pytest.raises(ValueError, match="single string"):
        abilities.compare_generation({"base": model}, tok, "arithmetic_reasoning")


def test_compare_abilities_uses_the_local_proxies_off_full(models, short_replies):
    model, tok = models()
    out = abilities.compare_abilities({"base": model, "pruned": model}, tok, limit=2, n_boot=20)
    assert out["abilities"] == abilities.LOCAL_ABILITY_TASKS and out["limit"] == 2
    assert abilities.claim_check(out, "pruned")["verdict"] == "not resolved"
    with pytest.raises(ValueError, match="limit must be a positive number"):
        abilities.compare_abilities({"base": model}, tok, limit=0)


# --- the claim -----------------------------------------------------------------------------------

def _comparison(follow_ci, reason_ci):
    def row(ci):
        return {"pruned": {"vs_reference": {"difference": sum(ci) / 2, "ci": ci, "n": 40,
                                            "resolved": ci[0] > 0 or ci[1] < 0}},
                "base": {"vs_reference": None}}
    return {"reference": "base", "abilities": dict(abilities.LOCAL_ABILITY_TASKS),
            "tasks": {"instruction_following": row(follow_ci), "arithmetic_reasoning": row(reason_ci)}}


@pytest.mark.parametrize("follow,reason,verdict", [
    ((0.05, 0.30), (-0.40, -0.10), "supported"),
    ((0.05, 0.30), (-0.20, 0.10), "not resolved"),
    ((-0.10, 0.10), (-0.40, -0.10), "not resolved"),
    ((-0.30, -0.05), (-0.40, -0.10), "contradicted"),
    ((0.05, 0.30), (0.10, 0.40), "contradicted"),
])
def test_claim_check_verdicts(follow, reason, verdict):
    check = abilities.claim_check(_comparison(follow, reason), "pruned")
    assert check["verdict"] == verdict
    lines = abilities.claim_lines(check)
    assert f": {verdict}." in lines and "pruned - base" in lines


def test_claim_check_bad_inputs():
    with pytest.raises(ValueError, match="what compare_abilities returned"):
        abilities.claim_check({"tasks": {}}, "pruned")
    with pytest.raises(ValueError, match="not a compared model"):
        abilities.claim_check(_comparison((0, 1), (0, 1)), "base")


# --- full: IFEval and GSM8K through lm-eval, lm-eval replaced at its boundary ---------------------

def _lm_eval_output(n: int, right: set[int]) -> dict:
    """What lm_eval.simple_evaluate returns for ifeval and gsm8k with log_samples=True (lm-eval 0.4.x: one sample
    per item and filter, the metrics of process_results merged into it; IFEval's are bools and lists)."""
    ifeval = [{"doc_id": d, "filter": "none", "filtered_resps": ["reply"], "prompt_level_strict_acc": d in right,
               "inst_level_strict_acc": [d in right, True], "prompt_level_loose_acc": True,
               "inst_level_loose_acc": [True, True]} for d in range(n)]
    gsm8k = [{"doc_id": d, "filter": flt, "filtered_resps": ["42"], "exact_match": float(d in right)}
             for flt in ("strict-match", "flexible-extract") for d in reversed(range(n))]
    share = len(right) / n
    return {"results": {"ifeval": {"alias": "ifeval", "prompt_level_strict_acc,none": share,
                                   "prompt_level_strict_acc_stderr,none": 0.1, "inst_level_strict_acc,none": 0.5},
                        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": share,
                                  "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": share}},
            "samples": {"ifeval": ifeval, "gsm8k": gsm8k}}


def test_full_profile_runs_ifeval_and_gsm8k_through_lm_eval(models, monkeypatch):
    model, tok = models()
    pruned = type(model)(model.config)  # another module object, so that the fake can tell the two apart
    calls = []

    class FakeLM:
        def __init__(self, pretrained, **kwargs):
            self.model = pretrained

    class FakeLmEval:
        @staticmethod
        def simple_evaluate(model, tasks, num_fewshot, limit, **kwargs):
            calls.append({"tasks": tasks, "num_fewshot": num_fewshot, "limit": limit})
            return _lm_eval_output(limit, {0, 1, 2} if model.model is pruned else {0, 3})

    monkeypatch.setenv("RLLM_PROFILE", "full")
    monkeypatch.setattr(benchmarks, "_import_lm_eval", lambda: (FakeLmEval, FakeLM, lambda **kwargs: None))
    out = abilities.compare_abilities({"base": model, "pruned": pruned}, tok, limit=6, n_boot=50)
    assert calls == [{"tasks": ["ifeval", "gsm8k"], "num_fewshot": abilities.GSM8K_FEWSHOT, "limit": 6}] * 2
    assert out["abilities"] == {"instruction following": "ifeval", "reasoning": "gsm8k"}
    ifeval, gsm8k = out["tasks"]["ifeval"], out["tasks"]["gsm8k"]
    assert ifeval["base"]["metric"] == "prompt_level_strict_acc"
    assert gsm8k["base"]["metric"] == "exact_match_strict-match"
    assert ifeval["base"]["score"] == pytest.approx(2 / 6) and ifeval["pruned"]["score"] == pytest.approx(3 / 6)
    assert gsm8k["base"]["n"] == 6  # one value per item, not one per item and filter
    vs = gsm8k["pruned"]["vs_reference"]
    assert (vs["only_a"], vs["only_b"]) == (1, 2)  # item 3 only base, items 1 and 2 only pruned
    raw = benchmarks.run_lm_eval(model, tok, ["gsm8k"], limit=6)["gsm8k"]
    assert raw["n"] == 6 and raw["per_item"]["exact_match_strict-match"] == [1.0, 0, 0, 1.0, 0, 0]


GENERATE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
{extra}output_type: generate_until
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 3
"""
TWO_FILTERS = """metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: "strict-match"
    filter: [{function: "regex", regex_pattern: "#### (\\\\d+)"}, {function: "take_first"}]
  - name: "flexible-extract"
    filter: [{function: "regex", group_select: -1, regex_pattern: "(\\\\d+)"}, {function: "take_first"}]
"""
BOOL_METRIC = """process_results: !function bool_metric.process_results
metric_list:
  - metric: prompt_level_strict_acc
    aggregation: mean
    higher_is_better: true
"""


def test_real_lm_eval_generate_until_samples_give_one_value_per_item(models, tmp_path):
    """The sample shapes the fake above assumes, from lm-eval itself on a tiny model: a task with two filters (as
    GSM8K) logs one sample per item and filter; a pass/fail metric (as IFEval's) is logged as a bool; a task whose
    config fixes num_fewshot at 0 (as IFEval) keeps 0 when num_fewshot=1 is asked for."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = models()
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(f'{{"q": "What is {k} + {k}?", "a": "{2 * k}"}}\n' for k in range(1, 4)))
    (tmp_path / "bool_metric.py").write_text("def process_results(doc, results):\n    return "
                                             "{'prompt_level_strict_acc': doc['q'].startswith('What is 1 ')}\n")
    (tmp_path / "filtered.yaml").write_text(GENERATE_YAML.format(name="filtered", data=data,
                                                                 extra="fewshot_split: test\n") + TWO_FILTERS)
    (tmp_path / "boolean.yaml").write_text(GENERATE_YAML.format(name="boolean", data=data, extra="num_fewshot: 0\n")
                                           + BOOL_METRIC)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["filtered", "boolean"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  num_fewshot=1, log_samples=True, verbosity="ERROR")
    for name, metric in (("filtered", "exact_match_strict-match"), ("boolean", "prompt_level_strict_acc")):
        entry = benchmarks._plain_metrics(out["results"][name])
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        per_item = benchmarks._per_item_scores(samples, entry)[metric]
        assert len(per_item) == len({s["doc_id"] for s in samples}) == 3
        assert sum(per_item) / 3 == pytest.approx(entry[metric])
    assert len(out["samples"]["filtered"]) == 6  # 3 items x 2 filters
    assert benchmarks._per_item_scores(sorted(out["samples"]["boolean"], key=lambda s: s["doc_id"]),
                                       {"prompt_level_strict_acc": 1.0})["prompt_level_strict_acc"] == [1.0, 0.0, 0.0]
    boolean_prompt = out["samples"]["boolean"][0]["arguments"][0][0]
    assert boolean_prompt.startswith("Question:") and boolean_prompt.count("Question:") == 1  # no few-shot example
    assert out["samples"]["filtered"][0]["arguments"][0][0].count("Question:") == 2  # one example, then the item
