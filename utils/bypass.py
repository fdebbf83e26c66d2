"""Adaptive Attention Bypass: skip, per prompt, the attention sublayers that barely matter to it (CH08).

The book's second original method, built from forward hooks on an unchanged model:

* :func:`attention_bypass` -- the context manager. During a prompt's prefill, hooks measure how much each
  attention turns the residual stream (``1 - cos``) and how spread the prompt's embeddings are; a
  **decision** picks the attentions to skip, either **after the prefill** (every score known; the skipped
  layers' prompt cache is freed) or **early**, when the prefill reaches block ``decide_after`` (those
  attentions then skip the rest of the prefill too and never allocate cache). A skipped attention adds
  exactly zero and computes nothing.
* Decisions: a ``threshold`` on the scores, or a ``rule(signal)``: :func:`ranked_rule` skips the first
  ``count(signal)`` blocks of a fixed ranking (the book's rule with :func:`complexity_score`, or a
  length-only control); :class:`ScorePredictor` predicts the later blocks' scores from the first ones.
* Calibration on training prompts, to a budget counted **per decoded token**: :func:`prompt_attention_scores`,
  :func:`calibrate_threshold`, :func:`calibrate_scale`; and the control at the budget a rule *realised*
  on other texts, :func:`matched_counts`.
* :func:`perplexity_with_skips` -- quality of any per-text skip pattern in one forward pass per batch; it equals
  reading the text through the KV cache under the bypass (a test checks it) and is what makes evaluating
  many methods on hundreds of texts affordable.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import check_block, removed_attention
from .kv_cache import cache_arg, make_cache, prompt_splits
from .precision import device_of
from .structure import decoder, decoder_blocks, hidden_of, mlp_input_norm, text_config

#: Where a skip starts in :func:`perplexity_with_skips`: at every position, or from the prompt's last token on.
SKIP_FROM = ("all", "decode")


@dataclass
class PromptSignal:
    """What a bypass decision sees about one prompt (one forward pass).

    Attributes:
        tokens: real tokens of the prompt.
        scores: ``1 - cos(stream before, stream after)`` of each block's attention on this prompt; ``nan`` for
            blocks not measured yet (at or after ``decided_at``) and for removed attentions.
        spread: ``1 - mean pairwise cosine`` of the prompt's input embeddings (0: all tokens alike).
        decided_at: the block whose prefill is about to run (``n_blocks``: the prefill is over).
    """

    tokens: int
    scores: list[float]
    spread: float
    decided_at: int


Rule = Callable[[PromptSignal], Iterable[int]]


def default_protected(model) -> list[int]:
    """Blocks the bypass never skips: block 0 and the first block of each attention type.

    transformers reads the cache's length from entry 0 and each mask's size from the first cache
    entry of its type (full or sliding window). A skipped attention writes nothing during decode,
    so its entry stays at the prompt's length: those entries must keep growing.
    """
    config = text_config(model)
    types_ = getattr(config, "layer_types", None) or []
    first = {types_.index(t) for t in set(types_)}
    return sorted({0} | first)


def embedding_spread(embeddings: torch.Tensor) -> float:
    """``1 - mean cosine`` over all pairs of different rows of ``embeddings [tokens, hidden]`` (0 for < 2 rows).

    The book's "embedding variance" feature, computed in O(tokens x hidden): the sum of the unit vectors
    has squared norm ``tokens + sum of the pairwise cosines``.
    """
    n = embeddings.shape[0]
    if n < 2:
        return 0.0
    unit = F.normalize(embeddings.detach().float(), dim=-1)
    pair_sum = float(unit.sum(0).pow(2).sum()) - n
    return 1.0 - pair_sum / (n * (n - 1))


def complexity_score(signal: PromptSignal, *, reference_tokens: int = 2000, length_weight: float = 0.75) -> float:
    """The book's prompt complexity in [0, 1]: ``w x log(1 + n) / log(1 + reference) + (1 - w) x spread x
    min(1, n / (reference / 15))``, clipped. Long, varied prompts score high and keep more attention.

    The form and weights (0.75 length, 0.25 embedding spread) follow the book's AAB notebook; its
    model-size tables are replaced here by a count calibrated to a budget (:func:`calibrate_scale`).
    """
    if reference_tokens < 2 or not 0 <= length_weight <= 1:
        raise ValueError("reference_tokens must be >= 2 and length_weight lie in [0, 1].")
    length = min(math.log1p(signal.tokens) / math.log1p(reference_tokens), 1.0)
    spread = signal.spread * min(1.0, signal.tokens / (reference_tokens / 15))
    return min(max(length_weight * length + (1 - length_weight) * spread, 0.0), 1.0)


def ranked_rule(ranking: Sequence[int], count: Callable[[PromptSignal], float]) -> Rule:
    """A decision that skips the first ``round(count(signal))`` blocks of ``ranking`` (least important first).

    E.g. the book's rule: ``ranked_rule(ranking, lambda s: scale * (1 - complexity_score(s)))``; a length-only
    control: ``ranked_rule(ranking, lambda s: scale * s.tokens)``.
    """
    ranking = [int(i) for i in ranking]

    def rule(signal: PromptSignal) -> list[int]:
        k = int(min(max(round(count(signal)), 0), len(ranking)))
        return ranking[:k]
    return rule


def threshold_rule(threshold: float) -> Rule:
    """The decision "skip every attention whose score on this prompt is below ``threshold``"."""
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (scores lie in [0, 2]), got {threshold!r}.")
    t = float(threshold)
    return lambda signal: [i for i, s in enumerate(signal.scores) if s < t]


class AttentionBypass:
    """State of one :func:`attention_bypass` context: the signal and decision of every prompt.

    Attributes:
        history: one dict per prefill: ``prompt_tokens``, ``scores`` (``nan`` where not measured), ``spread``,
            ``decided_at`` and ``skipped`` (blocks skipped for this prompt).
        protect: blocks never skipped.
    """

    def __init__(self, model, decide: Rule, protect: Iterable[int], decide_after: int, free_cache: bool):
        self.model = model
        self.decide = decide
        self.protect = sorted(set(protect))
        self.decide_after = decide_after
        self.free_cache = free_cache
        self.history: list[dict] = []
        self.skip: set[int] = set()
        self.decoding = False
        self.skip_prefill = False
        self._sums: dict[int, float] = {}
        self._mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._tokens = 0
        self._spread = 0.0

    @property
    def mean_skipped(self) -> float:
        """Mean number of attention sublayers skipped per prompt so far."""
        if not self.history:
            return 0.0
        return sum(len(h["skipped"]) for h in self.history) / len(self.history)

    def __repr__(self) -> str:
        return f"AttentionBypass(prompts={len(self.history)}, mean_skipped={self.mean_skipped:.2f})"


def _real_rows(state: AttentionBypass, hidden: torch.Tensor) -> torch.Tensor:
    """The real (unpadded) token vectors of a prefill's hidden states, as ``[tokens, hidden]``."""
    return hidden[state._mask] if state._mask is not None else hidden.reshape(-1, hidden.shape[-1])


