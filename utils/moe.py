"""Mixture of experts from a dense model: split a GLU MLP into experts, route, upcycle, export (CH09).

A GLU MLP is a sum over its neurons: ``down(act(gate(x)) * up(x)) = sum_i W_down[:, i] a_i(x)``. Cut the
neurons into ``E`` disjoint groups and each group is a smaller GLU MLP, an *expert*; the sum of all ``E``
experts' outputs is exactly the dense MLP's output. A *router* then picks the ``k`` experts that should run
for each token, so only ``k/E`` of the MLP's neurons compute. The pieces:

* :func:`partition_neurons` — which neurons go together: a seeded random split, or a balanced clustering of
  neurons that fire on the same tokens (the co-activation of two neurons is the cosine of their activation
  vectors over the calibration tokens, read from :func:`utils.activation_grams`). The clustering is a
  k-means on those cosines whose assignment step is a balanced transport plan (Sinkhorn iterations) rounded
  expert by expert: loops over iterations and experts, never over neurons.
* :class:`GLUMoE` — the expert layer: fused ``[E, ...]`` weights, a linear router, an optional shared expert
  that always runs, top-k selection by the router or by an oracle (the truly largest experts).
  Two ways to combine the selected experts:

  - ``combine="sum"``: each selected expert's output counts with weight 1. At ``k = E`` this *is* the dense
    MLP (up to float rounding): the exact split.
  - ``combine="softmax"``: the rule of ``transformers``' MoE blocks (Mixtral, Qwen2-MoE with
    ``norm_topk_prob=True``): ``softmax(logits / T)`` over all experts, keep the top k, renormalise them to
    sum to 1, optionally multiply by ``k`` (``scale_by_k``). With a large temperature ``T`` the selected
    weights approach ``1/k`` each, so ``scale_by_k`` makes them approach 1: the "sum" rule, approximately.
    The selection itself never depends on ``T`` (softmax keeps the order of the logits).

* :func:`fit_routers` — a router built from data: a ridge regression (no intercept: the exported router has
  no bias) from the MLP's input onto each expert's output norm, so the router scores the experts by how much
  they would add.
* :func:`moefy` (dense -> MoE in place), :func:`upcycle` (experts copied from one or several dense models),
  :func:`set_routing` / :func:`set_top_k`, :func:`routing_stats` (load per expert, entropy),
  :func:`load_balancing_loss` (Switch Transformer, Fedus et al. 2021, Eq. 4-6; the same quantity as
  ``transformers``' ``load_balancing_loss_func``), :func:`router_loss_fn` (next-token loss plus that term, for
  router-only training with :func:`utils.train`), :func:`top1_routing` (where each token's first choice goes) and
  :func:`capacity_factor` (how uneven that is), :func:`active_parameters`.
* :func:`to_qwen2_moe` / :func:`save_moe` (and :func:`compare_logits` to check a reload) — the same model as a
  plain ``transformers`` Qwen2-MoE (``qkv_bias=False`` reproduces Llama attention; blocks that stay dense are
  ``mlp_only_layers``; the shared expert's sigmoid gate gets a zero weight, so it is exactly 1/2, and the shared
  expert's ``down_proj`` is doubled). It reloads with ``AutoModelForCausalLM.from_pretrained`` and no custom
  code. It computes the ``combine="softmax"`` rule (the only one ``transformers`` has), so that is the mode to
  export and compare. With its default grouped experts kernel, ``transformers`` rounds the last bits differently from
  :class:`GLUMoE`'s loop, and top-k routing can turn that into a swapped expert for a nearly tied token;
  ``from_pretrained(folder, experts_implementation="eager")`` loops over the experts as we do.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_tensors
from .evaluation import count_parameters
from .precision import device_of
from .structure import decoder_blocks, glu_mlps
from .training import causal_lm_loss
from .width import GRAM_BUDGET_BYTES, activation_grams, layer_groups

COMBINES: tuple[str, ...] = ("sum", "softmax")
SELECTIONS: tuple[str, ...] = ("router", "oracle")
#: Ridge strength of :func:`fit_routers`, relative to the mean diagonal of ``X^T X``.
DEFAULT_ROUTER_DAMPING = 1e-2
#: Model types whose attention a Qwen2-MoE with ``qkv_bias=False`` reproduces exactly.
EXPORTABLE_TYPES: tuple[str, ...] = ("llama",)


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


# --- partitioning ----------------------------------------------------------------------------------

def coactivation(gram: torch.Tensor) -> torch.Tensor:
    """``|cos|`` between neurons' activation vectors over the calibration tokens, from their Gram matrix.

    ``gram[i, j] = sum_t a_i(t) a_j(t)`` (:func:`utils.activation_grams`); the result is
    ``|G_ij| / sqrt(G_ii G_jj)``, 1 on the diagonal. The absolute value counts two neurons as firing together
    whether their activations share a sign or not: either way both are large on the same tokens.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [neurons, neurons] matrix, got shape {tuple(gram.shape)}.")
    g = gram.double()
    norms = g.diagonal().clamp_min(1e-12).sqrt()
    return (g.abs() / norms[:, None] / norms[None, :]).float()


