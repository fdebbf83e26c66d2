"""Solutions of CH09_NB02's exercises."""

import torch


def routing_entropy(load):
    """Entropy in bits of each row of the [layers, experts] load shares (0 log 0 = 0)."""
    p = load.double()
    terms = torch.where(p > 0, -p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    return terms.sum(dim=1).tolist()


def balance_loss(router_logits, top_k, attention_mask):
    """E x sum_e f_e x P_e over the real tokens of one layer's [tokens, E] router logits."""
    real = attention_mask.reshape(-1).bool()
    logits = router_logits[real]
    experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    picks = torch.topk(logits, top_k, dim=-1).indices
    f = torch.bincount(picks.reshape(-1), minlength=experts).float() / logits.shape[0]
    return experts * (f * probs.mean(dim=0)).sum()
