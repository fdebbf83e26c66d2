"""LoRA and DoRA from scratch (CH07): the layer, wrapping a model, parameter and size arithmetic.

LoRA (Hu et al., 2021) freezes a Linear layer's weight ``W`` (``out x in``) and learns a
low-rank update ``B @ A`` with ``A``: ``r x in`` and ``B``: ``out x r``::

    y = W x + b + (alpha / r) * B (A x)

``B`` starts at zero, so the wrapped model starts out exactly as the original one; only
``r * (in + out)`` values per layer are trained instead of ``in * out``.

DoRA (Liu et al., 2024) splits the adapted weight into a *direction* and a *magnitude*: each
output row of ``W' = W + (alpha / r) B A`` is normalised to unit length and multiplied by a
learned magnitude ``m`` (one value per output feature, initialised to the row norms of ``W``)::

    y = (m / ||W'||_row) * (W' x) + b

Both match the ``peft`` library's ``LoraConfig(use_dora=False/True)`` layers number for number
(tests/test_lora.py checks it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Names of the projections whose shapes :func:`lora_parameter_count` knows from a config
#: (Llama, Qwen3, Gemma 3, SmolLM2 and the other GLU decoders of the course).
CONFIG_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: File names that hold a saved peft adapter's weights.
ADAPTER_WEIGHT_FILES: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")


def _check_rank_alpha(r, alpha) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"The LoRA rank r must be a positive int (e.g. 8), got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number (the update is scaled by alpha / r), got {alpha!r}.")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (LoRA), optionally DoRA.

    Args:
        base: the layer to adapt; its weight and bias are frozen (``requires_grad=False``).
        r: rank of the update (``A``: ``r x in_features``, ``B``: ``out_features x r``).
        alpha: the update is multiplied by ``scaling = alpha / r``.
        dropout: dropout on the adapter's input (the base path sees the input unchanged).
        dora: learn a per-output-row magnitude as well (DoRA).

    ``A`` is initialised like ``nn.Linear``'s weight (Kaiming-uniform, as peft does) and ``B``
    with zeros, so at initialisation the layer returns exactly what ``base`` returns. Adapter
    parameters are float32 when the base weight is float16/bfloat16 (stable training); the
    adapter's output is cast back to the base's dtype.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear) or type(base).__module__.startswith("bitsandbytes"):
            raise TypeError(f"LoRALinear wraps a plain torch.nn.Linear with float weights, got {type(base).__name__}.")
        _check_rank_alpha(r, alpha)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}.")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling, self.use_dora = r, alpha, alpha / r, bool(dora)
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude = nn.Parameter(self.row_norms().to(dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """The LoRA update ``scaling * B @ A`` (``out x in``), in the adapter's dtype."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def row_norms(self) -> torch.Tensor:
        """L2 norm of each output row of ``W + scaling * B @ A`` (DoRA's denominator), one per output."""
        adapted = self.base.weight.to(self.lora_A.dtype) + self.delta_weight()
        return torch.linalg.vector_norm(adapted, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x_adapter = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(x_adapter, self.lora_A), self.lora_B) * self.scaling
        if not self.use_dora:
            return result + update.to(result.dtype)
        # DoRA. The row norms are treated as a constant during back-propagation (detached), as
        # the DoRA paper (§4.3) and peft do: it saves memory and barely changes the gradient.
        scale = self.lora_magnitude / self.row_norms().detach()
        # (m / n) * (W x + update) + b, written as  base(x) + (m / n - 1) * W x + (m / n) * update,
        # the same arrangement as peft (with dropout active, W x here uses the dropped-out input).
        base_part = F.linear(x_adapter, self.base.weight.to(x_adapter.dtype))
        return result + ((scale - 1) * base_part + scale * update).to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scaling B A`` (LoRA) or ``m / ||W + scaling B A||_row * (W + scaling B A)`` (DoRA)."""
        adapted = self.base.weight.to(self.lora_A.dtype) + self.delta_weight()
        if self.use_dora:
            adapted = adapted * (self.lora_magnitude / self.row_norms()).unsqueeze(1)
        return adapted.to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` that computes the same function (adapter folded into the weight)."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_(self.merged_weight())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}"


# --- finding and wrapping target modules -----------------------------------------------------------

def _as_names(target_modules) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not isinstance(target_modules, Iterable) or isinstance(target_modules, (bytes, dict)):
        raise TypeError("target_modules must be a module name or a list of names, e.g. ['q_proj', 'v_proj'].")
    names = list(target_modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}.")
    return names


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the full name, or its dotted suffix, equals the target."""
    return name == target or name.endswith("." + target)


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)}


