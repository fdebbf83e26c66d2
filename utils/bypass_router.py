"""A learned router for Adaptive Attention Bypass, trained on what skipping costs (CH08, issue 27).

The rules of :mod:`utils.bypass` decide from a proxy: how much each attention turns the residual stream
(``1 - cos``), or the prompt's length and spread. The router here learns from the quality cost itself:

* :func:`skip_costs` -- the training labels. For each training text and each attention that may be skipped,
  the increase of the continuation's negative log-likelihood, in nats per scored token, when that attention
  alone is skipped (one :func:`~utils.bypass.perplexity_with_skips` pass per block: the expensive part).
* :class:`CostRouter` -- a ridge regression from what the prefill measured to those costs, one row per
  (prompt, block): the block (its own intercept and its own slope on the prompt's log length), the log of
  the block's score on this prompt, and the prompt's embedding spread. It decides **after the prefill**, like
  the threshold rule, from the same signal: skip every block predicted cheaper than a cut that
  :meth:`CostRouter.calibrate` sets on training prompts to a budget per decoded token, or the ``k`` cheapest
  (:meth:`CostRouter.ranking`).

Use it as ``attention_bypass(model, rule=router.rule(router.calibrate(rows, 8, weights=tokens)))``.
``scripts/bypass_router.py`` compares it with the threshold rule and static removal on validation texts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import removed_attention
from .bypass import (
    PromptSignal,
    Rule,
    as_signal,
    calibrate_threshold,
    check_weights,
    default_protected,
    perplexity_with_skips,
)
from .kv_cache import prompt_splits
from .precision import device_of
from .structure import decoder_blocks

#: Scores below this are clipped before the log (an attention that does not turn the stream at all).
SCORE_FLOOR = 1e-6


def _protected_blocks(model, protect: Iterable[int] | str, n_blocks: int) -> set[int]:
    if isinstance(protect, str):
        if protect != "auto":
            raise ValueError(f"protect must be 'auto' or a list of block indices, got {protect!r}.")
        return set(default_protected(model))
    chosen = {int(i) for i in protect}
    if any(not 0 <= i < n_blocks for i in chosen):
        raise ValueError(f"protect holds block indices outside 0..{n_blocks - 1}: {sorted(chosen)}.")
    return chosen


@torch.no_grad()
def skip_costs(model, dataloader: Iterable[dict], *, prefix_tokens: int | float,
               protect: Iterable[int] | str = "auto", skip_from: str = "decode", batch_size: int = 8,
               progress: bool = True) -> list[list[float]]:
    """What skipping each attention alone costs each text: the router's training labels.

    For every block that may be skipped (not in ``protect``, attention not removed), one
    :func:`~utils.bypass.perplexity_with_skips` pass in which every text skips that block (from the prompt's last
    token on with ``skip_from="decode"``, the moment a decision after the prefill takes effect), plus one pass
    that skips nothing. Texts are cut as there (and as :func:`~utils.bypass.prompt_attention_scores` with
    ``decode_first=True`` cuts the prompts), so row ``t`` belongs to the same text as that function's row ``t``.

    Args:
        dataloader: read once per block, so a DataLoader or a list of batches (not a one-shot iterator).
        protect: blocks never skipped (``"auto"``: :func:`~utils.bypass.default_protected`).

    Returns:
        One list of ``n_blocks`` numbers per text: the extra nats per scored token when that block is skipped
        (negative: skipping helped this text), ``nan`` for protected blocks and removed attentions.
    """
    if iter(dataloader) is dataloader:
        raise ValueError("skip_costs reads the texts once per block: pass a DataLoader or a list of batches, "
                         "not a one-shot iterator.")
    n_blocks = len(decoder_blocks(model))
    skipped = set(removed_attention(model)) | _protected_blocks(model, protect, n_blocks)
    texts = len(prompt_splits(dataloader, prefix_tokens, device_of(model)))

    def run(block: int | None) -> tuple[np.ndarray, np.ndarray]:
        skips = [[] if block is None else [block]] * texts
        out = perplexity_with_skips(model, dataloader, prefix_tokens=prefix_tokens, skips=skips,
                                    skip_from=skip_from, batch_size=batch_size, progress=False)
        return np.asarray(out["nll"], dtype=float), np.asarray(out["tokens"], dtype=float)
    base, tokens = run(None)
    costs = np.full((texts, n_blocks), np.nan)
    for block in tqdm([i for i in range(n_blocks) if i not in skipped], desc="skip costs", disable=not progress,
                      leave=False):
        costs[:, block] = (run(block)[0] - base) / tokens
    return costs.tolist()


def _mean_one_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    w = check_weights(weights, n)
    return w * n / w.sum()  # mean 1: the ridge penalty keeps its meaning whatever the units


class CostRouter:
    """Predict, per prompt, what skipping each attention would cost, and skip the cheapest.

    A weighted ridge regression on one row per (training prompt, block): the target is the block's measured
    :func:`skip_costs` on that prompt; the features are the block's own intercept, the block's own slope on the
    prompt's log length, and two slopes shared by all blocks, on the log of the block's score on this prompt and
    on the prompt's embedding spread (continuous features standardised on the training rows; intercepts not
    penalised). It decides after the prefill, when every score is known.

    Args:
        protect: blocks never skipped (e.g. :func:`~utils.bypass.default_protected`); never predicted either.
        ridge: penalty on the slopes, in units of one training prompt's weight (weights are rescaled to mean 1).

    Attributes:
        blocks: the blocks the router may skip (set by :meth:`fit`: not protected, measured on every prompt).
        coef: the fitted coefficients (``None`` before :meth:`fit`).
    """

    def __init__(self, protect: Iterable[int], ridge: float = 1.0):
        if isinstance(protect, str):
            raise ValueError("protect must be a list of block indices (e.g. bypass.default_protected(model)).")
        if not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}.")
        self.protect = sorted({int(i) for i in protect})
        self.ridge = float(ridge)
        self.blocks: list[int] = []
        self.n_blocks = 0
        self.coef: np.ndarray | None = None
        self._centre = np.zeros(3)
        self._scale = np.ones(3)

    def __repr__(self) -> str:
        state = f"{len(self.blocks)} blocks" if self.coef is not None else "not fitted"
        return f"CostRouter({state}, ridge={self.ridge:g})"

    def _raw(self, signal: PromptSignal) -> np.ndarray:
        """``[blocks, 3]``: log tokens, log score, spread of this prompt for each routed block."""
        scores = np.array([signal.scores[i] for i in self.blocks], dtype=float)
        log_score = np.log(np.clip(scores, SCORE_FLOOR, None))  # nan stays nan
        return np.stack([np.full(len(self.blocks), math.log(max(signal.tokens, 1))), log_score,
                         np.full(len(self.blocks), signal.spread)], axis=1)

    def _design(self, raw: np.ndarray) -> np.ndarray:
        """Intercept per block, log-length slope per block, shared log-score and spread slopes."""
        z = (raw - self._centre) / self._scale
        eye = np.eye(len(self.blocks))
        return np.concatenate([eye, eye * z[:, :1], z[:, 1:]], axis=1)

    def fit(self, rows: Sequence[dict], costs: Sequence[Sequence[float]], *,
            weights: Sequence[float] | None = None) -> CostRouter:
        """Fit on training prompts: their :func:`~utils.bypass.prompt_attention_scores` rows and their
        :func:`skip_costs` (same texts, same order). ``weights`` (e.g. each prompt's ``scored_tokens``) weigh the
        prompts as the budget does: per decoded token."""
        if len(rows) < 2 or len(rows) != len(costs):
            raise ValueError(f"fit needs one costs list per row, at least 2 prompts: got {len(rows)} rows and "
                             f"{len(costs)} costs lists (use skip_costs on the texts the rows came from).")
        y = np.asarray([list(c) for c in costs], dtype=float)
        scores = np.asarray([list(r["scores"]) for r in rows], dtype=float)
        if y.ndim != 2 or y.shape != scores.shape:
            raise ValueError(f"every costs list must have one entry per block, like the rows' scores: "
                             f"got costs {y.shape}, scores {scores.shape}.")
        w = _mean_one_weights(weights, len(rows))
        usable = np.isfinite(y).all(0) & np.isfinite(scores).all(0)
        self.n_blocks = y.shape[1]
        self.blocks = [i for i in range(self.n_blocks) if usable[i] and i not in self.protect]
        if not self.blocks:
            raise ValueError("No block may be routed: every one is protected or has a nan cost or score.")
        signals = [as_signal(r) for r in rows]
        raw = np.concatenate([self._raw(s) for s in signals])
        self._centre, self._scale = raw.mean(0), raw.std(0)
        self._scale[self._scale == 0] = 1.0
        x = np.concatenate([self._design(self._raw(s)) for s in signals])
        target, row_w = y[:, self.blocks].reshape(-1), np.repeat(w, len(self.blocks))
        penalty = np.diag([0.0] * len(self.blocks) + [self.ridge] * (x.shape[1] - len(self.blocks)))
        self.coef = np.linalg.solve(x.T @ (x * row_w[:, None]) + penalty, x.T @ (row_w * target))
        return self

    def predict(self, signal: PromptSignal) -> list[float]:
        """The predicted cost of skipping each block on this prompt (nats per token), ``nan`` for blocks the
        router never skips and for a block whose score is missing."""
        if self.coef is None:
            raise ValueError("This CostRouter is not fitted: call fit(rows, costs) first.")
        if len(signal.scores) != self.n_blocks:
            raise ValueError(f"The signal has {len(signal.scores)} block scores, the router was fitted on "
                             f"{self.n_blocks}: use it on the model it was trained for.")
        if signal.decided_at < self.n_blocks:
            raise ValueError("CostRouter decides after the prefill (it reads every block's score): use it with "
                             "attention_bypass(..., decide_after=None).")
        predicted = self._design(self._raw(signal)) @ self.coef
        out = [float("nan")] * self.n_blocks
        for block, value in zip(self.blocks, predicted):
            out[block] = float(value)
        return out

    def ranking(self, signal: PromptSignal) -> list[int]:
        """The routed blocks with a known score, cheapest first: skip ``sorted(ranking[:k])`` for a fixed count."""
        predicted = self.predict(signal)
        return sorted((i for i in self.blocks if not math.isnan(predicted[i])), key=lambda i: predicted[i])

    def calibrate(self, rows: Sequence[dict], mean_skipped: float, *,
                  weights: Sequence[float] | None = None) -> float:
        """The cut on the predicted cost at which :meth:`rule` skips ``mean_skipped`` attentions on average over
        ``rows`` (training prompts), weighted by ``weights`` (each prompt's ``scored_tokens``: per decoded token).
        Uses :func:`~utils.bypass.calibrate_threshold` on the predictions."""
        if self.coef is None:
            raise ValueError("This CostRouter is not fitted: call fit(rows, costs) first.")
        if not rows:
            raise ValueError("calibrate needs the prompt_attention_scores rows of some training prompts.")
        predicted = [self.predict(as_signal(row)) for row in rows]
        return calibrate_threshold(predicted, mean_skipped, protect=self.protect, weights=weights)

    def rule(self, threshold: float) -> Rule:
        """The decision "skip every block predicted to cost less than ``threshold``" (see :meth:`calibrate`)."""
        if self.coef is None:
            raise ValueError("This CostRouter is not fitted: call fit(rows, costs) first.")
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number (a predicted cost), got {threshold!r}.")
        t = float(threshold)
        return lambda signal: [i for i, c in enumerate(self.predict(signal)) if c < t]