def _sinkhorn_balanced(scores: torch.Tensor, per_expert: int, *, temperature: float = 0.3,
                       iters: int = 50) -> torch.Tensor:
    """Hard balanced assignment (``per_expert`` neurons each) that follows ``scores`` [neurons, experts].

    A transport plan with uniform marginals (Sinkhorn iterations on ``scores`` in units of their standard
    deviation, divided by ``temperature``), rounded one expert at a time: the expert with the most confident
    column first takes its ``per_expert`` best free neurons. On tiny-profile Gram matrices the clustering hardly
    changed between temperatures 0.03 and 1.
    """
    n, experts = scores.shape
    log_p = (scores - scores.mean()) / (scores.std().clamp_min(1e-12) * temperature)
    for _ in range(iters):  # rows sum to 1, columns to per_expert (log domain)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + math.log(per_expert)
    assign = torch.full((n,), -1, dtype=torch.long)
    for e in torch.argsort(log_p.max(dim=0).values, descending=True).tolist():  # one expert at a time
        free = (assign < 0).nonzero().flatten()
        take = free[torch.topk(log_p[free, e], per_expert).indices]
        assign[take] = e
    return assign


def partition_neurons(gram: torch.Tensor, num_experts: int, *, method: str = "coactivation", shared: int = 0,
                      seed: int = 0, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one layer's neurons into ``num_experts`` equal groups (plus ``shared`` always-on neurons).

    Args:
        gram: the layer's activation Gram matrix ``[intermediate, intermediate]`` (:func:`utils.activation_grams`).
            Its diagonal (activation energy) picks the shared neurons; its off-diagonal drives the clustering.
        num_experts: ``E``; ``intermediate - shared`` must be a multiple of it (equal experts, as
            ``transformers`` MoE layers need).
        method: ``"coactivation"`` (balanced k-means on :func:`coactivation`) or ``"random"`` (a seeded shuffle).
        shared: neurons of the shared expert: the ``shared`` neurons with the largest activation energy.
        seed: seeds the random split and the clustering's random start.
        iters: k-means iterations.

    Returns:
        ``(experts, shared_index)``: a ``[E, m]`` tensor of sorted neuron indices per expert, and the sorted
        indices of the shared neurons (empty when ``shared=0``).
    """
    if method not in ("coactivation", "random"):
        raise ValueError(f"method must be 'coactivation' or 'random', got {method!r}.")
    width = gram.shape[0]
    _check_int("num_experts", num_experts, 1)
    _check_int("shared", shared, 0)
    routed = width - shared
    if routed < num_experts:
        raise ValueError(f"{width} neurons minus {shared} shared leave {routed}: fewer than {num_experts} experts.")
    if routed % num_experts:
        divisors = [d for d in range(2, min(routed, 64) + 1) if routed % d == 0]
        raise ValueError(f"{routed} routed neurons ({width} - {shared} shared) do not split into {num_experts} "
                         f"equal experts: choose num_experts among {divisors[:12]} or change shared.")
    per_expert = routed // num_experts
    energy = gram.diagonal().float()
    shared_index = torch.topk(energy, shared).indices.sort().values if shared else torch.empty(0, dtype=torch.long)
    is_routed = torch.ones(width, dtype=torch.bool)
    is_routed[shared_index] = False
    routed_index = is_routed.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    assign = torch.arange(routed) % num_experts
    assign = assign[torch.randperm(routed, generator=generator)]
    if method == "coactivation" and num_experts > 1:
        sim = coactivation(gram)[routed_index][:, routed_index]
        sim.fill_diagonal_(0.0)
        for _ in range(iters):
            members = F.one_hot(assign, num_experts).float()  # [routed, E]
            scores = sim @ members / per_expert  # mean co-activation with each expert's current members
            new = _sinkhorn_balanced(scores, per_expert)
            if torch.equal(new, assign):
                break
            assign = new
    experts = torch.stack([routed_index[(assign == e).nonzero().flatten()] for e in range(num_experts)])
    return experts.sort(dim=1).values, shared_index


def gram_matrices(model: nn.Module, dataloader: Iterable, *, layers: Iterable[int] | None = None,
                  progress: bool = True) -> dict[int, torch.Tensor]:
    """:func:`utils.activation_grams` for many layers, a group of layers per pass so that the matrices held on
    the model's device stay under ``utils.width.GRAM_BUDGET_BYTES`` (as :func:`utils.prune_glu` does).
    Returns ``{layer: G}`` on the CPU."""
    mlps = glu_mlps(model)
    chosen = list(range(len(mlps))) if layers is None else sorted({int(i) for i in layers})
    grams: dict[int, torch.Tensor] = {}
    for group in layer_groups([mlps[i] for i in chosen], GRAM_BUDGET_BYTES):
        grams.update(activation_grams(model, dataloader, layers=[chosen[j] for j in group], progress=progress))
    return grams


def within_expert_coactivation(gram: torch.Tensor, experts: torch.Tensor) -> float:
    """Mean :func:`coactivation` between two different neurons of the same expert (higher = tighter experts)."""
    sim = coactivation(gram)
    total, pairs = 0.0, 0
    for members in experts:
        block = sim[members][:, members]
        total += float(block.sum() - block.diagonal().sum())
        pairs += members.numel() * (members.numel() - 1)
    return total / max(pairs, 1)


# --- the expert layer -------------------------------------------------------------------------------

class GLUMoE(nn.Module):
    """A mixture of GLU experts with a linear router (see the module docstring for the two combine rules).

    Weights: ``gate_proj``/``up_proj`` ``[E, m, hidden]``, ``down_proj`` ``[E, hidden, m]``,
    ``router`` an ``nn.Linear(hidden, E, bias=False)``, and an optional ``shared`` GLU that always runs with
    weight 1. ``top_k``, ``combine``, ``temperature``, ``scale_by_k``, ``selection`` and ``noise_std`` (Gaussian
    noise on the router logits while training) are plain attributes; :func:`set_routing` changes them.
    ``last_router_logits`` holds the latest forward's ``[tokens, E]`` logits when ``keep_logits`` is true
    (for :func:`load_balancing_loss`).
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, top_k: int,
                 act_fn: nn.Module, shared: nn.Module | None = None, router: nn.Linear | None = None,
                 combine: str = "sum", temperature: float = 1.0, scale_by_k: bool = True):
        super().__init__()
        experts, m, hidden = gate.shape
        if up.shape != gate.shape or down.shape != (experts, hidden, m):
            raise ValueError(f"Expert weights disagree: gate {tuple(gate.shape)}, up {tuple(up.shape)}, down "
                             f"{tuple(down.shape)} (expected [E, m, hidden] twice and [E, hidden, m]).")
        self.num_experts, self.expert_size, self.hidden_size = experts, m, hidden
        self.gate_proj = nn.Parameter(gate.detach().clone())
        self.up_proj = nn.Parameter(up.detach().clone())
        self.down_proj = nn.Parameter(down.detach().clone())
        self.act_fn = act_fn
        self.shared = shared
        self.router = router if router is not None else nn.Linear(hidden, experts, bias=False,
                                                                  device=gate.device, dtype=gate.dtype)
        if self.router.bias is not None or self.router.weight.shape != (experts, hidden):
            raise ValueError(f"router must be nn.Linear({hidden}, {experts}, bias=False).")
        self.top_k = _check_top_k(top_k, experts)
        self.combine = _check_choice("combine", combine, COMBINES)
        self.temperature = _check_temperature(temperature)
        self.scale_by_k = bool(scale_by_k)
        self.selection = "router"
        self.noise_std = 0.0
        self.keep_logits = False
        self.last_router_logits: torch.Tensor | None = None
        self._records: list | None = None

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, expert_size={self.expert_size}, top_k={self.top_k}, "
                f"combine={self.combine!r}, shared={self.shared is not None}")

    def active_expert_parameters(self) -> int:
        """Expert weights one token multiplies with: ``top_k`` experts' gate, up and down matrices."""
        return 3 * self.expert_size * self.hidden_size * self.top_k

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output for flat tokens ``x`` [N, hidden] -> ``[N, E, hidden]``."""
        h = self.act_fn(torch.einsum("nh,emh->nem", x, self.gate_proj)) * torch.einsum("nh,emh->nem", x, self.up_proj)
        return torch.einsum("nem,ehm->neh", h, self.down_proj)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [N, E], selected [N, k], weights [N, k])`` for flat tokens ``x``."""
        logits = self.router(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        if self.selection == "oracle":
            if self.combine != "sum":
                raise ValueError("The oracle selection only goes with combine='sum'.")
            with torch.no_grad():
                norms = self.expert_outputs(x).norm(dim=-1)
            selected = torch.topk(norms, self.top_k, dim=-1).indices
            return logits, selected, torch.ones(selected.shape, dtype=x.dtype, device=x.device)
        if self.combine == "sum":
            selected = torch.topk(logits, self.top_k, dim=-1).indices
            return logits, selected, torch.ones(selected.shape, dtype=x.dtype, device=x.device)
        # the router weight divided by T, exactly as the exported Qwen2-MoE router computes it
        if self.temperature == 1.0 or (self.training and self.noise_std > 0):
            scaled = logits / self.temperature
        else:
            scaled = F.linear(x, self.router.weight / self.temperature)
        probs = torch.softmax(scaled.float(), dim=-1)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scale_by_k:
            weights = weights * self.top_k
        return logits, selected, weights.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, selected, weights = self.route(x)
        if self.keep_logits:
            self.last_router_logits = logits
        if self._records is not None:
            self._records.append(selected.detach().cpu())
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            if self.top_k == self.num_experts:
                rows, slot = None, (selected == e).float().argmax(dim=-1)
                w = weights.gather(1, slot[:, None])
                xs = x
            else:
                rows, slot = (selected == e).nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                w = weights[rows, slot][:, None]
                xs = x[rows]
            y = F.linear(self.act_fn(F.linear(xs, self.gate_proj[e])) * F.linear(xs, self.up_proj[e]),
                         self.down_proj[e]) * w
            out = out + y if rows is None else out.index_add(0, rows, y)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


def _check_top_k(k, experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ValueError(f"top_k must be an integer between 1 and the number of experts ({experts}), got {k!r}.")
    return k


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"temperature must be a positive finite number, got {value!r}.")
    return float(value)


def moe_layers(model: nn.Module) -> dict[int, GLUMoE]:
    """``{block index: GLUMoE}`` for every block whose MLP is a :class:`GLUMoE` (empty for a dense model)."""
    return {i: b.mlp for i, b in enumerate(decoder_blocks(model)) if isinstance(getattr(b, "mlp", None), GLUMoE)}


def _require_moe(model: nn.Module) -> dict[int, GLUMoE]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError("The model has no GLUMoE layer: build one with utils.moe.moefy(...) or "
                         "utils.moe.upcycle(...).")
    return layers


def _glu_slice(mlp: nn.Module, index: torch.Tensor) -> nn.Module:
    """A copy of a GLU MLP that keeps only the neurons ``index``."""
    part = copy.deepcopy(mlp)
    idx = index.to(mlp.gate_proj.weight.device)
    with torch.no_grad():
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            old = getattr(mlp, name)
            weight = old.weight.detach().index_select(dim, idx)
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight)
            setattr(part, name, new)
    return part


