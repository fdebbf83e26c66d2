"""The KV cache: build one that fits the model, measure what it holds, read text back through it (CH08).

* :func:`make_cache` -- a fresh dynamic, static or quantised cache with one entry per attention that is left;
  :func:`fit_cache` fits a cache transformers built from the config (one entry per block) to a model whose
  attention was removed in some blocks, and :func:`install_cache_fitting` makes the model's decoder do so in
  every forward pass.
* :func:`cache_bytes` -- the bytes a cache holds, measured on its tensors; :func:`kv_bytes_per_token` -- the
  same by the formula, per token.
* :func:`perplexity_through_cache` -- the perplexity of each text's continuation read token by token through
  the cache, which is what a lossy (quantised) cache changes; :func:`prompt_splits` cuts the texts into
  prompt and continuation.

A block holds no cache entry when its attention module says ``holds_no_cache = True``
(:class:`utils.attention.RemovedAttention` does): :func:`holds_cache` and :func:`cached_blocks` read that mark.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .anatomy import kv_bytes
from .data import batch_tensors
from .precision import device_of
from .structure import decoder, decoder_blocks, text_config

#: The cache kinds :func:`make_cache` builds by name.
CACHE_KINDS = ("dynamic", "static", "quantized")


# --- which blocks hold an entry ---------------------------------------------------------------

def holds_cache(block: torch.nn.Module) -> bool:
    """Whether the block's attention computes keys and values, i.e. has an entry in the KV cache: False only
    when its ``self_attn`` is marked ``holds_no_cache`` (a removed attention)."""
    return not getattr(getattr(block, "self_attn", None), "holds_no_cache", False)


def cached_blocks(model: torch.nn.Module) -> list[int]:
    """Indices of the blocks whose attention still computes keys and values (one cache entry each)."""
    return [i for i, block in enumerate(decoder_blocks(model)) if holds_cache(block)]


def cache_arg(model: torch.nn.Module) -> str:
    """Name of the forward argument that carries the KV cache (``cache`` since transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --- building a cache that fits ---------------------------------------------------------------

def fit_cache(model: torch.nn.Module, cache):
    """Keep only the entries of ``cache`` that belong to attentions still in ``model`` (in place).

    transformers builds a cache from the config: one entry per block, typed by block (full or
    sliding window). After :func:`utils.attention.remove_attention` the attention with ``layer_idx`` ``j`` is
    the one of the ``j``-th block that still has attention, so entry ``j`` must be that block's entry. A cache
    that already has one entry per remaining attention is left alone. Returns ``cache``.
    """
    keep = cached_blocks(model)
    layers = getattr(cache, "layers", None)
    if layers is not None and len(keep) < len(decoder_blocks(model)) == len(layers):
        cache.layers = [layers[i] for i in keep]
    return cache


def _fit_cache_hook(owner, args, kwargs):
    """Forward pre-hook of the decoder (registered by :func:`install_cache_fitting`)."""
    keep = [i for i, block in enumerate(owner.layers) if holds_cache(block)]
    if len(keep) == len(owner.layers):
        return None
    name = "cache" if "cache" in kwargs else "past_key_values"
    cache = kwargs.get(name)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(owner.config, "use_cache", False)
    if cache is None and use_cache and not (owner.training and getattr(owner, "gradient_checkpointing", False)):
        from transformers import DynamicCache

        kwargs[name] = cache = DynamicCache(config=owner.config)
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) == len(owner.layers):
        cache.layers = [layers[i] for i in keep]
    return args, kwargs


def install_cache_fitting(model: torch.nn.Module) -> None:
    """Make the model's decoder fit every cache it is given or builds from the config (one entry per block)
    to the blocks that still hold an entry, before each forward pass (a forward pre-hook, installed once)."""
    owner = decoder(model)
    if not getattr(owner, "_fits_cache_to_attention", False):
        owner.register_forward_pre_hook(_fit_cache_hook, with_kwargs=True)
        owner._fits_cache_to_attention = True


