"""The attention half of a decoder block: score it, remove it, bypass it, and time the decode (CH08).

* :func:`sublayer_importance` (and :func:`attention_importance`, :func:`mlp_importance`) —
  ``1 - cos`` between the residual stream before and after each attention and each MLP sublayer,
  averaged over real tokens (He et al. 2024, *What Matters in Transformers? Not All Attention Is
  Needed*). One forward pass per batch, hooks only, through the same loop as
  :func:`utils.block_importance`.
* :func:`choose_attention_to_remove`, :func:`remove_attention`, :func:`removed_attention` — the
  surgery. A removed attention adds exactly zero to the residual stream and holds no KV cache: the
  remaining attentions are renumbered so the cache has one entry per attention that is left.
  :func:`apply_recorded_surgery` re-applies a removal recorded in a saved config.
* The KV cache (:func:`~utils.kv_cache.make_cache`, :func:`~utils.kv_cache.cache_bytes`,
  :func:`~utils.kv_cache.kv_bytes_per_token`, :func:`~utils.kv_cache.perplexity_through_cache`) lives in
  :mod:`utils.kv_cache`; those names can still be imported from here.
* Adaptive Attention Bypass (skip attentions per prompt) lives in :mod:`utils.bypass`.
* :func:`measure_decode`, :func:`decode_flops_per_token`, :func:`ideal_decode_speedup`,
  :func:`realised_share` — token-by-token decoding speed, timed alternately by
  :func:`utils.compare_speed`, against the FLOPs ideal of a decoding step (matmul weights plus
  attention's context-length term).

Works on Llama-style blocks (Llama, SmolLM2, Qwen 3: ``input_layernorm -> self_attn -> +``) and on
Gemma 3 blocks (which also normalise the attention output with ``post_attention_layernorm``).
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from .depth import mean_cosines, renumber_layer_idx
from .kv_cache import (  # cache_bytes, fit_cache, kv_bytes_per_token: their old utils.attention paths still work
    cache_arg,
    cache_bytes,  # noqa: F401
    cached_blocks,
    fit_cache,  # noqa: F401
    holds_cache,
    install_cache_fitting,
    kv_bytes_per_token,  # noqa: F401
    make_cache,
    perplexity_through_cache,  # noqa: F401
    )
from .models import register_config_surgery
from .precision import device_of, to_device
from .speed import (
    as_prompt_list,
    check_models,
    compare_speed,
    generation_inputs,
    matmul_parameters,
    speedup,
    time_alternately,
)
from .structure import decoder_blocks, hidden_of, mlp_input_norm, output_of, text_config

#: The name transformers' ``per_layer_config`` uses for an attention sublayer in a ``skip`` list.
SKIP_NAME = "attention"
#: Config field listing the blocks whose attention was removed (indices of the saved model's blocks).
CONFIG_FIELD = "removed_attention"
#: Config field set to True when the removal was saved as zeroed ``o_proj`` weights (``portable=True``).
PORTABLE_FIELD = "removed_attention_portable"
#: A bypass decision: ``(scores of one prompt, its real tokens) -> indices of the blocks whose attention to skip``.
Decision = Callable[[list[float], int], Iterable[int]]


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


def check_block(block, index: int) -> None:
    """Raise ``ValueError`` unless block ``index`` is a Llama/Qwen 3/Gemma 3 style block (self_attn, norm, mlp)."""
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
        check_block(block, index)

    def register(store: dict) -> list:
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: store.__setitem__(("in", i), hidden_of(args, kwargs)),
                with_kwargs=True))
            handles.append(mlp_input_norm(block).register_forward_pre_hook(
                lambda mod, args, i=i: store.__setitem__(("mid", i), args[0])))
            handles.append(block.register_forward_hook(
                lambda mod, args, output, i=i: store.__setitem__(("out", i), output_of(output))))
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
    available = [i for i in cached_blocks(model) if i not in set(_block_list(protect, total, "protect holds"))]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < len(cached_blocks(model)):
        raise ValueError(f"n must be an integer between 1 and {len(cached_blocks(model)) - 1} (the model has "
                         f"{len(cached_blocks(model))} attention sublayers and at least one must stay), got {n!r}.")
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
    config = text_config(model)
    if getattr(config, PORTABLE_FIELD, False):
        return sorted(getattr(config, CONFIG_FIELD, None) or [])
    return [i for i, block in enumerate(decoder_blocks(model)) if not holds_cache(block)]


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
        check_block(blocks[index], index)
    config = text_config(model)
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
    install_cache_fitting(model)
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
    config = text_config(model)
    recorded = sorted(getattr(config, CONFIG_FIELD, None) or [])
    if not recorded or getattr(config, PORTABLE_FIELD, False):
        return model
    missing = [i for i in recorded if holds_cache(decoder_blocks(model)[i])]
    if missing:
        remove_attention(model, missing)
    return model


# --- decode speed ---------------------------------------------------------------------------

def decode_flops_per_token(model, context: int | float, *, skip: Iterable[int] = ()) -> float:
    """FLOPs to produce one token by decoding, with ``context`` tokens already in the KV cache.

    ``2 x`` every matmul weight (:func:`utils.speed.matmul_parameters`, the LM head included) plus
    attention's context-length term: each attention that still runs multiplies the new query with
    ``context`` keys and its weights with ``context`` values, ``4 x context x heads x head_dim`` FLOPs
    (a sliding-window layer sees at most its window). A removed attention costs neither; a *portable*
    removal (zeroed ``o_proj``) still computes everything and is counted in full. ``skip``: blocks whose
    attention does not run for this token (a bypass), counted like removed ones.
    """
    if not isinstance(context, (int, float)) or context < 0:
        raise ValueError(f"context must be a number of tokens >= 0, got {context!r}.")
    config = text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    skip = {int(i) for i in skip}
    attention, skipped_weights = 0.0, 0
    blocks = decoder_blocks(model)
    for i in cached_blocks(model):
        if i in skip:
            skipped_weights += matmul_parameters(blocks[i].self_attn)
            continue
        sliding = layer_types is not None and i < len(layer_types) and "sliding" in str(layer_types[i])
        seen = min(context, window) if sliding and window else context
        attention += 4.0 * seen * heads * head_dim
    return 2.0 * (matmul_parameters(model) - skipped_weights) + attention


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


def _crop(cache, length: int) -> None:
    """Cut every entry of a dynamic cache back to ``length`` tokens (entries that hold nothing stay empty)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


