"""Datasets for the three profiles, and the dataloader every chapter uses.

Every file the course reads lives here: the text datasets of :data:`DATASETS` (:func:`load_records`,
:func:`load_texts`), each with an optional validator that a technique module registers
(:func:`register_validator`), and CH11's bias data (:func:`load_bias_pairs`, :func:`load_bias_probes`,
:func:`load_bias_benchmark`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from .profiles import DATA_DIR, get_profile

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a course dataset lives in each profile.

    ``validate`` (None: no check) turns a label read from the Hub into the record's label, or returns None to
    leave the row out; the module that defines the labels registers it with :func:`register_validator`.
    """

    name: str
    sample_file: str  # offline stand-in in data/ (cpu and tiny profiles)
    hub_path: str | None  # Hugging Face Hub dataset (full profile); None: the sample is used in every profile
    hub_config: str | None
    text_field: str
    label_field: str | None = None
    label_names: tuple[str, ...] | None = None
    description: str = ""
    validate: Callable[[Any], Any | None] | None = None


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
    "course_prose": DatasetSpec(
        "course_prose", "course_prose_sample.jsonl", None, None, "text",
        description="paragraphs of the course's own explanations: technical English prose (a held-out domain; "
                    "every profile)",
    ),
    "python_reference": DatasetSpec(
        "python_reference", "python_reference_sample.jsonl", None, None, "text",
        description="paragraphs of the Python Language Reference (PSF License; a held-out domain; every profile)",
    ),
}
ALIASES = {"wikitext2": "wikitext", "wikitext-2": "wikitext", "sms": "sms_spam", "spam": "sms_spam",
           "clinical": "clinical_notes", "clinical-ner-qdora": "clinical_notes",
           "code": "course_code", "prose": "course_prose", "pyref": "python_reference"}


def _spec(name: str) -> DatasetSpec:
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: "
            + ", ".join(f"{k} ({v.description})" for k, v in DATASETS.items())
        )
    return DATASETS[key]