def _check_glu_model(model: nn.Module, layers: Iterable[int] | None) -> tuple[list[nn.Module], list[int]]:
    mlps = glu_mlps(model)  # raises a clear error for GPT-2-style MLPs
    blocks = decoder_blocks(model)
    if len(mlps) != len(blocks) or any(getattr(b, "mlp", None) is not m for b, m in zip(blocks, mlps)):
        raise ValueError("Every decoder block needs a GLU MLP at block.mlp (dense, not already split into experts).")
    chosen = list(range(len(blocks))) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad or not chosen:
        raise ValueError(f"layers must be block indices in 0..{len(blocks) - 1}, got {bad or 'none'}.")
    return mlps, chosen


@torch.no_grad()
def moefy(model: nn.Module, num_experts: int, top_k: int, *, dataloader: Iterable | None = None,
          layers: Iterable[int] | None = None, method: str = "coactivation", shared: int = 0, router: str = "ridge",
          damping: float = DEFAULT_ROUTER_DAMPING, grams: dict[int, torch.Tensor] | None = None, seed: int = 0,
          progress: bool = True) -> dict:
    """Split the GLU MLP of each chosen block into ``num_experts`` experts, in place (dense -> MoE).

    Args:
        num_experts, top_k: ``E`` equal experts per block, ``k`` of them run per token (``combine="sum"``).
        dataloader: calibration batches; needed for ``method="coactivation"``, for ``shared > 0`` and for
            the ridge router. Two passes: one for the activation Gram matrices, one for the router.
        layers: block indices to split (default: all).
        method: ``"coactivation"`` or ``"random"`` (:func:`partition_neurons`).
        shared: neurons per block kept in an always-on shared expert.
        router: ``"ridge"`` (:func:`fit_routers`) or ``"zeros"`` (no router yet: ties; only sensible at k = E).
        grams: activation Gram matrices already measured on this dense model (``{layer: G}``, e.g. the
            ``"grams"`` another ``moefy`` call returned): skips that calibration pass.

    Returns:
        ``{"partitions": {layer: experts [E, m]}, "shared": {layer: indices}, "grams": {layer: G},
        "router_r2": {layer: R^2 of the ridge router}}`` (the Gram matrices are kept so a notebook can measure
        the clustering and reuse them; they are CPU float32 tensors, 268 MB per block of Llama-3.2-1B: delete
        them once they are no longer read; empty when none were measured or given, e.g. a random split).
    """
    mlps, chosen = _check_glu_model(model, layers)
    _check_int("num_experts", num_experts, 1)
    _check_top_k(top_k, num_experts)
    _check_choice("router", router, ("ridge", "zeros"))
    width = mlps[chosen[0]].gate_proj.out_features
    if (width - shared) % num_experts:
        partition_neurons(torch.eye(width), num_experts, shared=shared)  # raises the explanatory error
    needs_grams = (method == "coactivation" or shared > 0) and grams is None
    if (needs_grams or router == "ridge") and dataloader is None:
        raise ValueError("moefy needs dataloader= (calibration batches, e.g. utils.make_dataloader("
                         "utils.load_texts('wikitext', n=32), tokenizer)) for the co-activation clustering, "
                         "the shared neurons and the ridge router; or use method='random', shared=0, router='zeros'.")
    if needs_grams:
        grams = gram_matrices(model, dataloader, layers=chosen, progress=progress)
    elif grams is None:  # a random split reads only the width: a zero-stride stand-in, not 16 x 268 MB of identity
        grams = {}
        stand_in = {i: torch.ones(1, 1).expand(mlps[i].gate_proj.out_features, -1) for i in chosen}
    elif any(i not in grams or grams[i].shape[0] != mlps[i].gate_proj.out_features for i in chosen):
        raise ValueError("grams must hold one [intermediate, intermediate] matrix for every chosen layer.")
    parts, shared_idx = {}, {}
    for i in chosen:
        gram = grams[i] if grams else stand_in[i]
        parts[i], shared_idx[i] = partition_neurons(gram, num_experts, method=method, shared=shared, seed=seed + i)
    blocks = decoder_blocks(model)
    for i in chosen:
        mlp = mlps[i]
        experts = parts[i].to(mlp.gate_proj.weight.device)
        gate = mlp.gate_proj.weight[experts]  # [E, m, hidden]
        up = mlp.up_proj.weight[experts]
        down = mlp.down_proj.weight[:, experts].permute(1, 0, 2)  # [E, hidden, m]
        shared_mlp = _glu_slice(mlp, shared_idx[i]) if shared else None
        blocks[i].mlp = GLUMoE(gate, up, down, top_k=top_k, act_fn=mlp.act_fn, shared=shared_mlp)
        if router == "zeros":
            nn.init.zeros_(blocks[i].mlp.router.weight)
    r2 = fit_routers(model, dataloader, damping=damping, progress=progress) if router == "ridge" else {}
    return {"partitions": parts, "shared": shared_idx, "grams": grams, "router_r2": r2}


