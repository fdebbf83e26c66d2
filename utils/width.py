"""Width pruning of gated (GLU) MLPs: score the neurons, keep the best, rebuild the layers (CH05).

A GLU MLP computes ``down( act(gate(x)) * up(x) )``. Its neuron *i* owns row *i* of
``gate_proj``, row *i* of ``up_proj`` and column *i* of ``down_proj``; width pruning removes
whole triples, so the three ``nn.Linear`` layers shrink together and the model stays dense.

Scores (higher = keep):

* static, from weights only (the definitions of optipfair 0.4.2, so the selections agree):
  ``"maw"`` peak-to-peak range ``max(w) + |min(w)|`` of the gate row plus that of the up row
  (optipfair calls it MAW/PPM, Martra 2025); ``"vow"`` variance of the gate row plus variance
  of the up row; ``"pon"`` product of the L1 norms of the gate and up rows; ``"l2"`` sum of
  their L2 norms.
* data-driven, from what each neuron does on calibration data. A pre-hook on ``down_proj``
  captures its input ``a = act(gate(x)) * up(x)`` at every position (see :data:`SCORE_PADDING`):
  ``"activation"`` the L2 norm of the neuron's activations over all tokens (CFSP, Wang et
  al. 2024, Eq. 8); ``"hybrid"`` optipfair's idea: (max-normalised peak-to-peak of gate row, up
  row and down column, summed) times that activation norm; ``"contribution"`` the size of the
  neuron's whole contribution to the MLP output, ``||a_i|| * ||W_down[:, i]||`` (exactly the
  Frobenius norm of the rank-one term ``a_i W_down[:, i]^T``; the same activation-times-weight
  idea as Wanda, Sun et al. 2023, and FLAP, An et al. 2024, applied to a whole column).

The data-driven default is ``"hybrid"``: on SmolLM2-135M at 20% it gave the lowest held-out wikitext
perplexity of the three in our cpu runs (``"contribution"`` was a little worse). Its activation norm counts
the padding positions of the calibration batches, as optipfair's does (:data:`SCORE_PADDING`): the model
still computes states there (the pad token reading the text before it), and with few, short calibration
texts counting them gave lower held-out perplexity in the course's benchmark. Unlike optipfair's, it is
one norm over all positions, not a sum of per-batch norms.

Least-squares repair (``reconstruct``, on by default when calibration data is given). Removing neurons
drops their terms ``W_down[:, R] a_R`` from the MLP output, but the surviving activations are
correlated with the removed ones, so the kept columns of ``down_proj`` can be re-fitted to stand in for
them. With ``G = sum_t a_t a_t^T`` (the Gram matrix of the activations over the calibration tokens), the
kept columns ``K`` that minimise ``sum_t ||W_down a_t - W'_K a_{K,t}||^2 + lambda ||W'_K - W_down[:, K]||^2``
are ``W'_K = W_down[:, K] + W_down[:, R] G_RK (G_KK + lambda I)^-1`` (:func:`compensate_down_proj`). The
idea is the one of FLAP's bias compensation (An et al., 2024) and of structured optimal brain
surgeon methods (ZipLM, Kurtic et al., 2023), done here as one ridge regression per layer; it changes
only the values of the kept ``down_proj`` columns, never the architecture.

How the cut is spread over the layers (``allocation`` of :func:`prune_glu`). ``"uniform"`` takes the same share
of every layer, so ``config.intermediate_size`` stays a single integer and the pruned model reloads with plain
``transformers``; it is the default without calibration data (the static scores, which match optipfair's).
``"global"`` removes the same total but lets one ranking over all layers choose where
(:func:`allocate_widths`: each layer's scores over their median, the first and last blocks protected); the layers
then get different widths, recorded in the config for :func:`utils.load_model`. It is the default with calibration
data since issue 33. Chosen on the validation split (``scripts/width_search.py``; SmolLM2-135M, 20 % of the neurons,
five domains x 16 and 64 calibration texts): it beat the uniform cut on all ten rows (perplexity x0.923 to x0.995
of the uniform cut's; wikitext with 16 texts 21.91 vs 23.74) and optipfair's hybrid by x0.768 to x0.906. Measured
and not kept: optipfair's per-batch sum of norms as the statistic (all ten rows: never more than 0.4 % better than
the single norm, up to 2.1 % worse); on wikitext only, a per-layer share from each layer's repaired output error
(23.13 vs 21.91) and the optimal-brain-surgeon choice of neurons (33.75); and on all ten rows the sequential
repair, each layer's statistics taken on the model whose earlier layers are cut (uniform widths): worse than the
one-pass uniform repair on 8 of 10 rows, level on course_code/64 (15.33 both), better only on wikitext/64 (21.38
vs 21.68), and worse than the global cut on all 10, at one calibration pass per layer
(``scripts/width_search.py --only sequential``). On the test split (BENCH_pruning_domains in RESULTS.md,
``scripts/benchmark.py``) the global default is at most 0.921x optipfair's perplexity on all 14 rows, the two
domains added after this choice included, and below the uniform cut on all 14 (x0.943 to x0.991).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .checks import check_damping
from .evaluation import StopForward, calibration_pass
from .models import register_config_surgery
from .precision import device_of
from .structure import glu_mlps  # utils.width.glu_mlps still works (utils.bias, utils.moe, notebooks)

STATIC_METHODS: tuple[str, ...] = ("maw", "vow", "pon", "l2")
DATA_METHODS: tuple[str, ...] = ("hybrid", "contribution", "activation")
#: Default criterion without calibration data.
DEFAULT_STATIC_METHOD = "maw"
#: Default criterion when a dataloader is given.
DEFAULT_DATA_METHOD = "hybrid"
#: Ridge strength of the least-squares repair, relative to the mean activation energy of the kept neurons.
#: 1.0 since the multi-domain benchmark (scripts/benchmark.py, table in RESULTS.md; SmolLM2-135M, 20 % of the
#: neurons, five domains x 16 and 64 calibration texts). With 16 texts a strong pull towards the plain cut
#: pays: real-token scores with damping 1.0 vs 0.1 gave 171.2 vs 175.0 on sms_spam (400 calibration tokens
#: for 1,536 neurons per layer) and 35.4 vs 37.2 on cosmopedia. With 64 texts 0.1 was better on three of
#: five domains (by up to 2 %: clinical notes 50.3 vs 51.3, course_code 17.96 vs 18.30) and 1.0 on the other
#: two (sms_spam 147.1 vs 149.7; wikitext within 0.2 %). With padding-counted scores, 1.0 met the target
#: against optipfair's hybrid on all ten rows; the old default (real tokens, 0.1) missed three 16-text rows.
DEFAULT_DAMPING = 1.0
#: Whether the data-driven scores count padding positions. True since the same benchmark: it matters where
#: much of the calibration batches is padding (sms_spam with 16 texts, 43 % padding: 160.4 counting it vs
#: 171.2 without, optipfair's hybrid 172.7; clinical notes with 16 texts, 25 %: 51.7 vs 53.6). Where texts
#: are long it changes little and can cost a little (wikitext with 16 texts, 10 % padding: 23.8 vs 23.3).
#: The repair's Gram matrix always uses real tokens only.
SCORE_PADDING = True
#: Largest total size of the Gram matrices gathered in one calibration pass (float32, on the model's device);
#: beyond it the layers are processed in groups, one pass per group.
GRAM_BUDGET_BYTES = 1024**3


def _check_method(method: str) -> str:
    name = str(method).lower()
    if name not in STATIC_METHODS + DATA_METHODS:
        raise ValueError(f"Unknown method {method!r}. Valid methods: static (weights only) "
                         f"{', '.join(STATIC_METHODS)}; data-driven (need a dataloader) {', '.join(DATA_METHODS)}.")
    return name


def peak_to_peak(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Peak-to-peak magnitude along ``dim``: ``max + |min|`` (the static "MAW" score of a weight's rows or columns).

    Used by :func:`static_scores` and by :func:`utils.bias.fairness_scores`.
    """
    return weight.amax(dim=dim) + weight.amin(dim=dim).abs()


