"""The attention half of a decoder block: score it, remove it, bypass it, and count what the KV cache costs (CH08).

* :func:`sublayer_importance` (and :func:`attention_importance`, :func:`mlp_importance`) —
  ``1 - cos`` between the residual stream before and after each attention and each MLP sublayer,
  averaged over real tokens (He et al. 2024, *What Matters in Transformers? Not All Attention Is
  Needed*). One forward pass per batch, hooks only, through the same loop as
  :func:`utils.block_importance`.
* :func:`choose_attention_to_remove`, :func:`remove_attention`, :func:`removed_attention` — the
  surgery. A removed attention adds exactly zero to the residual stream and holds no KV cache: the
  remaining attentions are renumbered so the cache has one entry per attention that is left.
  :func:`apply_recorded_surgery` re-applies a removal recorded in a saved config.
* :func:`make_cache`, :func:`cache_bytes`, :func:`kv_bytes_per_token`,
  :func:`perplexity_through_cache` — what the KV cache holds, measured, and what a lossy
  (quantised) cache costs in quality when every continuation token is read back through it.
* :func:`attention_bypass`, :func:`prompt_attention_scores`, :func:`calibrate_threshold` — our
  Adaptive Attention Bypass: during prefill every attention runs and hooks measure how much each one
  changes the residual stream for *this* prompt; the ones under a threshold are skipped for the
  whole decode.
* :func:`measure_decode`, :func:`decode_flops_per_token`, :func:`ideal_decode_speedup`,
  :func:`realised_share` — token-by-token decoding speed, timed alternately by
  :func:`utils.compare_speed`, against the FLOPs ideal of a decoding step (matmul weights plus
  attention's context-length term).

Works on Llama-style blocks (Llama, SmolLM2, Qwen 3: ``input_layernorm -> self_attn -> +``) and on
Gemma 3 blocks (which also normalise the attention output with ``post_attention_layernorm``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import types
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .anatomy import kv_bytes
from .data import batch_tensors
from .depth import _hidden_of, _output_of, decoder_blocks, mean_cosines, renumber_layer_idx
from .evaluation import _device_of
from .models import register_config_surgery

#: The name transformers' ``per_layer_config`` uses for an attention sublayer in a ``skip`` list.
SKIP_NAME = "attention"
#: Config field listing the blocks whose attention was removed (indices of the saved model's blocks).
CONFIG_FIELD = "removed_attention"
#: Config field set to True when the removal was saved as zeroed ``o_proj`` weights (``portable=True``).
PORTABLE_FIELD = "removed_attention_portable"


# --- the structure of a block ---------------------------------------------------------------

class RemovedAttention(torch.nn.Module):
    """Stands where a removed attention sublayer was: it adds exactly zero to the residual stream
    and never reads or writes the KV cache (``holds_no_cache``). It has no parameters.

    Returning zeros, not the input, is the point: a block computes ``h + attention(norm(h))``, so an
    attention that returned its input would add a normalised copy of the stream.
    """

    holds_no_cache = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def _check_block(block, index: int) -> None:
    if not all(hasattr(block, name) for name in ("self_attn", "input_layernorm", "mlp")):
        raise ValueError(f"Block {index} ({type(block).__name__}) is not a Llama/Qwen 3/Gemma 3 style block with "
                         "self_attn, input_layernorm and mlp: attention surgery supports those families only.")


def _attention_branch(block) -> list[str]:
    """Names of the block's modules that serve only the attention: the attention itself, the norm
    before it and, in Gemma 3 (which has a separate pre-MLP norm), the norm after it."""
    names = ["self_attn", "input_layernorm"]
    if hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
        names.append("post_attention_layernorm")
    return names


def _mlp_input_norm(block) -> torch.nn.Module:
    """The norm in front of the MLP: its input is the residual stream after the attention."""
    return block.pre_feedforward_layernorm if hasattr(block, "pre_feedforward_layernorm") \
        else block.post_attention_layernorm


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder(model) -> torch.nn.Module:
    """The module that owns the decoder blocks and creates the KV cache (``model.model`` for Llama)."""
    blocks = decoder_blocks(model)
    for module in model.modules():
        if any(child is blocks for child in module.children()):
            return module
    raise ValueError(f"Cannot find the module that holds the decoder blocks of {type(model).__name__}.")


def _is_removed(block) -> bool:
    return getattr(getattr(block, "self_attn", None), "holds_no_cache", False)


def _attention_blocks(model) -> list[int]:
    """Indices of the blocks whose attention still computes keys and values (one cache entry each)."""
    return [i for i, block in enumerate(decoder_blocks(model)) if not _is_removed(block)]


# --- importance -----------------------------------------------------------------------------

def sublayer_importance(model, dataloader: Iterable[dict], *, average: str = "tokens",
                        progress: bool = True) -> dict[str, list[float]]:
    """Importance of every attention and every MLP sublayer, from one forward pass per batch.

    For block ``l`` with input ``x`` (the residual stream), ``m = x + attention`` (the stream
    entering the MLP's norm) and output ``y = m + MLP``:

    * ``attention[l] = 1 - cos(x, m)``
    * ``mlp[l] = 1 - cos(m, y)``

    per token, averaged over real tokens (``attention_mask == 1``) as in
    :func:`utils.block_importance`, which the same pass also returns (``1 - cos(x, y)``). A removed
    attention scores exactly 0.

    Returns:
        ``{"attention": [...], "mlp": [...], "block": [...]}``, one float per block each.
    """
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        _check_block(block, index)

    def register(store: dict) -> list:
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: store.__setitem__(("in", i), _hidden_of(args, kwargs)),
                with_kwargs=True))
            handles.append(_mlp_input_norm(block).register_forward_pre_hook(
                lambda mod, args, i=i: store.__setitem__(("mid", i), args[0])))
            handles.append(block.register_forward_hook(
                lambda mod, args, output, i=i: store.__setitem__(("out", i), _output_of(output))))
        return handles

    n = len(blocks)
    pairs = ([(("in", i), ("mid", i)) for i in range(n)] + [(("mid", i), ("out", i)) for i in range(n)]
             + [(("in", i), ("out", i)) for i in range(n)])
    sims = mean_cosines(model, dataloader, register=register, pairs=pairs, average=average, progress=progress,
                        desc="sublayer importance")
    return {"attention": [1.0 - s for s in sims[:n]], "mlp": [1.0 - s for s in sims[n:2 * n]],
            "block": [1.0 - s for s in sims[2 * n:]]}


def attention_importance(model, dataloader: Iterable[dict], *, average: str = "tokens",
                         progress: bool = True) -> list[float]:
    """``1 - cos(residual before, residual after)`` of each attention sublayer (see :func:`sublayer_importance`)."""
    return sublayer_importance(model, dataloader, average=average, progress=progress)["attention"]


def mlp_importance(model, dataloader: Iterable[dict], *, average: str = "tokens",
                   progress: bool = True) -> list[float]:
    """``1 - cos(residual before, residual after)`` of each MLP sublayer (see :func:`sublayer_importance`)."""
    return sublayer_importance(model, dataloader, average=average, progress=progress)["mlp"]


def _block_list(indices, total: int, what: str) -> list[int]:
    if isinstance(indices, int):
        indices = [indices]
    indices = list(indices)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < total]
    if bad:
        raise ValueError(f"{what} {bad} out of range: this model has {total} blocks, numbered 0..{total - 1}.")
    return indices


def choose_attention_to_remove(model, dataloader: Iterable[dict] | None, n: int, *,
                               scores: Sequence[float] | None = None, protect: int | Sequence[int] = (),
                               progress: bool = True) -> list[int]:
    """The ``n`` attention sublayers with the lowest :func:`attention_importance` (sorted block indices).

    Attentions already removed and the blocks in ``protect`` are never chosen. Pass ``scores`` to
    reuse importance scores computed earlier (then ``dataloader`` may be None).
    """
    blocks = decoder_blocks(model)
    total = len(blocks)
    available = [i for i in _attention_blocks(model) if i not in set(_block_list(protect, total, "protect holds"))]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < len(_attention_blocks(model)):
        raise ValueError(f"n must be an integer between 1 and {len(_attention_blocks(model)) - 1} (the model has "
                         f"{len(_attention_blocks(model))} attention sublayers and at least one must stay), got {n!r}.")
    if n > len(available):
        raise ValueError(f"Only {len(available)} attention sublayers are neither removed nor protected: lower n.")
    if scores is None:
        if dataloader is None:
            raise ValueError("Pass calibration data (a dataloader such as utils.make_dataloader(texts, tokenizer)) "
                             "or precomputed scores=attention_importance(...).")
        scores = attention_importance(model, dataloader, progress=progress)
    if len(scores) != total:
        raise ValueError(f"scores has {len(scores)} entries but the model has {total} blocks.")
    return sorted(sorted(available, key=lambda i: scores[i])[:n])


# --- removal --------------------------------------------------------------------------------

def removed_attention(model) -> list[int]:
    """Indices of the blocks whose attention sublayer has been removed (sorted).

    A portable removal (zeroed ``o_proj``, see :func:`remove_attention`) keeps the modules, so it is
    read from the config's record instead.
    """
    config = _text_config(model)
    if getattr(config, PORTABLE_FIELD, False):
        return sorted(getattr(config, CONFIG_FIELD, None) or [])
    return [i for i, block in enumerate(decoder_blocks(model)) if _is_removed(block)]


def _record(config, indices: list[int], portable: bool) -> None:
    before = list(getattr(config, CONFIG_FIELD, None) or [])
    removed = sorted(set(before) | set(indices))
    setattr(config, CONFIG_FIELD, removed)
    if portable:
        setattr(config, PORTABLE_FIELD, True)
    # transformers' native per-layer record: {block: {"skip": ["attention"]}} (read by nothing in 5.24 yet).
    overrides = {int(k): dict(v) for k, v in (config.to_dict().get("per_layer_config") or {}).items()}
    for index in removed:
        entry = overrides.setdefault(index, {})
        entry["skip"] = sorted(set(entry.get("skip", [])) | {SKIP_NAME})
    config.per_layer_config = overrides


def remove_attention(model, indices: int | Iterable[int], *, portable: bool = False):
    """Remove the attention sublayer of the given blocks, in place, and return the model.

    Each chosen block keeps its MLP and becomes ``h -> h + MLP(norm(h))``:

    * ``self_attn`` becomes a :class:`RemovedAttention` (adds exactly zero, holds no KV cache) and
      the norm(s) that only fed it become ``Identity``: their weights leave the state dict;
    * the remaining attentions' ``layer_idx`` are renumbered ``0..L-k-1``, so the KV cache holds
      exactly ``L - k`` entries — also when block 0 loses its attention (transformers reads the
      cache length from entry 0). A forward pre-hook on the decoder fits every cache that
      transformers builds from the config (one entry per block) to those ``L - k`` entries;
    * the config records the removal: ``removed_attention`` (block indices) and transformers'
      ``per_layer_config = {block: {"skip": ["attention"]}}``, so :func:`utils.load_model` can
      re-apply it (:func:`apply_recorded_surgery`) before loading the weights strictly.

    With ``portable=True`` the modules stay and the attention's output projection ``o_proj`` is
    zeroed instead: the output is the same (the sublayer adds exactly zero), a ``save_pretrained``
    checkpoint loads with plain ``AutoModelForCausalLM.from_pretrained`` anywhere, but nothing gets
    faster and the KV cache keeps all ``L`` entries.

    Raises:
        ValueError: for an index out of range, a duplicate, an attention already removed, or
        removing every attention.
    """
    blocks = decoder_blocks(model)
    total = len(blocks)
    indices = _block_list(indices, total, "Block indices")
    if not indices:
        raise ValueError("indices is empty: pass the blocks whose attention should go, e.g. [10, 12].")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"Block indices {duplicates} are listed more than once: pass each index once.")
    already = sorted(set(indices) & set(removed_attention(model)))
    if already:
        raise ValueError(f"The attention of blocks {already} is already removed (see removed_attention(model)).")
    if len(set(removed_attention(model)) | set(indices)) >= total:
        raise ValueError(f"Cannot remove the attention of all {total} blocks: keep at least one "
                         "(without any attention a token never sees the tokens before it).")
    for index in indices:
        _check_block(blocks[index], index)
    config = _text_config(model)
    if portable:
        for index in indices:
            o_proj = getattr(blocks[index].self_attn, "o_proj", None)
            if o_proj is None:
                raise ValueError(f"Block {index}'s attention has no o_proj to zero: portable=True is not supported.")
            with torch.no_grad():
                o_proj.weight.zero_()
                if getattr(o_proj, "bias", None) is not None:
                    o_proj.bias.zero_()
        _record(config, indices, portable=True)
        return model
    if getattr(config, PORTABLE_FIELD, False):
        raise ValueError("This model records a portable removal (zeroed o_proj): remove attention either "
                         "portably or not, not both; reload the original model to change the kind.")
    for index in indices:
        block = blocks[index]
        for name in _attention_branch(block):
            setattr(block, name, RemovedAttention() if name == "self_attn" else torch.nn.Identity())
    renumber_layer_idx(model)
    _record(config, indices, portable=False)
    decoder = _decoder(model)
    if not getattr(decoder, "_fits_cache_to_attention", False):
        decoder.register_forward_pre_hook(_fit_cache_hook, with_kwargs=True)
        decoder._fits_cache_to_attention = True
    return model


def _records_removal(config) -> bool:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, CONFIG_FIELD, None)) and not getattr(config, PORTABLE_FIELD, False)


@register_config_surgery(applies=_records_removal)
def apply_recorded_surgery(model):
    """Re-apply the attention removal recorded in ``model.config`` to a model freshly built from it.

    Meant for loading a saved model: build it from its config, call this, then
    ``load_state_dict(..., strict=True)``. It is registered with
    :func:`utils.models.register_config_surgery`, so :func:`utils.load_model` applies it to every
    model it loads from a folder. A portable record (zeroed ``o_proj``) needs nothing: the weights
    already carry it. Returns the model.
    """
    config = _text_config(model)
    recorded = sorted(getattr(config, CONFIG_FIELD, None) or [])
    if not recorded or getattr(config, PORTABLE_FIELD, False):
        return model
    missing = [i for i in recorded if not _is_removed(decoder_blocks(model)[i])]
    if missing:
        remove_attention(model, missing)
    return model


# --- the KV cache ---------------------------------------------------------------------------

def _cache_arg(model) -> str:
    """Name of the forward argument that carries the KV cache (``cache`` since transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fit_cache(model, cache):
    """Keep only the entries of ``cache`` that belong to attentions still in ``model`` (in place).

    transformers builds a cache from the config: one entry per block, typed by block (full or
    sliding window). After :func:`remove_attention` the attention with ``layer_idx`` ``j`` is the one
    of the ``j``-th block that still has attention, so entry ``j`` must be that block's entry. A cache
    that already has one entry per remaining attention is left alone. Returns ``cache``.
    """
    keep = _attention_blocks(model)
    layers = getattr(cache, "layers", None)
    if layers is not None and len(keep) < len(decoder_blocks(model)) == len(layers):
        cache.layers = [layers[i] for i in keep]
    return cache


def _fit_cache_hook(decoder, args, kwargs):
    """Forward pre-hook of the decoder (registered by :func:`remove_attention`)."""
    keep = [i for i, block in enumerate(decoder.layers) if not _is_removed(block)]
    if len(keep) == len(decoder.layers):
        return None
    name = "cache" if "cache" in kwargs else "past_key_values"
    cache = kwargs.get(name)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(decoder.config, "use_cache", False)
    if cache is None and use_cache and not (decoder.training and getattr(decoder, "gradient_checkpointing", False)):
        from transformers import DynamicCache

        kwargs[name] = cache = DynamicCache(config=decoder.config)
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) == len(decoder.layers):
        cache.layers = [layers[i] for i in keep]
    return args, kwargs


def make_cache(model, kind: str = "dynamic", *, max_cache_len: int | None = None, backend: str = "fp8",
               **quantization):
    """A fresh KV cache for ``model`` with one entry per attention that is left.

    Args:
        kind: ``"dynamic"`` (grows with the text), ``"static"`` (allocated up front for
            ``max_cache_len`` tokens; what ``torch.compile`` wants) or ``"quantized"`` (stored in
            ``backend``: ``"fp8"`` built into transformers; ``"hqq"`` or ``"quanto"`` with
            ``nbits=4`` or ``2`` when those packages are installed).
        quantization: passed to ``transformers.QuantizedCache`` (``nbits``, ``q_group_size``,
            ``residual_length``, ...).
    """
    from transformers import DynamicCache, QuantizedCache, StaticCache

    config = _text_config(model)
    if kind == "dynamic":
        cache = DynamicCache(config=config)
    elif kind == "static":
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError("A static cache needs max_cache_len (prompt + new tokens), e.g. max_cache_len=256.")
        cache = StaticCache(config=config, max_cache_len=max_cache_len)
    elif kind == "quantized":
        try:
            cache = QuantizedCache(backend=backend, config=config, **quantization)
        except ImportError as error:
            raise ImportError(f"The {backend!r} KV-cache backend is not installed ({error}). The 'fp8' backend needs "
                              "nothing extra; 'hqq' needs `pip install hqq`, 'quanto' `pip install optimum-quanto`.") \
                from error
    else:
        raise ValueError(f"kind={kind!r} is not a cache kind: use 'dynamic', 'static' or 'quantized'.")
    return fit_cache(model, cache)


def _tensor_storages(obj, found: dict[int, int], depth: int = 0) -> None:
    if depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) and flatten is not None:
            names, _ = flatten()
            for name in names:  # a quantised tensor subclass: count the tensors it is made of
                _tensor_storages(getattr(obj, name), found, depth + 1)
            return
        storage = obj.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensor_storages(item, found, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensor_storages(item, found, depth + 1)


def cache_bytes(cache) -> int:
    """Bytes of memory the KV cache holds, measured on its tensors (not computed from a formula).

    Works for every cache of transformers 5: dynamic and sliding-window layers, static layers
    (allocated up front), quantised layers (the packed values plus their scales and zero points,
    plus the full-precision residual window of the HQQ/quanto backends). Tensors that share memory
    are counted once; an entry that was never written holds nothing.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Expected a transformers Cache (with .layers), got {type(cache).__name__}.")
    found: dict[int, int] = {}
    for layer in layers:
        for value in vars(layer).values():
            _tensor_storages(value, found)
    found.pop(0, None)  # empty tensors have no storage
    return sum(found.values())


def kv_bytes_per_token(model, *, bytes_per_value: float | None = None) -> float:
    """KV-cache bytes one token costs in ``model`` by the formula
    ``2 (K and V) x attentions holding a cache x kv_heads x head_dim x bytes per value``.

    Counts only the attentions that are left after :func:`remove_attention`. ``bytes_per_value``
    defaults to the size of the model's dtype (4 for float32).
    """
    config = _text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if bytes_per_value is None:
        bytes_per_value = next(model.parameters()).element_size()
    return kv_bytes(len(_attention_blocks(model)), kv_heads, head_dim, bytes_per_value)


def _prompt_splits(dataloader: Iterable[dict], prefix_tokens: int | float, device) -> list[tuple[torch.Tensor, int]]:
    """Each text's real tokens and its prompt length: ``prefix_tokens`` tokens, or that fraction of
    the text when it is a float in (0, 1). Texts with nothing after the prompt are left out."""
    fraction = isinstance(prefix_tokens, float)
    if fraction and not 0 < prefix_tokens < 1:
        raise ValueError(f"A float prefix_tokens is a share of each text and must lie in (0, 1), got {prefix_tokens}.")
    if not fraction and (not isinstance(prefix_tokens, int) or isinstance(prefix_tokens, bool) or prefix_tokens < 1):
        raise ValueError(f"prefix_tokens must be a positive integer (the prompt length) or a share in (0, 1), "
                         f"got {prefix_tokens!r}.")
    splits = []
    for batch in dataloader:
        input_ids, mask = batch_tensors(batch, device)
        for ids, m in zip(input_ids, mask):
            seq = ids[m.bool()]
            n = max(1, round(prefix_tokens * seq.numel())) if fraction else prefix_tokens
            if seq.numel() > n:
                splits.append((seq, n))
    if not splits:
        raise ValueError(f"No text is longer than prefix_tokens={prefix_tokens}: lower prefix_tokens or raise "
                         "max_length of the dataloader.")
    return splits


@torch.no_grad()
def perplexity_through_cache(model, dataloader: Iterable[dict], *, prefix_tokens: int | float,
                             cache: str | Callable[[], object] = "dynamic", max_cache_len: int | None = None,
                             batch_size: int = 8, per_text: bool = False, progress: bool = True,
                             desc: str = "perplexity through the cache", **cache_kwargs):
    """Perplexity of every text's continuation, read token by token **through the KV cache**.

    For each text (padding dropped): one forward pass over its prompt — the first ``prefix_tokens``
    tokens, or that share of the text when ``prefix_tokens`` is a float in (0, 1) — fills a fresh
    cache (prefill); then each continuation token goes in alone, so its prediction of the next
    token attends to keys and values that were written to and read back from the cache — which is
    what a quantised cache changes. A single forward pass over the whole text would never read the
    cache. Texts with no token after the prompt are skipped.

    Consecutive texts with prompts of the same length are processed ``batch_size`` at a time, in
    input order (a prompt is all real tokens, so no padding enters the prefill; a text that has
    ended is fed filler tokens that are not scored). Use ``batch_size=1`` inside
    :func:`attention_bypass`, which decides once per forward pass. A quantised cache computes its
    scales over the batch it holds.

    Args:
        cache: a cache kind for :func:`make_cache` (``"dynamic"``, ``"static"``, ``"quantized"``),
            with ``cache_kwargs`` such as ``backend="fp8"``; or a function returning a new cache.
        max_cache_len: for ``cache="static"``; default: the longest text.
        per_text: also return each text's summed negative log-likelihood and token count, for
            paired comparisons between models.

    Returns:
        ``exp(total negative log-likelihood / continuation tokens)``; with ``per_text=True`` a dict
        with ``perplexity``, ``nll`` (one sum per text, in input order) and ``tokens``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not callable(cache) and cache not in ("dynamic", "static", "quantized"):
        raise ValueError(f"cache={cache!r}: use 'dynamic', 'static', 'quantized' or a function returning a cache.")
    device = _device_of(model)
    splits = _prompt_splits(dataloader, prefix_tokens, device)
    longest = max(seq.numel() for seq, _ in splits)
    groups: list[tuple[int, list[int]]] = []  # consecutive texts with prompts of the same length, in order
    for index, (_, n) in enumerate(splits):
        if groups and groups[-1][0] == n and len(groups[-1][1]) < batch_size:
            groups[-1][1].append(index)
        else:
            groups.append((n, [index]))
    arg = _cache_arg(model)
    nll = [0.0] * len(splits)
    counts = [0] * len(splits)
    was_training = model.training
    model.eval()
    try:
        for prompt, members in tqdm(groups, desc=desc, disable=not progress, leave=False):
            group = [splits[i][0] for i in members]
            lengths = torch.tensor([s.numel() for s in group], device=device)
            ids = torch.stack([F.pad(s, (0, int(lengths.max()) - s.numel()), value=int(s[-1])) for s in group])
            if callable(cache):
                kv = cache()
            elif cache == "static":
                kv = make_cache(model, cache, max_cache_len=max_cache_len or longest, **cache_kwargs)
            else:
                kv = make_cache(model, cache, **cache_kwargs)
            out = model(input_ids=ids[:, :prompt], use_cache=True, **{arg: kv})
            logits = [out.logits[:, -1]]  # the cache object is updated in place
            for t in range(prompt, ids.shape[1] - 1):
                out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{arg: kv})
                logits.append(out.logits[:, -1])
            logits = torch.stack(logits, dim=1).float()  # [batch, positions, vocab]
            targets = ids[:, prompt:].masked_fill(
                torch.arange(prompt, ids.shape[1], device=device)[None] >= lengths[:, None], -100)
            losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=-100, reduction="none").view(targets.shape)
            for row, index in enumerate(members):
                nll[index] = float(losses[row].sum())
                counts[index] = int((targets[row] != -100).sum())
    finally:
        model.train(was_training)
    value = math.exp(sum(nll) / sum(counts))
    return {"perplexity": value, "nll": nll, "tokens": counts} if per_text else value


