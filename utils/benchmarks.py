"""Benchmark evaluation (APPB): multiple-choice scoring from scratch, local tasks, and lm-evaluation-harness.

A multiple-choice benchmark needs no generation. Each item is a prompt (``query``) and a few answers
(``choices``); the model "answers" with the choice whose tokens it finds most likely after the prompt:

* :func:`score_choices` sums each choice's token log-probabilities (lm-eval's ``acc`` rule picks the largest
  sum; ``acc_norm`` divides by the choice's length in characters first);
* :func:`mc_metrics` turns the picks into accuracies with lm-eval's standard error
  (sample standard deviation of the 0/1 outcomes / sqrt(n));
* :func:`paired_comparison` asks whether two models scored on the *same* items differ by more than the noise
  (a paired bootstrap interval of the difference and McNemar's exact test);
* :func:`local_task` builds offline tasks from the course's data (a wikitext cloze, a spam question, the CH11
  bias benchmark); :func:`benchmark_tasks` names the tasks of the active profile (the standard lm-eval tasks in
  ``full``);
* :func:`run_lm_eval` runs any of them, or any lm-eval task, through ``lm_eval.simple_evaluate`` on an
  in-memory model and returns plain floats with standard errors (and, for multiple-choice tasks, each item's
  log-likelihoods, so that it can be compared with :func:`score_choices` item by item).

lm-eval is optional (``pip install 'lm-eval>=0.4.8'``): everything but :func:`run_lm_eval` works without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import load_bias_benchmark, load_records
from .precision import device_of
from .profiles import get_profile

#: The standard lm-eval tasks of the ``full`` profile (all scored by log-likelihood, no generation).
STANDARD_TASKS: tuple[str, ...] = ("arc_easy", "winogrande", "hellaswag", "lambada_openai", "piqa", "boolq")
#: The offline tasks :func:`local_task` builds from ``data/`` (``cpu`` and ``tiny`` profiles).
LOCAL_TASKS: tuple[str, ...] = ("wikitext_cloze", "sms_spam_question", "bias_mc")
LM_EVAL_INSTALL = "pip install 'lm-eval>=0.4.8'"
#: Words of a wikitext sentence that become the answer of the cloze task.
CLOZE_WORDS = 3


# --- prompts and the scorer -----------------------------------------------------------------

def mc_prompt(item: dict) -> str:
    """The text a model continues for a context + question item: context, question, then ``Answer:``."""
    return f"{item['context']}\nQuestion: {item['question']}\nAnswer:"


def item_prompt(item: dict) -> str:
    """An item's prompt: its ``query`` if it has one, else :func:`mc_prompt` (``context`` + ``question``)."""
    if "query" in item:
        return item["query"]
    if "context" in item and "question" in item:
        return mc_prompt(item)
    raise ValueError(f"item has neither 'query' nor 'context' + 'question' (keys: {sorted(item)}): "
                     "give it a 'query' string, the prompt the choices continue.")


def _check_items(items, what: str = "items") -> list[dict]:
    if isinstance(items, dict):
        raise TypeError(f"{what} must be a list of items, not a single item: wrap it as [item].")
    items = list(items)
    if not items:
        raise ValueError(f"{what} is empty: build some with utils.benchmarks.local_task('wikitext_cloze').")
    for k, item in enumerate(items):
        choices = item.get("choices") if isinstance(item, dict) else None
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c
                                                                               for c in choices):
            raise ValueError(f"item {k} needs 'choices': a list of at least two non-empty strings.")
        item_prompt(item)
    return items


