"""Instruction following vs reasoning (CH05): two abilities, a benchmark for each, and a paired comparison.

The book reports that width pruning made Llama-3.2-1B better at following instructions (IFEval) and worse at
reasoning (GSM8K). :func:`compare_abilities` puts that claim to a test on the notebook's own models:

* ``full``: IFEval (0-shot) and GSM8K (5-shot) through lm-eval (:func:`utils.benchmarks.compare_models`);
* ``cpu`` and ``tiny``: two offline proxies written for this course (``scripts/build_ability_data.py``), the
  :data:`GENERATION_TASKS`. ``instruction_following``: a short writing request with one constraint a program can
  verify (:func:`follows_constraint`: capitals only, exactly N words, a given first word, JSON with given keys,
  ...). ``arithmetic_reasoning``: a one- or two-step word problem; the answer is the last number of the reply
  (:func:`numeric_answer`, GSM8K's "flexible-extract" rule). Both are answered by greedy generation
  (:func:`generate_responses`) and scored 1 or 0 per item, so :func:`utils.benchmarks.paired_difference` compares
  two models item by item.

Either way the result has the shape of :func:`utils.benchmarks.compare_models`' (print it with
:func:`utils.benchmarks.comparison_table`); :func:`claim_check` reads the book's claim off it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .benchmarks import bootstrap_ci, check_models, compare_models, paired_difference
from .precision import device_of
from .profiles import DATA_DIR, get_profile

#: The standard lm-eval task of each ability (``full`` profile) and the metric the book reads.
STANDARD_ABILITY_TASKS: dict[str, str] = {"instruction following": "ifeval", "reasoning": "gsm8k"}
#: The offline proxy of each ability (``cpu`` and ``tiny`` profiles).
LOCAL_ABILITY_TASKS: dict[str, str] = {"instruction following": "instruction_following",
                                       "reasoning": "arithmetic_reasoning"}
#: The local generation tasks, their data files and the name of their per-item metric.
GENERATION_TASKS: tuple[str, ...] = tuple(LOCAL_ABILITY_TASKS.values())
TASK_FILES: dict[str, str] = {"instruction_following": "instruction_prompts.jsonl",
                              "arithmetic_reasoning": "arithmetic_problems.jsonl"}
TASK_METRIC: dict[str, str] = {"instruction_following": "constraint_followed", "arithmetic_reasoning": "exact_number"}
#: Greedy tokens generated per answer: enough for one sentence or a small JSON object, and for a short
#: worked answer ending in a number.
MAX_NEW_TOKENS: dict[str, int] = {"instruction_following": 32, "arithmetic_reasoning": 32}
#: The constraints :func:`follows_constraint` can verify.
CONSTRAINT_TYPES: tuple[str, ...] = ("uppercase", "lowercase", "word_count", "starts_with", "include_word",
                                     "avoid_word", "json_keys")
#: Few-shot examples for GSM8K in ``full`` (lm-eval's default, as in the book); IFEval is always 0-shot.
GSM8K_FEWSHOT = 5
ARITHMETIC_SUFFIX = " Give the answer as a number."
BUILD_SCRIPT = "python scripts/build_ability_data.py"


def ability_tasks() -> dict[str, str]:
    """``{ability: task}`` for the active profile: IFEval and GSM8K in ``full``, the local proxies otherwise."""
    return dict(STANDARD_ABILITY_TASKS if get_profile() == "full" else LOCAL_ABILITY_TASKS)


def _check_task(name: str) -> None:
    if name not in GENERATION_TASKS:
        raise ValueError(f"Unknown generation task {name!r}. Known: {', '.join(GENERATION_TASKS)} (IFEval and GSM8K "
                         "go to utils.benchmarks.compare_models by name).")


def load_generation_task(name: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """The items of a local generation task, each ``{"id", "prompt", "target"}``.

    ``target`` is the constraint dict for ``instruction_following`` and the integer answer for
    ``arithmetic_reasoning`` (whose prompt is the question plus :data:`ARITHMETIC_SUFFIX`). Every profile reads
    ``data/`` (these are the course's own data). ``n`` keeps a seeded random subset, in file order.
    """
    _check_task(name)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive number of items (or None for all), got {n!r}.")
    path = DATA_DIR / TASK_FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rebuild it with `{BUILD_SCRIPT}`.")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if name == "instruction_following":
        items = [{"id": r["id"], "prompt": r["prompt"], "target": r["constraint"]} for r in records]
    else:
        items = [{"id": r["id"], "prompt": r["question"] + ARITHMETIC_SUFFIX, "target": int(r["answer"])}
                 for r in records]
    if n is not None and n < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), n))
        items = [items[i] for i in keep]
    return items


# --- the scorers ---------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    """Whitespace-separated pieces that contain a letter or a digit ("--" and lone punctuation are not words)."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def _check_constraint(constraint: Mapping) -> str:
    if not isinstance(constraint, Mapping) or constraint.get("type") not in CONSTRAINT_TYPES:
        raise ValueError(f"constraint must be a dict whose 'type' is one of {', '.join(CONSTRAINT_TYPES)}, got "
                         f"{constraint!r}.")
    kind = constraint["type"]
    if kind == "word_count" and not (isinstance(constraint.get("n"), int) and constraint["n"] > 0):
        raise ValueError(f"a word_count constraint needs 'n', a positive integer: got {constraint!r}.")
    if kind in ("starts_with", "include_word", "avoid_word") and not (
            isinstance(constraint.get("word"), str) and _words(constraint["word"])):
        raise ValueError(f"a {kind} constraint needs 'word', a non-empty string: got {constraint!r}.")
    if kind == "json_keys" and not (isinstance(constraint.get("keys"), (list, tuple)) and constraint["keys"]
                                    and all(isinstance(k, str) for k in constraint["keys"])):
        raise ValueError(f"a json_keys constraint needs 'keys', a non-empty list of strings: got {constraint!r}.")
    return kind


def _json_object(text: str) -> dict | None:
    """``text`` as a JSON object (a Markdown code fence around it is allowed), else None."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def follows_constraint(response: str, constraint: Mapping) -> bool:
    """Whether ``response`` obeys ``constraint`` (``{"type": ..., <parameters>}``; see :data:`CONSTRAINT_TYPES`).

    ``uppercase`` / ``lowercase``: it has letters and none of the other case. ``word_count``: exactly ``n`` words
    (pieces between spaces that contain a letter or digit). ``starts_with``: its first word, without quotes or
    punctuation, is ``word`` (any case). ``include_word`` / ``avoid_word``: ``word`` occurs / does not occur as a
    whole word (any case) in a reply that has words. ``json_keys``: the reply is one JSON object (a code fence
    around it is allowed) with exactly ``keys``. An empty reply follows nothing.
    """
    if not isinstance(response, str):
        raise ValueError(f"response must be the model's reply as a string, got {type(response).__name__}.")
    kind = _check_constraint(constraint)
    text, words = response.strip(), _words(response)
    letters = [c for c in text if c.isalpha()]
    if not words:
        return False
    if kind in ("uppercase", "lowercase"):
        return bool(letters) and not any(c.islower() if kind == "uppercase" else c.isupper() for c in letters)
    if kind == "word_count":
        return len(words) == constraint["n"]
    if kind == "starts_with":
        return re.sub(r"^\W+|\W+$", "", words[0]).lower() == constraint["word"].lower()
    if kind in ("include_word", "avoid_word"):
        found = re.search(rf"(?<!\w){re.escape(constraint['word'])}(?!\w)", text, flags=re.IGNORECASE) is not None
        return found if kind == "include_word" else not found
    reply = _json_object(text)
    return reply is not None and set(reply) == set(constraint["keys"])


def numeric_answer(response: str) -> float | None:
    """The last number in ``response`` (thousands commas dropped; GSM8K's "flexible-extract" rule), or None."""
    if not isinstance(response, str):
        raise ValueError(f"response must be the model's reply as a string, got {type(response).__name__}.")
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", response)
    if not numbers:
        return None
    return float(numbers[-1].replace(",", ""))


def score_response(name: str, item: Mapping, response: str) -> float:
    """1.0 if ``response`` answers ``item`` of task ``name`` correctly, else 0.0."""
    _check_task(name)
    if name == "instruction_following":
        return float(follows_constraint(response, item["target"]))
    value = numeric_answer(response)
    return float(value is not None and abs(value - float(item["target"])) < 1e-9)


# --- generation ----------------------------------------------------------------------------------

def format_prompt(tokenizer, text: str) -> str:
    """``text`` as the user turn of the tokenizer's chat template, ready for the reply; without a template (a
    base model), ``text`` followed by a new line and ``Answer:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{text}\nAnswer:"


def _stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.get_vocab().get("<|im_end|>")
    if end_of_turn is not None and end_of_turn not in ids:
        ids.append(end_of_turn)
    if not ids:
        raise ValueError("The tokenizer has no eos token and no <|im_end|>: generation could not stop.")
    return ids


@torch.no_grad()
def generate_responses(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 8) -> list[str]:
    """Greedy replies to ``prompts`` (each put in :func:`format_prompt`), in order, special tokens removed.

    Each batch is left-padded, so every row's reply starts at the same column; a row stops at the end-of-turn or
    eos token, or after ``max_new_tokens``.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings (wrap a single prompt as [prompt]).")
    for label, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}.")
    stops = _stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    chat = bool(getattr(tokenizer, "chat_template", None))
    device, was_training, replies = device_of(model), model.training, []
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=not chat)["input_ids"]
                   for p in prompts[start: start + batch_size]]
            width = max(len(row) for row in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, row in enumerate(ids):
                input_ids[r, width - len(row):] = torch.tensor(row)
                mask[r, width - len(row):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
            replies.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [r.strip() for r in replies]


def run_generation_task(model: nn.Module, tokenizer, name: str, *, n: int | None = None, seed: int = 0,
                        batch_size: int = 8) -> dict:
    """Answer ``n`` items of a local generation task with ``model`` and score each reply.

    Returns ``{"metric", "score" (mean), "per_item" (1.0 / 0.0 per item, in item order), "n", "ids",
    "responses"}``; the same ``n`` and ``seed`` give the same items, so two models can be compared item by item.
    """
    items = load_generation_task(name, n=n, seed=seed)
    replies = generate_responses(model, tokenizer, [item["prompt"] for item in items],
                                 max_new_tokens=MAX_NEW_TOKENS[name], batch_size=batch_size)
    per_item = [score_response(name, item, reply) for item, reply in zip(items, replies)]
    return {"metric": TASK_METRIC[name], "score": sum(per_item) / len(per_item), "per_item": per_item,
            "n": len(items), "ids": [item["id"] for item in items], "responses": replies}


# --- comparisons ---------------------------------------------------------------------------------

def _score_row(values: list[float], reference: list[float] | None, metric: str, *, n_boot: int, seed: int) -> dict:
    ci = bootstrap_ci(list(range(len(values))), values, n_boot=n_boot, seed=seed,
                      metric=lambda _items, v: {"score": sum(v) / len(v)})["score"]
    return {"metric": metric, "score": sum(values) / len(values), "ci": ci, "n": len(values),
            "vs_reference": None if reference is None else
            paired_difference(reference, values, n_boot=n_boot, seed=seed)}


def compare_generation(models: Mapping[str, nn.Module | Callable[[], nn.Module]], tokenizer,
                       tasks: Sequence[str] = GENERATION_TASKS, *, n: int | None = None, reference: str | None = None,
                       n_boot: int = 1000, seed: int = 0, batch_size: int = 8) -> dict:
    """Several models on the same items of local generation tasks, in :func:`utils.benchmarks.compare_models`'
    shape: ``{"reference", "tasks": {task: {name: {"metric", "score", "ci", "n", "vs_reference"}}},
    "responses": {task: {name: [reply, ...]}}}``. A model may be given as a function that builds it."""
    names, reference = check_models(models, reference)
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of task names, not a single string: [{tasks!r}].")
    for task in tasks:
        _check_task(task)
    raw: dict[str, dict] = {}
    for name in names:
        model = models[name] if isinstance(models[name], nn.Module) else models[name]()
        raw[name] = {t: run_generation_task(model, tokenizer, t, n=n, seed=seed, batch_size=batch_size) for t in tasks}
        del model
    out: dict = {"reference": reference, "tasks": {}, "responses": {}}
    for task in tasks:
        ref = raw[reference][task]["per_item"]
        out["tasks"][task] = {name: _score_row(raw[name][task]["per_item"], None if name == reference else ref,
                                               TASK_METRIC[task], n_boot=n_boot, seed=seed) for name in names}
        out["responses"][task] = {name: raw[name][task]["responses"] for name in names}
    return out


def compare_abilities(models: Mapping[str, nn.Module | Callable[[], nn.Module]], tokenizer, *,
                      limit: int | None = None, reference: str | None = None, n_boot: int = 1000, seed: int = 0,
                      batch_size: int = 8) -> dict:
    """Instruction following and reasoning of several models on the same items, with intervals.

    ``full``: IFEval and GSM8K (5-shot) through lm-eval, ``limit`` items each (downloads both datasets);
    ``cpu`` / ``tiny``: the local proxies, ``limit`` items each (:func:`compare_generation`). Returns that
    comparison plus ``"abilities"`` (``{ability: task}``) and ``"limit"``; read it with :func:`claim_check`.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive number of items per task (or None for all), got {limit!r}.")
    tasks = ability_tasks()
    if get_profile() == "full":
        out = compare_models(models, tokenizer, list(tasks.values()), limit=limit, reference=reference,
                             n_boot=n_boot, seed=seed, batch_size=batch_size, num_fewshot=GSM8K_FEWSHOT)
    else:
        out = compare_generation(models, tokenizer, list(tasks.values()), n=limit, reference=reference,
                                 n_boot=n_boot, seed=seed, batch_size=batch_size)
    return {**out, "abilities": tasks, "limit": limit}


def claim_check(comparison: Mapping, model: str) -> dict:
    """The book's claim for ``model`` against the reference: better at following instructions, worse at reasoning.

    Per ability: ``difference`` (model - reference), its paired ``ci``, and ``direction``: ``"higher"`` or
    ``"lower"`` when the interval excludes 0, else ``"within noise"``. ``verdict``: ``"supported"`` (instruction
    following higher and reasoning lower, both beyond noise), ``"contradicted"`` (either one beyond noise the other
    way), else ``"not resolved"`` (at this number of items the data cannot tell).
    """
    if "abilities" not in comparison or "tasks" not in comparison:
        raise ValueError("comparison must be what compare_abilities returned.")
    out: dict = {"model": model, "reference": comparison["reference"], "abilities": {}}
    for ability, task in comparison["abilities"].items():
        rows = comparison["tasks"][task]
        if model not in rows or rows[model]["vs_reference"] is None:
            raise ValueError(f"{model!r} is not a compared model (models: {sorted(rows)}; the reference "
                             f"{comparison['reference']!r} is not compared with itself).")
        vs = rows[model]["vs_reference"]
        direction = ("higher" if vs["ci"][0] > 0 else "lower") if vs["resolved"] else "within noise"
        out["abilities"][ability] = {"task": task, "difference": vs["difference"], "ci": list(vs["ci"]),
                                     "direction": direction, "n": vs["n"]}
    follow, reason = (out["abilities"][a]["direction"] for a in STANDARD_ABILITY_TASKS)
    if follow == "higher" and reason == "lower":
        out["verdict"] = "supported"
    elif follow == "lower" or reason == "higher":
        out["verdict"] = "contradicted"
    else:
        out["verdict"] = "not resolved"
    return out


def claim_lines(check: Mapping) -> str:
    """:func:`claim_check`'s result in words, one line per ability and one for the verdict."""
    lines = []
    for ability, row in check["abilities"].items():
        low, high = row["ci"]
        lines.append(f"{ability:22s} ({row['task']}, n={row['n']}): {check['model']} - {check['reference']} = "
                     f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}] -> {row['direction']}")
    lines.append(f"The book's claim (better at following instructions, worse at reasoning): {check['verdict']}.")
    return "\n".join(lines)