def register_validator(name: str, validate: Callable[[Any], Any | None]) -> DatasetSpec:
    """Attach ``validate`` to the dataset ``name`` (an alias works) in :data:`DATASETS`; returns the new entry.

    ``validate(label)`` gets a label read from the Hub (a dict) and returns the label to keep, or None to leave
    the row out. :mod:`utils.extraction` registers the clinical notes' validator when it is imported (``import
    utils`` imports it), so ``data`` imports no technique module. Registering again replaces the validator.
    """
    spec = _spec(name)
    if not callable(validate):
        raise TypeError(f"validate must be a function label -> label or None, got {type(validate).__name__}.")
    DATASETS[spec.name] = replace(spec, validate=validate)
    return DATASETS[spec.name]


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
    Rows whose label cannot be read as the extraction schema (the dataset's registered validator, see
    :func:`register_validator`, returns None) are left out, with a printed count.
    """
    from datasets import load_dataset  # imported here: only the full profile needs it

    if spec.validate is None:
        raise RuntimeError(f"No validator is registered for {spec.name}: import utils.extraction (``import utils`` "
                           "does) before loading it from the Hub.")
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
        label = spec.validate(label) if isinstance(label, dict) else None
        if not isinstance(text, str) or not text.strip() or label is None:
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


# --- CH11's bias data ---------------------------------------------------------------------
# Prompt pairs that differ in one group word (data/bias_pairs.jsonl, every profile), behavioural probes
# (data/bias_probes.jsonl, every profile) and a BBQ-style multiple-choice benchmark (data/bias_mc.jsonl in cpu and
# tiny; the real BBQ, Parrish et al. 2022, from the Hub in full). utils.bias uses them (and re-exports the loaders).

#: The bias axes of the pairs and the benchmark.
AXES: tuple[str, ...] = ("gender", "age", "ses", "ethnicity")
PAIR_SPLITS: tuple[str, ...] = ("calibration", "heldout")
PAIRS_FILE = DATA_DIR / "bias_pairs.jsonl"
MC_FILE = DATA_DIR / "bias_mc.jsonl"
PROBES_FILE = DATA_DIR / "bias_probes.jsonl"
#: What :func:`load_bias_probes` can select: the kinds of probe, their splits and their kinds of word pair.
PROBE_KINDS: tuple[str, ...] = ("stereotype", "neutral", "awareness")
PROBE_SPLITS: tuple[str, ...] = ("validation", "test")
PROBE_WORDS: tuple[str, ...] = ("calibration", "heldout", "neutral")
#: The real BBQ in the ``full`` profile (one configuration per axis, a single ``test`` split).
BBQ_HUB_ID = "oskarvanderwal/bbq"
BBQ_CONFIGS = {"gender": "Gender_identity", "age": "Age", "ses": "SES", "ethnicity": "Race_ethnicity"}


def _check_axis(axis: str | None) -> None:
    if axis is not None and axis not in AXES:
        raise ValueError(f"Unknown axis {axis!r}. Known axes: {', '.join(AXES)} (or None for all).")


def _read_jsonl(path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; it ships with the repository. Rebuild it with "
                                "`python scripts/build_bias_data.py` or restore it with `git checkout -- data/`.")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def equal_length(tokenizer, pair: dict) -> bool:
    """Whether the two prompts of ``pair`` have the same number of tokens under ``tokenizer``."""
    return len(tokenizer(pair["target_prompt"])["input_ids"]) == len(tokenizer(pair["other_prompt"])["input_ids"])


def load_bias_pairs(split: str | None = None, *, axis: str | None = None, tokenizer=None) -> list[dict]:
    """The prompt pairs of ``data/bias_pairs.jsonl`` (every profile: they are the course's own data).

    Args:
        split: ``"calibration"`` (to find neurons), ``"heldout"`` (to measure; other situations) or None for both.
        axis: one of :data:`AXES`, or None for all.
        tokenizer: if given, keep only the pairs whose two prompts have the same number of tokens under
            it (the file guarantees it for SmolLM2's tokenizer; other tokenizers may split a group word
            differently) and print how many were dropped.

    Each record has ``axis``, ``split``, ``target``/``other`` (the group words), ``target_prompt`` and
    ``other_prompt``.
    """
    if split is not None and split not in PAIR_SPLITS:
        raise ValueError(f"Unknown split {split!r}. Known splits: {', '.join(PAIR_SPLITS)} (or None for both).")
    _check_axis(axis)
    pairs = [p for p in _read_jsonl(PAIRS_FILE)
             if (split is None or p["split"] == split) and (axis is None or p["axis"] == axis)]
    if tokenizer is not None:
        kept = [p for p in pairs if equal_length(tokenizer, p)]
        if len(kept) < len(pairs):
            print(f"load_bias_pairs: kept {len(kept)} of {len(pairs)} pairs; {len(pairs) - len(kept)} split "
                  "their group words into different numbers of tokens with this tokenizer.")
        if not kept:
            raise ValueError("No pair has prompts of equal token length under this tokenizer.")
        pairs = kept
    return pairs


def load_bias_probes(kind: str, *, split: str | None = None, axis: str | None = None,
                     words: str | None = None) -> list[dict]:
    """The probes of ``data/bias_probes.jsonl`` of one kind (every profile: they are the course's own data).

    They tell a model that is less biased from one that merely no longer notices the group word.

    Args:
        kind: ``"stereotype"`` (each record has ``stereo`` and ``anti`` continuations: does the model prefer
            the stereotype after the target word more than after the other?), ``"neutral"`` (the same kind of
            sentence with a swap of two words that name no group: how large a difference is without a group)
            or ``"awareness"`` (``target_answer``/``other_answer``, the pronoun that is right after each word:
            does the model still tell the groups apart?).
        split: ``"validation"`` (to choose settings), ``"test"`` (to report) or None for both. The split is
            by template: no sentence is in both.
        axis: one of :data:`AXES` (awareness probes exist for ``"gender"`` only), ``"neutral"`` (the axis of
            the neutral probes) or None for all.
        words: ``"calibration"`` (the word pairs of ``bias_pairs.jsonl``, which found the neurons),
            ``"heldout"`` (two new word pairs per axis) or ``"neutral"`` (the neutral probes), or None for all.

    Every record has ``id``, ``kind``, ``axis``, ``split``, ``words``, ``template``, ``target``/``other`` (the
    two words) and ``target_prompt``/``other_prompt`` (the template rendered with each; they differ only in
    that word), then the fields of its kind. Raises ``ValueError`` for an unknown value, or when nothing
    matches (e.g. ``load_bias_probes("awareness", axis="age")``).
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"Unknown kind {kind!r}. Known kinds: {', '.join(PROBE_KINDS)}.")
    if split is not None and split not in PROBE_SPLITS:
        raise ValueError(f"Unknown split {split!r}. Known splits: {', '.join(PROBE_SPLITS)} (or None for both).")
    if axis is not None and axis not in AXES + ("neutral",):
        raise ValueError(f"Unknown axis {axis!r}. Known axes: {', '.join(AXES)}, neutral (or None for all).")
    if words is not None and words not in PROBE_WORDS:
        raise ValueError(f"Unknown words {words!r}. Known values: {', '.join(PROBE_WORDS)} (or None for all).")
    of_kind = [p for p in _read_jsonl(PROBES_FILE) if p["kind"] == kind]
    probes = [p for p in of_kind if (split is None or p["split"] == split) and (axis is None or p["axis"] == axis)
              and (words is None or p["words"] == words)]
    if not probes:
        axes = sorted({p["axis"] for p in of_kind})
        kinds_of_words = sorted({p["words"] for p in of_kind})
        raise ValueError(f"No {kind} probe has axis={axis!r} and words={words!r}: the {kind} probes have axes "
                         f"{', '.join(axes)} and words {', '.join(kinds_of_words)}.")
    return probes


#: BBQ labels gender answers with words ("girl", "man") or letters ("F", "M") while its stereotyped groups use
#: the letters: these words stand for each letter.
_BBQ_ALIASES = {"f": {"f", "woman", "girl", "female", "women", "girls"},
                "m": {"m", "man", "boy", "male", "men", "boys"}}


def _bbq_norm(label) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


def _bbq_matches(group: str, stereotyped: set[str]) -> bool:
    """Whether an answer's group label (e.g. "lowSES", "girl", "F-Black") names one of the stereotyped groups."""
    names = {group} | {_bbq_norm(part) for part in str(group).replace("-", " ").replace("_", " ").split()}
    names = {_bbq_norm(n) for n in names}
    for target in stereotyped:
        if target in names or names & _BBQ_ALIASES.get(target, set()):
            return True
    return False


def _bbq_item(record: dict) -> dict | None:
    """One BBQ record (Hub format) in the fields of ``bias_mc.jsonl``; None if its groups cannot be told apart."""
    info = record["answer_info"]
    groups = [str(info[f"ans{i}"][1]) for i in range(3)]
    stereotyped = {_bbq_norm(g) for g in record["additional_metadata"]["stereotyped_groups"]}
    unknown = [i for i, g in enumerate(groups) if _bbq_norm(g) == "unknown"]
    target = [i for i, g in enumerate(groups) if i not in unknown and _bbq_matches(g, stereotyped)]
    if len(unknown) != 1 or len(target) != 1:
        return None
    other = ({0, 1, 2} - {unknown[0], target[0]}).pop()
    return {"id": f"bbq-{record['category']}-{record['example_id']}", "axis": record["category"],
            "scenario": f"bbq-{record['category']}-{record['question_index']}",
            "context_condition": record["context_condition"], "question_polarity": record["question_polarity"],
            "context": record["context"], "question": record["question"],
            "choices": [record["ans0"], record["ans1"], record["ans2"]], "label": int(record["label"]),
            "target_index": target[0], "other_index": other, "unknown_index": unknown[0],
            "group_order": "target_first" if record["context"].find(record[f"ans{target[0]}"].split()[-1])
            <= record["context"].find(record[f"ans{other}"].split()[-1]) else "other_first"}


def load_bias_benchmark(axis: str | None = None, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """The multiple-choice bias benchmark: ``data/bias_mc.jsonl`` (cpu, tiny) or BBQ from the Hub (full).

    Every item has ``context``, ``question``, three ``choices``, the correct ``label`` and which choice is
    the stereotyped group (``target_index``), the other group (``other_index``) and "unknown"
    (``unknown_index``), plus ``context_condition`` (``"ambig"``/``"disambig"``) and ``question_polarity``
    (``"neg"``/``"nonneg"``). ``n`` keeps a seeded random subset (BBQ has thousands of items per axis).
    In ``full``, BBQ items whose answers do not name the stereotyped group unambiguously are skipped.
    """
    _check_axis(axis)
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of items, got {n}.")
    if get_profile() == "full":
        from datasets import load_dataset  # only the full profile downloads

        axes = [axis] if axis else list(AXES)
        items = []
        for name in axes:
            records = load_dataset(BBQ_HUB_ID, BBQ_CONFIGS[name], split="test")
            converted = [item for item in map(_bbq_item, records) if item is not None]
            if len(converted) < len(records):
                print(f"BBQ {BBQ_CONFIGS[name]}: kept {len(converted)} of {len(records)} items (the others do not "
                      "name the stereotyped group in their answers unambiguously)")
            items.extend({**item, "axis": name} for item in converted)
        if not items:
            raise ValueError(f"No usable BBQ item for axis {axis!r}: the dataset's answer_info / stereotyped_groups "
                             "fields did not match. Check the dataset version, or use the offline benchmark "
                             "(RLLM_PROFILE=cpu).")
    else:
        items = [r for r in _read_jsonl(MC_FILE) if axis is None or r["axis"] == axis]
    if n is not None and n < len(items):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n]
        items = [items[i] for i in sorted(order.tolist())]
    return items
