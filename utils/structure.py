"""Where things are inside a decoder-only model: the accessors every technique module shares.

Each technique (depth, width, attention, distillation, MoE, activations) needs to find the same parts of a
model -- its decoder blocks, the module that owns them, its text config, the norm in front of an MLP, the gated
MLPs -- and to read a block's hidden states from a forward hook. They live here, once, with no dependency on any
other ``utils`` module:

* :func:`decoder_blocks` -- the ``ModuleList`` of decoder blocks (:data:`BLOCK_PATHS` lists where to look);
* :func:`decoder` -- the module that holds those blocks and builds the KV cache (``model.model`` for Llama);
* :func:`text_config` -- the config of the language model (Gemma 3's text config inside a multimodal one);
* :func:`mlp_input_norm` -- the norm whose input is the residual stream after the attention;
* :func:`glu_mlps` -- the gated MLP (``gate_proj``, ``up_proj``, ``down_proj``) of every block;
* :func:`hidden_of` / :func:`output_of` -- the hidden states a block's forward pre-hook / forward hook sees.

Works on the course's Llama, SmolLM2, Gemma 3 (``gemma3_text``), Qwen 3 (``model.model.layers``) and GPT-2
(``model.transformer.h``) models.
"""

from __future__ import annotations

import torch
from torch import nn

#: Where decoder blocks live in the model families we meet (dotted attribute paths), first match wins.
BLOCK_PATHS: tuple[str, ...] = ("model.layers", "model.language_model.layers", "model.decoder.layers",
                                "transformer.h", "gpt_neox.layers", "layers")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks: ``model.model.layers`` (Llama, Gemma 3, Qwen 3, ...)
    or ``model.transformer.h`` (GPT-2); the first of :data:`BLOCK_PATHS` that holds a ``ModuleList``.

    Raises:
        ValueError: if none of :data:`BLOCK_PATHS` leads to a ``ModuleList``.
    """
    for path in BLOCK_PATHS:
        owner = model
        for part in path.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if isinstance(owner, nn.ModuleList):
            return owner
    raise ValueError(f"Cannot find the decoder blocks of {type(model).__name__}: expected model.model.layers "
                     "(Llama, Gemma 3, Qwen 3) or model.transformer.h (GPT-2).")


def decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder blocks and creates the KV cache (``model.model`` for Llama).

    Raises:
        ValueError: if the model has no decoder blocks (see :func:`decoder_blocks`) or no module holds them
        as a direct child.
    """
    blocks = decoder_blocks(model)
    for module in model.modules():
        if any(child is blocks for child in module.children()):
            return module
    raise ValueError(f"Cannot find the module that holds the decoder blocks of {type(model).__name__}.")


def text_config(model: nn.Module):
    """The config of the language model: ``model.config.get_text_config()`` where the config has one (a
    multimodal config holds the text model's inside it), else ``model.config`` itself."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def mlp_input_norm(block: nn.Module) -> nn.Module:
    """The norm in front of a block's MLP: its input is the residual stream after the attention.

    ``pre_feedforward_layernorm`` in Gemma 3 (whose ``post_attention_layernorm`` normalises the attention's
    output), ``post_attention_layernorm`` in Llama, SmolLM2 and Qwen 3.
    """
    return block.pre_feedforward_layernorm if hasattr(block, "pre_feedforward_layernorm") \
        else block.post_attention_layernorm


def glu_mlps(model: nn.Module) -> list[nn.Module]:
    """The gated MLP of every decoder block, in order (modules with gate_proj, up_proj, down_proj).

    Raises:
        ValueError: if the model has no such module (GPT-2's MLP, or Phi-3's fused gate_up_proj).
    """
    mlps = [m for m in model.modules()
            if all(isinstance(getattr(m, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))]
    if not mlps:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        fused = any(hasattr(m, "gate_up_proj") for m in model.modules())
        hint = (" It fuses gate and up into one gate_up_proj: split it into gate_proj/up_proj first."
                if fused else " Use a Llama, Gemma, Qwen or Mistral-style model.")
        raise ValueError(f"Model ({kind}) has no gate_proj; width pruning of GLU MLPs needs separate "
                         f"gate_proj, up_proj and down_proj Linear layers.{hint}")
    return mlps


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block receives, as a forward pre-hook registered ``with_kwargs=True`` sees them:
    the first positional argument, else the ``hidden_states`` keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


def output_of(output) -> torch.Tensor:
    """The hidden states a block returns, as a forward hook sees its output: the tensor itself, or the first
    element of the tuple that older blocks return."""
    return output if isinstance(output, torch.Tensor) else output[0]
