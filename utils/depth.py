"""Depth pruning: score whole decoder blocks, choose which to remove, remove them (CH02, CH04).

* :func:`block_importance` — one score per decoder block, ``1 - cos(input, output)`` of the
  block's hidden states, averaged over real tokens (Men et al. 2024, *ShortGPT*, "Block
  Influence"). One forward pass per batch, read by forward hooks.
* :func:`choose_blocks_to_remove` — selection strategies by name (see :data:`STRATEGIES`).
* :func:`remove_blocks` — the surgery, keeping ``config.num_hidden_layers``,
  ``config.layer_types`` and every attention's ``layer_idx`` consistent, so that the KV cache
  and ``save_pretrained``/``from_pretrained`` keep working.
* :func:`linear_replacements` / :func:`fold_linear_replacements` — a least-squares linear map that
  stands in for a removed run of blocks, folded into the ``down_proj`` of the block before it
  (ReplaceMe, Shopkhoev et al. 2025); the architecture stays standard.
* :func:`prune_depth` — the course's default in one call: choose a run (``"angular_window"``), fit and
  fold its replacement, remove it. In ``scripts/benchmark.py`` (five domains, 16 and 64 calibration
  texts, SmolLM2-135M, 6 of 30 blocks) it is compared with optipfair's one-shot cosine cut; the table
  is in RESULTS.md.

Works on the course's Llama, Gemma 3 (``gemma3_text``), Qwen 3 (``model.model.layers``) and
GPT-2 (``model.transformer.h``) models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import check_damping
from .data import batch_tensors
from .evaluation import calibration_pass
from .precision import device_of
from .structure import BLOCK_PATHS, decoder_blocks, hidden_of, output_of, text_config  # + old utils.depth path

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

def _set_decoder_blocks(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> None:
    for path in BLOCK_PATHS:
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


# --- importance -----------------------------------------------------------------------------

def check_average(average: str) -> None:
    if average not in ("tokens", "batches"):
        raise ValueError(f"average={average!r} is not valid; use 'tokens' (every real token weighs the same) "
                         "or 'batches' (mean of per-batch means, as optipfair does).")


@torch.no_grad()
def mean_cosines(model, dataloader, *, register: Callable[[dict], list], pairs: Sequence[tuple[Hashable, Hashable]],
                 average: str = "tokens", progress: bool = True, desc: str = "cosines") -> list[float]:
    """Mean cosine similarity, over real tokens, between pairs of hidden states captured by hooks.

    The one loop behind every "how much does this part turn the residual stream" score of the course
    (whole blocks here, attention and MLP sublayers in :mod:`utils.attention`): ``register(store)``
    installs forward hooks that put ``[batch, tokens, hidden]`` tensors into the dict ``store`` under
    keys of its choice and returns their handles; for each ``(a, b)`` in ``pairs`` the cosine between
    ``store[a]`` and ``store[b]`` is taken per token and averaged over tokens whose
    ``attention_mask`` is 1. One forward pass per batch, no KV cache; the hooks are removed at the end.
    """
    check_average(average)
    device = device_of(model)
    store: dict = {}
    handles = register(store)
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    batch_means: list[torch.Tensor] = []
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
            input_ids, mask = batch_tensors(batch, device)
            store.clear()
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            n_real = int(real.sum())
            if n_real == 0:
                continue
            this = torch.stack([
                F.cosine_similarity(store[a].float(), store[b].float(), dim=-1)[real].sum()
                for a, b in pairs
            ]).double().cpu()
            sums += this
            batch_means.append(this / n_real)
            tokens += n_real
    finally:
        for handle in handles:
            handle.remove()
        store.clear()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("The dataloader holds no real token (empty, or every attention_mask is 0): "
                         "pass a dataloader such as utils.make_dataloader(load_texts('wikitext', n=16), tok).")
    means = sums / tokens if average == "tokens" else torch.stack(batch_means).mean(0)
    return [float(v) for v in means]


def _boundary_similarities(model, dataloader, *, pairs: Sequence[tuple[int, int]], average: str,
                           progress: bool, desc: str) -> list[float]:
    """Mean cosine similarity between the hidden state entering block ``a`` and the one leaving
    block ``b - 1``, for each ``(a, b)`` in ``pairs``; one forward pass per batch, hooks only."""
    check_average(average)
    blocks = decoder_blocks(model)
    last = len(blocks) - 1
    needed = {a for a, _ in pairs} | {b for _, b in pairs}

    def register(boundary: dict) -> list:  # boundary index i = hidden state entering block i
        def pre_hook(index):
            def hook(module, args, kwargs):
                if index in needed:
                    boundary[index] = hidden_of(args, kwargs)
            return hook

        def post_hook(index):
            def hook(module, args, kwargs, output):
                if index + 1 in needed:
                    boundary[index + 1] = output_of(output)
            return hook

        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            if i == last or i + 1 in needed:
                handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
        return handles

    return mean_cosines(model, dataloader, register=register, pairs=pairs, average=average, progress=progress,
                        desc=desc)


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
    config = text_config(model)
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
    config = text_config(model)
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
    config = text_config(model)
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
    _remap_block_records(config, kept)
    renumber_layer_idx(model)
    return model


# --- replacing a removed run of blocks by a linear map (ReplaceMe) ---------------------------

#: Ridge strength of :func:`linear_replacements`, relative to the mean energy of the MLP output it maps.
#: 1.0 from SmolLM2-135M, 6 of 30 blocks (a window of blocks 13-18): held-out perplexity with damping 1.0 vs 0.1 vs
#: 0.01 was 143.3 / 167.2 / 267.6 on sms_spam (16 texts) and 24.0 / 24.7 / 26.6 on wikitext (16 texts); on clinical
#: notes (64 texts) 0.1 was 0.6 % better (45.8 vs 46.1). CH04_NB01 repeats the sweep; scripts/benchmark.py checks
#: the default against optipfair's one-shot cut on five domains.
DEFAULT_REPLACEMENT_DAMPING = 1.0


def _contiguous_runs(indices: Iterable[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _output_projection(block) -> torch.nn.Module:
    """The last linear layer of a block's MLP, whose output is added straight to the residual stream."""
    if any(hasattr(block, name) for name in ("post_feedforward_layernorm", "post_mlp_layernorm")):
        raise ValueError("This block normalises its MLP output before adding it to the residual stream (Gemma "
                         "family), so a linear map cannot be folded into the MLP: cut without it "
                         "(prune_depth(..., linear_replacement=False) or remove_blocks).")
    mlp = getattr(block, "mlp", None)
    for name in ("down_proj", "c_proj", "fc2"):
        layer = getattr(mlp, name, None)
        if layer is not None and hasattr(layer, "weight"):
            return layer
    raise ValueError(f"Cannot find the output projection of {type(block).__name__}'s MLP (down_proj or c_proj).")


