"""Looking inside a model before cutting it: activations, the residual stream, the logit lens (CH10).

Why this name: the module is about what a model *computes* — its activations. ``utils.inspect`` would
work as a package-relative module, but it reads like the standard library's :mod:`inspect` (which
``utils.kv_cache`` itself imports), and ``probes`` usually means trained linear classifiers, another
technique. ``utils.activations`` says what is inside.

* :func:`capture_activations` — every point of a decoder block that a forward hook can read
  (:data:`CAPTURE_POINTS`: the residual stream in and out, the norms, the attention's output, each
  projection of the GLU MLP, what ``down_proj`` sees and emits), per token, for any layers, with
  right-padded batches. :func:`optipfair_captures` returns optipfair's captures in the same shape, so
  the two can be compared (``utils.bias.mlp_activations`` is the pooled special case at
  ``down_proj_input``).
* :func:`glu_statistics` — how often the gate's pre-activation is negative and how often the gated
  output is near zero: SiLU / GELU MLPs are dense, not sparse like ReLU ones.
  :func:`bin_neurons` — shrink thousands of neurons to a heatmap's columns (mean or max-abs per bin).
* :func:`residual_stream` — the stream entering each block plus the last block's output (before the
  final norm). :func:`find_massive` — its largest values relative to the median (Sun et al., 2024,
  *Massive Activations in Large Language Models*); :func:`trace_writers` — which attention / MLP
  sublayers and which MLP neurons write one dimension of the stream, and which erase it;
  :func:`patch_residual` — a context manager that overwrites stream entries (ablations).
* :func:`logit_lens` — each layer's residual stream read by the final norm and the LM head
  (nostalgebraist, 2020, *interpreting GPT: the logit lens*). The final norm is applied exactly once,
  so the last row equals the model's own logits (``output_hidden_states[-1]`` is already normalised in
  transformers; normalising it again is a common mistake). :func:`lens_top_tokens` decodes it.
* :func:`attention_to_first_token` — the share of attention every layer puts on the first token
  (attention sinks, Xiao et al., 2023, *Efficient Streaming Language Models with Attention Sinks*);
  it switches the model to eager attention (the only kind that returns weights) and restores it.

Works on Llama, SmolLM2, Qwen 3 and Gemma 3 blocks (Gemma 3 normalises each sublayer's output
before adding it to the stream; the sublayer contributions of :func:`trace_writers` are exact
differences of the stream either way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import batch_tensors, make_dataloader
from .precision import device_of
from .structure import decoder, decoder_blocks, hidden_of, mlp_input_norm, output_of, text_config

#: Capture points of a decoder block, with what each one holds (``[tokens, width]`` per prompt and layer).
CAPTURE_POINTS: dict[str, str] = {
    "block_input": "the residual stream entering the block",
    "input_norm": "output of the norm in front of the attention",
    "attention": "output of the attention sublayer (after o_proj), before it joins the stream",
    "residual_mid": "the residual stream between the attention and the MLP",
    "mlp_input": "input of the MLP (the normalised stream after the attention)",
    "gate_proj": "output of gate_proj: the gate's pre-activations, one per neuron",
    "up_proj": "output of up_proj, one per neuron",
    "gate_act": "act(gate_proj(x)): the activation function's output, one per neuron",
    "down_proj_input": "what down_proj sees: act(gate) * up, one value per neuron",
    "down_proj": "what down_proj emits (hidden size)",
    "mlp_output": "output of the MLP",
    "block_output": "the residual stream leaving the block",
}
#: Our capture points that optipfair 0.4.2 also captures: ``point -> (its target_layers name, its key prefix)``.
OPTIPFAIR_POINTS: dict[str, tuple[str, str]] = {
    "input_norm": ("input_norm", "input_norm"),
    "attention": ("attention", "attention_output"),
    "gate_proj": ("gate_proj", "gate_proj"),
    "up_proj": ("up_proj", "up_proj"),
    "down_proj_input": ("down_proj_input", "down_proj_input"),
    "down_proj": ("down_proj", "down_proj"),
    "mlp_output": ("mlp_output", "mlp_output"),
}
#: Sun et al. (2024) call an activation massive when it exceeds 100 in magnitude and is about 1000 times
#: the median magnitude of its hidden state.
MASSIVE_MIN_VALUE = 100.0
MASSIVE_MIN_RATIO = 1000.0
BIN_MODES: tuple[str, ...] = ("mean", "mean_abs", "max_abs")


# --- checking inputs --------------------------------------------------------------------------

def _check_prompts(prompts) -> tuple[list[str], bool]:
    """``(prompts as a list, whether a single string was given)``; clear errors for empty input."""
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts) if prompts is not None else []
    if not items:
        raise ValueError("No prompt given: pass a string or a non-empty list of strings.")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a string.")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: an empty prompt has no token to capture; pass some text.")
    return items, single


def _check_points(points) -> list[str]:
    points = [points] if isinstance(points, str) else list(points)
    if not points:
        raise ValueError(f"No capture point given: choose from {', '.join(CAPTURE_POINTS)}.")
    unknown = [p for p in points if p not in CAPTURE_POINTS]
    if unknown:
        raise ValueError(f"Unknown capture point(s) {unknown}. Known points: {', '.join(CAPTURE_POINTS)}.")
    return list(dict.fromkeys(points))


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError(f"layers is empty: pass None for all, or indices in 0..{n_layers - 1}.")
    bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: this model has {n_layers} blocks, valid layers are "
                         f"0..{n_layers - 1}.")
    return layers


def _hook_target(block: nn.Module, point: str, index: int) -> tuple[nn.Module, str]:
    """The module a capture point reads and how: ``"in"`` (its input) or ``"out"`` (its output)."""
    mlp = getattr(block, "mlp", None)
    try:
        target = {
            "block_input": lambda: (block, "in"),
            "input_norm": lambda: (block.input_layernorm, "out"),
            "attention": lambda: (block.self_attn, "out"),
            "residual_mid": lambda: (mlp_input_norm(block), "in"),
            "mlp_input": lambda: (mlp, "in"),
            "gate_proj": lambda: (mlp.gate_proj, "out"),
            "up_proj": lambda: (mlp.up_proj, "out"),
            "gate_act": lambda: (mlp.act_fn, "out"),
            "down_proj_input": lambda: (mlp.down_proj, "in"),
            "down_proj": lambda: (mlp.down_proj, "out"),
            "mlp_output": lambda: (mlp, "out"),
            "block_output": lambda: (block, "out"),
        }[point]()
    except AttributeError as error:
        raise ValueError(f"Block {index} ({type(block).__name__}) has no module for capture point {point!r} "
                         f"({error}). Capture points need Llama / Qwen 3 / Gemma 3 style blocks with a GLU MLP "
                         "(gate_proj, up_proj, down_proj, act_fn).") from None
    if not isinstance(target[0], nn.Module):
        raise ValueError(f"Block {index} ({type(block).__name__}) has no module for capture point {point!r}.")
    return target


# --- capturing ------------------------------------------------------------------------------

def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer captures (float32, CPU); layers of different widths (neurons removed layer by
    layer, CH11) are zero-padded to the widest."""
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([torch.nn.functional.pad(t.float().cpu(), (0, width - t.shape[-1])) for t in tensors])


