import json

import pytest
import torch

from utils import DATASETS, batch_tensors, load_records, load_texts, load_tokenizer, make_dataloader
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