def can_fold_linear_replacements(model) -> bool:
    """Whether :func:`fold_linear_replacements` (and so ``prune_depth(..., linear_replacement=True)``) works on
    ``model``: every block's MLP output must reach the residual stream through a plain linear layer. Gemma's
    blocks normalise it first, so the answer there is ``False``: cut with ``linear_replacement=False``."""
    try:
        for block in decoder_blocks(model):
            _output_projection(block)
    except ValueError:
        return False
    return True


@torch.no_grad()
def linear_replacements(model, indices: Iterable[int], dataloader: Iterable[dict], *,
                        damping: float = DEFAULT_REPLACEMENT_DAMPING, progress: bool = True) -> dict[int, torch.Tensor]:
    """For each run of consecutive blocks in ``indices``, the linear map that best stands in for it.

    Let block ``p`` be the block just before a run and ``y`` the hidden state leaving the run's last
    block. Block ``p`` outputs ``r + m``: its residual stream ``r`` plus its MLP's output ``m``. The map
    ``T`` (``[hidden, hidden]``) minimises, over the real tokens of ``dataloader``,
    ``sum_t ||r_t + m_t T - y_t||^2 + lambda ||T - I||^2`` with ``lambda = damping * mean(diag(M^T M))``:
    if block ``p``'s MLP writes ``m T`` instead of ``m``, the run can go and the next block still
    receives (approximately) what it received before. This is the idea of ReplaceMe (Shopkhoev et al.,
    2025) in its least-squares form; the ridge pulls ``T`` towards the identity (the plain cut) when the
    calibration tokens are few. Returns ``{p: T}`` (float32, CPU); :func:`fold_linear_replacements`
    writes the maps into the weights.
    """
    check_damping(damping, DEFAULT_REPLACEMENT_DAMPING)
    blocks = decoder_blocks(model)
    runs = _contiguous_runs(indices)
    if not runs:
        raise ValueError("indices is empty: pass the block indices to remove, e.g. [10, 11].")
    bad = [i for run in runs for i in run if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"Block indices {bad} are out of range: this model has {len(blocks)} blocks.")
    if runs[0][0] == 0:
        raise ValueError("Block 0 has no block before it whose MLP could absorb the linear map: keep block 0 "
                         "(the default strategies protect it) or remove it with remove_blocks.")
    for run in runs:
        _output_projection(blocks[run[0] - 1])
    device = device_of(model)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    hidden = text_config(model).hidden_size
    stats = {run[0] - 1: [torch.zeros(hidden, hidden, dtype=dtype, device=device),
                          torch.zeros(hidden, hidden, dtype=dtype, device=device)] for run in runs}
    last_of = {run[0] - 1: run[-1] for run in runs}
    state: dict[str, torch.Tensor] = {}
    handles = []
    for p, last in last_of.items():
        def on_mlp(module, args, output, p=p):
            state[f"m{p}"] = output.reshape(-1, output.shape[-1])[state["real"]].to(dtype)

        def on_block(module, args, output, p=p):
            state[f"x{p}"] = output_of(output).reshape(-1, hidden)[state["real"]].to(dtype)

        def on_last(module, args, output, p=p):
            y = output_of(output).reshape(-1, hidden)[state["real"]].to(dtype)
            m = state.pop(f"m{p}")
            residual = state.pop(f"x{p}") - m
            stats[p][0].addmm_(m.T, m)
            stats[p][1].addmm_(m.T, y - residual)

        handles += [blocks[p].mlp.register_forward_hook(on_mlp), blocks[p].register_forward_hook(on_block),
                    blocks[last].register_forward_hook(on_last)]
    try:
        calibration_pass(model, dataloader, lambda mask: state.__setitem__("real", mask.reshape(-1).bool()),
                         desc="calibration (linear replacement)", progress=progress)
    finally:
        for h in handles:
            h.remove()
    maps = {}
    for p, (mtm, mty) in stats.items():
        eye = torch.eye(hidden, dtype=torch.float64, device=device)
        ridge = damping * mtm.diagonal().mean().clamp_min(1e-12).double() * eye
        maps[p] = torch.linalg.solve(mtm.double() + ridge, mty.double() + ridge).float().cpu()
    return maps