def static_scores(gate: torch.Tensor, up: torch.Tensor, method: str = "maw") -> torch.Tensor:
    """Score each neuron of one layer from its gate row and up row (``[intermediate, hidden]`` each)."""
    gate, up = gate.float(), up.float()
    if method == "maw":
        return peak_to_peak(gate, 1) + peak_to_peak(up, 1)
    if method == "vow":
        return gate.var(dim=1) + up.var(dim=1)
    if method == "pon":
        return gate.abs().sum(dim=1) * up.abs().sum(dim=1)
    if method == "l2":
        return gate.norm(dim=1) + up.norm(dim=1)
    raise ValueError(f"static_scores: method must be one of {', '.join(STATIC_METHODS)}, got {method!r}.")


@torch.no_grad()
def _run_calibration(model: nn.Module, dataloader: Iterable, layers: list[int], consume, *, desc: str,
                     progress: bool) -> None:
    """Feed ``dataloader`` through ``model`` and call ``consume(layer, real, every)`` with the ``down_proj``
    input of each chosen layer: ``real`` holds the real tokens' rows, ``every`` every position's, padding
    included (both ``[rows, intermediate]``, float32). The forward pass stops after the deepest chosen layer."""
    mlps = glu_mlps(model)
    state: dict[str, torch.Tensor] = {}
    last = max(layers)

    def make_hook(index: int):
        def hook(module, args):
            acts = args[0].reshape(-1, args[0].shape[-1])
            real = state["mask"].reshape(-1).bool()
            consume(index, acts[real].float(), acts.float())  # real tokens only, and every position
            if index == last:
                raise StopForward
        return hook

    handles = [mlps[i].down_proj.register_forward_pre_hook(make_hook(i)) for i in layers]
    try:
        calibration_pass(model, dataloader, lambda mask: state.__setitem__("mask", mask), desc=desc,
                         progress=progress)
    finally:
        for h in handles:
            h.remove()


