"""Solutions of CH09_NB03's lab tasks."""

import torch

from utils import evaluation, moe


@torch.no_grad()
def expert_share(moe_model, dataloader, expert):
    """Per MoE layer: the share of real tokens whose router logits are largest for ``expert``."""
    device = next(moe_model.parameters()).device
    hits, tokens = None, 0
    moe_model.eval()
    with moe.keep_router_logits(moe_model) as layers:
        for batch in dataloader:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            moe_model(input_ids=ids, attention_mask=mask)
            real = mask.reshape(-1).bool()
            counts = [int((layer.last_router_logits[real].argmax(dim=-1) == expert).sum()) for layer in layers]
            hits = counts if hits is None else [h + c for h, c in zip(hits, counts)]
            tokens += int(real.sum())
    return [h / tokens for h in hits]


def capacity_factor(load):
    """E x the largest share, per row of the [layers, E] load table."""
    return (load.shape[1] * load.max(dim=1).values).tolist()


def perplexity_table(models, loaders):
    """{model name: {domain: perplexity pooled over the loader's real tokens}}."""
    return {name: {domain: evaluation.perplexity(model, loader, progress=False) for domain, loader in loaders.items()}
            for name, model in models.items()}
