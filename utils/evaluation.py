"""Measurements every chapter repeats: size, perplexity, and the calibration pass that hooks read.

Speed (the timing harness, the FLOPs ideal) lives in :mod:`utils.speed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import batch_tensors
from .precision import device_of


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters; shared (tied) tensors are counted once.

    Works on models built on the ``meta`` device too.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"count_parameters expects a torch.nn.Module, got {type(model).__name__}.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class StopForward(Exception):
    """Raise it from a forward hook to skip the rest of a forward pass; :func:`calibration_pass` catches it."""


@torch.no_grad()
def calibration_pass(model: torch.nn.Module, dataloader: Iterable[dict], before_batch: Callable, *,
                     desc: str = "calibration", progress: bool = True) -> int:
    """Feed every batch through ``model`` (eval mode, no cache, no gradients) for hooks to read.

    ``before_batch(attention_mask)`` is called before each forward pass, so hooks can tell real tokens from
    padding. A hook may raise :class:`StopForward` once it has what it needs. The model's training mode is
    restored afterwards. Returns the number of batches; an empty dataloader raises ``ValueError``.
    """
    device = device_of(model)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
            ids, mask = batch_tensors(batch, device)
            before_batch(mask)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("The dataloader is empty: calibration needs at least one batch.")
    return seen


@torch.no_grad()
def perplexity(model: torch.nn.Module, dataloader: Iterable[dict], *, progress: bool = True,
               desc: str = "perplexity") -> float:
    """Token-weighted perplexity over a whole dataloader, padding excluded.

    ``exp(total negative log-likelihood / number of predicted tokens)``: each position whose
    target token is real (``attention_mask == 1``) counts once, so long and short texts weigh
    by their length rather than per batch.
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
        input_ids, mask = batch_tensors(batch, device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("The dataloader holds no token to predict (empty, or every text is one token long).")
    return math.exp(total_nll / total_tokens)


def mean_interval(values, *, baseline=None, clusters: Sequence | None = None, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """A mean with a percentile bootstrap interval; optionally a ratio of sums, optionally resampling clusters.

    Args:
        values: one number per item (e.g. each prompt pair's change after pruning).
        baseline: one number per item, or None. If given, the statistic is ``sum(values) / sum(baseline)``
            (with ``values`` = per-item changes, that is the relative change); else the mean of ``values``.
        clusters: one label per item (e.g. the sentence template an item was written from). Items that share
            a label are not independent; the bootstrap then draws whole clusters with replacement, which gives
            the honest, wider interval. None: every item is its own cluster.
        n_boot, seed, level: bootstrap draws, their seed, and the interval's coverage.

    Returns ``value``, ``low``, ``high``, ``n`` (items), ``clusters`` (how many) and ``verdict``: ``"below 0"``,
    ``"above 0"`` or ``"within noise"`` when the interval contains 0.
    """
    vals = np.asarray(values, dtype=float).ravel()
    if vals.size == 0:
        raise ValueError("values is empty: give one number per item.")
    base = None if baseline is None else np.asarray(baseline, dtype=float).ravel()
    if base is not None and base.shape != vals.shape:
        raise ValueError(f"baseline has {base.size} numbers for {vals.size} values: give one per item.")
    if not np.isfinite(vals).all() or (base is not None and not np.isfinite(base).all()):
        raise ValueError("values and baseline must be finite numbers (a NaN or inf crept in).")
    if not isinstance(n_boot, int) or n_boot < 100 or not 0 < level < 1:
        raise ValueError(f"Use n_boot >= 100 and a level in (0, 1); got n_boot={n_boot!r}, level={level!r}.")
    labels = list(range(vals.size)) if clusters is None else list(clusters)
    if len(labels) != vals.size:
        raise ValueError(f"clusters has {len(labels)} labels for {vals.size} values: give one label per item.")
    index = {label: k for k, label in enumerate(dict.fromkeys(labels))}
    member = np.array([index[label] for label in labels])
    n_clusters = len(index)
    sums = np.bincount(member, weights=vals, minlength=n_clusters)
    denominators = (np.bincount(member, weights=base, minlength=n_clusters) if base is not None
                    else np.bincount(member, minlength=n_clusters).astype(float))
    if abs(denominators.sum()) == 0:
        raise ValueError("The baseline sums to 0: a relative change is undefined.")
    picks = np.random.default_rng(seed).integers(0, n_clusters, size=(n_boot, n_clusters))
    draws = sums[picks].sum(1) / denominators[picks].sum(1)
    low, high = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    verdict = "within noise" if low <= 0 <= high else ("below 0" if high < 0 else "above 0")
    return {"value": float(sums.sum() / denominators.sum()), "low": float(low), "high": float(high),
            "n": int(vals.size), "clusters": n_clusters, "verdict": verdict}


def paired_log_perplexity(a: dict, b: dict, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """How much higher the log-perplexity of ``a`` is than that of ``b`` on the same texts, with a paired bootstrap.

    ``a`` and ``b`` are per-text results (``nll``: summed negative log-likelihood per text, ``tokens``: scored
    tokens per text, same texts in the same order), e.g. from ``perplexity_through_cache(..., per_text=True)``.
    Texts are resampled with replacement and the difference ``sum(nll_a - nll_b) / sum(tokens)`` recomputed
    ``n_boot`` times. Returns ``diff`` (negative: ``a`` is better), ``low``/``high`` (the ``level`` percentile
    interval), ``texts`` and ``verdict`` (``"a lower"``, ``"a higher"`` or ``"within noise"`` when the interval
    contains 0).
    """
    nll_a, nll_b = np.asarray(a["nll"], dtype=float), np.asarray(b["nll"], dtype=float)
    tokens = np.asarray(a["tokens"], dtype=float)
    if nll_a.shape != nll_b.shape or list(a["tokens"]) != list(b["tokens"]) or nll_a.size == 0:
        raise ValueError("a and b must score the same, non-empty list of texts (equal 'tokens' lists): compare "
                         "results of the same dataloader and prefix_tokens.")
    if not isinstance(n_boot, int) or n_boot < 100 or not 0 < level < 1:
        raise ValueError(f"Use n_boot >= 100 and a level in (0, 1); got n_boot={n_boot!r}, level={level!r}.")
    delta = nll_a - nll_b
    picks = np.random.default_rng(seed).integers(0, delta.size, size=(n_boot, delta.size))
    draws = delta[picks].sum(1) / tokens[picks].sum(1)
    low, high = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    verdict = "within noise" if low <= 0 <= high else ("a lower" if high < 0 else "a higher")
    return {"diff": float(delta.sum() / tokens.sum()), "low": float(low), "high": float(high),
            "texts": int(delta.size), "verdict": verdict}