def activation_norms(model: nn.Module, dataloader: Iterable, *, padding: bool = False,
                     progress: bool = True) -> list[torch.Tensor]:
    """L2 norm of each MLP neuron's activation over the calibration positions, per layer.

    A forward pre-hook on each ``down_proj`` reads its input ``act(gate(x)) * up(x)`` and adds the
    squares; the result is ``sqrt(sum over positions a_i^2)``. With ``padding=False`` only real tokens
    count (the norms do not depend on how the texts were batched); with ``padding=True`` the padding
    positions of right-padded batches count too, as in optipfair and in the course's default scores
    (:data:`SCORE_PADDING`, where the evidence is).
    """
    mlps = glu_mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]

    def consume(index: int, real: torch.Tensor, every: torch.Tensor) -> None:
        sums[index] += (every if padding else real).pow(2).sum(dim=0).double().cpu()

    _run_calibration(model, dataloader, list(range(len(mlps))), consume, desc="calibration", progress=progress)
    return [s.sqrt().float() for s in sums]


def scores_from_activations(model: nn.Module, norms: list[torch.Tensor], method: str = DEFAULT_DATA_METHOD
                            ) -> list[torch.Tensor]:
    """Data-driven scores from already collected :func:`activation_norms` (no new forward pass)."""
    method = _check_method(method)
    if method not in DATA_METHODS:
        raise ValueError(f"scores_from_activations needs a data-driven method ({', '.join(DATA_METHODS)}), "
                         f"got {method!r}.")
    mlps = glu_mlps(model)
    if len(norms) != len(mlps):
        raise ValueError(f"norms must hold one vector per layer ({len(mlps)}), got {len(norms)}.")
    return [_data_scores(m, n, method) for m, n in zip(mlps, norms)]


def _data_scores(mlp: nn.Module, act_norm: torch.Tensor, method: str) -> torch.Tensor:
    down = mlp.down_proj.weight.detach().float().cpu()  # [hidden, intermediate]
    act_norm = act_norm.float().cpu()
    if method == "activation":
        return act_norm.clone()
    if method == "contribution":
        return act_norm * down.norm(dim=0)
    # hybrid: normalised structural range of the (gate row, up row, down column) triple x activations
    gate = mlp.gate_proj.weight.detach().float().cpu()
    up = mlp.up_proj.weight.detach().float().cpu()
    parts = [peak_to_peak(gate, 1), peak_to_peak(up, 1), peak_to_peak(down, 0)]
    structural = sum(p / (p.max() + 1e-8) for p in parts)
    return structural * act_norm


def neuron_importance(model: nn.Module, *, method: str = DEFAULT_STATIC_METHOD, dataloader: Iterable | None = None,
                      progress: bool = True) -> list[torch.Tensor]:
    """One importance vector per layer (length = that layer's intermediate size); higher = keep.

    Args:
        model: a model with GLU MLPs (Llama, Gemma, Qwen, Mistral ...).
        method: ``"maw"``, ``"vow"``, ``"pon"``, ``"l2"`` (static) or ``"hybrid"``,
            ``"contribution"``, ``"activation"`` (data-driven; need ``dataloader``).
        dataloader: calibration batches (dicts with ``input_ids`` and ``attention_mask``).
    """
    method = _check_method(method)
    mlps = glu_mlps(model)
    if method in DATA_METHODS:
        if dataloader is None:
            raise ValueError(f"method {method!r} is data-driven: pass dataloader= (calibration batches, e.g. "
                             "utils.make_dataloader(utils.load_texts('wikitext', n=64), tokenizer)), "
                             f"or use a static method ({', '.join(STATIC_METHODS)}).")
        return scores_from_activations(model, activation_norms(model, dataloader, padding=SCORE_PADDING,
                                                               progress=progress), method)
    if dataloader is not None:
        raise ValueError(f"method {method!r} uses weights only and would ignore the dataloader: drop "
                         f"dataloader=, or choose a data-driven method ({', '.join(DATA_METHODS)}).")
    return [static_scores(m.gate_proj.weight.detach().cpu(), m.up_proj.weight.detach().cpu(), method)
            for m in mlps]


