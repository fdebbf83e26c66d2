"""Depth pruning: score whole decoder blocks, choose which to remove, remove them (CH02, CH04).

* :func:`block_importance` — one score per decoder block, ``1 - cos(input, output)`` of the
  block's hidden states, averaged over real tokens (Men et al. 2024, *ShortGPT*, "Block
  Influence"). One forward pass per batch, read by forward hooks.
* :func:`choose_blocks_to_remove` — selection strategies by name (see :data:`STRATEGIES`).
* :func:`remove_blocks` — the surgery, keeping ``config.num_hidden_layers``,
  ``config.layer_types`` and every attention's ``layer_idx`` consistent, so that the KV cache
  and ``save_pretrained``/``from_pretrained`` keep working.

Works on the course's Llama, Gemma 3 (``gemma3_text``), Qwen 3 (``model.model.layers``) and
GPT-2 (``model.transformer.h``) models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import batch_tensors
from .evaluation import _device_of

#: Strategy names accepted by :func:`choose_blocks_to_remove`, with a one-line description.
STRATEGIES: dict[str, str] = {
    "last": "the last n blocks",
    "middle": "n consecutive blocks centred in the stack",
    "weight_norm": "the n blocks with the smallest weight norm (data-free)",
    "cosine": "the n blocks with the lowest one-shot cosine importance (ShortGPT)",
    "cosine_protected": "like 'cosine', but never the protected blocks (default: first and last)",
    "angular_window": "the n consecutive blocks whose input and output are closest in angle (Gromov et al. 2024)",
    "iterative": "remove the least important block, re-score the smaller model, repeat n times",
}
DEFAULT_STRATEGY = "angular_window"
_PROTECTING = ("cosine_protected", "angular_window", "iterative")


# --- finding the blocks ---------------------------------------------------------------------

#: Where decoder blocks live in the model families we meet, first match wins.
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "model.decoder.layers", "transformer.h",
                "gpt_neox.layers", "layers")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder blocks: ``model.model.layers`` (Llama, Gemma 3, Qwen 3, ...)
    or ``model.transformer.h`` (GPT-2)."""
    for path in _BLOCK_PATHS:
        owner = model
        for part in path.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if isinstance(owner, torch.nn.ModuleList):
            return owner
    raise ValueError(f"Cannot find the decoder blocks of {type(model).__name__}: expected model.model.layers "
                     "(Llama, Gemma 3, Qwen 3) or model.transformer.h (GPT-2).")


