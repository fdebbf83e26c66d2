"""Datasets for the three profiles, and the dataloader every chapter uses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .profiles import DATA_DIR, get_profile

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a course dataset lives in each profile."""

    name: str
    sample_file: str  # offline stand-in in data/ (cpu and tiny profiles)
    hub_path: str | None  # Hugging Face Hub dataset (full profile); None: the sample is used in every profile
    hub_config: str | None
    text_field: str
    label_field: str | None = None
    label_names: tuple[str, ...] | None = None
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "wikitext": DatasetSpec(
        "wikitext", "wikitext_sample.jsonl", "Salesforce/wikitext", "wikitext-2-raw-v1", "text",
        description="encyclopedic paragraphs (general English)",
    ),
    "sms_spam": DatasetSpec(
        "sms_spam", "sms_spam_sample.jsonl", "ucirvine/sms_spam", None, "sms",
        label_field="label", label_names=("ham", "spam"),
        description="short informal text messages labelled ham or spam",
    ),
    "cosmopedia": DatasetSpec(
        "cosmopedia", "cosmopedia_sample.jsonl", "HuggingFaceTB/cosmopedia-100k", None, "text",
        description="synthetic educational text (textbook sections, explainers, how-tos)",
    ),
    "clinical_notes": DatasetSpec(
        "clinical_notes", "clinical_notes_sample.jsonl", "oopere/clinical-ner-qdora", None, "note",
        label_field="label",
        description="synthetic clinical notes with a gold JSON extraction label (CH07)",
    ),
    "course_code": DatasetSpec(
        "course_code", "course_code_sample.jsonl", None, None, "text",
        description="Python functions of the course's own utils package (a held-out domain; every profile)",
    ),
}
ALIASES = {"wikitext2": "wikitext", "wikitext-2": "wikitext", "sms": "sms_spam", "spam": "sms_spam",
           "clinical": "clinical_notes", "clinical-ner-qdora": "clinical_notes",
           "code": "course_code"}


def _spec(name: str) -> DatasetSpec:
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: "
            + ", ".join(f"{k} ({v.description})" for k, v in DATASETS.items())
        )
    return DATASETS[key]