def make_cache(model: torch.nn.Module, kind: str = "dynamic", *, max_cache_len: int | None = None,
               backend: str = "fp8", **quantization):
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

    config = text_config(model)
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


# --- what it holds ----------------------------------------------------------------------------

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


def kv_bytes_per_token(model: torch.nn.Module, *, bytes_per_value: float | None = None) -> float:
    """KV-cache bytes one token costs in ``model`` by the formula
    ``2 (K and V) x attentions holding a cache x kv_heads x head_dim x bytes per value``.

    Counts only the attentions that are left after :func:`utils.attention.remove_attention`.
    ``bytes_per_value`` defaults to the size of the model's dtype (4 for float32).
    """
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if bytes_per_value is None:
        bytes_per_value = next(model.parameters()).element_size()
    return kv_bytes(len(cached_blocks(model)), kv_heads, head_dim, bytes_per_value)


# --- reading text back through the cache ------------------------------------------------------

def prompt_splits(dataloader: Iterable[dict], prefix_tokens: int | float,
                  device: torch.device | str) -> list[tuple[torch.Tensor, int]]:
    """Each text's real tokens (on ``device``) and its prompt length: ``prefix_tokens`` tokens, or that
    fraction of the text when it is a float in (0, 1). Texts with nothing after the prompt are left out.

    Raises:
        ValueError: for a ``prefix_tokens`` that is neither a positive integer nor a share in (0, 1), or when no
        text is longer than its prompt.
    """
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


def _same_prompt_groups(splits: list[tuple[torch.Tensor, int]], batch_size: int) -> list[tuple[int, list[int]]]:
    """Consecutive texts with prompts of the same length, at most ``batch_size`` per group, in input order:
    ``(prompt length, indices into splits)``."""
    groups: list[tuple[int, list[int]]] = []
    for index, (_, n) in enumerate(splits):
        if groups and groups[-1][0] == n and len(groups[-1][1]) < batch_size:
            groups[-1][1].append(index)
        else:
            groups.append((n, [index]))
    return groups