# --- Adaptive Attention Bypass --------------------------------------------------------------

def default_protected(model) -> list[int]:
    """Blocks the bypass never skips: block 0 and the first block of each attention type.

    transformers reads the cache's length from entry 0 and each mask's size from the first cache
    entry of its type (full or sliding window). A skipped attention writes nothing during decode,
    so its entry stays at the prompt's length: those entries must keep growing.
    """
    config = _text_config(model)
    types_ = getattr(config, "layer_types", None) or []
    first = {types_.index(t) for t in set(types_)}
    return sorted({0} | first)


class AttentionBypass:
    """State of one :func:`attention_bypass` context: the scores and decisions of every prompt.

    Attributes:
        history: one dict per prefill: ``prompt_tokens``, ``scores`` (``1 - cos`` of each block's
            attention on this prompt, ``nan`` for removed ones) and ``skipped`` (blocks skipped while
            decoding it).
        protect: blocks never skipped.
    """

    def __init__(self, model, decide: Callable[[list[float], int], Iterable[int]], protect: Iterable[int]):
        self.model = model
        self.decide = decide
        self.protect = sorted(set(protect))
        self.history: list[dict] = []
        self.skip: set[int] = set()
        self.decoding = False
        self._sums: dict[int, float] = {}
        self._mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._tokens = 0

    @property
    def mean_skipped(self) -> float:
        """Mean number of attention sublayers skipped per prompt so far."""
        if not self.history:
            return 0.0
        return sum(len(h["skipped"]) for h in self.history) / len(self.history)

    def __repr__(self) -> str:
        return f"AttentionBypass(prompts={len(self.history)}, mean_skipped={self.mean_skipped:.2f})"


