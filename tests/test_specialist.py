"""utils.specialist: CH07's clinical specialist in one place -- its folder, the adapter, the training call both
notebooks share, and where CH09_NB02 finds it (folder, Hub id in full only, or a short run here). Tiny models."""

from __future__ import annotations

import pytest
import torch

import utils
from utils import publish, specialist

BASE = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
RECORDS_N = 8
TRAIN = {"steps": 1, "batch_size": 4, "last_blocks": 2}


@pytest.fixture(scope="module")
def records():
    return utils.load_records("clinical_notes", split="train", n=RECORDS_N)


def _params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_the_folder_is_one_place(tiny):
    assert specialist.specialist_folder() == utils.runs_dir("tiny") / "CH07_clinical_specialist"
    assert specialist.specialist_folder("cpu").parts[-2:] == ("cpu", specialist.SPECIALIST_NAME)


def test_add_lora_trains_float32_adapters_only_on_a_half_precision_base(tiny, models):
    model, _ = models(BASE)
    peft_model = specialist.add_lora(model.half(), rank=2, alpha=4, last_blocks=3)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}  # no optimizer on float16 weights
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n in trainable}
    assert blocks == {21, 22, 23}


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"alpha": -1}, "alpha must be a positive number"),
    ({"target_modules": "q_proj"}, "non-empty list of projection names"),
    ({"last_blocks": 0}, "last_blocks must be None"),
    ({"last_blocks": 25}, "from 1 to 24"),
    ({"target_modules": ["q_proj", "qkv"]}, r"named \['qkv'\]"),
])
def test_add_lora_bad_inputs(tiny, models, kwargs, message):
    model, _ = models(BASE)
    with pytest.raises(ValueError, match=message):
        specialist.add_lora(model, **kwargs)


def test_train_specialist_is_the_course_loop_on_answer_only_batches(tiny, models, records):
    model, tokenizer = models(BASE)
    peft_model = specialist.add_lora(model, rank=2, alpha=4)
    history, loader = specialist.train_specialist(peft_model, tokenizer, records, steps=2, batch_size=4,
                                                  progress=False)
    assert history["settings"]["steps"] == 2 and len(history["loss"]) == 2
    assert "labels" in next(iter(loader))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        specialist.train_specialist(peft_model, tokenizer, records, steps=0)


def test_load_specialist_reads_the_folder_ch07_writes(tiny, models, records, tmp_path):
    base, tokenizer = models(BASE)
    trained, _ = specialist.train_here(base, tokenizer, records, **TRAIN)
    folder = publish.save_with_card(trained, tokenizer, tmp_path / "spec", base_model=base.name_or_path,
                                    changes=["LoRA, merged"], results={"schema compliance": 0.5})
    found, info = specialist.load_specialist(base, tokenizer, folder=folder)
    assert info["source"] == "folder" and info["where"] == str(folder)
    assert _params_equal(found, trained) and not _params_equal(found, base)


def test_load_specialist_trains_one_when_the_folder_does_not_fit(tiny, models, records, tmp_path):
    other, tokenizer = models("HuggingFaceTB/SmolLM2-135M-Instruct")  # 30 blocks, not 24
    folder = publish.save_with_card(other, tokenizer, tmp_path / "other", base_model=other.name_or_path,
                                    changes=["nothing"], results={"x": 1.0})
    base, _ = models(BASE)
    found, info = specialist.load_specialist(base, tokenizer, folder=folder, records=records, train_settings=TRAIN)
    assert info["source"] == "trained here" and "does not fit" in info["reason"]
    assert "num_hidden_layers: 24 vs 30" in info["reason"]
    assert not specialist.same_shape(base, found) and not _params_equal(found, base)


def test_load_specialist_ignores_a_hub_id_outside_full(tiny, models, records, tmp_path):
    base, tokenizer = models(BASE)
    _, info = specialist.load_specialist(base, tokenizer, folder=tmp_path / "none", specialist_id="someone/clinical",
                                         records=records, train_settings=TRAIN)
    assert info["source"] == "trained here" and "full profile only" in info["reason"]


def test_load_specialist_bad_inputs(tiny, models, records, tmp_path):
    base, tokenizer = models(BASE)
    with pytest.raises(ValueError, match="run CH07_NB02 first"):
        specialist.load_specialist(base, tokenizer, folder=tmp_path / "none")
    with pytest.raises(ValueError, match="run CH07_NB02 first"):
        specialist.load_specialist(base, tokenizer, folder=tmp_path / "none", records=records, train_settings={})
    with pytest.raises(ValueError, match="Hub repository id"):
        specialist.load_specialist(base, tokenizer, specialist_id="not an id")
    with pytest.raises(ValueError, match="base_model must be the transformers model"):
        specialist.load_specialist("model", tokenizer)


def test_clinical_texts_are_the_chats_the_specialist_learned(tiny, models, records):
    _, tokenizer = models(BASE)
    texts = specialist.clinical_texts(tokenizer, records[:2])
    for text, record in zip(texts, records[:2]):
        assert record["text"] in text and text.endswith("<|im_end|>")
        assert utils.extraction.format_answer(record["label"]) in text
    with pytest.raises(ValueError):
        specialist.clinical_texts(tokenizer, [{"text": "no label"}])