@torch.no_grad()
def _step_jobs(models: Mapping, tokenizer, prompts: list[str], new_tokens: int) -> tuple[dict, int]:
    """One job per model: ``new_tokens`` greedy decoding steps from a cache its prompts prefilled once (untimed,
    inside whatever bypass is active on the model); each job crops the cache back afterwards."""
    inputs = generation_inputs(tokenizer, prompts)
    length = inputs["input_ids"].shape[1]
    jobs = {}
    for name, model in models.items():
        model.eval()
        on_model = to_device(inputs, device_of(model))
        kv = make_cache(model)
        arg = cache_arg(model)
        # only the last position's logits: over a large vocabulary, all of them can outweigh the cache
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        first = model(**on_model, use_cache=True, **{arg: kv}, **keep).logits[:, -1:].argmax(-1)
        mask = on_model["attention_mask"]

        @torch.no_grad()
        def decode(model=model, kv=kv, first=first, mask=mask, arg=arg):
            token, m = first, mask
            for _ in range(new_tokens):
                m = torch.cat([m, m.new_ones(m.shape[0], 1)], dim=1)
                token = model(input_ids=token, attention_mask=m, use_cache=True, **{arg: kv}).logits.argmax(-1)
            _crop(kv, length)
        jobs[name] = decode
    return jobs, length


