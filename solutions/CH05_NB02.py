"""Solutions of CH05_NB02's exercises."""

import torch

from utils import precision, structure


@torch.no_grad()
def padded_norms(model, dataloader):
    """sqrt(sum of squared down_proj inputs) per neuron, over every position (padding included)."""
    mlps = structure.glu_mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]

    def adder(i):
        def hook(module, args):
            sums[i] += args[0].detach().double().pow(2).sum(dim=(0, 1)).cpu()
        return hook

    handles = [m.down_proj.register_forward_pre_hook(adder(i)) for i, m in enumerate(mlps)]
    try:
        for batch in dataloader:
            batch = precision.to_device(batch, model)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return [s.sqrt() for s in sums]


def kept_overlap(scores_a, scores_b, keep):
    """Mean over layers of the share of the `keep` kept neurons two rankings have in common."""
    shares = []
    for a, b in zip(scores_a, scores_b):
        top_a = set(torch.topk(a.float(), keep).indices.tolist())
        top_b = set(torch.topk(b.float(), keep).indices.tolist())
        shares.append(len(top_a & top_b) / keep)
    return sum(shares) / len(shares)
