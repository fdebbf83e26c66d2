"""Solutions of CH02_NB01's exercises."""

import math

import torch
import torch.nn.functional as F

from utils import precision


@torch.no_grad()
def perplexity_by_hand(model, dataloader):
    """exp(summed next-token cross-entropy / real targets), over the whole dataloader."""
    total, count = 0.0, 0
    for batch in dataloader:
        batch = precision.to_device(batch, model)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return math.exp(total / count)


def drop_blocks(model, indices):
    """Remove the blocks `indices`, renumber the cache slots, update the config."""
    drop = set(indices)
    kept = [block for i, block in enumerate(model.model.layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(kept)
    for i, block in enumerate(kept):
        block.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    return model
