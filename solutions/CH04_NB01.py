"""Solutions of CH04_NB01's exercises."""

import torch
import torch.nn.functional as F

from utils import precision, structure


def mlp_importance(model, dataloader):
    """1 - cos(stream entering the MLP's norm, block output) per block, averaged over all real tokens."""
    blocks = structure.decoder_blocks(model)
    store, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(structure.mlp_input_norm(block).register_forward_pre_hook(
            lambda module, args, i=i: store.__setitem__(("mlp_in", i), args[0])))
        handles.append(block.register_forward_hook(
            lambda module, args, output, i=i: store.__setitem__(("out", i), structure.output_of(output))))
    totals, count = [0.0] * len(blocks), 0
    try:
        with torch.no_grad():
            for batch in dataloader:
                batch = precision.to_device(batch, model)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                real = batch["attention_mask"].bool()
                for i in range(len(blocks)):
                    cos = F.cosine_similarity(store[("mlp_in", i)].float(), store[("out", i)].float(), dim=-1)
                    totals[i] += float((1 - cos)[real].sum())
                count += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    return [t / count for t in totals]


def choose_protected(scores, n):
    """The n lowest-scoring blocks, never the first or the last one."""
    last = len(scores) - 1
    candidates = sorted((i for i in range(len(scores)) if i not in (0, last)), key=lambda i: scores[i])
    return sorted(candidates[:n])