def _argmax(row: Sequence[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def norm_predictions(loglik: Sequence[Sequence[float]], items: Sequence[dict]) -> list[int]:
    """lm-eval's ``acc_norm`` rule: the choice with the highest log-likelihood per character of the choice."""
    return [_argmax([ll / max(1, len(c)) for ll, c in zip(row, item["choices"])]) for row, item in zip(loglik, items)]


def choice_requests(tokenizer, items: Sequence[dict]) -> list[tuple[int, int, list[int], list[int]]]:
    """``(item index, choice index, prompt ids, choice ids)`` for every choice of every item: the prompt
    (:func:`item_prompt`) and the choice after one space are tokenised together and split where the prompt's
    own tokens end (lm-eval's rule). :func:`score_choices` scores these; so does :mod:`utils.bias`."""
    requests = []
    for i, item in enumerate(items):
        prompt = item_prompt(item)
        context = tokenizer(prompt)["input_ids"]
        for j, choice in enumerate(item["choices"]):
            whole = tokenizer(prompt + " " + choice)["input_ids"]
            requests.append((i, j, whole[: len(context)], whole[len(context):]))
    return requests


def pad_requests(chunk: Sequence[tuple], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a batch of :func:`choice_requests`, right-padded with ``pad``."""
    seqs = [c + r for _, _, c, r in chunk]
    ids = torch.full((len(seqs), max(len(q) for q in seqs)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, q in enumerate(seqs):
        ids[row, : len(q)] = torch.tensor(q)
        mask[row, : len(q)] = 1
    return ids, mask


def request_logprobs(logits: torch.Tensor, chunk: Sequence[tuple]) -> torch.Tensor:
    """The summed log-probability of each request's choice tokens, ``[len(chunk)]`` (differentiable)."""
    out = []
    for row, (_, _, c, r) in enumerate(chunk):
        # only the answer's positions need a softmax over the vocabulary
        logprobs = logits[row, len(c) - 1: len(c) + len(r) - 1].float().log_softmax(-1)
        index = torch.arange(len(r), device=logprobs.device)
        out.append(logprobs[index, torch.tensor(r, device=logprobs.device)].sum())
    return torch.stack(out)


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer, items: Sequence[dict], *, batch_size: int = 16,
                  progress: bool = True) -> dict[str, list]:
    """Log-likelihood of each choice after the item's prompt (lm-eval's multiple-choice rule).

    The prompt is :func:`item_prompt` (``query``, or ``context`` + ``question``); each choice follows it after
    one space. Prompt + choice are tokenised together and split where the prompt's own tokens end (lm-eval
    does the same), one forward pass scores a whole batch of (prompt, choice) pairs, and only the choice's
    tokens are summed.

    Returns ``{"loglik": [[float, ...], ...], "pred": [int, ...], "pred_norm": [int, ...]}``: ``pred`` picks
    the highest summed log-likelihood (lm-eval's ``acc``), ``pred_norm`` the highest log-likelihood per
    character of the choice (``acc_norm``), which does not penalise a long answer for its length.
    """
    items = _check_items(items)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    device = device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    requests = choice_requests(tokenizer, items)
    loglik = [[0.0] * len(item["choices"]) for item in items]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(requests), batch_size), desc="scoring choices", disable=not progress,
                          leave=False):
            chunk = requests[start: start + batch_size]
            ids, mask = pad_requests(chunk, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for (i, j, _, _), value in zip(chunk, request_logprobs(logits, chunk).tolist()):
                loglik[i][j] = value
    finally:
        model.train(was_training)
    return {"loglik": loglik, "pred": [_argmax(row) for row in loglik], "pred_norm": norm_predictions(loglik, items)}


# --- accuracy, standard errors, paired comparisons -----------------------------------------

def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean, as lm-eval reports it: sample standard deviation (n - 1) / sqrt(n).

    None for fewer than two values (the spread is unknown).
    """
    values = [float(v) for v in values]
    if len(values) < 2:
        return None
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def _check_predictions(items: list[dict], predictions, name: str = "predictions") -> list[int]:
    predictions = list(predictions)
    if len(predictions) != len(items):
        raise ValueError(f"{len(items)} items but {len(predictions)} {name}: give one choice index per item.")
    for k, (item, p) in enumerate(zip(items, predictions)):
        if not isinstance(p, int) or not 0 <= p < len(item["choices"]):
            raise ValueError(f"{name}[{k}] is {p!r}; it must be a choice index 0-{len(item['choices']) - 1}.")
    return predictions


def accuracy(items: Sequence[dict], predictions: Sequence[int]) -> dict[str, float | None]:
    """``{"acc": share of items whose prediction is the ``label``, "acc_stderr": its standard error}``."""
    items = _check_items(items)
    predictions = _check_predictions(items, predictions)
    correct = [float(p == item["label"]) for item, p in zip(items, predictions)]
    return {"acc": sum(correct) / len(correct), "acc_stderr": mean_stderr(correct)}


def mc_metrics(items: Sequence[dict], scored: Mapping[str, list]) -> dict[str, float | int | None]:
    """lm-eval's metrics from :func:`score_choices`' output: ``acc``, ``acc_stderr``, ``acc_norm``,
    ``acc_norm_stderr`` and ``n``."""
    items = _check_items(items)
    if "pred" not in scored or "pred_norm" not in scored:
        raise ValueError("scored must be the output of score_choices (with 'pred' and 'pred_norm').")
    acc, norm = accuracy(items, scored["pred"]), accuracy(items, scored["pred_norm"])
    return {"acc": acc["acc"], "acc_stderr": acc["acc_stderr"], "acc_norm": norm["acc"],
            "acc_norm_stderr": norm["acc_stderr"], "n": len(items)}


def _accuracy_only(items, predictions) -> dict[str, float]:
    return {"acc": accuracy(items, predictions)["acc"]}


def _cluster_members(clusters: Sequence | None, n: int) -> list[list[int]]:
    """The item indices of each cluster (one cluster per item when ``clusters`` is None)."""
    if clusters is None:
        return [[i] for i in range(n)]
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"clusters has {len(labels)} labels for {n} items: give one label per item "
                         "(e.g. [item['scenario'] for item in items]).")
    members: dict = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    return list(members.values())


def bootstrap_ci(items: Sequence, predictions: Sequence, *, metric: Callable = _accuracy_only, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0,
                 clusters: Sequence | None = None) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals of every number ``metric(items, predictions)`` returns.

    Items are resampled with replacement ``n_boot`` times (seeded), each with its prediction. The default
    metric is accuracy (``{"acc": ...}``); :func:`utils.bias.bootstrap_ci` uses BBQ's scores. Keys starting
    with ``n_`` (counts) are skipped. Returns ``{name: (low, high)}``; None for a number that is undefined
    (``metric`` returned None) in more than 5 % of the resamples.

    ``clusters`` (one label per item, e.g. the scenario an item was written from): items of one scenario are
    variants of each other, not independent draws, so the bootstrap then resamples whole clusters. Resampling
    the variants one by one would give intervals that are too narrow.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be strictly between 0 and 1 (e.g. 0.95), got {level}.")
    if not isinstance(n_boot, int) or n_boot < 10:
        raise ValueError(f"n_boot must be an integer of at least 10 (1000 is usual), got {n_boot!r}.")
    items, predictions = list(items), list(predictions)
    metric(items, predictions)  # validates
    groups = _cluster_members(clusters, len(items))
    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    for _ in range(n_boot):
        picked = torch.randint(len(groups), (len(groups),), generator=generator).tolist()
        idx = [i for g in picked for i in groups[g]]
        values = metric([items[i] for i in idx], [predictions[i] for i in idx])
        for name, value in values.items():
            if name.startswith("n_"):
                continue
            if value is None:
                missing[name] = missing.get(name, 0) + 1
            else:
                draws.setdefault(name, []).append(float(value))
    tail = (1 - level) / 2
    out: dict[str, tuple[float, float] | None] = {}
    for name in set(draws) | set(missing):
        values = draws.get(name, [])
        if missing.get(name, 0) > 0.05 * n_boot or not values:
            out[name] = None
            continue
        t = torch.tensor(values)
        out[name] = (float(t.quantile(tail)), float(t.quantile(1 - tail)))
    return out


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference", the items that only one model gets right are
    split between the two like fair coin flips. 1.0 when no item differs."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a} and {only_b}.")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(items: Sequence[dict], pred_a: Sequence[int], pred_b: Sequence[int], *, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0, clusters: Sequence | None = None) -> dict:
    """Is model B's accuracy different from model A's on the same items by more than the noise?

    Returns ``difference`` (acc B - acc A), its paired bootstrap interval ``ci`` (items resampled with both
    predictions together, so what the two models share cancels; whole clusters if ``clusters`` labels them, as
    in :func:`bootstrap_ci`), ``only_a`` / ``only_b`` (items only A / only B gets right), McNemar's exact
    ``p_value`` on those (it assumes independent items), and ``resolved``: True when the interval excludes 0.
    """
    items = _check_items(items)
    pred_a = _check_predictions(items, pred_a, "pred_a")
    pred_b = _check_predictions(items, pred_b, "pred_b")

    def difference(items_, pairs_):
        right_a = [a == item["label"] for item, (a, _) in zip(items_, pairs_)]
        right_b = [b == item["label"] for item, (_, b) in zip(items_, pairs_)]
        return {"difference": (sum(right_b) - sum(right_a)) / len(items_)}

    pairs = list(zip(pred_a, pred_b))
    point = difference(items, pairs)["difference"]
    ci = bootstrap_ci(items, pairs, metric=difference, n_boot=n_boot, level=level, seed=seed,
                      clusters=clusters)["difference"]
    only_a = sum(a == item["label"] != b for item, (a, b) in zip(items, pairs))
    only_b = sum(b == item["label"] != a for item, (a, b) in zip(items, pairs))
    return {"difference": point, "ci": ci, "only_a": only_a, "only_b": only_b,
            "p_value": mcnemar_exact(only_a, only_b), "resolved": bool(ci[0] > 0 or ci[1] < 0), "n": len(items)}


# --- local tasks from the course's offline data ----------------------------------------------

def _sentences(texts: Sequence[str], min_words: int) -> list[str]:
    out = []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if len(sentence.split()) >= min_words and sentence[-1] in ".!?":
                out.append(sentence)
    return out


def _cloze_items(seed: int, n_choices: int = 4) -> list[dict]:
    from .data import load_texts

    sentences = _sentences(load_texts("wikitext", split="test"), min_words=CLOZE_WORDS + 8)
    if len(sentences) < n_choices:
        raise ValueError(f"Only {len(sentences)} usable wikitext sentences: the cloze task needs at least {n_choices}.")
    endings = [" ".join(s.split()[-CLOZE_WORDS:]) for s in sentences]
    rng = random.Random(seed)
    items = []
    for k, sentence in enumerate(sentences):
        others = sorted({e for e in endings if e != endings[k]})
        if len(others) < n_choices - 1:
            continue
        choices = rng.sample(others, n_choices - 1)
        label = rng.randrange(n_choices)
        choices.insert(label, endings[k])
        items.append({"query": " ".join(sentence.split()[:-CLOZE_WORDS]), "choices": choices, "label": label})
    return items


def _spam_items() -> list[dict]:
    return [{"query": f"Message: {r['text']}\nQuestion: Is this message spam?\nAnswer:", "choices": ["no", "yes"],
             "label": int(r["label"] in ("spam", 1))} for r in load_records("sms_spam", split="test")]


def _bias_items() -> list[dict]:
    return [{"query": mc_prompt(r), "choices": list(r["choices"]), "label": int(r["label"])}
            for r in load_bias_benchmark()]


def local_task(name: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """The items of an offline task: ``{"query", "choices", "label"}`` each, ready for :func:`score_choices`
    and :func:`run_lm_eval`.

    * ``"wikitext_cloze"``: a sentence of the wikitext test split without its last ``CLOZE_WORDS`` (3) words; the
      choices are its true ending and the endings of three other sentences (seeded), in a seeded order;
    * ``"sms_spam_question"``: "Message: ... Question: Is this message spam? Answer:" with choices no / yes;
    * ``"bias_mc"``: CH11's BBQ-style benchmark (:func:`utils.load_bias_benchmark`), context + question.

    The data come from the active profile (``data/`` in cpu and tiny; the Hub in full). ``n`` keeps a seeded
    random subset, in the original order.
    """
    builders = {"wikitext_cloze": lambda: _cloze_items(seed), "sms_spam_question": _spam_items,
                "bias_mc": _bias_items}
    if name not in builders:
        raise ValueError(f"Unknown local task {name!r}. Known: {', '.join(LOCAL_TASKS)} (the standard lm-eval tasks "
                         f"such as {', '.join(STANDARD_TASKS[:3])} go to run_lm_eval by name).")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive number of items (or None for all), got {n!r}.")
    items = builders[name]()
    if n is not None and n < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), n))
        items = [items[i] for i in keep]
    return items


def benchmark_tasks() -> list[str]:
    """The tasks of the active profile: the standard lm-eval tasks in ``full`` (downloaded by lm-eval), the
    offline :data:`LOCAL_TASKS` in ``cpu`` and ``tiny``."""
    return list(STANDARD_TASKS) if get_profile() == "full" else list(LOCAL_TASKS)


# --- lm-evaluation-harness ----------------------------------------------------------------

#: A local multiple-choice task for lm-eval: the prompt is the item's ``query``; lm-eval puts one space
#: (its default ``target_delimiter``) between the prompt and each choice, as :func:`score_choices` does.
LM_EVAL_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
{fewshot}output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness can be imported (``pip install 'lm-eval>=0.4.8'``)."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"lm-eval is not installed: `{LM_EVAL_INSTALL}` (the optional benchmark package; "
                          "`make setup` installs it), then re-run this cell.") from error
    return lm_eval, HFLM, TaskManager


def write_local_task(folder: str | Path, name: str, items: Sequence[dict], *, fewshot: bool = False) -> Path:
    """Write ``items`` as an lm-eval task in ``folder``: ``<name>.jsonl`` and ``<name>.yaml``. Returns the YAML.

    With ``fewshot=True`` lm-eval draws its few-shot examples from the same items (it leaves out the item
    being asked)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"task name {name!r} must be letters, digits and underscores, starting with a letter.")
    items = _check_items(items)
    folder = Path(folder)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"query": item_prompt(item), "choices": list(item["choices"]),
                                        "label": int(item["label"])}) + "\n" for item in items), encoding="utf-8")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(LM_EVAL_TASK_YAML.format(name=name, data=json.dumps(str(data)),
                                             fewshot="fewshot_split: test\n" if fewshot else ""), encoding="utf-8")
    return yaml