def _prefill_start(state: AttentionBypass) -> Callable:
    """Forward pre-hook of the decoder: is this pass a prefill (empty cache) or a decoding step? A prefill
    resets the previous prompt's decision and counts the real tokens."""
    def start(module, args, kwargs):
        hidden = kwargs.get("input_ids", args[0] if args else None)
        if hidden is None:
            hidden = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        state.decoding = past > 0
        if not state.decoding:
            mask = kwargs.get("attention_mask")
            n = hidden.shape[1]
            state._mask = mask[:, -n:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            state._sums, state.skip, state.skip_prefill = {}, set(), False
            state._tokens = int(state._mask.sum()) if state._mask is not None else hidden.shape[0] * n
            state._cache = cache
    return start


def _decide(state: AttentionBypass, at: int, n_blocks: int, removed: set[int]) -> None:
    """Build the prompt's signal, ask the decision, keep what may be skipped (not protected, not removed, not
    already run) and record it."""
    scores = [float("nan")] * n_blocks
    for i, total in state._sums.items():
        scores[i] = 1.0 - total / max(state._tokens, 1)
    signal = PromptSignal(tokens=state._tokens, scores=scores, spread=state._spread, decided_at=at)
    allowed = set(range(at if at < n_blocks else 0, n_blocks)) - set(state.protect) - removed
    chosen = sorted(set(int(i) for i in state.decide(signal)) & allowed)
    state.skip = set(chosen)
    state.skip_prefill = at < n_blocks
    state.history.append({"prompt_tokens": state._tokens, "scores": scores, "spread": state._spread,
                          "decided_at": at, "skipped": chosen})


def _free_skipped_cache(state: AttentionBypass, cache) -> None:
    """Drop the prompt's keys and values of the attentions skipped from now on (nothing reads them again)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    blocks = decoder_blocks(state.model)
    for i in state.skip:
        index = getattr(blocks[i].self_attn, "layer_idx", i)
        if index < len(layers) and hasattr(layers[index], "reset"):
            layers[index].reset()


def _prefill_finish(state: AttentionBypass, n_blocks: int, removed: set[int]) -> Callable:
    """Forward hook of the decoder: after a prefill that has not decided yet, decide, and free the skipped
    attentions' prompt cache when asked."""
    def finish(module, args, kwargs, output):
        if state.decoding or state.decide_after < n_blocks:
            return
        _decide(state, n_blocks, n_blocks, removed)
        if state.free_cache:
            _free_skipped_cache(state, getattr(state, "_cache", None))
    return finish


def _block_input(state: AttentionBypass, index: int, n_blocks: int, removed: set[int]) -> Callable:
    """Forward pre-hook of block ``index`` during a prefill: the spread of the embeddings (block 0), the early
    decision (block ``decide_after``) and the stream entering a block that is still measured."""
    def hook(module, args, kwargs):
        if state.decoding:
            return
        hidden = hidden_of(args, kwargs)
        if index == 0:
            state._spread = embedding_spread(_real_rows(state, hidden))
        if index == state.decide_after:
            _decide(state, index, n_blocks, removed)
        if index < state.decide_after:
            state._inputs[index] = hidden
    return hook


def _mlp_input(state: AttentionBypass, index: int) -> Callable:
    """Forward pre-hook of block ``index``'s MLP norm: during a prefill, add up the cosine between the stream
    before and after the attention over the real tokens."""
    def hook(module, args):
        if not state.decoding and index in state._inputs:
            cos = F.cosine_similarity(state._inputs.pop(index).float(), args[0].float(), dim=-1)
            state._sums[index] = float(cos[state._mask].sum() if state._mask is not None else cos.sum())
    return hook


def _gated(state: AttentionBypass, index: int, original: Callable) -> Callable:
    """The forward of block ``index``'s attention under the bypass: zero (nothing computed) once the prompt's
    decision skips it, else ``original``."""
    def forward(self, hidden_states, *args, **kwargs):
        if index in state.skip and (state.decoding or state.skip_prefill):
            return torch.zeros_like(hidden_states), None
        return original(hidden_states, *args, **kwargs)
    return forward


def _remove_bypass(state: AttentionBypass, handles: list, patched: list) -> None:
    """Undo :func:`attention_bypass`: remove its hooks and give every attention back its previous forward."""
    for handle in handles:
        handle.remove()
    for attention, previous in reversed(patched):
        if previous is None:
            del attention.forward  # back to the class's forward
        else:
            attention.forward = previous  # an enclosing bypass's
    state._inputs.clear()
    state._cache = None


def _check_bypass_args(threshold, rule, decide_after, n_blocks: int) -> tuple[Rule, int]:
    if (threshold is None) == (rule is None):
        raise ValueError("Pass exactly one of threshold= (skip attentions scoring below it) or rule= "
                         "(a function PromptSignal -> blocks to skip).")
    at = n_blocks if decide_after is None else decide_after
    if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= n_blocks:
        raise ValueError(f"decide_after must be a block index in 0..{n_blocks} (or None: after the prefill), "
                         f"got {decide_after!r}.")
    if threshold is not None and at < n_blocks:
        raise ValueError("A threshold needs every score, so it decides after the prefill: leave decide_after=None, "
                         "or pass a rule (e.g. a ScorePredictor's) to decide early.")
    return (threshold_rule(threshold) if threshold is not None else rule), at


@contextlib.contextmanager
def attention_bypass(model, threshold: float | None = None, *, rule: Rule | None = None,
                     decide_after: int | None = None, free_cache: bool = True,
                     protect: Iterable[int] | str = "auto") -> Iterator[AttentionBypass]:
    """Adaptive Attention Bypass: per prompt, skip the attention sublayers that barely matter to it.

    Inside the ``with`` block, every forward pass that starts a new KV cache is a prompt's prefill. Hooks
    measure the spread of its embeddings and, block by block, each attention's ``1 - cos(residual before,
    residual after)`` over the real tokens; then a decision picks the attentions to skip for this prompt:

    * ``decide_after=None`` (default): after the whole prefill, from every score. The skipped attentions
      run in the prefill but not while decoding; with ``free_cache`` their prompt keys and values are
      dropped, since nothing reads them again.
    * ``decide_after=k``: when the prefill reaches block ``k``, from the scores of blocks ``0..k-1`` (and the
      length and spread; ``k=0``: from those alone, the book's way). Skipped attentions (only blocks ``>= k``)
      skip the rest of the prefill too and never allocate cache.

    A skipped attention adds exactly zero and computes nothing. ``protect`` (default:
    :func:`default_protected`) keeps the cache entries transformers reads lengths from. One decision per
    forward pass: a batch of several prompts pools their tokens, so use one prompt per batch for
    per-prompt decisions.

    Args:
        threshold: skip the attentions scoring below it (decides after the prefill).
        rule: ``rule(signal: PromptSignal) -> blocks to skip`` (:func:`ranked_rule`, :class:`ScorePredictor`, ...).

    Yields:
        An :class:`AttentionBypass` whose ``history`` records every prompt's signal and skips.
    """
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        check_block(block, index)
    decide, at = _check_bypass_args(threshold, rule, decide_after, len(blocks))
    protected = default_protected(model) if protect == "auto" else _block_list(protect, len(blocks))
    state = AttentionBypass(model, decide, protected, at, free_cache)
    removed = set(removed_attention(model))
    owner = decoder(model)
    handles = [owner.register_forward_pre_hook(_prefill_start(state), with_kwargs=True),
               owner.register_forward_hook(_prefill_finish(state, len(blocks), removed), with_kwargs=True)]
    patched = []
    try:
        for i, block in enumerate(blocks):
            if i == 0 or i <= at:
                handles.append(block.register_forward_pre_hook(_block_input(state, i, len(blocks), removed),
                                                                with_kwargs=True))
            if i in removed:
                continue
            if i < at:
                handles.append(mlp_input_norm(block).register_forward_pre_hook(_mlp_input(state, i)))
            attention = block.self_attn
            patched.append((attention, vars(attention).get("forward")))
            attention.forward = types.MethodType(_gated(state, i, attention.forward), attention)
        yield state
    finally:
        _remove_bypass(state, handles, patched)


def _block_list(indices: Iterable[int], total: int) -> list[int]:
    values = sorted({int(i) for i in indices})
    if any(not 0 <= i < total for i in values):
        raise ValueError(f"protect holds block indices outside 0..{total - 1}: {values}.")
    return values


# --- signals and calibration ------------------------------------------------------------------

@torch.no_grad()
def prompt_attention_scores(model, dataloader: Iterable[dict], *, prefix_tokens: int | float,
                            decode_first: bool = False, progress: bool = True) -> list[dict]:
    """Each prompt's signal as the bypass sees it after a full prefill (nothing skipped).

    Prompts are cut as in :func:`utils.kv_cache.perplexity_through_cache` (same ``prefix_tokens`` and
    ``decode_first``, same texts, same order). Returns one dict per prompt: ``prompt_tokens``, ``scores``
    (``nan`` for removed attentions), ``spread`` and ``scored_tokens`` (the continuation tokens scored after it:
    the weight of this prompt in a budget counted per decoded token).
    """
    arg = cache_arg(model)
    splits = prompt_splits(dataloader, prefix_tokens, device_of(model))
    hold = 1 if decode_first else 0
    if hold and min(n for _, n in splits) < 2:
        raise ValueError("decode_first needs prompts of at least 2 tokens: raise prefix_tokens.")
    with attention_bypass(model, rule=lambda signal: [], protect=()) as probe:
        for seq, n in tqdm(splits, desc="prompt scores", disable=not progress, leave=False):
            model(input_ids=seq[None, :n - hold], use_cache=True, **{arg: make_cache(model)})
    return [{"prompt_tokens": h["prompt_tokens"], "scores": h["scores"], "spread": h["spread"],
             "scored_tokens": int(seq.numel() - n)} for h, (seq, n) in zip(probe.history, splits)]


def as_signal(row: dict, decided_at: int | None = None) -> PromptSignal:
    """A :func:`prompt_attention_scores` row as the :class:`PromptSignal` a decision taken at block ``decided_at``
    would see (later scores hidden as ``nan``; default: after the prefill, every score)."""
    scores = list(row["scores"])
    at = len(scores) if decided_at is None else decided_at
    return PromptSignal(tokens=row["prompt_tokens"], scores=[s if i < at else float("nan") for i, s in
                                                              enumerate(scores)], spread=row["spread"], decided_at=at)


def decisions(rows: Sequence[dict], rule: Rule, *, protect: Iterable[int],
              decided_at: int | None = None) -> list[list[int]]:
    """The blocks ``rule`` would skip on each :func:`prompt_attention_scores` row, exactly as
    :func:`attention_bypass` restricts them (not protected, not removed, not before ``decided_at``)."""
    protect = set(protect)
    out = []
    for row in rows:
        signal = as_signal(row, decided_at)
        allowed = {i for i in range(signal.decided_at if signal.decided_at < len(row["scores"]) else 0,
                                    len(row["scores"])) if i not in protect and not math.isnan(row["scores"][i])}
        out.append(sorted(set(int(i) for i in rule(signal)) & allowed))
    return out


def check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Per-prompt weights as an array of ``n`` finite, non-negative numbers that are not all zero (all ones for
    ``None``). Every calibration of this module and :class:`utils.bypass_router.CostRouter` reads its weights
    (e.g. each prompt's decoded tokens) through this check, so a wrong length or a NaN gets one clear error."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be the number of prompts, a whole number, got {n!r}.")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must hold one finite, non-negative number per prompt ({n}), not all zero.")
    return w


def calibrate_threshold(scores: Sequence, mean_skipped: float, *, protect: Iterable[int],
                        weights: Sequence[float] | None = None) -> float:
    """The threshold at which "skip if score < threshold" skips ``mean_skipped`` attentions on average.

    ``scores`` holds one list per prompt (or the dicts of :func:`prompt_attention_scores`); protected blocks and
    removed attentions are left out. ``weights`` (e.g. each prompt's ``scored_tokens``) turn the average into
    one per decoded token; without them every prompt counts once. The threshold lies halfway between the
    two pooled scores around the point where the weighted mean count reaches ``mean_skipped``.
    """
    protect = set(protect)
    rows = [row["scores"] if isinstance(row, dict) else row for row in scores]
    if not rows:
        raise ValueError("scores is empty: pass one list of attention scores per calibration prompt.")
    w = check_weights(weights, len(rows))
    pooled = sorted((s, w[p]) for p, row in enumerate(rows) for i, s in enumerate(row)
                    if i not in protect and not math.isnan(s))
    per_prompt = len(pooled) / len(rows)
    if not isinstance(mean_skipped, (int, float)) or not 0 <= mean_skipped <= per_prompt:
        raise ValueError(f"mean_skipped must lie between 0 and {per_prompt:g} (the attention sublayers that may be "
                         f"skipped per prompt), got {mean_skipped!r}.")
    reached = np.cumsum([weight for _, weight in pooled]) / w.sum()  # mean count if the first j+1 are skipped
    m = int(np.argmin(np.abs(np.concatenate([[0.0], reached]) - mean_skipped)))
    if m == 0:
        return pooled[0][0] - 1.0
    if m >= len(pooled):
        return pooled[-1][0] + 1.0
    return (pooled[m - 1][0] + pooled[m][0]) / 2


def calibrate_scale(features: Sequence[float], mean_skipped: float, *, limit: int,
                    weights: Sequence[float] | None = None) -> float:
    """The scale ``c`` at which skipping ``clip(round(c x feature), 0, limit)`` attentions per prompt skips
    ``mean_skipped`` on average (weighted by ``weights``, e.g. decoded tokens): the count of a
    :func:`ranked_rule`. Found by bisection on the training prompts' features (all >= 0)."""
    f = np.asarray(features, dtype=float)
    w = check_weights(weights, len(f))
    if f.size == 0 or (f < 0).any() or f.max() <= 0:
        raise ValueError("features must be non-negative numbers, at least one above zero.")
    if not 0 <= mean_skipped <= limit:
        raise ValueError(f"mean_skipped must lie in 0..{limit} (the blocks that may be skipped), got {mean_skipped!r}.")

    def mean_count(c: float) -> float:
        return float(np.average(np.clip(np.round(c * f), 0, limit), weights=w))
    low, high = 0.0, (limit + 1) / f[f > 0].min()
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_count(middle) < mean_skipped else (low, middle)
    return min((low, high), key=lambda c: abs(mean_count(c) - mean_skipped))


def matched_counts(weights: Sequence[float], mean_skipped: float, *, limit: int, seed: int = 0) -> list[int]:
    """Per-prompt counts of a static cut whose mean, weighted by ``weights`` (e.g. each text's scored tokens),
    matches ``mean_skipped``: every prompt gets ``floor(mean_skipped)`` or one more, the extra ones chosen in a
    seeded random order. The control that compares an adaptive rule with static removal at the budget the rule
    *realised* on the texts, not the one it was calibrated to. The match is as close as the weights allow:
    compute the realised mean with ``np.average(counts, weights=weights)``.
    """
    weights = [] if weights is None else list(weights)
    w = check_weights(weights, len(weights))
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative whole number (the blocks that may be cut), got {limit!r}.")
    if not isinstance(mean_skipped, (int, float)) or not 0 <= mean_skipped <= limit:
        raise ValueError(f"mean_skipped must lie in 0..{limit} (the blocks that may be cut), got {mean_skipped!r}.")
    low = min(int(math.floor(mean_skipped)), limit)
    counts = np.full(len(w), low)
    target, reached = (mean_skipped - low) * w.sum(), 0.0
    for p in np.random.default_rng(seed).permutation(len(w)):
        if low < limit and abs(reached + w[p] - target) < abs(reached - target):
            counts[p], reached = low + 1, reached + w[p]
    return [int(c) for c in counts]


class ScorePredictor:
    """Our early decision: predict every later attention's score from what the first ``early`` blocks of the
    prefill measured, and skip the ones predicted below a threshold.

    Features per prompt: 1, ``log(tokens)``, ``spread`` and the scores of blocks ``0..early-1``; one ridge
    regression per later block (fitted on training prompts by :meth:`fit`). Use it as
    ``attention_bypass(model, rule=predictor.rule(threshold), decide_after=predictor.early)``.
    """

    def __init__(self, early: int, ridge: float = 1e-3):
        if not isinstance(early, int) or early < 0:
            raise ValueError(f"early must be a block count >= 0, got {early!r}.")
        self.early, self.ridge = early, ridge
        self.coef: np.ndarray | None = None

    def _features(self, signal: PromptSignal) -> np.ndarray:
        seen = [0.0 if math.isnan(s) else s for s in signal.scores[:self.early]]
        return np.array([1.0, math.log(max(signal.tokens, 1)), signal.spread, *seen])

    def fit(self, rows: Sequence[dict]) -> ScorePredictor:
        """Fit on :func:`prompt_attention_scores` rows of training prompts (full prefills)."""
        if len(rows) < 2:
            raise ValueError("fit needs the scores of at least 2 training prompts.")
        x = np.stack([self._features(as_signal(r, self.early)) for r in rows])
        y = np.nan_to_num(np.array([r["scores"] for r in rows], dtype=float), nan=1.0)
        penalty = self.ridge * np.eye(x.shape[1])
        penalty[0, 0] = 0.0
        self.coef = np.linalg.solve(x.T @ x + penalty, x.T @ y)
        return self

    def predict(self, signal: PromptSignal) -> list[float]:
        """Predicted scores of every block (measured ones are returned as measured)."""
        if self.coef is None:
            raise RuntimeError("Call fit(training_rows) before predict.")
        predicted = self._features(signal) @ self.coef
        return [s if i < self.early and not math.isnan(s) else float(predicted[i]) for i, s in enumerate(signal.scores)]

    def rule(self, threshold: float) -> Rule:
        """The decision "skip the later blocks predicted below ``threshold``"."""
        return lambda signal: [i for i, s in enumerate(self.predict(signal)) if i >= self.early and s < threshold]


# --- quality of a skip pattern ----------------------------------------------------------------

def _skip_masks(skips: Sequence[Sequence[int]], starts: list[int], length: int, n_blocks: int,
                device) -> dict[int, torch.Tensor]:
    """Per block, a ``[texts, positions, 1]`` mask that is 0 where that text skips the block's attention."""
    masks: dict[int, torch.Tensor] = {}
    for row, (blocks, start) in enumerate(zip(skips, starts)):
        for i in blocks:
            if i not in masks:
                masks[i] = torch.ones(len(skips), length, 1, device=device)
            masks[i][row, start:] = 0.0
    return {i: m for i, m in masks.items() if i < n_blocks}


@torch.no_grad()
def perplexity_with_skips(model, dataloader: Iterable[dict], *, prefix_tokens: int | float,
                          skips: Sequence[Sequence[int]], skip_from: str = "all", batch_size: int = 8,
                          progress: bool = True, desc: str = "perplexity with skips") -> dict:
    """Perplexity of each text's continuation when text ``t`` skips the attentions ``skips[t]``.

    ``skip_from="all"``: skipped at every position (a decision taken before or during the prefill, or a static
    removal); ``"decode"``: from the prompt's last token on (a decision taken after a prefill of all but the
    last prompt token, which is then fed as the first decoding step). Texts are cut and scored as in
    :func:`utils.kv_cache.perplexity_through_cache` with ``decode_first=True``, and the result equals that
    under :func:`attention_bypass` up to float rounding (a test checks it), in one forward pass per batch:
    the skipped attentions are computed and multiplied by zero, so this measures quality, not speed.

    Returns ``perplexity``, ``nll`` (summed per text) and ``tokens`` (scored per text).
    """
    if skip_from not in SKIP_FROM:
        raise ValueError(f"skip_from must be 'all' or 'decode', got {skip_from!r}.")
    splits = prompt_splits(dataloader, prefix_tokens, device_of(model))
    if len(skips) != len(splits):
        raise ValueError(f"skips holds {len(skips)} lists but there are {len(splits)} texts with a continuation: "
                         "pass one list of blocks per text, in order.")
    blocks = decoder_blocks(model)
    state: dict[int, torch.Tensor] = {}

    def gate(i):
        def hook(module, args, output):
            if i in state:
                return (output[0] * state[i].to(output[0].dtype), *output[1:])
        return hook
    handles = [b.self_attn.register_forward_hook(gate(i)) for i, b in enumerate(blocks)]
    nll, counts = [], []
    try:
        for first in tqdm(range(0, len(splits), batch_size), desc=desc, disable=not progress, leave=False):
            group = splits[first:first + batch_size]
            length = max(s.numel() for s, _ in group)
            ids = torch.stack([F.pad(s, (0, length - s.numel()), value=int(s[-1])) for s, _ in group])
            mask = torch.stack([(torch.arange(length, device=ids.device) < s.numel()).long() for s, _ in group])
            starts = [0 if skip_from == "all" else n - 1 for _, n in group]
            state.clear()
            state.update(_skip_masks(skips[first:first + batch_size], starts, length, len(blocks), ids.device))
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for row, (seq, n) in enumerate(group):
                losses = F.cross_entropy(logits[row, n - 1:seq.numel() - 1], seq[n:], reduction="sum")
                nll.append(float(losses))
                counts.append(int(seq.numel() - n))
    finally:
        for handle in handles:
            handle.remove()
    return {"perplexity": math.exp(sum(nll) / sum(counts)), "nll": nll, "tokens": counts}
