"""The course models' real architecture facts, in one table.

Every number in :data:`ARCHITECTURES` is a published ``config.json`` value of the model on
the Hugging Face Hub. Three things are built from this table:

* :func:`real_config` — the full-size ``transformers`` config, used by CH03 to build each
  architecture on the ``meta`` device (exact parameter counts and module trees, no weights,
  no download);
* :func:`tiny_config` — the same family and the same number of decoder layers with a tiny
  width, used by the ``tiny`` profile so that layer indices in a notebook mean the same thing;
* the family/layer lookups used by :func:`utils.load_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ArchSpec:
    """Published architecture facts of one model (see the module docstring)."""

    model_id: str
    model_type: str  # transformers ``model_type``: llama, gemma3_text, qwen3, phi3, gpt2
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    max_position_embeddings: int
    mlp: str  # "glu" (gate/up/down) or "mlp" (two matrices)
    norm: str  # "rmsnorm" or "layernorm"
    activation: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_kind(self) -> str:
        """``"MHA"``, ``"GQA"`` or ``"MQA"`` from the number of key/value heads."""
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def expansion_ratio(self) -> float:
        """MLP width divided by model width (intermediate_size / hidden_size)."""
        return self.intermediate_size / self.hidden_size


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    # Gemma 3: five local (sliding-window) layers, then one global layer, repeated.
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_id: spec
    for spec in [
        ArchSpec(
            "distilbert/distilgpt2", "gpt2", 6, 768, 3072, 12, 12, 64, 50257, True, 1024,
            mlp="mlp", norm="layernorm", activation="gelu_new",
        ),
        ArchSpec(
            "meta-llama/Llama-3.2-1B", "llama", 16, 2048, 8192, 32, 8, 64, 128256, True, 131072,
            mlp="glu", norm="rmsnorm", activation="silu",
            extra={"rms_norm_eps": 1e-5, "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}},
        ),
        ArchSpec(
            "meta-llama/Llama-3.2-3B", "llama", 28, 3072, 8192, 24, 8, 128, 128256, True, 131072,
            mlp="glu", norm="rmsnorm", activation="silu",
            extra={"rms_norm_eps": 1e-5, "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}},
        ),
        ArchSpec(
            "google/gemma-3-270m", "gemma3_text", 18, 640, 2048, 4, 1, 256, 262144, True, 32768,
            mlp="glu", norm="rmsnorm", activation="gelu_pytorch_tanh",
            extra={"rms_norm_eps": 1e-6, "sliding_window": 512, "query_pre_attn_scalar": 256,
                   "layer_types": _gemma3_layer_types(18)},
        ),
        ArchSpec(
            "Qwen/Qwen3-0.6B", "qwen3", 28, 1024, 3072, 16, 8, 128, 151936, True, 40960,
            mlp="glu", norm="rmsnorm", activation="silu",
            extra={"rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        ),
        ArchSpec(
            "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 24, 2048, 8192, 32, 32, 64, 49152, True, 8192,
            mlp="glu", norm="rmsnorm", activation="silu",
            extra={"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}},
        ),
        ArchSpec(
            "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", 32, 960, 2560, 15, 5, 64, 49152, True, 8192,
            mlp="glu", norm="rmsnorm", activation="silu",
            extra={"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
        ),
        ArchSpec(
            "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30, 576, 1536, 9, 3, 64, 49152, True, 8192,
            mlp="glu", norm="rmsnorm", activation="silu",
            extra={"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
        ),
        ArchSpec(
            "microsoft/Phi-4-mini-instruct", "phi3", 32, 3072, 8192, 24, 8, 128, 200064, True, 131072,
            mlp="glu", norm="rmsnorm", activation="silu",
            # Phi-4-mini applies rotary embeddings to 3/4 of each head (partial RoPE) and extends
            # its context with LongRoPE; the scaling factors do not change the parameter count.
            extra={"rms_norm_eps": 1e-5, "original_max_position_embeddings": 4096,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.75}},
        ),
    ]
}

#: Model used when an id is not in the table (tiny profile) — a Llama, the most common family.
FALLBACK_MODEL_ID = "meta-llama/Llama-3.2-1B"

#: Width of every tiny model (hidden size) and of each attention head.
TINY_HIDDEN = 64
TINY_HEAD_DIM = 8


def get_spec(model_id: str) -> ArchSpec:
    """Return the :class:`ArchSpec` of a course model.

    Raises:
        KeyError: if ``model_id`` is not in the table; the message lists the known ids.
    """
    if model_id in ARCHITECTURES:
        return ARCHITECTURES[model_id]
    lowered = {key.lower(): key for key in ARCHITECTURES}
    if model_id.lower() in lowered:
        return ARCHITECTURES[lowered[model_id.lower()]]
    raise KeyError(
        f"{model_id!r} is not in the course's architecture table. Known models: "
        + ", ".join(ARCHITECTURES)
    )


def _config_kwargs(spec: ArchSpec, *, hidden: int, intermediate: int, heads: int, kv_heads: int,
                   head_dim: int, vocab: int) -> dict[str, Any]:
    if spec.model_type == "gpt2":
        return dict(n_layer=spec.num_layers, n_embd=hidden, n_head=heads, n_inner=intermediate,
                    vocab_size=vocab, n_positions=spec.max_position_embeddings,
                    activation_function=spec.activation, tie_word_embeddings=spec.tied_embeddings,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kwargs: dict[str, Any] = dict(
        num_hidden_layers=spec.num_layers, hidden_size=hidden, intermediate_size=intermediate,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tied_embeddings,
    )
    if spec.model_type in ("llama", "qwen3", "gemma3_text"):
        kwargs["head_dim"] = head_dim
    if spec.model_type == "gemma3_text":
        kwargs["hidden_activation"] = spec.activation
    else:
        kwargs["hidden_act"] = spec.activation
    kwargs.update({k: v for k, v in spec.extra.items()})
    if spec.model_type == "gemma3_text":
        kwargs["query_pre_attn_scalar"] = head_dim
    return kwargs


def real_config(model_id: str) -> PretrainedConfig:
    """Full-size ``transformers`` config of a course model, built offline from the table."""
    spec = get_spec(model_id)
    kwargs = _config_kwargs(spec, hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                            heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                            vocab=spec.vocab_size)
    return AutoConfig.for_model(spec.model_type, **kwargs)


def tiny_config(model_id: str, vocab_size: int, *, hidden_size: int = TINY_HIDDEN,
                special_token_ids: dict[str, int | None] | None = None) -> PretrainedConfig:
    """A tiny config of the same family and depth as ``model_id``.

    Keeps: family, number of decoder layers, attention kind (MHA/GQA/MQA), MLP expansion
    ratio (rounded to a multiple of 16), tied embeddings, Gemma 3's sliding/full pattern.
    Shrinks: width to ``hidden_size`` (default 64), heads to 8 of 8 dimensions, vocabulary
    to the tiny tokenizer's ``vocab_size``. ``special_token_ids`` (``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``) should come from that tokenizer; ids outside the
    vocabulary are dropped.
    """
    spec = get_spec(model_id)
    if hidden_size % TINY_HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {TINY_HEAD_DIM}, got {hidden_size}.")
    heads = hidden_size // TINY_HEAD_DIM
    group = spec.num_heads // spec.num_kv_heads  # query heads per key/value head
    if spec.attention_kind == "MHA":
        kv_heads = heads
    elif spec.attention_kind == "MQA":
        kv_heads = 1
    else:  # GQA: keep at least two key/value heads, so that it stays grouped-query attention
        kv_heads = max(2, heads // group)
    intermediate = int(16 * math.ceil(hidden_size * spec.expansion_ratio / 16))
    kwargs = _config_kwargs(spec, hidden=hidden_size, intermediate=intermediate, heads=heads,
                            kv_heads=kv_heads, head_dim=TINY_HEAD_DIM, vocab=vocab_size)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = (special_token_ids or {}).get(name)
        kwargs[name] = token_id if token_id is not None and 0 <= token_id < vocab_size else None
    return AutoConfig.for_model(spec.model_type, **kwargs)


def build_on_meta(model_id: str) -> PreTrainedModel:
    """Build the full-size architecture on PyTorch's ``meta`` device: shapes only, no memory, no download.

    Use it to print the module tree and count parameters exactly (``p.numel()`` works on meta
    tensors). The model cannot run a forward pass.
    """
    config = real_config(model_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model