def _split_of(index: int) -> str:
    # A fixed, interleaved split for sets that ship without one: 20% test, 10% validation.
    bucket = index % 10
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def _check_args(split: str, n: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {', '.join(SPLITS)}.")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise ValueError(f"n must be a positive integer (or None for all records), got {n!r}.")


def _offline_records(spec: DatasetSpec, split: str) -> list[dict]:
    path = DATA_DIR / spec.sample_file
    if not path.exists():
        raise FileNotFoundError(f"The offline sample {path} is missing; it ships with the repository "
                                "(restore it with `git checkout -- data/`).")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if rows and "split" in rows[0]:  # samples that were made with their own (stratified) split
        return [row for row in rows if row["split"] == split]
    return [row for i, row in enumerate(rows) if _split_of(i) == split]


def _hub_records(spec: DatasetSpec, split: str) -> list[dict]:
    from datasets import load_dataset  # imported here: only the full profile needs it

    if spec.name == "clinical_notes":
        return _clinical_hub_records(spec, split)
    if spec.name == "wikitext":
        data = load_dataset(spec.hub_path, spec.hub_config, split=split)
        # wikitext stores one line per row; keep real paragraphs, drop headings and blank lines.
        lines = (row["text"].strip() for row in data)
        return [{"text": line} for line in lines if len(line) > 200 and not line.startswith("=")]
    data = load_dataset(spec.hub_path, spec.hub_config, split="train")
    records = []
    for i, row in enumerate(data):
        if _split_of(i) != split:
            continue
        record = {"text": row[spec.text_field]}
        if spec.label_field:
            record["label"] = spec.label_names[row[spec.label_field]]
        records.append(record)
    return records


def _clinical_hub_records(spec: DatasetSpec, split: str) -> list[dict]:
    """The Hub clinical notes in the offline sample's record format.

    Untested offline (the Hub cannot be reached while the course's tests run): the mapping is
    written from the dataset's published layout (``train``/``test`` splits; ``note``, ``label`` as
    a JSON string or an object, ``category``) and is defensive about the rest. The validation
    split is carved from Hub ``train``: every tenth note of each category, a fixed choice.
    Rows whose label cannot be read as the extraction schema are left out, with a printed count.
    """
    from datasets import load_dataset  # imported here: only the full profile needs it

    from .extraction import check_schema, coerce_label

    data = load_dataset(spec.hub_path, spec.hub_config, split="test" if split == "test" else "train")
    records, seen_per_category, skipped = [], {}, 0
    for i, row in enumerate(data):
        category = str(row.get("category") or "all")
        if split != "test":
            position = seen_per_category.get(category, 0)
            seen_per_category[category] = position + 1
            if (position % 10 == 9) != (split == "validation"):
                continue
        text = row.get(spec.text_field) or row.get("text")
        label = row.get(spec.label_field)
        if isinstance(label, str):
            try:
                label = json.loads(label)
            except json.JSONDecodeError:
                label = None
        label = coerce_label(label) if isinstance(label, dict) else None
        if not isinstance(text, str) or not text.strip() or label is None or check_schema(label):
            skipped += 1
            continue
        records.append({"id": f"hub-{split}-{i:04d}", "category": category, "split": split, "text": text,
                        "label": label, "novel": []})
    if skipped:
        print(f"[clinical_notes] left out {skipped} Hub rows whose note or label does not fit the schema.")
    return records


def load_records(name: str, *, split: str = "train", n: int | None = None) -> list[dict]:
    """Records (dicts with at least ``"text"``) of a course dataset, for the active profile.

    ``sms_spam`` records also have ``"label"`` (``"ham"`` or ``"spam"``). ``clinical_notes``
    records have ``"text"`` (the note), ``"label"`` (the gold extraction, see
    :mod:`utils.extraction`), ``"category"`` and ``"novel"`` (test-only phrasings the note uses).
    The ``cpu`` and ``tiny`` profiles read the samples in ``data/``; ``full`` downloads the real
    dataset. Datasets without their own splits get a fixed one: 70% train, 10% validation, 20% test.
    """
    spec = _spec(name)
    _check_args(split, n)
    offline = get_profile() != "full" or spec.hub_path is None
    records = _offline_records(spec, split) if offline else _hub_records(spec, split)
    return records[:n] if n is not None else records


def load_texts(name: str, *, split: str = "train", n: int | None = None) -> list[str]:
    """Texts of a course dataset: ``"wikitext"``, ``"sms_spam"``, ``"cosmopedia"``, ``"clinical_notes"`` or
    ``"course_code"``.

    Args:
        name: dataset name (an unknown one raises ``ValueError`` listing the known ones).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        n: keep the first ``n`` texts (default: all).
    """
    return [record["text"] for record in load_records(name, split=split, n=n)]


def make_dataloader(texts: Sequence[str], tokenizer, *, batch_size: int = 8, max_length: int = 256,
                    shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader of plain dicts ``{"input_ids", "attention_mask"}`` (right-padded tensors).

    Plain dicts, not the tokenizer's ``BatchEncoding``: optipfair only accepts dicts. Each text
    is truncated to ``max_length`` tokens; padding positions have ``attention_mask == 0``.

    With ``shuffle=True`` the order comes from a generator seeded once with ``seed``, so each pass
    over the loader draws a *new* order (what several epochs want). Runs that must see the same
    batches in the same order should each build their own loader with the same seed.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string: wrap it as [text].")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass at least one string (e.g. load_texts('wikitext', n=32)).")
    if not all(isinstance(t, str) and t for t in texts):
        raise ValueError("every item of texts must be a non-empty string.")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token.")
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    pad_id = tokenizer.pad_token_id

    def collate(batch: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(encoded, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def batch_tensors(batch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of one batch, on ``device``; an all-ones mask when none is given.

    Accepts the dicts of :func:`make_dataloader` (or any dict with ``input_ids``) and
    ``(input_ids, attention_mask)`` tuples. Every helper that runs a model over a dataloader reads
    its batches through this function.
    """
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
    elif isinstance(batch, (list, tuple)):
        ids, mask = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        raise TypeError(f"Unsupported batch type {type(batch).__name__}: use dicts with input_ids and "
                        "attention_mask (utils.make_dataloader makes them).")
    mask = torch.ones_like(ids) if mask is None else mask
    return ids.to(device), mask.to(device)