def _datasets_progress_bars(enabled: bool) -> bool:
    """Switch the ``datasets`` library's progress bars on or off; return whether they were on."""
    try:
        import datasets
    except ImportError:
        return enabled
    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    return was


def _plain_metrics(results: Mapping) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out = {}
    for key, value in results.items():
        metric, comma, filter_name = key.partition(",")
        if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "sample_len", and the "N/A" lm-eval writes for an unknown stderr
        out[metric if filter_name in ("", "none") else f"{metric}_{filter_name}"] = float(value)
    return out


@contextlib.contextmanager
def _without_env_info(lm_eval_module):
    """While it is active, lm-eval's ``evaluator.add_env_info`` does nothing (where this lm-eval has it)."""
    evaluator = sys.modules.get(getattr(lm_eval_module.simple_evaluate, "__module__", ""))  # lm_eval.evaluator
    original = getattr(evaluator, "add_env_info", None)
    if original is None:
        yield
        return
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.add_env_info = original


def run_lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str] | Mapping[str, Sequence[dict]],
                limit: int | None = None, num_fewshot: int = 0, batch_size: int = 16, *,
                seed: int = 0) -> dict[str, dict]:
    """Evaluate an in-memory model with EleutherAI's lm-evaluation-harness; plain floats with standard errors.

    Args:
        tasks: task names, or ``{name: items}`` for your own multiple-choice items. A name in
            :data:`LOCAL_TASKS` is built offline with :func:`local_task` (``limit`` items, seeded); any other
            name is looked up in lm-eval's own registry (downloads its dataset; indexing the registry takes
            about a minute, so it is done only when such a name is asked for).
        limit: items per task (None = all).
        num_fewshot: examples shown before each question (local tasks draw them from their own items).
        batch_size: sequences per forward pass inside lm-eval.

    Returns ``{task: {"acc": float, "acc_stderr": float, ..., "n": int}}`` with every metric lm-eval reports
    (``acc_norm``, ``perplexity``, ...). Multiple-choice tasks also get ``loglik`` (per item, per choice) and
    ``pred`` (the ``acc`` choice), and tasks given as items ``pred_norm``, in the items' order: compare them
    with :func:`score_choices`. Raises ImportError saying how to install lm-eval when it is missing.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    import tempfile

    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of names (or a dict of items), not a single string: [{tasks!r}].")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of items per task (or None for all), got {limit!r}.")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}.")
    if isinstance(tasks, Mapping):
        local = {name: _check_items(items, f"tasks[{name!r}]") for name, items in tasks.items()}
        registry: list[str] = []
    else:
        tasks = list(tasks)
        local = {name: local_task(name, n=limit, seed=seed) for name in tasks if name in LOCAL_TASKS}
        registry = [name for name in tasks if name not in LOCAL_TASKS]
    if not local and not registry:
        raise ValueError("tasks is empty: pass e.g. utils.benchmark_tasks().")
    with tempfile.TemporaryDirectory() as folder:
        for name, items in local.items():
            write_local_task(folder, name, items, fewshot=num_fewshot > 0)
        previous = logging.getLogger("lm_eval").level
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that the model was passed in memory
        bars = _datasets_progress_bars(False)  # one "Generating test split" bar per local task otherwise
        try:
            manager = TaskManager(include_path=folder if local else None, include_defaults=bool(registry))
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True)
            # lm-eval records the environment (pip freeze, torch's collect_env: about 2 s a call) in results we
            # do not read: skipped
            with _without_env_info(lm_eval):
                out = lm_eval.simple_evaluate(model=lm, tasks=list(local) + registry, task_manager=manager,
                                              num_fewshot=num_fewshot, limit=limit if registry else None,
                                              log_samples=True, verbosity="WARNING", random_seed=seed,
                                              numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
        finally:
            logging.getLogger("lm_eval").setLevel(previous)
            _datasets_progress_bars(bars)
    results = {}
    for name in list(local) + registry:
        entry = _plain_metrics(out["results"][name])
        samples = sorted(out["samples"].get(name, []), key=lambda s: s["doc_id"])
        # a filtered task (GSM8K) logs one sample per item and filter: count the items, not the samples
        entry["n"] = (len({s["doc_id"] for s in samples}) if samples
                      else int(out.get("n-samples", {}).get(name, {}).get("effective", 0)))
        responses = [s["filtered_resps"] for s in samples]
        per_item = _per_item_scores(samples, entry)
        if per_item:
            entry["per_item"] = per_item
        if responses and all(len(r) >= 2 for r in responses):  # multiple choice: one (loglik, greedy) per choice
            entry["loglik"] = [[float(choice[0]) for choice in r] for r in responses]
            entry["pred"] = [_argmax(row) for row in entry["loglik"]]
            if name in local:
                entry["pred_norm"] = norm_predictions(entry["loglik"], local[name])
        results[name] = entry
    return results


def _per_item_scores(samples: Sequence[Mapping], entry: Mapping[str, float]) -> dict[str, list[float]]:
    """Each item's value of every metric lm-eval averaged (``{"acc": [1.0, 0.0, ...]}``), in ``doc_id`` order.

    A filtered task (GSM8K's ``strict-match``, ...) logs one sample per item and filter; its metric is named
    ``<metric>_<filter>`` in ``entry`` (see :func:`_plain_metrics`), and so it is here. A pass/fail metric that
    lm-eval logs as a bool (IFEval's ``prompt_level_strict_acc``) counts as 1.0 / 0.0; lists (IFEval's
    per-instruction results) are left out."""
    out: dict[str, list[float]] = {}
    for sample in samples:
        flt = sample.get("filter", "none")
        for key, value in sample.items():
            if not isinstance(value, (bool, int, float)) or key in ("doc_id",):
                continue
            name = key if flt in ("", "none") else f"{key}_{flt}"
            if name in entry:
                out.setdefault(name, []).append(float(value))
    return out


# --- several models on the same items --------------------------------------------------------

#: The metric :func:`compare_models` reads for a task when ``acc`` is not what the task reports.
TASK_METRICS: dict[str, str] = {"gsm8k": "exact_match_strict-match", "ifeval": "prompt_level_strict_acc"}


def paired_difference(values_a: Sequence[float], values_b: Sequence[float], *, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0, clusters: Sequence | None = None) -> dict:
    """Mean per-item difference ``b - a`` of two models scored on the same items, with a paired bootstrap interval.

    Works for any per-item score (0/1 correctness, a log-probability, a constraint pass rate). Returns
    ``difference``, ``ci``, ``resolved`` (the interval excludes 0), ``n``, and for 0/1 scores McNemar's exact
    ``p_value`` with ``only_a`` / ``only_b`` (the items only one model gets right).
    """
    a, b = [float(v) for v in values_a], [float(v) for v in values_b]
    if len(a) != len(b) or not a:
        raise ValueError(f"values_a and values_b must score the same items (got {len(a)} and {len(b)} values): "
                         "evaluate both models with the same task, limit and seed.")

    def mean_difference(_items, pairs):
        return {"difference": sum(y - x for x, y in pairs) / len(pairs)}

    pairs = list(zip(a, b))
    ci = bootstrap_ci(list(range(len(pairs))), pairs, metric=mean_difference, n_boot=n_boot, level=level, seed=seed,
                      clusters=clusters)["difference"]
    out = {"difference": mean_difference(None, pairs)["difference"], "ci": ci,
           "resolved": bool(ci[0] > 0 or ci[1] < 0), "n": len(pairs)}
    if all(v in (0.0, 1.0) for v in a + b):
        out["only_a"] = sum(x > y for x, y in pairs)
        out["only_b"] = sum(y > x for x, y in pairs)
        out["p_value"] = mcnemar_exact(out["only_a"], out["only_b"])
    return out


def _task_metric(task: str, entry: Mapping) -> str:
    metric = TASK_METRICS.get(task, "acc")
    if metric not in entry.get("per_item", {}):
        raise ValueError(f"Task {task!r} reports no per-item {metric!r} (it has {sorted(entry.get('per_item', {}))}): "
                         f"add it to utils.benchmarks.TASK_METRICS.")
    return metric


def check_models(models: Mapping, reference: str | None = None) -> tuple[list[str], str]:
    """The names of a ``{name: model}`` dict, in order, and the reference among them (default: the first);
    a clear ``ValueError`` for an empty dict or an unknown reference."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict {name: model}, e.g. {'base': base, 'pruned': pruned}.")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {names}.")
    return names, reference


