"""The offline clinical-notes set (CH07): built deterministically, valid labels, stratified disjoint splits,
test-only phrasings kept out of training."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from utils import check_schema, load_records
from utils.profiles import DATA_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import build_clinical_notes  # noqa: E402

PATH = DATA_DIR / "clinical_notes_sample.jsonl"


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in PATH.open(encoding="utf-8")]


def test_the_build_is_deterministic_and_matches_the_file_on_disk():
    first = build_clinical_notes.to_jsonl(build_clinical_notes.build())
    second = build_clinical_notes.to_jsonl(build_clinical_notes.build())
    assert first == second
    assert PATH.read_text(encoding="utf-8") == first, "run scripts/build_clinical_notes.py and commit the result"
    assert build_clinical_notes.main(["--check"]) == 0


def test_another_seed_gives_other_notes():
    assert build_clinical_notes.build(seed=1)[0]["text"] != build_clinical_notes.build()[0]["text"]


def test_sizes_categories_and_unique_notes(rows):
    assert len(rows) == sum(build_clinical_notes.CATEGORY_SIZES.values()) == 400
    assert Counter(r["category"] for r in rows) == build_clinical_notes.CATEGORY_SIZES
    assert len({r["text"] for r in rows}) == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_every_label_follows_the_schema(rows):
    for r in rows:
        assert check_schema(r["label"]) == [], (r["id"], check_schema(r["label"]))


def test_labels_are_rendered_in_the_notes(rows):
    # Numbers of the label appear verbatim in the note (typos never touch digits).
    for r in rows:
        vitals = r["label"]["vital_signs"]
        if vitals["temperature"] is not None:
            assert str(vitals["temperature"]) in r["text"], r["text"]
        if vitals["heart_rate"] is not None:
            assert str(vitals["heart_rate"]) in r["text"], r["text"]
        for med in r["label"]["medications"]:
            assert med["dose"].split()[0] in r["text"], r["text"]
        if r["category"] not in ("implicit", "typos") and r["label"]["patient_age"] is not None:
            assert str(r["label"]["patient_age"]) in r["text"], r["text"]


def test_splits_are_disjoint_stratified_and_complete(tiny, rows):
    splits = {s: load_records("clinical_notes", split=s) for s in ("train", "validation", "test")}
    texts = {s: {r["text"] for r in recs} for s, recs in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert sum(len(v) for v in splits.values()) == len(rows)
    for category, size in build_clinical_notes.CATEGORY_SIZES.items():
        n = {s: sum(r["category"] == category for r in recs) for s, recs in splits.items()}
        assert n["test"] == round(0.2 * size) and n["validation"] == round(0.1 * size), (category, n)


def test_test_only_phrasings_never_reach_train_or_validation(rows):
    markers = build_clinical_notes.test_only_markers()
    assert len(markers) >= 20
    for r in rows:
        if r["split"] != "test":
            assert r["novel"] == []
            assert not [m for m in markers if m in r["text"]], r["text"]
    test_rows = [r for r in rows if r["split"] == "test"]
    used = {m for r in test_rows for m in r["novel"]}
    assert len(used) >= 20, "test notes use a good share of the test-only phrasings"
    assert sum(bool(r["novel"]) for r in test_rows) >= len(test_rows) // 2
    for r in test_rows:
        if r["category"] != "typos":  # typos may alter a marker's letters
            assert all(m in r["text"] for m in r["novel"]), r


def test_number_words():
    assert [build_clinical_notes.number_words(n) for n in (7, 19, 40, 45, 92)] == [
        "seven", "nineteen", "forty", "forty-five", "ninety-two"]


def test_typos_never_touch_digits():
    import random

    text = "Temperature 101.2 and pulse 98 with headache and fatigue since yesterday"
    noisy = build_clinical_notes.add_typos(random.Random(0), text, rate=1.0)
    assert noisy != text and "101.2" in noisy and " 98 " in noisy


def test_clinical_notes_alias_and_n(tiny):
    assert load_records("clinical", split="test", n=3) == load_records("clinical_notes", split="test")[:3]