@contextmanager
def _capture_moe_inputs(model: nn.Module, layers: dict[int, GLUMoE], consume):
    handles = []

    def make_hook(index):
        def hook(module, args):
            consume(index, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    for i, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(make_hook(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fit_routers(model: nn.Module, dataloader: Iterable, *, damping: float = DEFAULT_ROUTER_DAMPING,
                progress: bool = True) -> dict[int, float]:
    """Fit every :class:`GLUMoE` router by ridge regression onto the experts' output norms; in place.

    For the MLP input ``x`` of each real token (padding excluded) and each expert's output norm
    ``y_e = ||f_e(x)||``, solves ``W = argmin sum_t ||W x_t - y_t||^2 + lambda ||W||^2`` in closed form
    from the accumulated ``X^T X`` and ``X^T Y`` (``lambda = damping * mean diag(X^T X)``). No intercept:
    the exported router (Qwen2-MoE's) has no bias. The routers see the model as it is (e.g. earlier layers
    already split), one pass over ``dataloader``.

    Returns:
        ``{layer: R^2}``: the share of the variance of the norms the fitted router explains on the same tokens.
    """
    layers = _require_moe(model)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ValueError(f"damping must be a positive number, got {damping!r}.")
    device = device_of(model)
    stats = {i: {"xtx": 0.0, "xty": 0.0, "yty": 0.0, "ysum": 0.0, "n": 0} for i in layers}
    state: dict = {}

    def consume(index, x):
        layer = layers[index]
        x = x[state["mask"]].float()
        y = layer.expert_outputs(x.to(layer.gate_proj.dtype)).float().norm(dim=-1)  # [N, E]
        s = stats[index]
        s["xtx"] = s["xtx"] + (x.T @ x).double().cpu()
        s["xty"] = s["xty"] + (x.T @ y).double().cpu()
        s["yty"] = s["yty"] + (y * y).sum(0).double().cpu()
        s["ysum"] = s["ysum"] + y.sum(0).double().cpu()
        s["n"] += y.shape[0]

    was_training = model.training
    model.eval()
    try:
        with _capture_moe_inputs(model, layers, consume):
            for batch in _progress(dataloader, progress, "router fit"):
                ids, mask = batch_tensors(batch, device)
                state["mask"] = mask.reshape(-1).bool()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        model.train(was_training)
    if not stats or next(iter(stats.values()))["n"] == 0:
        raise ValueError("The dataloader gave no token: fit_routers needs calibration batches.")
    r2 = {}
    for i, s in stats.items():
        xtx, xty = s["xtx"], s["xty"]
        ridge = damping * xtx.diagonal().mean().clamp_min(1e-12)
        w = torch.linalg.solve(xtx + ridge * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty)  # [hidden, E]
        layer = layers[i]
        layer.router.weight.copy_(w.T.to(layer.router.weight.dtype))
        residual = s["yty"] - 2 * (w * xty).sum(0) + (w * (xtx @ w)).sum(0)  # sum of squared errors per expert
        total = s["yty"] - s["ysum"] ** 2 / s["n"]
        r2[i] = float(1 - residual.sum() / total.sum().clamp_min(1e-12))
    return r2


def _progress(iterable, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)


def set_routing(model: nn.Module, *, top_k: int | None = None, combine: str | None = None,
                temperature: float | None = None, scale_by_k: bool | None = None, selection: str | None = None,
                noise_std: float | None = None) -> nn.Module:
    """Change how every :class:`GLUMoE` of ``model`` routes (only the arguments given); returns the model."""
    layers = _require_moe(model)
    for layer in layers.values():
        if top_k is not None:
            layer.top_k = _check_top_k(top_k, layer.num_experts)
        if combine is not None:
            layer.combine = _check_choice("combine", combine, COMBINES)
        if temperature is not None:
            layer.temperature = _check_temperature(temperature)
        if scale_by_k is not None:
            layer.scale_by_k = bool(scale_by_k)
        if selection is not None:
            layer.selection = _check_choice("selection", selection, SELECTIONS)
        if noise_std is not None:
            if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or noise_std < 0:
                raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}.")
            layer.noise_std = float(noise_std)
    return model


@torch.no_grad()
def calibrate_temperature(model: nn.Module, dataloader: Iterable, *, deviation: float = 0.01) -> dict[int, float]:
    """Set each :class:`GLUMoE`'s temperature so that the softmax rule's weights stay near the sum rule's.

    With ``combine="softmax"`` and ``scale_by_k``, a selected expert's weight is ``k * softmax`` over the
    top-k logits divided by ``T``; it differs from 1 by about the spread of those logits over ``T``. Per layer,
    ``T`` = the mean spread (largest minus smallest of the top-k logits, real tokens of ``dataloader``) divided
    by ``deviation``. Much larger temperatures make the probabilities so close that float32 rounding starts to
    reorder near-ties, so the selection would no longer be the router's. Returns ``{layer: T}``.
    """
    layers = _require_moe(model)
    if isinstance(deviation, bool) or not isinstance(deviation, (int, float)) or not 0 < deviation < 1:
        raise ValueError(f"deviation must be a number between 0 and 1 (e.g. 0.01), got {deviation!r}.")
    device = device_of(model)
    spread = dict.fromkeys(layers, 0.0)
    count = 0
    with keep_router_logits(model) as ordered:
        for batch in dataloader:
            ids, mask = batch_tensors(batch, device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.reshape(-1).bool()
            count += int(real.sum())
            for i, layer in zip(sorted(layers), ordered):
                top = torch.topk(layer.last_router_logits[real].float(), layer.top_k, dim=-1).values
                spread[i] += float((top[:, 0] - top[:, -1]).sum())
    if count == 0:
        raise ValueError("The dataloader gave no token: calibrate_temperature needs a few batches.")
    temps = {}
    for i, layer in layers.items():
        temps[i] = max(spread[i] / count / deviation, 1e-6) if layer.top_k > 1 else 1.0
        layer.temperature = temps[i]
    return temps


def set_top_k(model: nn.Module, k: int) -> nn.Module:
    """Run ``k`` experts per token in every :class:`GLUMoE` (1 <= k <= E); returns the model."""
    return set_routing(model, top_k=k)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The router weights of every :class:`GLUMoE` (what router training optimises)."""
    return [layer.router.weight for layer in _require_moe(model).values()]


@contextmanager
def keep_router_logits(model: nn.Module):
    """Within the block, each :class:`GLUMoE` keeps its latest ``[tokens, E]`` router logits (with gradient)."""
    layers = _require_moe(model)
    for layer in layers.values():
        layer.keep_logits = True
    try:
        yield [layers[i] for i in sorted(layers)]
    finally:
        for layer in layers.values():
            layer.keep_logits = False
            layer.last_router_logits = None


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over all layers: ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of (token, layer) top-k picks that go to expert ``e`` (each token makes ``top_k``
    picks, so the shares sum to ``top_k``) and ``P_e`` the mean router probability of ``e``; padding tokens
    (``attention_mask == 0``) are left out. It is smallest (``top_k``) when both are uniform. Gradients flow
    through ``P_e`` only (the counts are not differentiable).

    Args:
        router_logits: one ``[batch * seq, E]`` tensor per MoE layer (:func:`keep_router_logits`).
        top_k: experts per token.
        attention_mask: ``[batch, seq]``, the same for every layer.
    """
    if isinstance(router_logits, torch.Tensor) or not router_logits:
        raise ValueError("router_logits must be a non-empty list with one [tokens, experts] tensor per layer.")
    experts = router_logits[0].shape[-1]
    _check_top_k(top_k, experts)
    logits = torch.cat([r.reshape(-1, experts) for r in router_logits]).float()
    probs = torch.softmax(logits, dim=-1)
    picks = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, experts).sum(dim=1).float()  # [rows, E]
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], device=logits.device)
    else:
        flat = attention_mask.reshape(-1).float().to(logits.device)
        if flat.numel() * len(router_logits) != logits.shape[0]:
            raise ValueError(f"attention_mask has {flat.numel()} positions but each layer's logits have "
                             f"{logits.shape[0] // len(router_logits)} rows: pass the batch's mask.")
        weight = flat.repeat(len(router_logits))
    total = weight.sum().clamp_min(1.0)
    share = (picks * weight[:, None]).sum(0) / total
    mean_prob = (probs * weight[:, None]).sum(0) / total
    return experts * (share * mean_prob).sum()