def target_width(intermediate: int, hidden: int, ratio: float | None = None, *,
                 expansion_ratio: float | None = None, divisor: int | None = None) -> int:
    """Neurons to keep per layer for a pruning ``ratio`` (share removed) or an ``expansion_ratio``.

    ``ratio`` removes ``int(ratio * intermediate)`` neurons (as optipfair does);
    ``expansion_ratio`` keeps ``round(expansion_ratio * hidden)``; ``divisor`` then rounds the
    width down to a multiple of itself (GPU-friendly shapes).
    """
    if (ratio is None) == (expansion_ratio is None):
        raise ValueError("Pass exactly one of ratio= (share of neurons to remove, e.g. 0.2) or expansion_ratio= "
                         "(new intermediate/hidden, e.g. 2.0).")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"ratio must be strictly between 0 and 1 (the share of neurons removed, "
                             f"e.g. 0.2 for 20%), got {ratio!r}.")
        keep = intermediate - int(ratio * intermediate)
    else:
        if isinstance(expansion_ratio, bool) or not isinstance(expansion_ratio, (int, float)) or expansion_ratio <= 0:
            raise ValueError(f"expansion_ratio must be a positive number (new intermediate/hidden), got "
                             f"{expansion_ratio!r}.")
        keep = int(round(expansion_ratio * hidden))
        if keep >= intermediate:
            raise ValueError(f"expansion_ratio={expansion_ratio} keeps {keep} neurons, not fewer than the current "
                             f"{intermediate} (expansion ratio {intermediate / hidden:.2f}): choose a smaller one.")
    if divisor is not None:
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ValueError(f"divisor must be a positive integer such as 32, 64, 128 or 256, got {divisor!r}.")
        keep = (keep // divisor) * divisor
        if keep == 0:
            raise ValueError(f"divisor={divisor} rounds the width down to 0 neurons: use a smaller divisor "
                             "or prune less.")
    if not 0 < keep < intermediate:
        raise ValueError(f"The target keeps {keep} of {intermediate} neurons: it must keep at least one and "
                         "remove at least one.")
    return keep


def _sliced_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = layer.weight.detach().index_select(dim, index.to(layer.weight.device))
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            bias = layer.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def _set_intermediate_size(model: nn.Module, size: int) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        if hasattr(cfg, "intermediate_size"):
            cfg.intermediate_size = size


def activation_grams(model: nn.Module, dataloader: Iterable, *, layers: Iterable[int] | None = None,
                     progress: bool = True, padded_norms: dict | None = None) -> dict[int, torch.Tensor]:
    """Gram matrix ``G = sum_t a_t a_t^T`` of each chosen layer's MLP activations over every real token.

    ``a_t`` is the input of ``down_proj`` at token ``t`` (padding excluded), so ``G`` is
    ``[intermediate, intermediate]``; its diagonal is the squared :func:`activation_norms`. The forward
    pass stops after the deepest chosen layer. Returns ``{layer index: G}`` in float32 on the CPU.

    ``padded_norms``: a dict to fill, in the same pass, with each layer's :func:`activation_norms` counting
    padding (what the default scores use), so :func:`prune_glu` needs one pass, not two.

    Memory: one float32 matrix per chosen layer on the model's device while it runs (for Llama-3.2-1B,
    8192 x 8192 x 4 bytes = 268 MB a layer), which is why :func:`prune_glu` asks for a few layers at a time.
    """
    mlps = glu_mlps(model)
    chosen = sorted(set(range(len(mlps)) if layers is None else (int(i) for i in layers)))
    bad = [i for i in chosen if not 0 <= i < len(mlps)]
    if bad or not chosen:
        raise ValueError(f"layers must be indices in 0..{len(mlps) - 1}, got {bad or 'none'}.")
    device = device_of(model)
    grams = {i: torch.zeros(mlps[i].down_proj.in_features, mlps[i].down_proj.in_features, device=device)
             for i in chosen}
    # the scores' statistic, gathered in the same pass when asked for
    norms = None if padded_norms is None else {i: torch.zeros(mlps[i].down_proj.in_features, dtype=torch.float64)
                                               for i in chosen}

    def consume(index: int, real: torch.Tensor, every: torch.Tensor) -> None:
        grams[index].addmm_(real.T, real)
        if norms is not None:
            norms[index] += every.pow(2).sum(dim=0).double().cpu()

    _run_calibration(model, dataloader, chosen, consume, desc="calibration (Gram)", progress=progress)
    if norms is not None:
        padded_norms.update({i: n.sqrt().float() for i, n in norms.items()})
    return {i: g.cpu() for i, g in grams.items()}


def compensate_down_proj(down_weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, *,
                         damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Least-squares values for the kept ``down_proj`` columns after the other neurons are removed.

    Solves ``min_W' sum_t ||W a_t - W' a_{K,t}||^2 + lambda ||W' - W[:, K]||^2`` in closed form:
    ``W' = W[:, K] + W[:, R] G_RK (G_KK + lambda I)^-1``, with ``lambda = damping * mean(diag(G_KK))``.

    Args:
        down_weight: ``down_proj.weight``, ``[hidden, intermediate]``.
        gram: the activations' Gram matrix ``[intermediate, intermediate]`` (:func:`activation_grams`).
        kept: indices of the neurons that stay.
        damping: ridge strength relative to the kept neurons' mean activation energy; larger keeps the
            result closer to the plain cut (``W[:, K]``), smaller fits the calibration tokens more closely.

    Returns:
        The new ``[hidden, len(kept)]`` weight, in ``down_weight``'s dtype and device.
    """
    check_damping(damping, DEFAULT_DAMPING)
    hidden, width = down_weight.shape
    if gram.shape != (width, width):
        raise ValueError(f"gram must be [{width}, {width}] (one row and column per neuron of this layer), "
                         f"got {tuple(gram.shape)}.")
    device = gram.device  # solve where the Gram matrix lives (a GPU makes wide layers fast), in float64
    kept = torch.as_tensor(kept, dtype=torch.long).to(device)
    if kept.numel() == 0 or kept.unique().numel() != kept.numel() or kept.min() < 0 or kept.max() >= width:
        raise ValueError(f"kept must be distinct neuron indices in 0..{width - 1}.")
    removed = torch.ones(width, dtype=torch.bool, device=device)
    removed[kept] = False
    weight = down_weight.detach().to(device=device, dtype=torch.float64)
    g = gram.double()
    g_kk = g[kept][:, kept]
    g_kk = g_kk + damping * g_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(kept), dtype=g.dtype,
                                                                                   device=device)
    g_rk = g[removed][:, kept]
    # (W_R G_RK) (G_KK + lambda I)^-1, as a solve with the symmetric matrix on the left
    correction = torch.linalg.solve(g_kk, (weight[:, removed] @ g_rk).T).T
    return (weight[:, kept] + correction).to(dtype=down_weight.dtype, device=down_weight.device)


def layer_groups(mlps: list[nn.Module], budget_bytes: int) -> list[list[int]]:
    """Consecutive groups of layer indices whose float32 Gram matrices (``d_ff x d_ff`` each) fit together in
    ``budget_bytes``; a layer larger than the budget gets a group of its own. Used to take the Gram matrices
    of a calibration run a few layers per pass (CH05's repair, CH09's expert clustering)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, mlp in enumerate(mlps):
        size = mlp.down_proj.in_features ** 2 * 4
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


#: Neurons moved at a time by :func:`allocate_widths` (wide MLPs; a narrow one moves them one by one).
ALLOCATION_STEP = 32
#: Blocks at each end of the model that :func:`allocate_widths` cuts at most half the average share.
PROTECTED_BLOCKS = 1


def allocate_widths(scores: list[torch.Tensor], remove: int, *, step: int = ALLOCATION_STEP,
                    protect: int = PROTECTED_BLOCKS) -> list[int]:
    """How many neurons each layer loses when ``remove`` neurons are taken by ONE ranking over all layers.

    Each layer's scores are divided by their median, so that layers whose scores live on different scales
    compete fairly; then the neurons go in steps of ``step`` (a layer's next ``step`` neurons cost its
    ``step``-th lowest remaining normalised score), cheapest first, until ``remove`` (rounded up to a whole
    step) are gone. Bounds keep it from hollowing a layer out: with ``s`` the average share removed, the first and
    last ``protect`` layers lose at most ``s / 2`` of their neurons, every other layer at most ``2 s``. Every
    count is a multiple of ``step`` (pass a ``divisor`` there to keep GPU-friendly widths).
    """
    if not scores or any(s.ndim != 1 or s.numel() == 0 for s in scores):
        raise ValueError("scores must hold one non-empty 1-D score vector per layer (from neuron_importance).")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive integer (neurons moved at a time), got {step!r}.")
    widths = [s.numel() for s in scores]
    if isinstance(remove, bool) or not isinstance(remove, int) or not 0 < remove < sum(widths):
        raise ValueError(f"remove must be a whole number of neurons between 1 and {sum(widths) - 1}, got {remove!r}.")
    share = remove / sum(widths)
    n = len(scores)
    ends = set(range(min(protect, n))) | set(range(max(n - protect, 0), n))
    high = [int((0.5 if i in ends else 2.0) * share * w) // step * step for i, w in enumerate(widths)]
    high = [min(h, (w - 1) // step * step) for h, w in zip(high, widths)]
    chunks = -(-remove // step)
    if sum(h // step for h in high) < chunks:
        raise ValueError(f"Cannot remove {remove} neurons in steps of {step} within the bounds (at most twice the "
                         "average share per layer, half of it at the ends): use a smaller step or divisor, or a "
                         "uniform cut.")
    costs = []
    for i, s in enumerate(scores):
        ordered = (s.float().cpu() / s.float().median().clamp_min(1e-12)).sort().values
        costs += [(float(ordered[c * step - 1]), i) for c in range(1, high[i] // step + 1)]
    removed = [0] * n
    for _cost, i in sorted(costs)[:chunks]:
        removed[i] += step
    return removed


ALLOCATIONS: tuple[str, ...] = ("uniform", "global")
#: How :func:`prune_glu` spreads the cut over the layers: with calibration data, and without (see the module
#: docstring for the evidence).
DEFAULT_DATA_ALLOCATION = "global"
DEFAULT_STATIC_ALLOCATION = "uniform"


@torch.no_grad()
def prune_glu(model: nn.Module, ratio: float | None = None, *, expansion_ratio: float | None = None,
              divisor: int | None = None, method: str | None = None, dataloader: Iterable | None = None,
              scores: list[torch.Tensor] | None = None, reconstruct: bool | None = None,
              damping: float = DEFAULT_DAMPING, allocation: str | None = None,
              progress: bool = True) -> nn.Module:
    """Remove the least important neurons of the GLU MLPs, in place, and return the model.

    Args:
        ratio: share of the MLP neurons to remove, strictly between 0 and 1.
        expansion_ratio: or the new (average) intermediate/hidden ratio (exactly one of the two).
        divisor: round the kept widths down to a multiple of it (e.g. 64, 128, 256).
        method: criterion (see :func:`neuron_importance`). Default: ``"hybrid"`` with a
            dataloader, ``"maw"`` without.
        dataloader: calibration batches, for data-driven methods and for the least-squares repair.
        scores: precomputed scores (one vector per layer, from :func:`neuron_importance`); then
            ``method`` is not used, and ``dataloader`` serves only the repair.
        reconstruct: re-fit the kept ``down_proj`` columns by least squares on the calibration
            activations (see the module docstring and :func:`compensate_down_proj`). Default: on
            when a ``dataloader`` is given; ``False`` gives the plain cut (what optipfair does).
        damping: ridge strength of that repair (``DEFAULT_DAMPING``).
        allocation: ``"uniform"``, every layer keeps the same number of neurons (its top scores), so
            ``config.intermediate_size`` stays one integer and plain ``transformers`` reloads the model; or
            ``"global"``, the same total removed (rounded up to whole steps) but chosen by one ranking over all
            layers (:func:`allocate_widths`), so the layers get different widths, recorded in
            ``config.mlp_intermediate_sizes`` for :func:`utils.load_model` (as :func:`remove_neurons` does).
            Default: ``"global"`` with a dataloader, ``"uniform"`` without (module docstring: the evidence).

    The three Linear layers are rebuilt with the same dtype, device and bias. With the repair, the
    statistics are measured on the unpruned model (one calibration pass, or one per group of layers for
    very wide MLPs) before any layer is cut.
    """
    mlps = glu_mlps(model)
    intermediate = mlps[0].gate_proj.out_features
    if any(m.gate_proj.out_features != intermediate for m in mlps):
        raise ValueError("The MLPs have different widths already; prune_glu keeps one uniform width.")
    hidden = mlps[0].gate_proj.in_features
    keep = target_width(intermediate, hidden, ratio, expansion_ratio=expansion_ratio, divisor=divisor)
    if reconstruct is None:
        reconstruct = dataloader is not None
    if reconstruct and dataloader is None:
        raise ValueError("reconstruct=True re-fits down_proj on calibration activations: pass dataloader= "
                         "(e.g. utils.make_dataloader(utils.load_texts('wikitext', n=64), tokenizer)).")
    check_damping(damping, DEFAULT_DAMPING)
    if allocation is None:
        allocation = DEFAULT_DATA_ALLOCATION if dataloader is not None else DEFAULT_STATIC_ALLOCATION
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}.")
    if method is None:
        method = DEFAULT_DATA_METHOD if dataloader is not None else DEFAULT_STATIC_METHOD
    method = _check_method(method)
    if scores is not None and (len(scores) != len(mlps) or any(len(s) != intermediate for s in scores)):
        raise ValueError(f"scores must hold {len(mlps)} vectors of length {intermediate} (one per layer).")
    keeps = [keep] * len(mlps)
    grams = None
    if allocation == "global":
        if scores is None and reconstruct and method in DATA_METHODS and SCORE_PADDING \
                and len(layer_groups(mlps, GRAM_BUDGET_BYTES)) == 1:  # one pass gives the scores and the Gram matrices
            padded: dict[int, torch.Tensor] = {}
            grams = activation_grams(model, dataloader, progress=progress, padded_norms=padded)
            scores = [_data_scores(m, padded[i], method) for i, m in enumerate(mlps)]
        elif scores is None:
            scores = neuron_importance(model, method=method, progress=progress,
                                       dataloader=dataloader if method in DATA_METHODS else None)
        step = divisor or (ALLOCATION_STEP if intermediate >= 16 * ALLOCATION_STEP else 1)
        removed = allocate_widths(scores, len(mlps) * (intermediate - keep), step=step)
        keeps = [intermediate - r for r in removed]
    kept, new_down = _select_and_repair(model, mlps, keeps, method, dataloader, scores, reconstruct, damping,
                                        progress, grams)
    for mlp, index, down in zip(mlps, kept, new_down):
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, index, 0)
        mlp.up_proj = _sliced_linear(mlp.up_proj, index, 0)
        mlp.down_proj = _sliced_linear(mlp.down_proj, index, 1)
        if down is not None:
            mlp.down_proj.weight.copy_(down)
    _record_widths(model, [len(k) for k in kept])
    return model


def _select_and_repair(model, mlps, keeps, method, dataloader, scores, reconstruct, damping, progress, grams=None):
    """The kept indices of each layer (``keeps[i]`` best scores) and, with the repair, its new ``down_proj``
    (from ``grams`` when the caller already gathered every layer's Gram matrix)."""
    kept: list[torch.Tensor] = [torch.empty(0)] * len(mlps)
    new_down: list[torch.Tensor | None] = [None] * len(mlps)
    if not reconstruct:
        if scores is None:
            scores = neuron_importance(model, method=method, dataloader=dataloader, progress=progress)
        return [kept_indices([s], k)[0] for s, k in zip(scores, keeps)], new_down
    groups = [list(range(len(mlps)))] if grams is not None else layer_groups(mlps, GRAM_BUDGET_BYTES)
    for group in groups:
        padded: dict[int, torch.Tensor] = {}
        if grams is None:
            grams = activation_grams(model, dataloader, layers=group, progress=progress, padded_norms=padded)
        for i in group:
            if scores is not None:
                layer_scores = scores[i]
            elif method in DATA_METHODS:
                norm = padded[i] if SCORE_PADDING else grams[i].diagonal().clamp_min(0).sqrt()
                layer_scores = _data_scores(mlps[i], norm, method)
            else:
                layer_scores = static_scores(mlps[i].gate_proj.weight.detach().cpu(),
                                             mlps[i].up_proj.weight.detach().cpu(), method)
            kept[i] = kept_indices([layer_scores], keeps[i])[0]
            down = mlps[i].down_proj.weight
            new_down[i] = compensate_down_proj(down, grams[i].to(down.device), kept[i], damping=damping)
        grams = None
    return kept, new_down


def _record_widths(model: nn.Module, widths: list[int]) -> None:
    """One width for all MLPs: ``config.intermediate_size``. Several: the largest there, and the list in
    ``config.mlp_intermediate_sizes`` (:data:`WIDTHS_FIELD`), which :func:`utils.load_model` reads back."""
    config = getattr(model, "config", None)
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if len(set(widths)) == 1:
        _set_intermediate_size(model, widths[0])
        if hasattr(text, WIDTHS_FIELD):
            setattr(text, WIDTHS_FIELD, None)
    else:
        _set_intermediate_size(model, max(widths))
        setattr(text, WIDTHS_FIELD, widths)


def kept_indices(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """The sorted indices of the ``keep`` best neurons of each layer (what :func:`prune_glu` keeps)."""
    return [torch.topk(s.float().cpu(), keep).indices.sort().values for s in scores]


def kept_neurons(original: nn.Module, pruned: nn.Module) -> list[torch.Tensor]:
    """Which neurons of each GLU MLP of ``original`` the width-pruned ``pruned`` kept (sorted indices).

    Found from the weights alone, exactly: a kept neuron's ``gate_proj`` and ``up_proj`` rows are copies
    of the original's, so each of ``pruned``'s rows is matched to the identical row of ``original``. Works
    for any pruner (ours, optipfair's) without knowing how it chose.

    Raises:
        ValueError: different numbers of MLPs, or a pruned row that is in no original row.
    """
    before, after = glu_mlps(original), glu_mlps(pruned)
    if len(before) != len(after):
        raise ValueError(f"original has {len(before)} GLU MLPs and pruned {len(after)}: pass the model that "
                         "was pruned and its width-pruned copy (depth pruning removes whole blocks).")
    kept = []
    for i, (a, b) in enumerate(zip(before, after)):
        rows_a = torch.cat([a.gate_proj.weight.detach(), a.up_proj.weight.detach()], dim=1).float().cpu()
        rows_b = torch.cat([b.gate_proj.weight.detach(), b.up_proj.weight.detach()], dim=1).float().cpu()
        _, inverse = torch.unique(torch.cat([rows_a, rows_b]), dim=0, return_inverse=True)
        position = {int(key): j for j, key in enumerate(inverse[:len(rows_a)].tolist())}
        index = [position.get(int(key), -1) for key in inverse[len(rows_a):].tolist()]
        if -1 in index:
            raise ValueError(f"Block {i}: a neuron of the pruned model is not a neuron of the original. Were both "
                             "made from the same model, and is the pruned one width-pruned (not repaired)?")
        kept.append(torch.tensor(sorted(index), dtype=torch.long))
    return kept


def same_selection_up_to_ties(scores: list[torch.Tensor], kept_a: list[torch.Tensor], kept_b: list[torch.Tensor],
                              *, rtol: float) -> list[int]:
    """Check that two selections of neurons differ only where the scores tie; return the blocks that differ.

    Two pruners that rank the same scores keep the same neurons, except at the cut-off: when neurons score
    the same up to rounding (a GPU computing in float16 and a CPU in float32 round differently), either
    may be kept. Every neuron kept by one selection and not by the other must score within ``rtol``
    (relative) of the block's cut-off score (the lowest score ``kept_a`` keeps).

    Raises:
        ValueError: the selections differ by more than ties (the message names the block and the scores),
            or the lists have different lengths or sizes.
    """
    if not len(scores) == len(kept_a) == len(kept_b):
        raise ValueError(f"One score vector and one selection per block: got {len(scores)} scores, "
                         f"{len(kept_a)} and {len(kept_b)} selections.")
    differ = []
    for i, (s, a, b) in enumerate(zip(scores, kept_a, kept_b)):
        s = s.detach().double().cpu()
        if len(a) != len(b):
            raise ValueError(f"Block {i}: the selections keep {len(a)} and {len(b)} neurons, not a tie.")
        swapped = sorted(set(a.tolist()) ^ set(b.tolist()))
        if not swapped:
            continue
        cut = s[a].min()
        far = [j for j in swapped if abs(s[j] - cut) > rtol * abs(cut)]
        if far:
            raise ValueError(f"Block {i}: neurons {far[:5]} are kept by one selection only, with scores "
                             f"{[round(float(s[j]), 6) for j in far[:5]]} against a cut-off of {float(cut):.6g}: "
                             f"more than a tie (rtol {rtol}). The two rankings are not the same.")
        differ.append(i)
    return differ


# --- removing chosen neurons, layer by layer (CH11) ------------------------------------------

#: Config field listing each block's MLP width after :func:`remove_neurons` (when the widths differ).
WIDTHS_FIELD = "mlp_intermediate_sizes"


def check_neuron_selection(mlps: list[nn.Module], neurons, *, allow_all: bool = False) -> dict[int, torch.Tensor]:
    """Validate a ``{layer: [neuron, ...]}`` selection against ``mlps``; return it as index tensors per layer.

    Raises ``TypeError``/``ValueError`` naming the bad layer or neuron. Unless ``allow_all``, a layer may not lose
    every neuron. Used by :func:`remove_neurons` and by :mod:`utils.bias`'s weight edits.
    """
    if not isinstance(neurons, dict):
        raise TypeError(f"neurons must be a dict {{layer: [neuron, ...]}}, got {type(neurons).__name__}.")
    checked: dict[int, torch.Tensor] = {}
    for layer, ids in neurons.items():
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(mlps):
            raise ValueError(f"Layer {layer!r} is out of range: the model has {len(mlps)} MLPs "
                             f"(valid layers 0-{len(mlps) - 1}).")
        index = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long).flatten()
        width = mlps[layer].gate_proj.out_features
        if index.numel() and (index.min() < 0 or index.max() >= width):
            raise ValueError(f"Layer {layer}: neuron indices must lie in 0-{width - 1}.")
        if index.unique().numel() != index.numel():
            raise ValueError(f"Layer {layer}: the neuron list has duplicates.")
        if index.numel() >= width and not allow_all:
            raise ValueError(f"Layer {layer}: removing all {width} neurons would delete the MLP; keep at least one.")
        if index.numel():
            checked[layer] = index
    return checked


def remove_neurons(model: nn.Module, neurons: dict[int, list[int] | torch.Tensor]) -> nn.Module:
    """Physically remove the given neurons (``{layer: [neuron, ...]}``) from the GLU MLPs, in place.

    Unlike :func:`prune_glu`, each layer may lose a different number of neurons (or none). The
    result computes exactly what the model computes with the same neurons zeroed (their gate and up
    rows and down column), with fewer parameters. Because the blocks now have different widths, the
    widths are recorded in ``config.mlp_intermediate_sizes`` and ``config.intermediate_size`` keeps the
    largest; :func:`utils.load_model` reads the record and rebuilds the narrower layers before loading
    the weights, so a saved model round-trips. (A plain ``from_pretrained`` cannot: ``transformers``
    has one ``intermediate_size`` for all blocks.)
    """
    mlps = glu_mlps(model)
    selection = check_neuron_selection(mlps, neurons)
    for layer, index in selection.items():
        mlp = mlps[layer]
        keep = torch.ones(mlp.gate_proj.out_features, dtype=torch.bool)
        keep[index] = False
        kept = keep.nonzero().flatten()
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, kept, 0)
        mlp.up_proj = _sliced_linear(mlp.up_proj, kept, 0)
        mlp.down_proj = _sliced_linear(mlp.down_proj, kept, 1)
    _record_widths(model, [m.gate_proj.out_features for m in mlps])
    return model


def _records_widths(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, WIDTHS_FIELD, None))


@register_config_surgery(applies=_records_widths)
def apply_recorded_widths(model: nn.Module) -> nn.Module:
    """Rebuild each MLP at the width recorded in ``config.mlp_intermediate_sizes`` (weights not kept).

    Meant for loading a saved model: :func:`utils.load_model` builds the model from its config, calls
    this, then loads the checkpoint strictly. Returns the model unchanged when nothing is recorded.
    """
    config = getattr(model, "config", None)
    if config is None or not _records_widths(config):
        return model
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    widths = list(getattr(text, WIDTHS_FIELD))
    mlps = glu_mlps(model)
    if len(widths) != len(mlps):
        raise ValueError(f"config.{WIDTHS_FIELD} lists {len(widths)} widths but the model has {len(mlps)} MLPs: "
                         "the config was edited after saving. Save the model again.")
    for mlp, width in zip(mlps, widths):
        if width != mlp.gate_proj.out_features:
            mlp.gate_proj = _sliced_linear(mlp.gate_proj, torch.arange(width), 0)
            mlp.up_proj = _sliced_linear(mlp.up_proj, torch.arange(width), 0)
            mlp.down_proj = _sliced_linear(mlp.down_proj, torch.arange(width), 1)
    return model