def _first_tensor(kwargs: dict, args: tuple, name: str, position: int):
    value = kwargs.get(name)
    if value is None and len(args) > position:
        value = args[position]
    return value


@contextlib.contextmanager
def attention_bypass(model, threshold: float | None = None, *,
                     rule: Callable[[list[float], int], Iterable[int]] | None = None,
                     protect: Iterable[int] | str = "auto") -> Iterator[AttentionBypass]:
    """Adaptive Attention Bypass: per prompt, skip the attention sublayers that barely matter to it.

    Inside the ``with`` block, every forward pass that starts a new KV cache (the prefill of a
    prompt) runs every sublayer, and hooks measure each attention's ``1 - cos(residual before,
    residual after)`` over the prompt's real tokens. Then the blocks chosen by the decision — score
    below ``threshold``, or whatever ``rule(scores, prompt_tokens)`` returns — are skipped in every
    later forward pass on that cache (the decode): their attention adds exactly zero to the residual
    stream and computes nothing. Their cache entries simply stop growing, which is consistent
    because they are not read again; ``protect`` (default: :func:`default_protected`) keeps the
    entries transformers reads lengths from.

    One decision per forward pass: with a batch of several prompts the scores are averaged over all
    their real tokens, so use batches of one prompt for per-prompt decisions.

    Yields:
        An :class:`AttentionBypass` whose ``history`` records every prompt's scores and skips.
    """
    if (threshold is None) == (rule is None):
        raise ValueError("Pass exactly one of threshold= (skip attentions scoring below it) or rule= "
                         "(a function (scores, prompt_tokens) -> blocks to skip).")
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number (scores lie in [0, 2]), got {threshold!r}.")
        rule = (lambda scores, n_tokens, t=float(threshold): [i for i, s in enumerate(scores) if s < t])
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        _check_block(block, index)
    protected = default_protected(model) if protect == "auto" else _block_list(protect, len(blocks), "protect holds")
    state = AttentionBypass(model, rule, protected)
    decoder = _decoder(model)
    removed = set(removed_attention(model))

    def start(module, args, kwargs):
        hidden = _first_tensor(kwargs, args, "input_ids", 0)
        if hidden is None:
            hidden = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        state.decoding = past > 0
        if not state.decoding:
            mask = kwargs.get("attention_mask")
            n = hidden.shape[1]
            state._mask = mask[:, -n:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            state._sums = {}
            state._tokens = int(state._mask.sum()) if state._mask is not None else hidden.shape[0] * n

    def finish(module, args, kwargs, output):
        if state.decoding:
            return
        scores = [state._sums.get(i, float("nan")) / max(state._tokens, 1) if i not in removed else float("nan")
                  for i in range(len(blocks))]
        scores = [1.0 - s if not math.isnan(s) else s for s in scores]
        candidates = [s if (i not in removed and i not in protected) else float("inf") for i, s in enumerate(scores)]
        chosen = sorted(set(int(i) for i in state.decide(candidates, state._tokens)) - set(protected) - removed)
        state.skip = set(chosen)
        state.history.append({"prompt_tokens": state._tokens, "scores": scores, "skipped": chosen})

    def block_in(index):
        def hook(module, args, kwargs):
            if not state.decoding:
                state._inputs[index] = _hidden_of(args, kwargs)
        return hook

    def mlp_in(index):
        def hook(module, args):
            if not state.decoding and index in state._inputs:
                cos = F.cosine_similarity(state._inputs.pop(index).float(), args[0].float(), dim=-1)
                state._sums[index] = float(cos[state._mask].sum() if state._mask is not None else cos.sum())
        return hook

    def gated(index, original):
        def forward(self, hidden_states, *args, **kwargs):
            if state.decoding and index in state.skip:
                return torch.zeros_like(hidden_states), None
            return original(hidden_states, *args, **kwargs)
        return forward

    handles = [decoder.register_forward_pre_hook(start, with_kwargs=True),
               decoder.register_forward_hook(finish, with_kwargs=True)]
    patched = []
    try:
        for i, block in enumerate(blocks):
            if i in removed:
                continue
            handles.append(block.register_forward_pre_hook(block_in(i), with_kwargs=True))
            handles.append(_mlp_input_norm(block).register_forward_pre_hook(mlp_in(i)))
            attention = block.self_attn
            patched.append((attention, vars(attention).get("forward")))
            attention.forward = types.MethodType(gated(i, attention.forward), attention)
        yield state
    finally:
        for handle in handles:
            handle.remove()
        for attention, previous in reversed(patched):
            if previous is None:
                del attention.forward  # back to the class's forward
            else:
                attention.forward = previous  # an enclosing bypass's
        state._inputs.clear()


@torch.no_grad()
def prompt_attention_scores(model, dataloader: Iterable[dict], *, prefix_tokens: int | float,
                            progress: bool = True) -> list[dict]:
    """Each prompt's attention scores as the bypass sees them during prefill (nothing is skipped).

    Prompts are cut as in :func:`perplexity_through_cache` (same ``prefix_tokens``, same texts, same
    order). Returns one dict per prompt: ``prompt_tokens`` and ``scores`` (``1 - cos`` of each
    block's attention, ``nan`` for removed ones).
    """
    arg = _cache_arg(model)
    splits = _prompt_splits(dataloader, prefix_tokens, _device_of(model))
    with attention_bypass(model, rule=lambda scores, n: [], protect=()) as probe:
        for seq, n in tqdm(splits, desc="prompt scores", disable=not progress, leave=False):
            model(input_ids=seq[None, :n], use_cache=True, **{arg: make_cache(model)})
    return [{"prompt_tokens": h["prompt_tokens"], "scores": h["scores"]} for h in probe.history]


def calibrate_threshold(scores: Sequence[Sequence[float]], mean_skipped: float, *,
                        protect: Iterable[int]) -> float:
    """The bypass threshold that skips ``mean_skipped`` attention sublayers per prompt on average.

    ``scores`` holds one list per prompt (or the dicts of :func:`prompt_attention_scores`). Pooling the scores of
    all prompts (protected blocks and removed attentions left out), the threshold is placed halfway
    between the ``m``-th and the ``m+1``-th smallest, with ``m = round(mean_skipped x prompts)``: a
    rule "skip if score < threshold" then skips exactly ``m`` sublayers over these prompts. Pass
    the bypass's ``protect`` (e.g. :func:`default_protected`).
    """
    protect = set(protect)
    scores = [row["scores"] if isinstance(row, dict) else row for row in scores]
    if not scores:
        raise ValueError("scores is empty: pass one list of attention scores per calibration prompt.")
    pooled = sorted(s for row in scores for i, s in enumerate(row) if i not in protect and not math.isnan(s))
    per_prompt = len(pooled) / len(scores)
    if not isinstance(mean_skipped, (int, float)) or not 0 <= mean_skipped <= per_prompt:
        raise ValueError(f"mean_skipped must lie between 0 and {per_prompt:g} (the attention sublayers that may be "
                         f"skipped per prompt), got {mean_skipped!r}.")
    m = round(mean_skipped * len(scores))
    if m == 0:
        return pooled[0] - 1.0
    if m >= len(pooled):
        return pooled[-1] + 1.0
    return (pooled[m - 1] + pooled[m]) / 2


# --- decode speed ---------------------------------------------------------------------------

def decode_flops_per_token(model, context: int | float) -> float:
    """FLOPs to produce one token by decoding, with ``context`` tokens already in the KV cache.

    ``2 x`` every matmul weight (:func:`utils.evaluation.matmul_parameters`, the LM head included) plus
    attention's context-length term: each attention that still runs multiplies the new query with
    ``context`` keys and its weights with ``context`` values, ``4 x context x heads x head_dim`` FLOPs
    (a sliding-window layer sees at most its window). A removed attention costs neither; a *portable*
    removal (zeroed ``o_proj``) still computes everything and is counted in full.
    """
    from .evaluation import matmul_parameters

    if not isinstance(context, (int, float)) or context < 0:
        raise ValueError(f"context must be a number of tokens >= 0, got {context!r}.")
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    attention = 0.0
    for i in _attention_blocks(model):
        sliding = layer_types is not None and i < len(layer_types) and "sliding" in str(layer_types[i])
        seen = min(context, window) if sliding and window else context
        attention += 4.0 * seen * heads * head_dim
    return 2.0 * matmul_parameters(model) + attention


def ideal_decode_speedup(base, pruned, context: int | float) -> float:
    """``decode_flops_per_token(base, context) / decode_flops_per_token(pruned, context)``: the decode
    speed-up a compute-bound step could reach. Larger than the matmul-only ratio when attentions were
    removed, as their context term goes too."""
    return decode_flops_per_token(base, context) / decode_flops_per_token(pruned, context)


def realised_share(measured: float, ideal: float) -> float:
    """Share of the ideal gain that a measured speed-up realises: ``(measured - 1) / (ideal - 1)``.

    1.0: all of it; 0.0: none (x1.00); negative: slower than the base. Undefined for an ideal of x1.00.
    """
    if abs(ideal - 1.0) < 1e-12:
        raise ValueError("The ideal speed-up is x1.00 (nothing was removed): there is no gain to realise.")
    return (measured - 1.0) / (ideal - 1.0)


def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, mode="default" if not torch.cuda.is_available() else "reduce-overhead")
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    return config