@torch.no_grad()
def routing_stats(model: nn.Module, dataloader: Iterable, *, progress: bool = False) -> dict:
    """Where the tokens of ``dataloader`` go, per MoE layer (padding excluded).

    Returns:
        ``{"layers": [block indices], "load": [L, E] share of the picks per expert (rows sum to 1),
        "entropy": [L] entropy of each row in bits, "max_entropy": log2(E), "tokens": real tokens seen}``.
    """
    layers = _require_moe(model)
    order = sorted(layers)
    device = device_of(model)
    counts = torch.zeros(len(order), layers[order[0]].num_experts, dtype=torch.float64)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in _progress(dataloader, progress, "routing"):
            ids, mask = batch_tensors(batch, device)
            for layer in layers.values():
                layer._records = []
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.reshape(-1).bool().cpu()
            tokens += int(real.sum())
            for row, i in enumerate(order):
                picks = layers[i]._records[-1][real]
                counts[row] += torch.bincount(picks.reshape(-1), minlength=counts.shape[1]).double()
    finally:
        for layer in layers.values():
            layer._records = None
        model.train(was_training)
    load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(load * torch.log2(load.clamp_min(1e-12))).sum(dim=1)
    return {"layers": order, "load": load.float(), "entropy": entropy.float(),
            "max_entropy": math.log2(counts.shape[1]), "tokens": tokens}