def _group_nll(model: torch.nn.Module, group: list[torch.Tensor], prompt: int, kv, arg: str,
               device, decode_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``kv`` with the group's prompts (all but their last token with ``decode_first``), then feed the
    rest one token at a time through it.

    Returns each position's negative log-likelihood ``[texts, positions]`` and the targets (``-100`` past
    the end of a shorter text, which is fed filler tokens that are not scored)."""
    lengths = torch.tensor([s.numel() for s in group], device=device)
    ids = torch.stack([F.pad(s, (0, int(lengths.max()) - s.numel()), value=int(s[-1])) for s in group])
    prefill = prompt - 1 if decode_first else prompt
    out = model(input_ids=ids[:, :prefill], use_cache=True, **{arg: kv})
    logits = [] if decode_first else [out.logits[:, -1]]  # the cache object is updated in place
    for t in range(prefill, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{arg: kv})
        logits.append(out.logits[:, -1])
    logits = torch.stack(logits, dim=1).float()  # [batch, positions, vocab]
    targets = ids[:, prompt:].masked_fill(
        torch.arange(prompt, ids.shape[1], device=device)[None] >= lengths[:, None], -100)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=-100, reduction="none").view(targets.shape)
    return losses, targets


@torch.no_grad()
def perplexity_through_cache(model: torch.nn.Module, dataloader: Iterable[dict], *, prefix_tokens: int | float,
                             cache: str | Callable[[], object] = "dynamic", max_cache_len: int | None = None,
                             batch_size: int = 8, per_text: bool = False, decode_first: bool = False,
                             progress: bool = True, desc: str = "perplexity through the cache", **cache_kwargs):
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
    :func:`utils.attention.attention_bypass`, which decides once per forward pass. A quantised cache computes
    its scales over the batch it holds.

    Args:
        cache: a cache kind for :func:`make_cache` (``"dynamic"``, ``"static"``, ``"quantized"``),
            with ``cache_kwargs`` such as ``backend="fp8"``; or a function returning a new cache.
        max_cache_len: for ``cache="static"``; default: the longest text.
        per_text: also return each text's summed negative log-likelihood and token count, for
            paired comparisons between models, and the bytes its cache held at the end (:func:`cache_bytes`).
        decode_first: prefill all but the prompt's last token and feed that token as the first decoding step,
            so that every scored prediction comes from a decoding step. Methods that change the model
            between prefill and decode (:func:`utils.bypass.attention_bypass`) are then scored the same way
            as a model changed everywhere.

    Returns:
        ``exp(total negative log-likelihood / continuation tokens)``; with ``per_text=True`` a dict
        with ``perplexity``, ``nll`` (one sum per text, in input order), ``tokens`` and ``cache_bytes``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not callable(cache) and cache not in CACHE_KINDS:
        raise ValueError(f"cache={cache!r}: use 'dynamic', 'static', 'quantized' or a function returning a cache.")
    device = device_of(model)
    splits = prompt_splits(dataloader, prefix_tokens, device)
    if decode_first and min(n for _, n in splits) < 2:
        raise ValueError("decode_first needs prompts of at least 2 tokens: raise prefix_tokens.")
    longest = max(seq.numel() for seq, _ in splits)
    arg = cache_arg(model)
    nll = [0.0] * len(splits)
    counts = [0] * len(splits)
    held = [0] * len(splits)
    was_training = model.training
    model.eval()
    try:
        for prompt, members in tqdm(_same_prompt_groups(splits, batch_size), desc=desc, disable=not progress,
                                    leave=False):
            if callable(cache):
                kv = cache()
            elif cache == "static":
                kv = make_cache(model, cache, max_cache_len=max_cache_len or longest, **cache_kwargs)
            else:
                kv = make_cache(model, cache, **cache_kwargs)
            losses, targets = _group_nll(model, [splits[i][0] for i in members], prompt, kv, arg, device,
                                         decode_first)
            for row, index in enumerate(members):
                nll[index] = float(losses[row].sum())
                counts[index] = int((targets[row] != -100).sum())
                held[index] = cache_bytes(kv) if hasattr(kv, "layers") else 0
    finally:
        model.train(was_training)
    value = math.exp(sum(nll) / sum(counts))
    return {"perplexity": value, "nll": nll, "tokens": counts, "cache_bytes": held} if per_text else value


@torch.no_grad()
def prompt_cache_bytes(model: torch.nn.Module, dataloader: Iterable[dict], *, prefix_tokens: int | float,
                       decode_steps: int = 2, decode_first: bool = False, progress: bool = True) -> list[int]:
    """Bytes of KV cache each text's prompt leaves behind: a fresh dynamic cache per text, filled by a
    prefill of its prompt (cut as in :func:`perplexity_through_cache`) and ``decode_steps`` decoding steps
    of its continuation, then measured with :func:`cache_bytes`.

    Run it inside :func:`utils.bypass.attention_bypass` to measure what the bypass keeps (entries it frees or
    never writes hold nothing). One text at a time, so every prompt gets its own decision. ``decode_first``:
    the prefill stops before the prompt's last token, which is the first decoding step (as in
    :func:`perplexity_through_cache`).
    """
    if not isinstance(decode_steps, int) or decode_steps < 0:
        raise ValueError(f"decode_steps must be an integer >= 0, got {decode_steps!r}.")
    arg = cache_arg(model)
    held = []
    for seq, n in tqdm(prompt_splits(dataloader, prefix_tokens, device_of(model)), desc="cache bytes",
                       disable=not progress, leave=False):
        kv = make_cache(model)
        start = n - 1 if decode_first and n > 1 else n
        model(input_ids=seq[None, :start], use_cache=True, **{arg: kv})
        for t in range(start, min(start + decode_steps, seq.numel())):
            model(input_ids=seq[None, t:t + 1], use_cache=True, **{arg: kv})
        held.append(cache_bytes(kv))
    return held