def find_target_modules(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` named by ``target_modules`` (full names or last parts).

    Raises:
        ValueError: if a target matches no Linear layer; the message lists the Linear names there are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    targets = _as_names(target_modules)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)
               and any(_matches(name, t) for t in targets)]
    if wrapped:
        raise ValueError(f"{wrapped[0]} (and {len(wrapped) - 1} more) already has a LoRA adapter: merge it first "
                         "(utils.merge_lora) or start again from the model without adapters.")
    linears = _linear_modules(model)
    unknown = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if unknown:
        available = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"No nn.Linear layer is named {', '.join(map(repr, unknown))}. "
                         f"The model's Linear layers are called: {', '.join(available) or '(none)'}.")
    return {name: module for name, module in linears.items() if any(_matches(name, t) for t in targets)}


def apply_lora(model: nn.Module, target_modules: str | Iterable[str], r: int = 8, alpha: float = 16, *,
               dropout: float = 0.0, dora: bool = False) -> dict[str, LoRALinear]:
    """Wrap the named Linear layers of ``model`` in :class:`LoRALinear`, in place.

    Like ``peft.get_peft_model``, every other parameter of the model is frozen, so only the
    adapters train. ``target_modules`` uses peft's matching rule: ``"q_proj"`` matches every
    module whose dotted name ends with ``.q_proj``.

    Returns:
        ``{module name: LoRALinear}`` for every wrapped layer, in model order.

    Raises:
        ValueError: rank or alpha not positive; a target name that matches no Linear layer (the
            message lists the Linear names the model has).
    """
    _check_rank_alpha(r, alpha)
    found = find_target_modules(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, linear in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(linear, r, alpha, dropout, dora)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` of ``model`` by its merged ``nn.Linear``, in place; return ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merge())
    return model


# --- counting -------------------------------------------------------------------------------------

