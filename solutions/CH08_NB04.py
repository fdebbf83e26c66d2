"""Solutions of CH08_NB04's exercises."""

import torch

from utils import structure


def decode_flops(model, context):
    """2 x matmul weights (LM head in, embeddings out) + 4 x context x heads x head_dim per attention layer."""
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and id(m.weight) not in embeddings)
    head = model.get_output_embeddings()
    if id(head.weight) in embeddings:  # a tied head is still a matmul
        weights += head.weight.numel()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * context * config.num_attention_heads * head_dim * len(structure.decoder_blocks(model))
    return 2 * weights + attention


def realised_share(measured, ideal):
    """Share of the ideal gain a measured speed-up delivered."""
    if ideal == 1:
        return float("nan")
    return (measured - 1) / (ideal - 1)