@torch.no_grad()
def capture_activations(model: nn.Module, tokenizer, prompts: str | Sequence[str],
                        points: str | Sequence[str] = ("down_proj_input",), *,
                        layers: int | Sequence[int] | None = None, batch_size: int = 8, max_length: int = 1024,
                        progress: bool = False):
    """What the chosen points of the chosen blocks hold for every token of every prompt.

    Args:
        prompts: one string, or a list of strings (batched with right padding, which leaves the real
            tokens' values unchanged up to float rounding; ``batch_size=1`` runs them one by one).
        points: names from :data:`CAPTURE_POINTS` (an unknown name raises ``ValueError`` listing them).
        layers: block indices (default: all); out of range raises ``ValueError`` with the valid range.
        max_length: longer prompts are truncated to this many tokens.

    Returns:
        For one string, ``{point: tensor [len(layers), tokens, width]}`` (float32, CPU); for a list,
        a list of such dicts, one per prompt, each holding that prompt's real tokens only.
    """
    items, single = _check_prompts(prompts)
    points = _check_points(points)
    blocks = decoder_blocks(model)
    layers = _check_layers(layers, len(blocks))
    targets = {(p, i): _hook_target(blocks[i], p, i) for p in points for i in layers}
    store: dict = {}

    def hook(key, where):
        if where == "in":
            return lambda module, args, kwargs: store.__setitem__(key, hidden_of(args, kwargs).detach())
        return lambda module, args, kwargs, output: store.__setitem__(key, output_of(output).detach())

    handles = []
    for key, (module, where) in targets.items():
        if where == "in":
            handles.append(module.register_forward_pre_hook(hook(key, where), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(hook(key, where), with_kwargs=True))
    device = device_of(model)
    was_training = model.training
    model.eval()
    results: list[dict[str, torch.Tensor]] = []
    try:
        loader = make_dataloader(items, tokenizer, batch_size=batch_size, max_length=max_length)
        for batch in tqdm(loader, desc="capture", disable=not progress, leave=False):
            ids, mask = batch_tensors(batch, device)
            store.clear()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            lengths = mask.sum(1).tolist()
            for row, n in enumerate(lengths):
                results.append({p: _stack([store[p, i][row, :n] for i in layers]) for p in points})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return results[0] if single else results


def optipfair_captures(model: nn.Module, tokenizer, prompt: str,
                       points: str | Sequence[str] = tuple(OPTIPFAIR_POINTS)) -> dict[str, torch.Tensor]:
    """optipfair's captures of one prompt, in :func:`capture_activations`'s shape: ``{point: [layers, tokens, width]}``.

    Calls ``optipfair.bias.activations.process_prompt`` (one prompt, no padding). That function logs at
    INFO (silenced here) and swallows any error, returning ``{}``; this one raises instead.
    """
    import logging

    items, _ = _check_prompts(prompt)
    if len(items) != 1:
        raise ValueError("optipfair_captures takes one prompt (optipfair processes prompts one at a time).")
    points = _check_points(points)
    missing = [p for p in points if p not in OPTIPFAIR_POINTS]
    if missing:
        raise ValueError(f"optipfair does not capture {missing}; the points it has are {', '.join(OPTIPFAIR_POINTS)}.")
    logging.getLogger("optipfair").setLevel(logging.WARNING)
    from optipfair.bias.activations import process_prompt  # needs scikit-learn

    names = [OPTIPFAIR_POINTS[p][0] for p in points]
    raw = process_prompt(model, tokenizer, items[0], target_layers=names)
    if not raw:
        raise RuntimeError("optipfair's process_prompt returned nothing (it hides the error it met): run "
                           "utils.capture_activations on the same prompt to see what fails.")
    n_layers = len(decoder_blocks(model))
    out = {}
    for point in points:
        prefix = OPTIPFAIR_POINTS[point][1]
        keys = [f"{prefix}_layer_{i}" for i in range(n_layers)]
        absent = [k for k in keys if k not in raw]
        if absent:
            raise RuntimeError(f"optipfair returned no {absent[0]} (and {len(absent) - 1} more) for point {point!r}.")
        out[point] = torch.stack([raw[k][0].float() for k in keys])
    return out


# --- GLU neurons ----------------------------------------------------------------------------

@torch.no_grad()
def glu_statistics(model: nn.Module, dataloader: Iterable[dict], *, eps: float = 0.01,
                   progress: bool = True) -> dict[str, list[float]]:
    """How dense the GLU MLPs are, per layer, over the real tokens of ``dataloader``.

    For every neuron and token, with ``g = gate_proj(x)`` and ``a = act(g) * up_proj(x)``:

    * ``negative_gate``: share of ``g < 0`` — what a ReLU would set exactly to zero;
    * ``near_zero_act``: share of ``|act(g)| < eps * mean |act(g)|`` (the mean over the layer, batch
      by batch) — what SiLU / GELU actually make (almost) zero;
    * ``near_zero_output``: the same test on ``a``, the value ``down_proj`` receives.

    Returns ``{"negative_gate": [...], "near_zero_act": [...], "near_zero_output": [...]}``, one float per layer.
    """
    if not eps > 0:
        raise ValueError(f"eps must be a positive share of the mean magnitude, got {eps}.")
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        for point in ("gate_proj", "down_proj_input"):
            _hook_target(block, point, i)
    n = len(blocks)
    counts = torch.zeros(3, n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    store: dict = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.mlp.gate_proj.register_forward_hook(
            lambda m, args, out, i=i: store.__setitem__(("g", i), out.detach())))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: store.__setitem__(("a", i), args[0].detach())))
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(dataloader, desc="GLU statistics", disable=not progress, leave=False):
            ids, mask = batch_tensors(batch, device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            for i, block in enumerate(blocks):
                g = store["g", i][real].float()
                act = block.mlp.act_fn(store["g", i][real]).float().abs()
                a = store["a", i][real].float().abs()
                counts[0, i] += (g < 0).sum().item()
                counts[1, i] += (act < eps * act.mean()).sum().item()
                counts[2, i] += (a < eps * a.mean()).sum().item()
                total[i] += g.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not total.any():
        raise ValueError("The dataloader holds no real token.")
    shares = counts / total
    return {"negative_gate": shares[0].tolist(), "near_zero_act": shares[1].tolist(),
            "near_zero_output": shares[2].tolist()}


def bin_neurons(values: torch.Tensor, n_bins: int, how: str = "max_abs") -> torch.Tensor:
    """Group the last dimension (neurons) into ``n_bins`` contiguous bins, for a heatmap's columns.

    ``how``: ``"mean"`` (signed mean: opposite signs cancel), ``"mean_abs"`` (mean magnitude) or
    ``"max_abs"`` (largest magnitude in the bin). One outlier among a bin's neurons barely moves its
    mean but sets its max: averaging hides exactly the neurons worth looking at.
    Bins differ in size by at most one neuron when the width is not a multiple of ``n_bins``.
    """
    if how not in BIN_MODES:
        raise ValueError(f"Unknown binning {how!r}: use one of {', '.join(BIN_MODES)}.")
    if not isinstance(values, torch.Tensor) or values.dim() == 0:
        raise ValueError("values must be a tensor whose last dimension is the neurons.")
    width = values.shape[-1]
    if not isinstance(n_bins, int) or not 1 <= n_bins <= width:
        raise ValueError(f"n_bins must be an integer in 1..{width} (the number of neurons), got {n_bins}.")
    parts = torch.tensor_split(values.float(), n_bins, dim=-1)
    if how == "mean":
        cols = [p.mean(-1) for p in parts]
    elif how == "mean_abs":
        cols = [p.abs().mean(-1) for p in parts]
    else:
        cols = [p.abs().amax(-1) for p in parts]
    return torch.stack(cols, dim=-1)


# --- the residual stream --------------------------------------------------------------------

def residual_stream(model: nn.Module, tokenizer, prompts: str | Sequence[str], *, batch_size: int = 8,
                    max_length: int = 1024):
    """The residual stream of each prompt: ``[n_blocks + 1, tokens, hidden]`` (float32, CPU).

    Row ``i < n_blocks`` is the stream entering block ``i`` (row 0: the embeddings, scaled as the model
    scales them); the last row is the last block's output **before** the final norm. (transformers'
    ``output_hidden_states[-1]`` is the same stream *after* the final norm.) One string gives one
    tensor; a list gives a list.
    """
    caps = capture_activations(model, tokenizer, prompts, ("block_input", "block_output"), batch_size=batch_size,
                               max_length=max_length)
    stack = lambda c: torch.cat([c["block_input"], c["block_output"][-1:]])
    return stack(caps) if isinstance(caps, dict) else [stack(c) for c in caps]


def _check_stream(stream) -> torch.Tensor:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 3:
        shape = tuple(stream.shape) if isinstance(stream, torch.Tensor) else type(stream).__name__
        raise ValueError(f"stream must be one prompt's residual stream [layers + 1, tokens, hidden] (from "
                         f"utils.residual_stream), got {shape}.")
    if 0 in stream.shape:
        raise ValueError(f"stream is empty (shape {tuple(stream.shape)}).")
    return stream.float()


def find_massive(stream: torch.Tensor, *, min_value: float = MASSIVE_MIN_VALUE,
                 min_ratio: float = MASSIVE_MIN_RATIO) -> dict:
    """Where the residual stream of one prompt holds its largest values, layer by layer.

    For every row of ``stream`` (from :func:`residual_stream`): the largest ``|value|``, its token and
    dimension, and ``ratio`` = that magnitude / the median magnitude of the row (all tokens, all
    dimensions). Overall, the row with the largest magnitude gives ``layer`` (a stream index: 0 = the
    embeddings, ``i + 1`` = after block ``i``), ``token``, ``dimension``, ``value`` (signed) and
    ``ratio``. ``massive`` says whether that entry passes Sun et al.'s test (``> min_value`` and
    ``>= min_ratio`` x the median); ``appears`` is the first stream index where the same dimension and
    token pass it (None if never). Random models have no massive activations: ``massive`` is then False.
    """
    stream = _check_stream(stream)
    mags = stream.abs()
    rows, tokens, hidden = stream.shape
    flat = mags.reshape(rows, -1)
    peak, where = flat.max(1)
    medians = flat.median(1).values
    ratios = peak / medians.clamp_min(torch.finfo(torch.float32).tiny)
    top = int(peak.argmax())
    token, dim = divmod(int(where[top]), hidden)
    column = mags[:, token, dim]
    passes = (column > min_value) & (column >= min_ratio * medians)
    return {
        "layer": top, "token": token, "dimension": dim, "value": float(stream[top, token, dim]),
        "ratio": float(ratios[top]), "median": float(medians[top]),
        "massive": bool(passes[top]), "appears": int(passes.nonzero()[0]) if passes.any() else None,
        "per_layer": {"max": peak.tolist(), "ratio": ratios.tolist(), "median": medians.tolist(),
                      "token": [int(w) // hidden for w in where], "dimension": [int(w) % hidden for w in where]},
    }


def trace_writers(model: nn.Module, tokenizer, prompt: str, dimension: int, *, token: int = 0, top: int = 5,
                  share: float = 0.1) -> dict:
    """Who writes entry ``(token, dimension)`` of the residual stream of ``prompt``, and who erases it.

    For block ``l`` with stream ``x`` before it, ``m`` between its attention and its MLP and ``y`` after:
    the attention adds ``m - x`` and the MLP adds ``y - m`` (exact, whatever norms the family puts
    around its sublayers). Inside an MLP, neuron ``j`` contributes ``a_j * W_down[dimension, j]`` to
    ``down_proj``'s output (``a`` = what ``down_proj`` sees); for Llama / Qwen 3 that output is what the
    MLP adds (``neurons_exact`` True), Gemma 3 normalises it first.

    "Writing" means pushing the entry away from zero in the direction of its largest value; a block is
    a *writer* (*eraser*) when its two sublayers together move the entry by more than ``share`` of
    that largest value towards (away from) it.

    Returns a dict: ``stream`` (the entry at every stream index), ``attention`` and ``mlp`` (each
    block's contributions), ``peak_layer``, ``writer_layers``, ``eraser_layers``, and the ``top`` neurons
    in each direction, ``writer_neurons`` / ``eraser_neurons`` as ``{"layer", "neuron", "contribution",
    "activation"}`` records.
    """
    items, _ = _check_prompts(prompt)
    if len(items) != 1:
        raise ValueError("trace_writers takes one prompt.")
    hidden = text_config(model).hidden_size
    if not isinstance(dimension, int) or not 0 <= dimension < hidden:
        raise ValueError(f"dimension {dimension} out of range: the residual stream has {hidden} dimensions "
                         f"(0..{hidden - 1}).")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive number of neurons, got {top}.")
    caps = capture_activations(model, tokenizer, items[0],
                               ("block_input", "residual_mid", "block_output", "down_proj_input"))
    n_tokens = caps["block_input"].shape[1]
    if not isinstance(token, int) or not -n_tokens <= token < n_tokens:
        raise ValueError(f"token {token} out of range: the prompt has {n_tokens} tokens (0..{n_tokens - 1}).")
    x, m, y = (caps[k][:, token, dimension] for k in ("block_input", "residual_mid", "block_output"))
    stream = torch.cat([x, y[-1:]])
    peak_layer = int(stream.abs().argmax())
    sign = 1.0 if stream[peak_layer] >= 0 else -1.0
    attention, mlp = m - x, y - m
    moved = sign * (attention + mlp)
    limit = share * float(stream.abs().max())
    records = []
    for layer, block in enumerate(decoder_blocks(model)):
        a = caps["down_proj_input"][layer, token]
        w = block.mlp.down_proj.weight[dimension].detach().float().cpu()
        a = a[: w.numel()]
        contrib = a * w
        for j in contrib.abs().topk(min(top, contrib.numel())).indices.tolist():
            records.append({"layer": layer, "neuron": j, "contribution": float(contrib[j]),
                            "activation": float(a[j])})
    ranked = sorted(records, key=lambda r: sign * r["contribution"])
    first_block = decoder_blocks(model)[0]
    return {
        "dimension": dimension, "token": token % n_tokens, "stream": stream.tolist(),
        "attention": attention.tolist(), "mlp": mlp.tolist(), "peak_layer": peak_layer,
        "writer_layers": [i for i, v in enumerate(moved.tolist()) if v > limit],
        "eraser_layers": [i for i, v in enumerate(moved.tolist()) if v < -limit],
        "writer_neurons": [r for r in reversed(ranked) if sign * r["contribution"] > 0][:top],
        "eraser_neurons": [r for r in ranked if sign * r["contribution"] < 0][:top],
        "neurons_exact": not hasattr(first_block, "post_feedforward_layernorm"),
    }


@contextlib.contextmanager
def patch_residual(model: nn.Module, layer: int, dims: int | Sequence[int], *, positions: int | Sequence[int] = (0,),
                   value: float | Sequence[float] | torch.Tensor = 0.0) -> Iterator[None]:
    """Overwrite entries of the residual stream leaving block ``layer``, inside a ``with`` block.

    ``dims`` are dimensions of the stream, ``positions`` absolute token positions (read from the
    block's ``position_ids``, so a KV-cached generation patches the right token too), ``value`` one
    number for all of them or one per dimension (e.g. their mean over many texts). Everything later in
    the model sees the patched stream. The hook is removed on exit, also after an error, so the model is
    exactly as before.

        with utils.patch_residual(model, 3, [507], value=0.0):
            ppl = utils.perplexity(model, dataloader)
    """
    blocks = decoder_blocks(model)
    (layer,) = _check_layers([layer] if isinstance(layer, int) else layer, len(blocks))
    hidden = text_config(model).hidden_size
    dims = [dims] if isinstance(dims, int) else list(dims)
    bad = [d for d in dims if not isinstance(d, int) or not 0 <= d < hidden]
    if not dims or bad:
        raise ValueError(f"dims {bad or dims} invalid: give one or more dimensions in 0..{hidden - 1}.")
    positions = [positions] if isinstance(positions, int) else list(positions)
    if not positions or any(not isinstance(p, int) or p < 0 for p in positions):
        raise ValueError(f"positions must be one or more token positions >= 0, got {positions}.")
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() not in (1, len(dims)):
        raise ValueError(f"value must be one number or one per dimension ({len(dims)}), got {values.numel()}.")
    dim_index = torch.tensor(dims)
    pos_index = torch.tensor(positions)

    def hook(module, args, kwargs, output):
        h = output_of(output)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(h.shape[-2], device=h.device)[None]
        hit = torch.isin(pos, pos_index.to(pos.device)).expand(h.shape[:-1])  # [batch, tokens]
        if not hit.any():
            return None
        patched = h.clone()
        rows = patched[hit]
        rows[:, dim_index.to(h.device)] = values.to(h.device, h.dtype).expand(len(dims))
        patched[hit] = rows
        return patched if isinstance(output, torch.Tensor) else (patched, *output[1:])

    handle = blocks[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# --- the logit lens -------------------------------------------------------------------------

def _final_norm(model: nn.Module) -> nn.Module:
    owner = decoder(model)
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(owner, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"Cannot find the final norm of {type(model).__name__} (looked for norm, final_layernorm, ln_f).")


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer, prompt: str, *, stream: torch.Tensor | None = None) -> torch.Tensor:
    """What every layer would predict: ``lm_head(final_norm(stream[i]))`` for every stream index ``i``.

    Returns float32 logits ``[n_blocks + 1, tokens, vocab]``. The final norm is applied once to the
    raw residual stream (:func:`residual_stream`), so the last row equals the model's own logits
    (Gemma-style final-logit soft-capping is applied when the config has it). Pass ``stream`` to reuse
    one already captured for the same prompt.
    """
    items, _ = _check_prompts(prompt)
    if len(items) != 1:
        raise ValueError("logit_lens takes one prompt.")
    if stream is None:
        stream = residual_stream(model, tokenizer, items[0])
    stream = _check_stream(stream)
    n_blocks = len(decoder_blocks(model))
    if stream.shape[0] != n_blocks + 1:
        raise ValueError(f"stream has {stream.shape[0]} rows; this model's residual stream has {n_blocks + 1}.")
    norm, head = _final_norm(model), model.get_output_embeddings()
    param = next(head.parameters())
    logits = head(norm(stream.to(param.device, param.dtype))).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.cpu()


def lens_top_tokens(lens: torch.Tensor, tokenizer) -> tuple[list[list[str]], torch.Tensor]:
    """The most likely next token at every (layer, position) of a :func:`logit_lens` result.

    Returns ``(tokens, probabilities)``: ``tokens[layer][position]`` decoded strings, and their
    probabilities as a ``[layers, positions]`` tensor.
    """
    if not isinstance(lens, torch.Tensor) or lens.dim() != 3:
        raise ValueError("lens must be the [layers, tokens, vocab] logits of utils.logit_lens.")
    probs = lens.float().softmax(-1)
    best, ids = probs.max(-1)
    words = [[tokenizer.decode([int(i)]) for i in row] for row in ids]
    return words, best


# --- attention sinks ------------------------------------------------------------------------

@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    config = model.config
    previous = config._attn_implementation
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation "
                         "(needs transformers >= 5).")
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def attention_to_first_token(model: nn.Module, dataloader: Iterable[dict], *, progress: bool = True) -> list[float]:
    """Share of attention each layer puts on the first token, averaged over heads and real query tokens.

    Query position 0 (which can only attend to itself) is left out. The weights come from eager
    attention: the model is switched to it for the measurement and switched back afterwards, also after
    an error. One float per block.
    """
    blocks = decoder_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        with _eager_attention(model):
            for batch in tqdm(dataloader, desc="attention to token 0", disable=not progress, leave=False):
                ids, mask = batch_tensors(batch, device)
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
                queries = mask.bool().clone()
                queries[:, 0] = False
                for layer, weights in enumerate(out.attentions):
                    first = weights[..., 0].float().mean(1)  # [batch, queries], mean over heads
                    sums[layer] += first[queries].sum().item()
                count += int(queries.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("No query token after the first: give texts of at least two tokens.")
    return (sums / count).tolist()