def compare_models(models: Mapping[str, nn.Module | Callable[[], nn.Module]], tokenizer,
                   tasks: Sequence[str] | None = None, *, limit: int | None = None, reference: str | None = None,
                   n_boot: int = 1000, seed: int = 0, batch_size: int = 16, num_fewshot: int = 0) -> dict:
    """Score several models on the same benchmark items and compare each with a reference, with intervals.

    Args:
        models: ``{name: model}`` in the order to report; a value may be a function that builds the model, so
            only one large model is in memory at a time (it is dropped after its evaluation).
        tasks: task names for :func:`run_lm_eval` (default: :func:`benchmark_tasks`, the profile's tasks).
        limit: items per task; reference: the model the others are compared with (default: the first).
        num_fewshot: passed to :func:`run_lm_eval` (lm-eval keeps 0 for a task whose config fixes it at 0, such
            as IFEval, so ``num_fewshot=5`` gives GSM8K its usual 5 examples and IFEval none).

    Returns ``{"reference", "tasks": {task: {name: {"metric", "score", "ci", "n", "vs_reference", "values"}}}}``:
    the score's percentile bootstrap interval, for every other model :func:`paired_difference` against the
    reference on the same items, and ``values``, each item's score (so :func:`paired_between` can pair any two
    models later without evaluating again). Print it with :func:`comparison_table`.
    """
    names, reference = check_models(models, reference)
    tasks = benchmark_tasks() if tasks is None else list(tasks)
    raw = {}
    for name in names:
        model = models[name]
        if not isinstance(model, nn.Module):
            model = model()
        raw[name] = run_lm_eval(model, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                seed=seed)
        del model
    out: dict = {"reference": reference, "tasks": {}}
    for task in tasks:
        metric = _task_metric(task, raw[reference][task])
        ref_values = raw[reference][task]["per_item"][metric]
        rows = {}
        for name in names:
            values = raw[name][task]["per_item"][_task_metric(task, raw[name][task])]
            ci = bootstrap_ci(list(range(len(values))), values, n_boot=n_boot, seed=seed,
                              metric=lambda _i, v: {"score": sum(v) / len(v)})["score"]
            rows[name] = {"metric": metric, "score": sum(values) / len(values), "ci": ci, "n": len(values),
                          "vs_reference": None if name == reference else
                          paired_difference(ref_values, values, n_boot=n_boot, seed=seed),
                          "values": values}
        out["tasks"][task] = rows
    return out


