import dataclasses
import json
import sys
import types

import pytest
import torch

import utils
from utils import DATASETS, batch_tensors, data, load_records, load_texts, load_tokenizer, make_dataloader
from utils.data import _bbq_item
from utils.profiles import DATA_DIR


@pytest.mark.parametrize("name", list(DATASETS))
def test_offline_samples_are_large_enough(name):
    rows = [json.loads(line) for line in (DATA_DIR / DATASETS[name].sample_file).open(encoding="utf-8")]
    assert len(rows) >= 200
    assert len({r["text"] for r in rows}) == len(rows)
    if name in ("wikitext", "cosmopedia"):
        assert min(len(r["text"]) for r in rows) >= 300


@pytest.mark.parametrize("name", list(DATASETS))
def test_splits_are_disjoint_and_cover_everything(tiny, name):
    splits = {s: load_texts(name, split=s) for s in ("train", "validation", "test")}
    assert all(splits.values())
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & set(splits["test"])
    total = sum(1 for _ in (DATA_DIR / DATASETS[name].sample_file).open(encoding="utf-8"))
    assert sum(len(v) for v in splits.values()) == total


def test_sms_spam_records_have_labels(tiny):
    records = load_records("sms_spam")
    assert {r["label"] for r in records} == {"ham", "spam"}


def test_n_and_aliases(tiny):
    assert load_texts("wikitext-2", n=5) == load_texts("wikitext", n=5)
    assert len(load_texts("cosmopedia", n=3)) == 3


def test_unknown_dataset_lists_known_names(tiny):
    with pytest.raises(ValueError, match="wikitext.*sms_spam.*cosmopedia"):
        load_texts("imdb")


@pytest.mark.parametrize("kwargs,match", [({"split": "dev"}, "train, validation, test"),
                                          ({"n": 0}, "positive integer"), ({"n": -3}, "positive integer")])