def top1_routing(model: nn.Module, dataloader: Iterable, *, progress: bool = False) -> dict:
    """:func:`routing_stats` with every :class:`GLUMoE` picking one expert per token (its top-1 choice).

    Where each token's *first* choice goes, whatever ``top_k`` the model runs with (with ``top_k = E`` every
    expert would get an equal share of the picks); each layer's ``top_k`` is restored afterwards. Read
    ``load[:, e]`` for the share of the tokens whose first choice is expert ``e``, per MoE layer (CH09_NB03).
    """
    layers = _require_moe(model)
    before = {i: layer.top_k for i, layer in layers.items()}
    try:
        set_top_k(model, 1)
        return routing_stats(model, dataloader, progress=progress)
    finally:
        for i, layer in layers.items():
            layer.top_k = before[i]


def capacity_factor(load: torch.Tensor) -> torch.Tensor:
    """The smallest capacity factor at which no token would be dropped, per MoE layer: ``E * max_e load[:, e]``.

    Switch Transformer (Fedus et al., 2021) gives each expert room for ``capacity_factor * tokens / E`` tokens
    and drops the overflow. ``load`` is a ``[layers, E]`` table of shares whose rows sum to 1 (e.g.
    ``top1_routing(...)["load"]``); 1.0 means perfectly even routing, ``E`` means one expert takes every token.
    """
    if not isinstance(load, torch.Tensor) or load.dim() != 2 or load.shape[1] < 1:
        raise ValueError("load must be a [layers, experts] tensor of routing shares, e.g. "
                         "utils.moe.top1_routing(model, dataloader)['load'].")
    return load.shape[1] * load.float().max(dim=1).values


