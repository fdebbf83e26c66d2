"""Looking inside a transformer: where the parameters live and what the KV cache costs (CH03)."""

from __future__ import annotations

import torch

from .architectures import ArchSpec

#: Groups used by :func:`parameter_breakdown`, in display order.
PARAMETER_GROUPS = ("embeddings", "attention", "mlp", "norms", "lm_head")


def _group_of(name: str) -> str:
    lowered = name.lower()
    if "embed" in lowered or lowered.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if lowered.startswith("lm_head"):
        return "lm_head"
    if "norm" in lowered or ".ln_" in lowered or lowered.startswith("transformer.ln_f"):
        return "norms"
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "feed_forward" in lowered:
        return "mlp"
    raise ValueError(f"Cannot tell which part of the model parameter {name!r} belongs to.")


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part of the model: embeddings, attention, MLP, norms, untied LM head.

    A tied LM head shares its tensor with the embeddings and is counted there once (the
    ``lm_head`` entry is then 0). Works on ``meta``-device models.
    """
    counts = dict.fromkeys(PARAMETER_GROUPS, 0)
    for name, param in model.named_parameters():  # named_parameters() skips shared tensors
        counts[_group_of(name)] += param.numel()
    return counts


def kv_cache_bytes_per_token(spec: ArchSpec, *, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token costs across ALL layers: ``2 (K and V) x layers x kv_heads x head_dim x bytes``.

    ``bytes_per_value`` is 2 for float16/bfloat16, 4 for float32, 1 for an 8-bit cache.
    """
    return kv_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, bytes_per_value)


def kv_bytes(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: float):
    """The KV-cache formula for one token: ``2 (K and V) x layers x kv_heads x head_dim x bytes``.

    ``num_layers`` counts the attention layers that keep a cache (CH08 removes some).
    """
    if bytes_per_value <= 0:
        raise ValueError("bytes_per_value must be positive (2 for fp16/bf16).")
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value


def kv_cache_bytes(spec: ArchSpec, context_length: int, *, batch_size: int = 1, bytes_per_value: int = 2) -> int:
    """Total KV-cache bytes for ``batch_size`` sequences of ``context_length`` tokens."""
    if context_length < 0 or batch_size < 1:
        raise ValueError("context_length must be >= 0 and batch_size >= 1.")
    return kv_cache_bytes_per_token(spec, bytes_per_value=bytes_per_value) * context_length * batch_size