def comparison_table(comparison: Mapping) -> str:
    """The lines of a :func:`compare_models` result, one per task and model: score [interval], and the paired
    difference from the reference [interval] with its verdict (``beyond noise`` or ``within noise``)."""
    if "tasks" not in comparison or "reference" not in comparison:
        raise ValueError("comparison must be what compare_models returned.")
    lines = []
    for task, rows in comparison["tasks"].items():
        for name, row in rows.items():
            low, high = row["ci"]
            line = f"{task:22s} {name:22s} {row['metric']} {row['score']:.3f} [{low:.3f}, {high:.3f}]  n={row['n']}"
            vs = row["vs_reference"]
            if vs is not None:
                verdict = "beyond noise" if vs["resolved"] else "within noise"
                line += (f"  vs {comparison['reference']}: {vs['difference']:+.3f} "
                         f"[{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}] {verdict}")
            lines.append(line)
    return "\n".join(lines)


def paired_between(comparison: Mapping, a: str, b: str, *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """The paired difference ``b - a`` between any two models of one :func:`compare_models` result, per task.

    :func:`compare_models` pairs every model with its reference; this pairs two others (the recovered model with
    the cut one, say) from the per-item ``values`` the comparison kept, on the same items, without evaluating
    anything again. Returns ``{task: paired_difference(values of a, values of b)}`` (see
    :func:`paired_difference`); print it with :func:`differences_table`.
    """
    if "tasks" not in comparison or "reference" not in comparison:
        raise ValueError("comparison must be what compare_models returned.")
    out = {}
    for task, rows in comparison["tasks"].items():
        for name in (a, b):
            if name not in rows:
                raise ValueError(f"{name!r} is not one of the compared models {list(rows)} (task {task!r}).")
            if "values" not in rows[name]:
                raise ValueError(f"The comparison keeps no per-item values for {name!r}: re-run compare_models "
                                 "(its rows carry 'values' since this helper exists).")
        out[task] = paired_difference(rows[a]["values"], rows[b]["values"], n_boot=n_boot, seed=seed)
    return out


def differences_table(differences: Mapping[str, Mapping], label: str) -> str:
    """One line per task of :func:`paired_between`'s result: ``label``, the difference [interval] and its verdict
    (``beyond noise`` when the paired interval excludes 0, else ``within noise``, as :func:`comparison_table`)."""
    if not isinstance(differences, Mapping) or not differences:
        raise ValueError("differences must be what paired_between returned: {task: paired difference}.")
    lines = []
    for task, d in differences.items():
        if not isinstance(d, Mapping) or not {"difference", "ci", "resolved"} <= set(d):
            raise ValueError(f"differences[{task!r}] is not a paired difference (paired_between's values are).")
        lines.append(f"{task:22s} {label}: {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
                     + ("beyond noise" if d["resolved"] else "within noise"))
    return "\n".join(lines)


def comparison_summary(comparison: Mapping) -> dict:
    """A :func:`compare_models` result without the per-item ``values``: the numbers a results JSON keeps
    (scores, intervals, n, paired differences), a few hundred bytes per task instead of one number per item."""
    if "tasks" not in comparison or "reference" not in comparison:
        raise ValueError("comparison must be what compare_models returned.")
    return {**comparison, "tasks": {task: {name: {k: v for k, v in row.items() if k != "values"}
                                           for name, row in rows.items()}
                                    for task, rows in comparison["tasks"].items()}}
