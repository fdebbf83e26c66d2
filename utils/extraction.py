"""Structured extraction from clinical notes (CH07): the schema, the prompts, chat formatting with
loss on the answer only, batched greedy generation, and the scorer.

A note in free text becomes one JSON object with exactly these keys::

    {"patient_age": int | null,
     "symptoms": [str, ...],
     "vital_signs": {"temperature": number | null, "heart_rate": int | null, "blood_pressure": "120/80" | null},
     "medications": [{"name": str, "dose": str, "frequency": str}, ...],
     "duration_days": int | null}

The records this module reads are those of ``utils.load_records("clinical_notes")``: dicts with
``"text"`` (the note), ``"label"`` (the gold object above) and ``"category"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import register_validator

TOP_LEVEL_KEYS: tuple[str, ...] = ("patient_age", "symptoms", "vital_signs", "medications", "duration_days")
VITAL_KEYS: tuple[str, ...] = ("temperature", "heart_rate", "blood_pressure")
MEDICATION_KEYS: tuple[str, ...] = ("name", "dose", "frequency")
#: The five single-valued fields scored by exact match (the vital signs are read inside ``vital_signs``).
SCALAR_FIELDS: tuple[str, ...] = ("patient_age", "temperature", "heart_rate", "blood_pressure", "duration_days")

#: The same rules as :func:`check_schema`, written as a JSON Schema document (draft 2020-12), for
#: readers who want to validate with the ``jsonschema`` package or paste the schema into a prompt.
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": list(TOP_LEVEL_KEYS),
    "properties": {
        "patient_age": {"type": ["integer", "null"], "minimum": 0},
        "symptoms": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "vital_signs": {
            "type": "object",
            "additionalProperties": False,
            "required": list(VITAL_KEYS),
            "properties": {
                "temperature": {"type": ["number", "null"]},
                "heart_rate": {"type": ["integer", "null"], "minimum": 0},
                "blood_pressure": {"type": ["string", "null"], "minLength": 1},
            },
        },
        "medications": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": list(MEDICATION_KEYS),
                "properties": {key: {"type": "string", "minLength": 1} for key in MEDICATION_KEYS},
            },
        },
        "duration_days": {"type": ["integer", "null"], "minimum": 0},
    },
}

#: The prompt the adapter is trained with: it names the task and nothing else.
MINIMAL_PROMPT = "Extract the patient information from the clinical note as JSON."

#: A prompt that spells out the schema and the rules, for a model that was never trained on the task.
STRICT_PROMPT = (
    "You convert clinical notes into JSON. Reply with exactly one JSON object and nothing else: "
    "no markdown, no explanation. Use exactly these keys:\n"
    '{"patient_age": integer or null, "symptoms": [strings], '
    '"vital_signs": {"temperature": number or null, "heart_rate": integer or null, '
    '"blood_pressure": "systolic/diastolic" string or null}, '
    '"medications": [{"name": string, "dose": string, "frequency": string}], '
    '"duration_days": integer or null}\n'
    "Rules: write null (or an empty list) for anything the note does not state about the patient; never "
    "guess a value. Ignore numbers and medicines that belong to someone else or to the clinic. Write "
    "symptoms as short lowercase medical terms, doses like \"400 mg\" and frequencies like \"twice daily\"."
)

PROMPTS: dict[str, str] = {"minimal": MINIMAL_PROMPT, "strict": STRICT_PROMPT}


# --- the schema -------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not (isinstance(value, float) and math.isnan(value))


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_schema(obj: Any) -> list[str]:
    """The ways ``obj`` breaks the extraction schema; an empty list means it complies.

    Exactly the five top-level keys, exactly the three vital-sign keys, exactly ``name``/``dose``/
    ``frequency`` in each medication, and the types of the module docstring (``true`` is not an
    integer). It checks the *form* of an answer; whether the values are right is the scorer's job
    (a blood pressure must be a string, and ``"130 over 85"`` complies but does not match ``"130/85"``).

    Example:
        >>> check_schema({"patient_age": "45"})[:1]
        ['patient_age must be an integer or null, got str']
    """
    if not isinstance(obj, Mapping):
        return [f"the answer must be a JSON object, got {type(obj).__name__}"]
    problems = []
    missing = [k for k in TOP_LEVEL_KEYS if k not in obj]
    extra = [k for k in obj if k not in TOP_LEVEL_KEYS]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected keys: {', '.join(map(str, extra))}")
    for key in ("patient_age", "duration_days"):
        if key in obj and obj[key] is not None and not (_is_int(obj[key]) and obj[key] >= 0):
            problems.append(f"{key} must be an integer or null, got {type(obj[key]).__name__}")
    if "symptoms" in obj:
        symptoms = obj["symptoms"]
        if not isinstance(symptoms, list) or not all(isinstance(s, str) and s.strip() for s in symptoms):
            problems.append("symptoms must be a list of non-empty strings")
    if "vital_signs" in obj:
        vitals = obj["vital_signs"]
        if not isinstance(vitals, Mapping):
            problems.append(f"vital_signs must be an object, got {type(vitals).__name__}")
        else:
            missing = [k for k in VITAL_KEYS if k not in vitals]
            extra = [k for k in vitals if k not in VITAL_KEYS]
            if missing:
                problems.append(f"vital_signs is missing: {', '.join(missing)}")
            if extra:
                problems.append(f"vital_signs has unexpected keys: {', '.join(map(str, extra))}")
            checks = {"temperature": (_is_number, "a number"), "heart_rate": (_is_int, "an integer"),
                      "blood_pressure": (_is_text, "a string such as \"120/80\"")}
            for key, (ok, what) in checks.items():
                if vitals.get(key) is not None and not ok(vitals[key]):
                    problems.append(f"vital_signs.{key} must be {what} or null, got {vitals[key]!r}")
    if "medications" in obj:
        meds = obj["medications"]
        if not isinstance(meds, list):
            problems.append(f"medications must be a list, got {type(meds).__name__}")
        else:
            for i, med in enumerate(meds):
                if not isinstance(med, Mapping) or set(med) != set(MEDICATION_KEYS):
                    problems.append(f"medications[{i}] must be an object with exactly name, dose, frequency")
                elif not all(isinstance(med[k], str) and med[k].strip() for k in MEDICATION_KEYS):
                    problems.append(f"medications[{i}]: name, dose and frequency must be non-empty strings")
    return problems


def parse_json_answer(text: str) -> Any | None:
    """The first top-level JSON object in a model's answer, or ``None`` when there is none.

    Tolerates what small models wrap around the object (markdown fences, a sentence before it,
    text after it): decoding is tried at each ``{`` that opens a new top-level block, and stops where
    the object ends. A ``{`` *inside* a broken object (say, a medication inside an answer whose
    blood pressure is not quoted) is not a candidate, so a broken answer is not mistaken for one of
    its parts. Returns what the object decodes to (a dict), without checking the schema.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_json_answer expects the model's answer as a string, got {type(text).__name__}.")
    decoder = json.JSONDecoder()
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if in_string:
            escaped = char == "\\" and not escaped
            in_string = not (char == '"' and not escaped)
            continue
        if char == '"' and depth > 0:  # quotes in prose around the object do not count
            in_string = True
        elif char == "{":
            if depth == 0:
                try:
                    return decoder.raw_decode(text, i)[0]
                except json.JSONDecodeError:
                    pass
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
    return None


def format_answer(label: Mapping) -> str:
    """The training target for a gold label: one line of JSON without spaces (fewer tokens to learn and
    to generate), keys in the schema's order."""
    problems = check_schema(label)
    if problems:
        raise ValueError(f"The label does not follow the extraction schema: {'; '.join(problems)}.")
    ordered = {key: label[key] for key in TOP_LEVEL_KEYS}
    ordered["vital_signs"] = {key: label["vital_signs"][key] for key in VITAL_KEYS}
    ordered["medications"] = [{key: med[key] for key in MEDICATION_KEYS} for med in label["medications"]]
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def _as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return value


def coerce_label(label: Mapping) -> dict:
    """A copy of ``label`` with harmless format differences fixed, for labels written elsewhere.

    ``45.0`` or ``"45"`` become ``45`` for the integer fields, ``"101.2"`` becomes ``101.2``,
    ``"130 / 85 mmHg"`` becomes ``"130/85"``, missing vital signs become ``null`` and missing lists
    ``[]``. Nothing is invented: anything else is left as it is for :func:`check_schema` to judge.
    """
    import re

    if not isinstance(label, Mapping):
        raise TypeError(f"coerce_label expects a dict, got {type(label).__name__}.")
    out = dict(label)
    for key in ("patient_age", "duration_days"):
        out[key] = _as_int(out.get(key))
    out["symptoms"] = out.get("symptoms") if out.get("symptoms") is not None else []
    out["medications"] = out.get("medications") if out.get("medications") is not None else []
    vitals = dict(out.get("vital_signs") or {})
    for key in VITAL_KEYS:
        vitals.setdefault(key, None)
    vitals["heart_rate"] = _as_int(vitals["heart_rate"])
    temperature = vitals["temperature"]
    if isinstance(temperature, str):
        try:
            vitals["temperature"] = float(temperature.strip())
        except ValueError:
            pass
    bp = vitals["blood_pressure"]
    if isinstance(bp, str):
        match = re.fullmatch(r"\s*(\d{2,3})\s*/\s*(\d{2,3})\s*(mm ?hg)?\s*", bp, flags=re.IGNORECASE)
        if match:
            vitals["blood_pressure"] = f"{match.group(1)}/{match.group(2)}"
    out["vital_signs"] = vitals
    return out


def checked_label(label: Any) -> dict | None:
    """A label read from the Hub's clinical notes as a record's label: :func:`coerce_label`'s copy, or None when
    it is not a dict or :func:`check_schema` finds a problem (the row is then left out).

    The ``clinical_notes`` dataset's validator, registered in :data:`utils.data.DATASETS` when this module is
    imported (:func:`utils.data.register_validator`).
    """
    if not isinstance(label, Mapping):
        return None
    label = coerce_label(label)
    return None if check_schema(label) else label


register_validator("clinical_notes", checked_label)


def validate_records(records: Sequence[Mapping], *, need_label: bool = True) -> None:
    """Raise a ``ValueError`` naming the first malformed record (no ``text`` string, bad ``label``)."""
    if isinstance(records, (str, Mapping)) or not isinstance(records, Sequence):
        raise TypeError("records must be a list of dicts such as utils.load_records('clinical_notes', split='test').")
    if not records:
        raise ValueError("records is empty: pass at least one record.")
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"record {i} is a {type(record).__name__}, not a dict with 'text' and 'label'.")
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise ValueError(f"record {i} has no note: 'text' must be a non-empty string, got {record.get('text')!r}.")
        if need_label:
            if "label" not in record:
                raise ValueError(f"record {i} has no 'label' (the gold JSON object).")
            problems = check_schema(record["label"])
            if problems:
                raise ValueError(f"record {i}'s label breaks the schema: {'; '.join(problems)}.")


# --- chat formatting and the training batches ---------------------------------------------------

def _check_notes(notes: Sequence[str]) -> list[str]:
    if isinstance(notes, str):
        raise TypeError("notes must be a list of strings, not a single string: wrap it as [note].")
    notes = list(notes)
    for i, note in enumerate(notes):
        if not isinstance(note, str):
            raise TypeError(f"note {i} is a {type(note).__name__}, not a string: pass the note's text "
                            "(record['text']), not the record itself.")
        if not note.strip():
            raise ValueError(f"note {i} is empty.")
    return notes


def end_of_turn_id(tokenizer) -> int:
    """Id of the token that closes a chat turn (``<|im_end|>`` in ChatML), else the eos token's."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return vocab["<|im_end|>"]
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has neither <|im_end|> nor an eos token: it cannot end an answer.")
    return tokenizer.eos_token_id


def chat_prompt(tokenizer, note: str, system_prompt: str = MINIMAL_PROMPT) -> str:
    """The text the model sees before its answer: system prompt, the note as the user turn, and
    the opening of the assistant turn (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``)."""
    (note,) = _check_notes([note])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("This tokenizer has no chat template; use an instruct model's tokenizer "
                         "(utils.load_model returns one in every profile).")
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": note}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_ids(tokenizer, note: str, system_prompt: str) -> list[int]:
    return tokenizer(chat_prompt(tokenizer, note, system_prompt), add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, note: str, label: Mapping, system_prompt: str = MINIMAL_PROMPT) -> dict:
    """Token ids of one training example and where its answer starts.

    Returns ``{"input_ids": [...], "prompt_length": n}``: the chat prompt (tokenized exactly as
    :func:`generate_answers` tokenizes it), then the answer (:func:`format_answer`) and the
    end-of-turn token. Prompt and answer are tokenized separately, so the boundary between them
    is the same at training and at generation time.
    """
    prompt = _prompt_ids(tokenizer, note, system_prompt)
    answer = tokenizer(format_answer(label), add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    return {"input_ids": prompt + answer, "prompt_length": len(prompt)}


def collate_answer_only(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` copies ``input_ids`` and puts ``-100`` (ignored by the loss) on the prompt and on
    padding. Padding is read from the **attention mask**, never from ``input_ids == pad_id``: in
    SmolLM2 the pad token *is* the end-of-turn token ``<|im_end|>``, which must stay a learned
    target at the end of every answer (or the model never learns to stop).
    """
    if not examples:
        raise ValueError("collate_answer_only got an empty batch.")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, example in enumerate(examples):
        labels[row, : example["prompt_length"]] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_sft_dataloader(records: Sequence[Mapping], tokenizer, *, system_prompt: str = MINIMAL_PROMPT,
                        batch_size: int = 8, max_length: int = 384, shuffle: bool = True,
                        seed: int = 0) -> DataLoader:
    """A DataLoader of training batches (plain dicts) with the loss on the answer tokens only.

    Each record becomes ``prompt + answer + <|im_end|>`` (see :func:`encode_example`); batches are
    right-padded by :func:`collate_answer_only`. Examples longer than ``max_length`` tokens are
    left out (a line says how many) rather than cut, since a cut answer would teach unfinished JSON.
    ``shuffle=True`` draws the order from a generator seeded once with ``seed``.
    """
    validate_records(records)
    if batch_size < 1 or max_length < 8:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 8, got {batch_size} and {max_length}.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token.")
    encoded = [encode_example(tokenizer, r["text"], r["label"], system_prompt) for r in records]
    kept = [e for e in encoded if len(e["input_ids"]) <= max_length]
    if len(kept) < len(encoded):
        longest = max(len(e["input_ids"]) for e in encoded)
        print(f"make_sft_dataloader: left out {len(encoded) - len(kept)} of {len(encoded)} examples longer than "
              f"max_length={max_length} tokens (the longest has {longest}).")
    if not kept:
        raise ValueError(f"Every example is longer than max_length={max_length} tokens: raise max_length.")
    pad_id = tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(kept, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=lambda batch: collate_answer_only(batch, pad_id))


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def with_replay(dataloader, texts: Sequence[str], tokenizer, *, steps: int, rows: int = 1,
                max_tokens: int = 128) -> list[dict[str, torch.Tensor]]:
    """``steps`` training batches that mix the task with general text (replay, against forgetting).

    The batches of ``dataloader`` (e.g. :func:`make_sft_dataloader`; read pass after pass, as
    :func:`utils.train` reads them, so the task batches are the same ones in the same order), each
    with ``rows`` more rows: the next texts of ``texts`` (cycled), at most ``max_tokens`` tokens each,
    with **every** token a label. So each optimizer step also practises plain language modelling on
    general text, which limits how far the adapter pulls the model away from it. Rows are
    right-padded to a common width (``-100`` labels and ``attention_mask == 0`` on the padding), and
    each batch's ``replay`` entry (a bool per row) marks the general rows. Pass the list to
    :func:`utils.train_lora_adapter` with ``loss_fn=answer_loss`` (the replayed text's own next
    tokens are the targets) or ``loss_fn=replay_distill_loss(teacher)`` (the teacher's next-token
    distributions are); it costs the compute of the extra rows.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (optimizer steps), got {steps!r}.")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int (general-text rows per batch), got {rows!r}.")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}.")
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings (general text to replay).")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token.")
    encoded = [tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] for t in texts]
    if any(len(ids) < 2 for ids in encoded):
        raise ValueError("Every replay text needs at least 2 tokens (one to read, one to predict).")
    pad, out, next_text = tokenizer.pad_token_id, [], 0
    while len(out) < steps:
        empty = True
        for batch in dataloader:
            empty = False
            if not {"input_ids", "attention_mask", "labels"} <= set(batch):
                raise ValueError("with_replay needs batches with input_ids, attention_mask and labels "
                                 "(build them with make_sft_dataloader).")
            replay = [encoded[(next_text + i) % len(encoded)] for i in range(rows)]
            next_text += rows
            width = max(batch["input_ids"].shape[1], *(len(ids) for ids in replay))
            ids = torch.full((rows, width), pad, dtype=torch.long)
            mask = torch.zeros((rows, width), dtype=torch.long)
            for r, row in enumerate(replay):
                ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[r, :len(row)] = 1
            out.append({"input_ids": torch.cat([_pad_to(batch["input_ids"], width, pad), ids]),
                        "attention_mask": torch.cat([_pad_to(batch["attention_mask"], width, 0), mask]),
                        "labels": torch.cat([_pad_to(batch["labels"], width, -100), ids.masked_fill(mask == 0, -100)]),
                        "replay": torch.arange(len(batch["input_ids"]) + rows) >= len(batch["input_ids"])})
            if len(out) == steps:
                break
        if empty:
            raise ValueError("dataloader is empty: check the records and max_length.")
    return out


def _needs_full_logits(lm: torch.nn.Module) -> bool:
    """True when the model's logits need more than its output layer (Gemma 2 soft-capping) or it has no decoder."""
    return bool(getattr(lm.config, "final_logit_softcapping", None)) or not hasattr(lm, "get_decoder")


def _counted_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
    """``(head, anchor)``: ``head(keep)`` gives the logits that predict token ``t + 1`` at the positions ``t``
    where ``keep`` (``[batch, seq - 1]``) is true, running the output layer on those positions only (on every
    position for models that :func:`_needs_full_logits`); ``anchor`` is the model's output, for a zero loss that
    stays in the graph."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if _needs_full_logits(lm):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        def head(keep):
            return logits[:, :-1][keep]
        return head, logits
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def head(keep):
        return lm.get_output_embeddings()(hidden[:, :-1][keep])
    return head, hidden


def answer_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The same loss as :func:`utils.causal_lm_loss` (next-token cross-entropy on ``batch["labels"]``),
    computing the output layer only where a label counts.

    The vocabulary projection is the largest single matrix product of a small model (SmolLM2: 49,152
    outputs per position); here it runs on the answer positions only, not on the prompt and padding,
    which saves time and memory. Pass it to ``utils.train(..., loss_fn=answer_loss)``. Works for
    transformers causal LMs with or without a ``peft`` wrapper; models whose logits need more than the
    output layer (soft-capping) fall back to ``causal_lm_loss``.
    """
    if "labels" not in batch:
        raise ValueError("answer_loss needs batch['labels'] (build batches with make_sft_dataloader).")
    if _needs_full_logits(model.get_base_model() if hasattr(model, "get_base_model") else model):
        from .training import causal_lm_loss  # logits need more than the output layer (Gemma 2 soft-capping)

        return causal_lm_loss(model, batch)
    head, anchor = _counted_logits(model, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    if not keep.any():
        return anchor.sum() * 0.0
    return torch.nn.functional.cross_entropy(head(keep).float(), targets[keep])


def replay_distill_loss(teacher: torch.nn.Module, *, temperature: float = 1.0):
    """``loss_fn(model, batch)`` for batches of :func:`with_replay`: the task rows learn their answers, the
    replayed general rows learn the **teacher's** next-token distributions instead of the text's own tokens.

    With :func:`answer_loss` a replayed row is ordinary language modelling on a handful of texts, which a
    long run can fit by heart; here the target at every replayed position is what ``teacher`` (the model
    before specialisation, a separate frozen copy) predicts there, so the adapter is pulled back towards
    the teacher's behaviour on general text rather than towards those particular texts (the idea of
    *Learning without Forgetting*, Li and Hoiem, 2016). The loss is a token-weighted mean, as in
    :func:`answer_loss`: ``(sum of CE over answer tokens + sum of T^2 KL(teacher || model) over replayed
    tokens) / (number of both)``; at ``temperature = 1`` a replayed token's gradient is that of the
    cross-entropy against the teacher's distribution. The function returns ``(loss, {"ce": ..., "kd": ...})``,
    the per-token means of the two parts (0 where a batch has none).

    Args:
        teacher: a causal LM with the model's vocabulary, on the model's device; run without gradients.
        temperature: softens both distributions on the replayed rows (see :func:`utils.distillation.soft_target_loss`).

    Raises:
        ValueError: a non-positive temperature, a teacher that is not a model; when called, a batch
            without ``labels`` or ``replay``, or a teacher that shares weights with the model being
            trained (pass ``copy.deepcopy(model)`` made *before* the adapter is added).
    """
    from .distillation import soft_target_loss

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
    if not isinstance(teacher, torch.nn.Module):
        raise ValueError("teacher must be a torch model (the model before specialisation), "
                         f"got {type(teacher).__name__}.")
    checked: set[int] = set()

    def loss_fn(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        if "labels" not in batch or "replay" not in batch:
            raise ValueError("replay_distill_loss needs batches with labels and replay (build them with "
                             "with_replay).")
        if id(model) not in checked:
            if {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
                raise ValueError("The teacher shares weights with the model being trained: pass a separate copy "
                                 "(copy.deepcopy(model) before the adapter is added).")
            checked.add(id(model))
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        targets = batch["labels"][:, 1:]
        replay = batch["replay"].to(targets.device).bool()
        task_keep = (targets != -100) & ~replay[:, None]
        replay_keep = (targets != -100) & replay[:, None]
        n_task, n_replay = int(task_keep.sum()), int(replay_keep.sum())
        head, anchor = _counted_logits(model, batch)  # the output layer on the counted positions only
        if not n_task + n_replay:
            return anchor.sum() * 0.0, {"ce": 0.0, "kd": 0.0}
        ce = kd = torch.zeros((), device=ids.device)
        if n_task:
            ce = torch.nn.functional.cross_entropy(head(task_keep).float(), targets[task_keep], reduction="sum")
        if n_replay:
            was_training = teacher.training
            teacher.eval()
            with torch.no_grad():
                t_logits = teacher(input_ids=ids[replay], attention_mask=None if mask is None else mask[replay],
                                   use_cache=False).logits[:, :-1][replay_keep[replay]]
            teacher.train(was_training)
            kd = soft_target_loss(head(replay_keep)[None], t_logits[None], temperature=temperature) * n_replay
        loss = (ce + kd) / (n_task + n_replay)
        return loss, {"ce": float(ce.detach()) / max(1, n_task), "kd": float(kd.detach()) / max(1, n_replay)}
    return loss_fn


# --- generation ---------------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(model, tokenizer, notes: Sequence[str], *, system_prompt: str = MINIMAL_PROMPT,
                     max_new_tokens: int = 160, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers of ``model`` to each note, in order (the answer text only, special tokens removed).

    Prompts are left-padded inside each batch, so every row's answer starts at the same column and
    the batch decodes together; generation stops at the end-of-turn token (or ``max_new_tokens``).
    """
    notes = _check_notes(notes)
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    stop_ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    starts = range(0, len(notes), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        prompts = [_prompt_ids(tokenizer, note, system_prompt) for note in notes[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=stop_ids, pad_token_id=pad_id)
        answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    model.train(was_training)
    return [a.strip() for a in answers]


# --- scoring --------------------------------------------------------------------------------------

def _norm_text(value: Any) -> str:
    return " ".join(str(value).lower().split())


def _scalar(obj: Mapping | None, field: str) -> Any:
    if not isinstance(obj, Mapping):
        return None
    if field in VITAL_KEYS:
        vitals = obj.get("vital_signs")
        return vitals.get(field) if isinstance(vitals, Mapping) else None
    return obj.get(field)


def _same_scalar(pred: Any, gold: Any) -> bool:
    if gold is None or pred is None:
        return pred is None and gold is None
    if _is_number(gold):
        return _is_number(pred) and abs(float(pred) - float(gold)) < 0.05
    return isinstance(pred, str) and pred.replace(" ", "") == str(gold).replace(" ", "")


def _symptom_set(obj: Any) -> set[str]:
    items = obj.get("symptoms") if isinstance(obj, Mapping) else None
    return {_norm_text(s) for s in items if isinstance(s, str)} if isinstance(items, list) else set()


def _medication_set(obj: Any) -> set[tuple[str, str, str]]:
    items = obj.get("medications") if isinstance(obj, Mapping) else None
    if not isinstance(items, list):
        return set()
    out = set()
    for med in items:
        if isinstance(med, Mapping):
            name, dose, freq = (_norm_text(med.get(k, "")) for k in MEDICATION_KEYS)
            out.add((name, dose.replace(" ", ""), freq))
    return out


def _f1(tp: int, n_pred: int, n_gold: int) -> float:
    if n_pred == 0 and n_gold == 0:
        return 1.0
    return 2 * tp / (n_pred + n_gold)


def _has_value(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _score(parsed: list[Any], golds: list[Mapping]) -> dict[str, Any]:
    n = len(golds)
    objects = [p if isinstance(p, Mapping) else None for p in parsed]
    compliant = [o is not None and not check_schema(o) for o in objects]
    per_field = {}
    for field in SCALAR_FIELDS:
        per_field[field] = sum(o is not None and _same_scalar(_scalar(o, field), _scalar(g, field))
                               for o, g in zip(objects, golds)) / n  # no object: every field is wrong
    tp = n_pred = n_gold = 0
    mtp = m_pred = m_gold = 0
    null_slots = hallucinated = 0
    for obj, gold in zip(objects, golds):
        pred_s, gold_s = _symptom_set(obj), _symptom_set(gold)
        tp, n_pred, n_gold = tp + len(pred_s & gold_s), n_pred + len(pred_s), n_gold + len(gold_s)
        pred_m, gold_m = _medication_set(obj), _medication_set(gold)
        mtp, m_pred, m_gold = mtp + len(pred_m & gold_m), m_pred + len(pred_m), m_gold + len(gold_m)
        if obj is None:
            continue  # no object: nothing it states can be counted as invented
        for field in SCALAR_FIELDS:
            if _scalar(gold, field) is None:
                null_slots += 1
                hallucinated += _has_value(_scalar(obj, field))
        if not gold["medications"]:
            null_slots += 1
            hallucinated += _has_value(obj.get("medications"))
    return {
        "n": n,
        "valid_json": sum(o is not None for o in objects) / n,
        "schema_compliance": sum(compliant) / n,
        "field_exact_match": sum(per_field.values()) / len(per_field),
        "field_accuracy": per_field,
        "symptom_f1": _f1(tp, n_pred, n_gold),
        "medication_f1": _f1(mtp, m_pred, m_gold),
        "hallucination_rate": hallucinated / null_slots if null_slots else None,  # None: no object to judge
        "null_slots": null_slots,
        "hallucinated_values": hallucinated,
    }


def score_extraction(predictions: Sequence[str | Mapping | None], records: Sequence[Mapping]) -> dict[str, Any]:
    """Score answers against the gold labels of ``records`` (same order).

    ``predictions`` are the model's raw answers (strings, parsed with :func:`parse_json_answer`)
    or already-parsed objects. Returns the overall metrics plus ``"per_category"`` (the same
    metrics for each record ``"category"``):

    * ``valid_json``: share of answers that contain a JSON object;
    * ``schema_compliance``: share whose object passes :func:`check_schema`;
    * ``field_exact_match``: mean, over the five scalar fields (age, temperature, heart rate, blood
      pressure, duration), of the share of notes where the value equals the gold one (``null`` must
      match ``null``; numbers within 0.05; no object = wrong); ``field_accuracy`` has each field;
    * ``symptom_f1``, ``medication_f1``: micro F1 over (note, item) pairs; symptoms compared
      lowercase, medications as (name, dose without spaces, frequency) triples;
    * ``hallucination_rate``: among answers that contain an object, the share of "empty" gold slots
      (a scalar field whose gold is ``null``, or an empty medication list) where the answer gives a
      value anyway. ``null_slots`` and ``hallucinated_values`` are its denominator and numerator;
      ``None`` when no answer contains an object (nothing to judge: not the same as 0).
    """
    validate_records(records)
    if isinstance(predictions, (str, Mapping)) or not isinstance(predictions, Sequence):
        raise TypeError("predictions must be a list (one answer per record), e.g. from generate_answers.")
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records: give one answer per record, "
                         "in the same order.")
    parsed = []
    for i, p in enumerate(predictions):
        if isinstance(p, str):
            parsed.append(parse_json_answer(p))
        elif p is None or isinstance(p, Mapping):
            parsed.append(p)
        else:
            raise TypeError(f"prediction {i} is a {type(p).__name__}: pass the answer text or a parsed dict.")
    golds = [r["label"] for r in records]
    scores = _score(parsed, golds)
    categories: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        categories.setdefault(str(record.get("category", "all")), []).append(i)
    scores["per_category"] = {}
    for cat, idx in categories.items():
        part = _score([parsed[i] for i in idx], [golds[i] for i in idx])
        scores["per_category"][cat] = {k: v for k, v in part.items() if k != "field_accuracy"}
    return scores


HEADLINE_METRICS: tuple[str, ...] = ("schema_compliance", "valid_json", "field_exact_match", "symptom_f1",
                                     "medication_f1", "hallucination_rate")


def category_table(scores: Mapping[str, Any], metrics: Sequence[str] = HEADLINE_METRICS):
    """The ``per_category`` part of :func:`score_extraction`'s result as a pandas DataFrame
    (one row per category, plus an ``all`` row with the overall figures)."""
    import pandas as pd

    if "per_category" not in scores:
        raise ValueError("scores must be the dict returned by score_extraction.")
    rows = {cat: {m: s[m] for m in ("n", *metrics)} for cat, s in scores["per_category"].items()}
    rows["all"] = {m: scores[m] for m in ("n", *metrics)}
    return pd.DataFrame(rows).T.astype({"n": int})