def measure_decode(models: dict, tokenizer, prompts: str | Sequence[str], *, new_tokens: int = 32,
                   cache: str = "dynamic", compile: bool = False, runs: int = 5, warmup: int = 1,
                   base: str | None = None, tolerance: float = 0.05) -> dict:
    """Token-by-token decoding speed of several models against ``base``, and the share of the ideal realised.

    The models are timed alternately by :func:`utils.compare_speed` (the course's one timing loop):
    per round, ``generate`` of one token and of ``new_tokens`` tokens for each model; their difference is
    the decode alone, without the prefill. Wall-clock and process CPU time are both reported.

    Args:
        models: ``{"base": base_model, "cut": cut_model, ...}``; the first is the base unless ``base`` says.
        tokenizer: turns ``prompts`` into one left-padded batch (one prompt: batch size 1).
        new_tokens: tokens generated per prompt (>= 2).
        cache: ``"dynamic"`` (grows token by token) or ``"static"`` (allocated once at full length).
        compile: ``torch.compile`` the forward pass inside ``generate`` (needs ``cache="static"``; the first,
            untimed warm-up round pays the compilation, so keep ``warmup >= 1``).

    Returns a JSON-friendly dict: ``context`` (mean tokens in the cache during decoding), ``cache``,
    ``compile``, ``batch_size``, ``compare`` (the full :func:`utils.compare_speed` result) and
    ``models[name]`` with ``decode_step_s`` / ``decode_step_cpu_s`` (median seconds per step of the
    batch), ``tokens_per_s``, ``ideal`` (:func:`ideal_decode_speedup` at ``context``) and, for every model
    but the base, ``speedup`` / ``speedup_min`` / ``speedup_max`` (wall clock, paired per round),
    ``cpu_speedup``, ``realised_share`` and ``cpu_realised_share`` (:func:`realised_share`) and the
    ``verdict`` of :func:`utils.compare_speed`.
    """
    from .evaluation import _as_prompt_list, _check_models, _generation_inputs, compare_speed

    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}.")
    if compile and cache != "static":
        raise ValueError("compile=True needs cache='static': a growing cache changes shapes at every step, "
                         "so the compiled graph would be rebuilt again and again.")
    if compile and warmup < 1:
        raise ValueError("compile=True needs warmup >= 1: the first call compiles and must not be timed.")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2 (one first token, then decoding), got {new_tokens!r}.")
    prompt_list = _as_prompt_list(prompts)
    names, base = _check_models(models, base)
    prompt_tokens = _generation_inputs(tokenizer, prompt_list)["input_ids"].shape[1]  # the batch generate will see
    context = prompt_tokens + new_tokens / 2
    ideals = {name: ideal_decode_speedup(models[base], m, context) for name, m in models.items()}
    generate_kwargs: dict = {}
    if cache == "static":
        generate_kwargs["cache_implementation"] = "static"
    if compile:
        generate_kwargs["compile_config"] = _compile_config()
    else:
        generate_kwargs["disable_compile"] = True
    result = compare_speed(models, tokenizer=tokenizer, prompts=prompt_list, max_new_tokens=new_tokens, base=base,
                           runs=runs, warmup=warmup, tolerance=tolerance, generate_kwargs=generate_kwargs,
                           decode_ideal={n: v for n, v in ideals.items() if n != base})
    out = {"context": context, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "cache": cache,
           "compile": bool(compile), "batch_size": len(prompt_list), "runs": runs, "base": base,
           "compare": result, "models": {}}
    for name in names:
        gen = result["models"][name]["generation"]
        step = statistics.median(gen["decode_step_runs_s"])
        entry = {"decode_step_s": step, "decode_step_cpu_s": gen["decode_step_cpu_s"],
                 "tokens_per_s": len(prompt_list) / step if step > 0 else float("inf"), "ideal": ideals[name]}
        if name != base:
            wall, cpu = result["models"][name]["speedup"]["decode"], result["models"][name]["speedup"]["decode_cpu"]
            entry.update({"speedup": wall["ratio"], "speedup_min": wall["min"], "speedup_max": wall["max"],
                          "cpu_speedup": cpu["ratio"], "verdict": wall["verdict"],
                          "realised_share": realised_share(wall["ratio"], ideals[name]),
                          "cpu_realised_share": realised_share(cpu["ratio"], ideals[name])})
        out["models"][name] = entry
    return out