def router_loss_fn(balance_weight: float = 0.01, top_k: int = 1) -> Callable[[nn.Module, dict], tuple]:
    """The loss of router training in CH09_NB02 and CH09_NB03: next-token loss plus
    ``balance_weight`` times :func:`load_balancing_loss` over every :class:`GLUMoE`, as a ``loss_fn(model, batch)``
    for :func:`utils.train`.

    It returns ``(loss, {"lm": ..., "balance": ...})`` so the history logs both parts. ``top_k`` is the number of
    picks per token the balancing term counts (1: the first choice, what top-1 inference will run).
    """
    if isinstance(balance_weight, bool) or not isinstance(balance_weight, (int, float)) or balance_weight < 0:
        raise ValueError(f"balance_weight must be a number >= 0 (e.g. 0.01), got {balance_weight!r}.")
    _check_int("top_k", top_k, 1)

    def loss_fn(model: nn.Module, batch: dict):
        with keep_router_logits(model) as layers:
            lm = causal_lm_loss(model, batch)
            balance = load_balancing_loss([layer.last_router_logits for layer in layers], top_k,
                                          batch.get("attention_mask"))
        return lm + balance_weight * balance, {"lm": float(lm.detach()), "balance": float(balance.detach())}

    return loss_fn


def active_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total", "active", "experts"}``: parameters in all, those one token uses, and those in routed experts.

    A token runs ``top_k`` of the ``E`` experts in each :class:`GLUMoE` (plus its router and shared expert);
    every other parameter is used by every token. Embeddings count once (like :func:`utils.count_parameters`).
    """
    total = count_parameters(model)
    idle, in_experts = 0, 0
    for layer in moe_layers(model).values():
        per_expert = (layer.gate_proj.numel() + layer.up_proj.numel() + layer.down_proj.numel()) // layer.num_experts
        in_experts += per_expert * layer.num_experts
        idle += per_expert * (layer.num_experts - layer.top_k)
    return {"total": total, "active": total - idle, "experts": in_experts}


@torch.no_grad()
def upcycle(model: nn.Module, layers: Iterable[int], sources: Sequence[nn.Module], *, top_k: int = 1,
            noise_std: float = 0.0, seed: int = 0) -> nn.Module:
    """Replace the MLP of each chosen block by a :class:`GLUMoE` whose expert ``e`` copies ``sources[e]``'s MLP.

    ``sources`` are models of the same architecture (e.g. the model itself and a copy fine-tuned on another
    domain); ``len(sources)`` experts per block. The router starts at zero (every expert equally likely), with
    ``combine="softmax"`` and ``scale_by_k=False``: at ``top_k = E`` the layer is a soft, convex mix of the
    experts, so identical experts reproduce the dense model exactly. In place; returns the model.
    """
    if isinstance(sources, nn.Module) or not sources:
        raise ValueError("sources must be a list of models, one per expert (e.g. [model, finetuned_copy]).")
    _, chosen = _check_glu_model(model, layers)
    source_mlps = []
    for s in sources:
        mlps = glu_mlps(s)
        if len(mlps) != len(glu_mlps(model)):
            raise ValueError("Every source must have the same number of blocks as the model.")
        source_mlps.append(mlps)
    _check_top_k(top_k, len(sources))
    blocks = decoder_blocks(model)
    torch.manual_seed(seed)
    for i in chosen:
        mlps = [m[i] for m in source_mlps]
        shapes = {tuple(m.gate_proj.weight.shape) for m in mlps}
        if len(shapes) != 1:
            raise ValueError(f"Block {i}: the sources' MLPs have different shapes {sorted(shapes)}.")
        dense = blocks[i].mlp
        device = dense.gate_proj.weight.device
        gate = torch.stack([m.gate_proj.weight.detach().to(device) for m in mlps])
        up = torch.stack([m.up_proj.weight.detach().to(device) for m in mlps])
        down = torch.stack([m.down_proj.weight.detach().to(device) for m in mlps])
        layer = GLUMoE(gate, up, down, top_k=top_k, act_fn=dense.act_fn, combine="softmax", scale_by_k=False)
        nn.init.zeros_(layer.router.weight)
        layer.noise_std = float(noise_std)
        blocks[i].mlp = layer
    return model


# --- export to transformers ----------------------------------------------------------------------

def _export_plan(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in EXPORTABLE_TYPES:
        raise ValueError(f"Export supports {', '.join(EXPORTABLE_TYPES)} models (Llama attention = Qwen2-MoE "
                         f"attention without q/k/v bias); got model_type={model_type!r}.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("The model has attention or MLP biases, which Qwen2-MoE's o_proj / experts lack.")
    layers = _require_moe(model)
    first = next(iter(layers.values()))
    shared_sizes = {layer.shared.gate_proj.out_features if layer.shared is not None else 0 for layer in layers.values()}
    keys = {(layer.num_experts, layer.expert_size, layer.top_k) for layer in layers.values()}
    if len(keys) != 1 or len(shared_sizes) != 1:
        raise ValueError("Every MoE layer must have the same number of experts, expert size, top_k and shared size "
                         f"to export (found {sorted(keys)} and shared sizes {sorted(shared_sizes)}).")
    if any(layer.combine != "softmax" or layer.selection != "router" for layer in layers.values()):
        raise ValueError("transformers' MoE blocks weigh the selected experts by their renormalised softmax "
                         "probabilities: switch to that rule first with utils.moe.set_routing(model, "
                         "combine='softmax', temperature=T) (a large T with scale_by_k=True approaches the "
                         "'sum' rule) and compare that mode with the reloaded model.")
    return {"layers": layers, "experts": first.num_experts, "expert_size": first.expert_size,
            "top_k": first.top_k, "shared": shared_sizes.pop()}


def qwen2_moe_config(model: nn.Module):
    """The ``Qwen2MoeConfig`` describing ``model`` (a Llama whose MLPs are partly :class:`GLUMoE`)."""
    from transformers import Qwen2MoeConfig

    plan = _export_plan(model)
    c = model.config
    n = c.num_hidden_layers
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=n, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings, qkv_bias=False,
        num_experts=plan["experts"], num_experts_per_tok=plan["top_k"], moe_intermediate_size=plan["expert_size"],
        shared_expert_intermediate_size=plan["shared"], norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(n) if i not in plan["layers"]], router_aux_loss_coef=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        use_sliding_window=False)


@torch.no_grad()
def to_qwen2_moe(model: nn.Module) -> nn.Module:
    """The same network as a ``transformers`` ``Qwen2MoeForCausalLM`` (new weights; ``model`` is untouched).

    Attention, norms and embeddings are copied as they are. Per MoE layer: router weight ``/ T``; experts'
    gate and up rows concatenated into ``gate_up_proj``; ``down_proj`` times ``k`` when ``scale_by_k``; the
    shared expert's ``down_proj`` doubled and its gate's weight zero (``sigmoid(0) = 1/2``), or no shared
    neurons at all. Dense blocks keep their MLP (``mlp_only_layers``).
    """
    from transformers import AutoModelForCausalLM

    plan = _export_plan(model)
    config = qwen2_moe_config(model)
    param = next(model.parameters())
    with warnings.catch_warnings():  # a width-0 shared expert warns that initialising it does nothing
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        with torch.device(param.device):  # built where the model is: no second copy in host memory
            out = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, layer in plan["layers"].items():
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = layer.router.weight / layer.temperature
        state[p + "experts.gate_up_proj"] = torch.cat([layer.gate_proj, layer.up_proj], dim=1)
        state[p + "experts.down_proj"] = layer.down_proj * (layer.top_k if layer.scale_by_k else 1)
        state[p + "shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size)
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = p + f"shared_expert.{name}.weight"
            if layer.shared is None:  # no shared neurons: Qwen2-MoE's shared expert has width 0 (adds exactly 0)
                state[key] = out.state_dict()[key]
            else:
                state[key] = getattr(layer.shared, name).weight * (2 if name == "down_proj" else 1)
    for i, block in enumerate(decoder_blocks(model)):
        if i not in plan["layers"]:
            for name in ("gate_proj", "up_proj", "down_proj"):
                state[f"model.layers.{i}.mlp.{name}.weight"] = getattr(block.mlp, name).weight
    missing, unexpected = out.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"Export mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    if config.tie_word_embeddings:
        out.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        out.generation_config = copy.deepcopy(model.generation_config)
    return out.eval()


@torch.no_grad()
def compare_logits(model: nn.Module, other: nn.Module, dataloader: Iterable) -> dict[str, float]:
    """How closely ``other`` reproduces ``model`` (e.g. a reloaded export) on the real tokens of ``dataloader``.

    Both run on their own device; the comparison is made on ``model``'s device in float32, one row of the batch
    at a time (a batch of 8 x 256 tokens of a 128k vocabulary is 1 GB of float32 logits per model: only one
    row of it is converted at once). Pass a few batches: the largest difference and the agreement settle quickly.

    Returns ``{"max_abs_diff": largest |logit difference|, "argmax_agreement": share of tokens whose top
    token is the same, "tokens": real tokens compared}``.
    """
    device = device_of(model)
    other_device = device_of(other)
    largest, agree, total = 0.0, 0, 0
    for batch in dataloader:
        ids, mask = batch_tensors(batch, device)
        a = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        b = other(input_ids=ids.to(other_device), attention_mask=mask.to(other_device), use_cache=False).logits
        b = b.to(a.device)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            if not bool(real.any()):
                continue
            ra, rb = a[row][real].float(), b[row][real].float()
            largest = max(largest, float((ra - rb).abs().max()))
            agree += int((ra.argmax(-1) == rb.argmax(-1)).sum())
            total += int(real.sum())
        del a, b
    if total == 0:
        raise ValueError("The dataloader gave no token to compare.")
    return {"max_abs_diff": largest, "argmax_agreement": agree / total, "tokens": total}


def save_moe(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` as a Qwen2-MoE checkpoint (:func:`to_qwen2_moe`) and ``tokenizer`` to ``folder``.

    Reload it anywhere with ``AutoModelForCausalLM.from_pretrained(folder)`` (or :func:`utils.load_model`).
    """
    folder = Path(folder)
    exported = to_qwen2_moe(model)
    exported.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