@torch.no_grad()
def fold_linear_replacements(model, maps: dict[int, torch.Tensor]):
    """Write each map ``T`` of :func:`linear_replacements` into block ``p``'s MLP output projection, in
    place: the MLP then outputs ``m T``. The architecture does not change (same shapes, no new module)."""
    blocks = decoder_blocks(model)
    for p, T in maps.items():
        layer = _output_projection(blocks[p])
        T = T.to(device=layer.weight.device, dtype=torch.float64)
        weight = layer.weight.double()
        if isinstance(layer, torch.nn.Linear):  # weight [hidden, inner]: out = a W^T + b
            layer.weight.copy_((T.T @ weight).to(layer.weight.dtype))
        else:  # GPT-2's Conv1D, weight [inner, hidden]: out = a W + b
            layer.weight.copy_((weight @ T).to(layer.weight.dtype))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_((layer.bias.double() @ T).to(layer.bias.dtype))
    return model


def prune_depth(model, n: int, dataloader: Iterable[dict], *, strategy: str = DEFAULT_STRATEGY,
                linear_replacement: bool = True, damping: float = DEFAULT_REPLACEMENT_DAMPING,
                protect: int | Sequence[int] | None = None, progress: bool = True):
    """Remove ``n`` decoder blocks in place, the course's default way, and return the model.

    Chooses the blocks with :func:`choose_blocks_to_remove` (``strategy``, default ``"angular_window"``),
    then, with ``linear_replacement=True`` (the default), folds the least-squares map of
    :func:`linear_replacements` into the block before each removed run, and removes the blocks with
    :func:`remove_blocks`. Both steps use the same calibration batches. ``linear_replacement=False`` is
    the plain cut. The evidence for the default is ``scripts/benchmark.py``'s table in RESULTS.md.
    """
    indices = choose_blocks_to_remove(model, dataloader, n, strategy=strategy, protect=protect, progress=progress)
    if linear_replacement:
        fold_linear_replacements(model, linear_replacements(model, indices, dataloader, damping=damping,
                                                            progress=progress))
    return remove_blocks(model, indices)


def _remap_block_records(config, kept: list[int]) -> None:
    """Records indexed by block follow the kept blocks: ``removed_attention`` (:mod:`utils.attention`)
    and transformers' ``per_layer_config`` overrides. Entries of removed blocks are dropped."""
    position = {old: new for new, old in enumerate(kept)}
    removed = getattr(config, "removed_attention", None)
    if removed:
        config.removed_attention = [position[b] for b in removed if b in position]
    if getattr(config, "is_heterogeneous", False):
        overrides = config.to_dict().get("per_layer_config") or {}
        config.per_layer_config = None
        remapped = {position[int(k)]: v for k, v in overrides.items() if int(k) in position}
        config.per_layer_config = remapped or None


def renumber_layer_idx(model) -> None:
    """Give every attention its index into the KV cache, and every block its position.

    The KV cache holds one entry per attention that still computes keys and values, in block
    order, so an attention's ``layer_idx`` counts only the blocks before it whose attention is
    still there (:func:`utils.attention.remove_attention` replaces removed ones by a module with
    ``holds_no_cache = True``). Without removed attention this is simply the block index. Any
    other submodule with a ``layer_idx`` (Gemma 3's decoder layer) gets its block's position.
    """
    slot = 0
    for index, block in enumerate(decoder_blocks(model)):
        attention = getattr(block, "self_attn", None) or getattr(block, "attn", None)
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = slot if module is attention else index
        if attention is not None and not getattr(attention, "holds_no_cache", False):
            slot += 1