def _measure_steps(models: Mapping, tokenizer, prompts: list[str], new_tokens: int, runs: int, warmup: int,
                   base: str, tolerance: float, ideals: Mapping[str, float]) -> dict:
    """:func:`measure_decode` with ``prefill="once"``: every model's decoding steps timed alternately by
    :func:`utils.speed.time_alternately` (the course's one timing loop), the prefill left out entirely."""
    jobs, length = _step_jobs(models, tokenizer, prompts, new_tokens)
    times = time_alternately(jobs, runs=runs, warmup=warmup)
    out = {"context": length + new_tokens / 2, "prompt_tokens": length, "new_tokens": new_tokens, "cache": "dynamic",
           "compile": False, "batch_size": len(prompts), "runs": runs, "base": base, "prefill": "once", "models": {}}
    for name in models:
        step = times[name]["median_s"] / new_tokens
        entry = {"decode_step_s": step, "tokens_per_s": len(prompts) / step, "ideal": ideals[name]}
        if name != base:
            wall = speedup(times[base]["runs_s"], times[name]["runs_s"], ideals[name], tolerance)
            entry.update({"speedup": wall["ratio"], "speedup_min": wall["min"], "speedup_max": wall["max"],
                          "verdict": wall["verdict"], "realised_share": wall["share_of_ideal_gain"]})
        out["models"][name] = entry
    return out


def measure_decode(models: dict, tokenizer, prompts: str | Sequence[str], *, new_tokens: int = 32,
                   cache: str = "dynamic", compile: bool = False, runs: int = 5, warmup: int = 1,
                   base: str | None = None, tolerance: float = 0.05, prefill: str = "each",
                   ideals: Mapping[str, float] | None = None) -> dict:
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

        prefill: ``"each"`` (default): time ``generate``, as above; ``"once"``: prefill every model once, untimed,
            then time ``new_tokens`` decoding steps per round (greedy, dynamic cache cut back after each
            round). Use it for long contexts, where repeating the prefill would cost more than the decode, and
            for an :func:`utils.bypass.attention_bypass` active on a model (its hooks are timed with it).
        ideals: the FLOPs ideal of some models, e.g. of a bypass that the structure does not show
            (``ideal_decode_speedup`` with ``decode_flops_per_token(..., skip=...)``); default: from the structure.

    Returns a JSON-friendly dict: ``context`` (mean tokens in the cache during decoding), ``cache``,
    ``compile``, ``batch_size``, ``compare`` (the full :func:`utils.compare_speed` result) and
    ``models[name]`` with ``decode_step_s`` / ``decode_step_cpu_s`` (median seconds per step of the
    batch), ``tokens_per_s``, ``ideal`` (:func:`ideal_decode_speedup` at ``context``) and, for every model
    but the base, ``speedup`` / ``speedup_min`` / ``speedup_max`` (wall clock, paired per round),
    ``cpu_speedup``, ``realised_share`` and ``cpu_realised_share`` (:func:`realised_share`) and the
    ``verdict`` of :func:`utils.compare_speed`.
    """
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}.")
    if compile and cache != "static":
        raise ValueError("compile=True needs cache='static': a growing cache changes shapes at every step, "
                         "so the compiled graph would be rebuilt again and again.")
    if compile and warmup < 1:
        raise ValueError("compile=True needs warmup >= 1: the first call compiles and must not be timed.")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2 (one first token, then decoding), got {new_tokens!r}.")
    if prefill not in ("each", "once"):
        raise ValueError(f"prefill must be 'each' (time generate) or 'once' (time decoding steps), got {prefill!r}.")
    if prefill == "once" and (cache != "dynamic" or compile):
        raise ValueError("prefill='once' times eager steps on a dynamic cache: leave cache='dynamic', compile=False.")
    prompt_list = as_prompt_list(prompts)
    names, base = check_models(models, base)
    prompt_tokens = generation_inputs(tokenizer, prompt_list)["input_ids"].shape[1]  # the batch generate will see
    context = prompt_tokens + new_tokens / 2
    given = dict(ideals or {})
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"ideals names models that are not in models: {sorted(unknown)}.")
    ideals = {name: given.get(name, ideal_decode_speedup(models[base], m, context)) for name, m in models.items()}
    if prefill == "once":
        if not isinstance(runs, int) or not isinstance(warmup, int) or runs < 1 or warmup < 0:
            raise ValueError(f"Use runs >= 1 and warmup >= 0 (whole numbers); got runs={runs!r}, warmup={warmup!r}.")
        return _measure_steps(models, tokenizer, prompt_list, new_tokens, runs, warmup, base, tolerance, ideals)
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