def _set_decoder_blocks(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> None:
    for path in _BLOCK_PATHS:
        *parents, last = path.split(".")
        owner = model
        for part in parents:
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if owner is not None and isinstance(getattr(owner, last, None), torch.nn.ModuleList):
            setattr(owner, last, blocks)
            return
    raise ValueError(f"Cannot find the decoder blocks of {type(model).__name__}.")


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# --- importance -----------------------------------------------------------------------------

def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _output_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def _boundary_similarities(model, dataloader, *, pairs: Sequence[tuple[int, int]], average: str,
                           progress: bool, desc: str) -> list[float]:
    """Mean cosine similarity between the hidden state entering block ``a`` and the one leaving
    block ``b - 1``, for each ``(a, b)`` in ``pairs``; one forward pass per batch, hooks only."""
    if average not in ("tokens", "batches"):
        raise ValueError(f"average={average!r} is not valid; use 'tokens' (every real token weighs the same) "
                         "or 'batches' (mean of per-batch means, as optipfair does).")
    blocks = decoder_blocks(model)
    device = _device_of(model)
    boundary: dict[int, torch.Tensor] = {}  # boundary index i = hidden state entering block i
    last = len(blocks) - 1
    needed = {a for a, _ in pairs} | {b for _, b in pairs}

    def pre_hook(index):
        def hook(module, args, kwargs):
            if index in needed:
                boundary[index] = _hidden_of(args, kwargs)
        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            if index + 1 in needed:
                boundary[index + 1] = _output_of(output)
        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        if i == last or i + 1 in needed:
            handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    batch_means: list[torch.Tensor] = []
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
            input_ids, mask = batch_tensors(batch, device)
            boundary.clear()
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            n_real = int(real.sum())
            if n_real == 0:
                continue
            this = torch.stack([
                F.cosine_similarity(boundary[a].float(), boundary[b].float(), dim=-1)[real].sum()
                for a, b in pairs
            ]).double().cpu()
            sums += this
            batch_means.append(this / n_real)
            tokens += n_real
    finally:
        for handle in handles:
            handle.remove()
        boundary.clear()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("The dataloader holds no real token (empty, or every attention_mask is 0): "
                         "pass a dataloader such as utils.make_dataloader(load_texts('wikitext', n=16), tok).")
    means = sums / tokens if average == "tokens" else torch.stack(batch_means).mean(0)
    return [float(v) for v in means]


def block_importance(model, dataloader: Iterable[dict], *, average: str = "tokens",
                     progress: bool = True) -> list[float]:
    """Importance of each decoder block: ``1 - cos(block input, block output)``.

    The cosine similarity is computed per token over the hidden dimension and averaged over
    real tokens (``attention_mask == 1``; padding excluded). A block that barely turns its
    input (score near 0) is a candidate for removal (Men et al. 2024, *ShortGPT*).

    One forward pass per batch, with a pre-hook and a hook on every block: the cost is that
    of a plain forward pass plus one cosine per block and token.

    Args:
        model: a causal LM whose blocks live in ``model.model.layers`` or ``model.transformer.h``.
        dataloader: batches of dicts with ``input_ids`` and ``attention_mask`` (e.g.
            :func:`utils.make_dataloader`).
        average: ``"tokens"`` (default) weighs every real token the same across the whole
            dataloader; ``"batches"`` averages per-batch means, which is what
            ``optipfair.analyze_layer_importance`` does (identical when every batch holds the
            same number of real tokens).
        progress: show a tqdm bar.

    Returns:
        One float per block, in block order.
    """
    n = len(decoder_blocks(model))
    pairs = [(i, i + 1) for i in range(n)]
    sims = _boundary_similarities(model, dataloader, pairs=pairs, average=average, progress=progress,
                                  desc="block importance")
    return [1.0 - s for s in sims]


def angular_distances(model, dataloader: Iterable[dict], n: int, *, progress: bool = True) -> list[float]:
    """Angular distance ``arccos(cos(h_l, h_{l+n})) / pi`` between the hidden state entering
    block ``l`` and the one leaving block ``l + n - 1``, for every start ``l`` (Gromov et al.
    2024, *The Unreasonable Ineffectiveness of the Deeper Layers*). Cosines are averaged over
    real tokens first. One forward pass per batch."""
    total = len(decoder_blocks(model))
    _check_n(n, total)
    pairs = [(start, start + n) for start in range(total - n + 1)]
    sims = _boundary_similarities(model, dataloader, pairs=pairs, average="tokens", progress=progress,
                                  desc=f"angular distance over {n} blocks")
    return [math.acos(max(-1.0, min(1.0, s))) / math.pi for s in sims]


def weight_norms(model) -> list[float]:
    """L2 norm of all the parameters of each decoder block (a data-free score)."""
    return [float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in block.parameters())))
            for block in decoder_blocks(model)]


# --- choosing -------------------------------------------------------------------------------

