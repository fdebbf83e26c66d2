"""Solutions of CH06_NB02's exercises."""

import math

import torch
import torch.nn.functional as F

from utils import structure


@torch.no_grad()
def window_distances(model, dataloader, n):
    """arccos(mean cos(stream into block l, stream out of block l + n - 1)) / pi, for l = 0 .. total - n - 1."""
    total = len(structure.decoder_blocks(model))
    device = next(model.parameters()).device
    sums = torch.zeros(total - n, dtype=torch.float64)
    tokens = 0
    for batch in dataloader:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        real = mask.bool()
        for start in range(total - n):  # states[total] (after the final norm) is never used
            cosine = F.cosine_similarity(states[start].float(), states[start + n].float(), dim=-1)
            sums[start] += float(cosine[real].sum())
        tokens += int(real.sum())
    return [math.acos(max(-1.0, min(1.0, float(s) / tokens))) / math.pi for s in sums]


def width_ratio(model, blocks):
    """Parameters of the removed blocks over the parameters of all the MLPs."""
    layers = structure.decoder_blocks(model)
    removed = sum(p.numel() for i in blocks for p in layers[i].parameters())
    mlp = sum(p.numel() for layer in layers for p in layer.mlp.parameters())
    return removed / mlp