def _projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each standard projection of one decoder block."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = text.hidden_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    inter = text.intermediate_size
    return {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


def lora_parameter_count(model_or_config, r: int, target_modules: str | Iterable[str], *, dora: bool = False) -> int:
    """Trainable parameters that LoRA (or DoRA) adds, in closed form.

    Each adapted ``in -> out`` Linear layer adds ``r * (in + out)`` values (``A`` and ``B``), and
    DoRA adds ``out`` more (the magnitude vector)::

        sum over adapted layers of  r * (in + out) + (out if dora else 0)

    Args:
        model_or_config: a model (the shapes are read from its Linear layers) or a transformers
            config of a GLU decoder (Llama, Qwen3, Gemma 3, SmolLM2...), whose projections
            ``q/k/v/o_proj`` and ``gate/up/down_proj`` are sized from ``hidden_size``,
            ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and
            ``intermediate_size``, once per decoder layer.
        r: the rank; target_modules: as for :func:`apply_lora`.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"The LoRA rank r must be a positive int (e.g. 8), got {r!r}.")
    if isinstance(model_or_config, nn.Module):
        found = find_target_modules(model_or_config, target_modules)
        shapes = [(m.in_features, m.out_features) for m in found.values()]
    elif hasattr(model_or_config, "num_hidden_layers") or hasattr(model_or_config, "get_text_config"):
        targets = _as_names(target_modules)
        unknown = [t for t in targets if t not in CONFIG_PROJECTIONS]
        if unknown:
            raise ValueError(f"From a config, lora_parameter_count knows the projections "
                             f"{', '.join(CONFIG_PROJECTIONS)}; not {', '.join(map(repr, unknown))}. "
                             "Pass the model itself to count any Linear layer.")
        per_block = _projection_shapes(model_or_config)
        text = model_or_config.get_text_config() if hasattr(model_or_config, "get_text_config") else model_or_config
        shapes = [per_block[t] for t in targets] * text.num_hidden_layers
    else:
        raise TypeError("model_or_config must be a torch.nn.Module or a transformers config, "
                        f"got {type(model_or_config).__name__}.")
    return sum(r * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in shapes)


def update_energy_share(update: LoRALinear | torch.Tensor, k: int = 1) -> float:
    """Share of an adapter update's energy held by its ``k`` largest singular values (CH07_NB04).

    The update ``dW = (alpha / r) B A`` has at most ``r`` non-zero singular values ``s_1 >= s_2 >= ...``;
    its energy is ``||dW||_F^2 = sum_i s_i^2``. The result is ``(s_1^2 + ... + s_k^2) / sum_i s_i^2``:
    1.0 for a rank-1 update (or ``k >= r``), close to ``k / r`` when the update spreads evenly over its
    ``r`` directions.

    Args:
        update: a :class:`LoRALinear` (its :meth:`~LoRALinear.delta_weight` is read) or the update matrix itself.
        k: how many leading singular values to count (>= 1).

    Raises:
        ValueError: ``k`` not a positive int; an update that is not a matrix, or is all zeros (``B = 0``: an
            adapter that has not trained yet has no direction to measure).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (how many singular values to count), got {k!r}.")
    if isinstance(update, LoRALinear):
        # B = Q_B R_B and A^T = Q_A R_A, so scaling * B A = Q_B (scaling * R_B R_A^T) Q_A^T: the same singular
        # values as an r x r matrix (milliseconds, where the full out x in matrix takes seconds on a CPU).
        _, r_b = torch.linalg.qr(update.lora_B.detach().double())
        _, r_a = torch.linalg.qr(update.lora_A.detach().double().T)
        update = update.scaling * r_b @ r_a.T
    if not isinstance(update, torch.Tensor) or update.dim() != 2:
        raise ValueError("update must be a LoRALinear or a 2-D update matrix (out_features x in_features).")
    energy = torch.linalg.svdvals(update.detach().double()) ** 2
    total = float(energy.sum())
    if total == 0.0:
        raise ValueError("The update is all zeros (B = 0: the adapter has not trained yet): train it first.")
    return float(energy[:k].sum()) / total


def adapter_size_bytes(source: nn.Module | int | str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes of an adapter's weights.

    Args:
        source: one of
            - a model holding adapters (ours or peft's): the parameters whose name contains
              ``lora_`` (``lora_A``, ``lora_B``, DoRA's magnitude) are counted;
            - a number of adapter parameters (e.g. from :func:`lora_parameter_count`);
            - a folder written by peft's ``save_pretrained`` (or the weight file itself): the size
              on disk of its ``adapter_model.safetensors`` / ``.bin`` (the small JSON config is
              not counted; the safetensors header is).
        dtype: count the weights in this dtype (e.g. ``torch.bfloat16`` for a 16-bit adapter).
            Default: each parameter's own dtype for a model, float32 for a plain count; not used
            for files on disk.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}.")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return path.stat().st_size
        files = [path / name for name in ADAPTER_WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} holds no saved adapter (looked for {', '.join(ADAPTER_WEIGHT_FILES)}); "
                                    "save one with `peft_model.save_pretrained(folder)`.")
        return files[0].stat().st_size
    if isinstance(source, bool):
        raise TypeError("source must be a model, a parameter count or a folder, not a bool.")
    if isinstance(source, int):
        if source < 0:
            raise ValueError(f"A parameter count cannot be negative, got {source}.")
        return source * (dtype or torch.float32).itemsize
    if isinstance(source, nn.Module):
        params = [p for name, p in source.named_parameters() if "lora_" in name]
        if not params:
            raise ValueError("The model holds no adapter parameters (no parameter name contains 'lora_').")
        return sum(p.numel() * (dtype or p.dtype).itemsize for p in params)
    raise TypeError(f"source must be a model, a parameter count or a folder, got {type(source).__name__}.")


def train_lora_adapter(model: nn.Module, dataloader, *, steps: int, rank: int = 8, alpha: float = 16,
                       target_modules: str | Iterable[str] = CONFIG_PROJECTIONS, lr: float = 2e-3,
                       warmup_steps: int = 3, loss_fn=None, seed: int = 0, progress: bool = True,
                       desc: str = "LoRA"):
    """Add a peft LoRA adapter to ``model``, train it for ``steps`` optimizer steps, return ``(peft_model, history)``.

    The recipe of CH07_NB02 in one call, so later chapters (CH12) give two models exactly the same
    adapter budget: ``peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=...)``, seeded
    initialisation, then :func:`utils.train` (AdamW over the adapter's parameters only, warm-up and
    cosine decay) for ``steps`` steps, cycling through ``dataloader`` as many times as needed.

    ``model`` is modified in place (peft wraps its Linear layers): pass ``copy.deepcopy(model)`` to keep
    the original. ``peft_model.merge_and_unload()`` then gives a plain transformers model.

    Args:
        dataloader: training batches, e.g. :func:`utils.extraction.make_sft_dataloader` (labels on the
            answer tokens only) with ``loss_fn=utils.extraction.answer_loss``.
        steps: optimizer steps (>= 1).
        rank, alpha: LoRA rank and scale numerator (scale = alpha / rank).
        target_modules: projection names to adapt (peft's rule: a module whose name ends with one).
        loss_fn: ``loss_fn(model, batch)``; default :func:`utils.causal_lm_loss`.
        seed: seeds the adapter's initialisation (``A`` is random, ``B`` zero).

    Returns:
        The ``peft.PeftModel`` in eval mode and :func:`utils.train`'s history (plus
        ``trainable_parameters``).
    """
    from peft import LoraConfig, get_peft_model

    from .training import train

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (optimizer steps), got {steps!r}.")
    _check_rank_alpha(rank, alpha)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}.")
    try:
        batches = len(dataloader)
    except TypeError:
        raise TypeError("dataloader must have a length and be readable again, as a torch DataLoader or a list of "
                        "batches is: training reads it as many times as `steps` need.") from None
    if batches == 0:
        raise ValueError("dataloader is empty: check the records and max_length (too-long examples are left out).")
    find_target_modules(model, target_modules)  # a clear error for a name that matches no Linear layer
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                  target_modules=list(_as_names(target_modules)),
                                                  task_type="CAUSAL_LM"))
    trainable = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in name for name, _ in trainable):
        raise RuntimeError("peft left parameters other than the adapter's trainable: this should not happen.")
    adapter = [p for _, p in trainable]
    history = train(peft_model, dataloader, loss_fn=loss_fn, max_steps=steps, lr=lr,
                    warmup_steps=min(warmup_steps, steps - 1), params=adapter, progress=progress, desc=desc)
    history["trainable_parameters"] = sum(p.numel() for p in adapter)
    peft_model.eval()
    return peft_model, history
