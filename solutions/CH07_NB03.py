"""Solutions of CH07_NB03's exercises."""

import torch

from utils import structure


def dora_weight(weight, lora_A, lora_B, magnitude, scaling):
    """m / ||W + scaling B A||_row x (W + scaling B A), in float32."""
    adapted = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    norms = torch.linalg.vector_norm(adapted, dim=1, keepdim=True)
    return magnitude.float()[:, None] * adapted / norms


def qlora_bytes(model, rank, targets, dora):
    """4-bit decoder weights + other weights in the model's dtype + a float32 adapter and AdamW's two moments."""
    linear = {id(m.weight): m.weight.numel() for block in structure.decoder_blocks(model) for m in block.modules()
              if isinstance(m, torch.nn.Linear)}
    base = sum(linear.values()) * (4 + 8 / 64 + 32 / (64 * 256)) / 8  # NF4, blocks of 64, double quantisation
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear)
    adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            adapter += rank * (module.in_features + module.out_features) + (module.out_features if dora else 0)
    return base + other + adapter * (4 + 8)