def _check_n(n, total: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < total:
        raise ValueError(f"n must be an integer between 1 and {total - 1} (the model has {total} blocks and "
                         f"at least one must stay), got {n!r}.")


def _normalise_protect(protect, total: int, strategy: str) -> set[int]:
    if protect is None:
        return {0, total - 1} if strategy in _PROTECTING else set()
    if isinstance(protect, int):
        protect = [protect]
    result = set()
    for index in protect:
        if not isinstance(index, int) or not -total <= index < total:
            raise ValueError(f"protect holds {index!r}, which is not a block index of this {total}-block model "
                             f"(use 0..{total - 1}, or negative indices such as -1 for the last block).")
        result.add(index % total)
    return result


def _lowest(scores: Sequence[float], n: int, excluded: set[int]) -> list[int]:
    candidates = sorted((s, i) for i, s in enumerate(scores) if i not in excluded)
    return sorted(i for _, i in candidates[:n])


def choose_blocks_to_remove(model, dataloader: Iterable[dict] | None, n: int, *,
                            strategy: str = DEFAULT_STRATEGY, protect: int | Sequence[int] | None = None,
                            progress: bool = True) -> list[int]:
    """Indices (sorted, in the original numbering) of ``n`` decoder blocks to remove.

    Strategies (see :data:`STRATEGIES`): ``"last"``, ``"middle"``, ``"weight_norm"`` (no data
    needed), ``"cosine"``, ``"cosine_protected"``, ``"angular_window"`` (default) and
    ``"iterative"``.

    ``"angular_window"`` (Gromov et al. 2024) removes the run of ``n`` consecutive blocks whose
    input (entering the first) and output (leaving the last) are closest in angle: it scores
    what the model loses when the whole run goes, not each block alone, in one forward pass
    per batch. On SmolLM2-135M (6 of 30 blocks, calibrated on wikitext train) it gave lower
    held-out perplexity than one-shot cosine selection on wikitext and sms_spam test text.
    ``"iterative"`` removes the lowest-importance block, re-scores the smaller model and
    repeats (``n`` scoring passes).

    Args:
        model: the model to score; it is left unchanged.
        dataloader: calibration batches (ignored by ``last``, ``middle``, ``weight_norm``).
        n: how many blocks to remove, ``1 <= n < number of blocks``.
        strategy: one of :data:`STRATEGIES`.
        protect: block indices never chosen (negative indices count from the end). Default:
            the first and the last block for ``cosine_protected``, ``angular_window`` and
            ``iterative``; none for the others. Pass ``()`` to protect nothing.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}. Valid strategies: " + ", ".join(STRATEGIES) + ".")
    total = len(decoder_blocks(model))
    _check_n(n, total)
    protected = _normalise_protect(protect, total, strategy)
    if total - len(protected) < n:
        raise ValueError(f"Cannot remove {n} blocks when {len(protected)} of the {total} are protected: "
                         "lower n or protect fewer blocks.")
    if strategy in ("cosine", "cosine_protected", "angular_window", "iterative") and dataloader is None:
        raise ValueError(f"strategy={strategy!r} needs calibration data: pass a dataloader "
                         "(e.g. utils.make_dataloader(load_texts('wikitext', n=32), tokenizer)).")

    if strategy in ("last", "middle"):
        start = total - n if strategy == "last" else (total - n) // 2
        window = list(range(start, start + n))
        if protected & set(window):
            raise ValueError(f"strategy={strategy!r} would remove protected blocks {sorted(protected & set(window))}: "
                             "pass protect=() or choose another strategy.")
        return window
    if strategy == "weight_norm":
        return _lowest(weight_norms(model), n, protected)
    if strategy in ("cosine", "cosine_protected"):
        return _lowest(block_importance(model, dataloader, progress=progress), n, protected)
    if strategy == "angular_window":
        distances = angular_distances(model, dataloader, n, progress=progress)
        allowed = [s for s in range(len(distances)) if not protected & set(range(s, s + n))]
        if not allowed:
            raise ValueError(f"No window of {n} consecutive blocks avoids the protected blocks {sorted(protected)}.")
        best = min(allowed, key=lambda s: distances[s])
        return list(range(best, best + n))
    return _iterative(model, dataloader, n, protected, progress)


def _iterative(model, dataloader, n: int, protected: set[int], progress: bool) -> list[int]:
    blocks = decoder_blocks(model)
    original = list(range(len(blocks)))  # original index of each block still in the model
    removed: list[int] = []
    saved = _snapshot(model)
    try:
        for _ in tqdm(range(n), desc="iterative selection", disable=not progress, leave=False):
            scores = block_importance(model, dataloader, progress=False)
            excluded = {pos for pos, orig in enumerate(original) if orig in protected}
            position = _lowest(scores, 1, excluded)[0]
            removed.append(original.pop(position))
            remove_blocks(model, [position])
    finally:
        _restore(model, saved)
    return sorted(removed)


# --- removing -------------------------------------------------------------------------------

def _snapshot(model) -> dict:
    config = _text_config(model)
    blocks = decoder_blocks(model)
    return {
        "blocks": list(blocks),
        "fields": {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types", "max_window_layers")
                   if hasattr(config, k)},
        "layer_idx": [(m, m.layer_idx) for b in blocks for m in b.modules() if isinstance(
            getattr(m, "layer_idx", None), int)],
    }


def _restore(model, saved: dict) -> None:
    _set_decoder_blocks(model, torch.nn.ModuleList(saved["blocks"]))
    config = _text_config(model)
    for key, value in saved["fields"].items():
        setattr(config, key, list(value) if isinstance(value, list) else value)
    for module, index in saved["layer_idx"]:
        module.layer_idx = index


def remove_blocks(model, indices: Iterable[int]):
    """Remove decoder blocks in place and return the model.

    Keeps the model self-consistent, so that generation with a KV cache, ``save_pretrained``
    and ``from_pretrained`` keep working:

    * the ``ModuleList`` of blocks loses the removed blocks;
    * ``config.num_hidden_layers`` (GPT-2: ``n_layer``) becomes the new depth;
    * ``config.layer_types`` (Gemma 3 sliding/full attention, Qwen 3) loses the removed
      entries, so every remaining block keeps its own attention type;
    * Qwen's ``config.max_window_layers`` counts the remaining blocks below the old boundary;
    * every submodule's ``layer_idx`` (the attention's index into the KV cache) is renumbered
      ``0..new_depth-1``;
    * ``config.removed_layers`` lists the removed blocks' indices in the ORIGINAL model (it
      accumulates over repeated cuts), so a saved model records what was cut.

    Raises:
        ValueError: for an index out of range, a duplicate, or removing every block.
    """
    blocks = decoder_blocks(model)
    total = len(blocks)
    indices = list(indices)
    if not indices:
        raise ValueError("indices is empty: pass the block indices to remove, e.g. [10, 11].")
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < total]
    if bad:
        raise ValueError(f"Block indices {bad} are out of range: this model has {total} blocks, "
                         f"numbered 0..{total - 1}.")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"Block indices {duplicates} are listed more than once: pass each index once.")
    if len(indices) >= total:
        raise ValueError(f"Cannot remove all {total} blocks: keep at least one.")
    config = _text_config(model)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("This GPT-2 config scales attention by 1/(layer_idx+1), so renumbered blocks would "
                         "compute something else after reloading: depth pruning is not supported for it.")
    gone = set(indices)
    kept = [i for i in range(total) if i not in gone]
    _set_decoder_blocks(model, torch.nn.ModuleList(blocks[i] for i in kept))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    config.num_hidden_layers = len(kept)  # GPT-2 maps this name to n_layer
    # Remember which of the ORIGINAL blocks are gone (composes over repeated cuts): distillation's
    # layer_map="kept" pairs each kept block with its original, and a saved model's config says what
    # was cut.
    before = list(getattr(config, "removed_layers", None) or [])
    original = [i for i in range(total + len(before)) if i not in set(before)]  # current -> original index
    config.removed_layers = sorted(before + [original[i] for i in gone])
    for new_index, block in enumerate(decoder_blocks(model)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    return model