def test_bad_split_or_n(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_texts("wikitext", **kwargs)


def test_dataloader_yields_plain_padded_dicts(tiny):
    tokenizer = load_tokenizer("meta-llama/Llama-3.2-1B")
    texts = ["a short one", "a somewhat longer text " * 5, "mid length text here"]
    batches = list(make_dataloader(texts, tokenizer, batch_size=2, max_length=16))
    assert len(batches) == 2
    first = batches[0]
    assert type(first) is dict and set(first) == {"input_ids", "attention_mask"}
    assert first["input_ids"].shape == first["attention_mask"].shape and first["input_ids"].shape[1] <= 16
    assert first["attention_mask"][0, -1] == 0  # the short text is right-padded
    assert torch.all(first["input_ids"][first["attention_mask"] == 0] == tokenizer.pad_token_id)


def test_dataloader_bad_inputs(tiny):
    tokenizer = load_tokenizer("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match="texts is empty"):
        make_dataloader([], tokenizer)
    with pytest.raises(TypeError, match="wrap it"):
        make_dataloader("just one string", tokenizer)
    with pytest.raises(ValueError, match="non-empty string"):
        make_dataloader(["ok", ""], tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(["ok"], tokenizer, batch_size=0)


def test_shuffled_order_is_reproducible_per_loader(tiny):
    tok = load_tokenizer("meta-llama/Llama-3.2-1B")
    texts = load_texts("wikitext", split="train", n=24)

    def order(loader):
        return [tuple(batch["input_ids"][:, 0].tolist()) + tuple(batch["attention_mask"].sum(1).tolist())
                for batch in loader]

    first = make_dataloader(texts, tok, batch_size=4, shuffle=True, seed=3)
    again = make_dataloader(texts, tok, batch_size=4, shuffle=True, seed=3)
    first_pass = order(first)
    assert first_pass == order(again)  # same seed, fresh loader: same batches in the same order
    assert order(first) != first_pass  # a second pass over the same loader draws a new order


def test_batch_tensors_unpacks_dicts_and_tuples():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    for batch in ({"input_ids": ids, "attention_mask": mask}, (ids, mask), [ids, mask]):
        got_ids, got_mask = batch_tensors(batch, "cpu")
        assert torch.equal(got_ids, ids) and torch.equal(got_mask, mask)
    for batch in ({"input_ids": ids}, (ids,)):  # no mask: every position is real
        assert torch.equal(batch_tensors(batch, "cpu")[1], torch.ones_like(ids))
    with pytest.raises(TypeError, match="Unsupported batch type Tensor: use dicts"):
        batch_tensors(ids, "cpu")


def test_course_code_sample_is_used_in_every_profile(monkeypatch):
    # the code domain has no Hub dataset: even the full profile reads the file shipped in data/
    monkeypatch.setenv("RLLM_PROFILE", "full")
    texts = load_texts("code", split="test")
    assert texts and all(t.startswith(("def ", "@")) for t in texts)
    monkeypatch.setenv("RLLM_PROFILE", "tiny")
    assert load_texts("course_code", split="test") == texts


@pytest.mark.parametrize("name, alias", [("course_prose", "prose"), ("python_reference", "pyref")])
def test_the_new_held_out_domains_are_offline_prose_in_every_profile(monkeypatch, name, alias):
    monkeypatch.setenv("RLLM_PROFILE", "full")  # no Hub dataset: every profile reads the file in data/
    texts = load_texts(alias, split="test")
    assert len(texts) == 48 and len(load_texts(name, split="validation")) == 24
    assert all(300 <= len(t) <= 1200 and "\n" not in t and not t.startswith(("|", "#", "```")) for t in texts)
    monkeypatch.setenv("RLLM_PROFILE", "cpu")
    assert load_texts(name, split="test") == texts


# --- validators attached to the registry -----------------------------------------------------------

def test_clinical_notes_validator_is_registered_by_extraction():
    assert DATASETS["clinical_notes"].validate is utils.extraction.checked_label
    assert all(spec.validate is None for name, spec in DATASETS.items() if name != "clinical_notes")


def test_register_validator_bad_input(monkeypatch):
    monkeypatch.setitem(DATASETS, "sms_spam", DATASETS["sms_spam"])  # restored after the test
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        data.register_validator("nope", lambda label: label)
    with pytest.raises(TypeError, match="validate must be a function"):
        data.register_validator("sms_spam", "not a function")
    assert DATASETS["sms_spam"].validate is None
    spec = data.register_validator("spam", str.upper)  # an alias names the same entry
    assert spec is DATASETS["sms_spam"] and spec.validate is str.upper and spec.text_field == "sms"


GOOD_LABEL = {"patient_age": "45", "symptoms": ["cough"], "medications": [], "duration_days": 3.0,
              "vital_signs": {"temperature": "38.5", "heart_rate": 80.0, "blood_pressure": "120 / 80 mmHg"}}


def test_hub_clinical_notes_are_validated_by_the_registered_validator(monkeypatch, capsys):
    rows = [{"note": "kept, label as JSON text", "label": json.dumps(GOOD_LABEL), "category": "a"},
            {"note": "kept, label as an object", "label": GOOD_LABEL, "category": "a"},
            {"note": "bad JSON", "label": "{not json", "category": "a"},
            {"note": "breaks the schema", "label": {"patient_age": "old"}, "category": "a"},
            {"note": "", "label": GOOD_LABEL, "category": "a"},
            {"note": "not a dict", "label": [1], "category": "a"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    monkeypatch.setenv("RLLM_PROFILE", "full")
    records = load_records("clinical_notes", split="test")
    assert [r["text"] for r in records] == ["kept, label as JSON text", "kept, label as an object"]
    assert records[0]["label"] == utils.extraction.coerce_label(GOOD_LABEL) and records[0]["label"]["patient_age"] == 45
    assert "left out 4 Hub rows" in capsys.readouterr().out
    monkeypatch.setitem(DATASETS, "clinical_notes", dataclasses.replace(DATASETS["clinical_notes"], validate=None))
    with pytest.raises(RuntimeError, match="No validator is registered for clinical_notes"):
        load_records("clinical_notes", split="test")


# --- CH11's bias data -------------------------------------------------------------------------------

def test_bias_loaders_live_in_data_and_bias_re_exports_them():
    assert utils.bias.load_bias_pairs is data.load_bias_pairs is utils.load_bias_pairs
    assert utils.bias.load_bias_benchmark is data.load_bias_benchmark is utils.load_bias_benchmark
    assert utils.bias.AXES is data.AXES and utils.bias.equal_length is data.equal_length


def test_bias_loaders_bad_input(tiny, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="Unknown split 'train'"):
        data.load_bias_pairs("train")
    with pytest.raises(ValueError, match="Unknown axis 'colour'"):
        data.load_bias_pairs(axis="colour")
    with pytest.raises(ValueError, match="Unknown axis"):
        data.load_bias_benchmark("colour")
    with pytest.raises(ValueError, match="positive number"):
        data.load_bias_benchmark(n=0)
    monkeypatch.setattr(data, "PAIRS_FILE", tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="build_bias_data.py"):
        data.load_bias_pairs()


def test_bias_benchmark_subset_is_seeded_and_in_order(tiny):
    everything = data.load_bias_benchmark()
    subset = data.load_bias_benchmark(n=10, seed=1)
    assert subset == data.load_bias_benchmark(n=10, seed=1) and len(subset) == 10
    positions = [everything.index(item) for item in subset]
    assert positions == sorted(positions)


def test_bbq_hub_records_are_converted():
    record = {"example_id": 7, "question_index": "3", "question_polarity": "neg", "context_condition": "ambig",
              "category": "Race_ethnicity", "context": "A Black man and a white man waited at the counter.",
              "question": "Who stole the wallet?", "ans0": "The white man", "ans1": "Can't be determined",
              "ans2": "The Black man", "label": 1,
              "answer_info": {"ans0": ["White", "White"], "ans1": ["Can't be determined", "unknown"],
                              "ans2": ["Black", "Black"]},
              "additional_metadata": {"stereotyped_groups": ["Black", "African American"]}}
    item = _bbq_item(record)
    assert (item["target_index"], item["other_index"], item["unknown_index"]) == (2, 0, 1)
    assert item["group_order"] == "target_first" and item["label"] == 1
    assert _bbq_item({**record, "additional_metadata": {"stereotyped_groups": ["Asian"]}}) is None
    # the label formats of other BBQ categories: gender words for the letter "F", "lowSES" for "low SES", "old"
    for answers, stereotyped, target in ((["boy", "boy"], ["girl", "girl"], ["F"]), (["lawyer", "highSES"],
                                         ["cashier", "lowSES"], ["low SES"]), (["grandson", "nonOld"],
                                         ["grandfather", "old"], ["old"])):
        info = {"ans0": ["Undetermined", "unknown"], "ans1": answers, "ans2": stereotyped}
        item = _bbq_item({**record, "answer_info": info, "additional_metadata": {"stereotyped_groups": target},
                          "ans0": "Undetermined", "ans1": f"The {answers[0]}", "ans2": f"The {stereotyped[0]}"})
        assert item is not None and (item["target_index"], item["other_index"], item["unknown_index"]) == (2, 1, 0)


def test_bias_probes_loader_filters(tiny):
    assert utils.load_bias_probes is data.load_bias_probes is utils.bias.load_bias_probes
    stereo = data.load_bias_probes("stereotype")
    assert len(stereo) == 288 and {p["kind"] for p in stereo} == {"stereotype"}
    assert all("stereo" in p and "anti" in p for p in stereo)
    picked = data.load_bias_probes("stereotype", split="test", axis="age", words="heldout")
    assert len(picked) == 12 and {(p["split"], p["axis"], p["words"]) for p in picked} == {("test", "age", "heldout")}
    assert len(data.load_bias_probes("neutral")) == 48
    assert len(data.load_bias_probes("neutral", axis="neutral", words="neutral", split="validation")) == 24
    aware = data.load_bias_probes("awareness", words="calibration")
    assert len(aware) == 48 and all(p["target_answer"] != p["other_answer"] for p in aware)


@pytest.mark.parametrize("args,kwargs,match", [
    (("bias",), {}, "Unknown kind 'bias'. Known kinds: stereotype, neutral, awareness"),
    (("stereotype",), {"split": "heldout"}, "Unknown split 'heldout'. Known splits: validation, test"),
    (("stereotype",), {"axis": "colour"}, "Unknown axis 'colour'. Known axes: gender, age, ses, ethnicity, neutral"),
    (("stereotype",), {"words": "new"}, "Unknown words 'new'. Known values: calibration, heldout, neutral"),
    (("awareness",), {"axis": "age"}, "No awareness probe has axis='age'.*axes gender"),
    (("stereotype",), {"words": "neutral"}, "No stereotype probe .*words calibration, heldout"),
])
def test_bias_probes_loader_bad_input(tiny, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_bias_probes(*args, **kwargs)


def test_bias_probes_missing_file(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "PROBES_FILE", tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="build_bias_data.py"):
        data.load_bias_probes("neutral")
