"""Solutions of CH09_NB01's exercises."""

from utils import evaluation, moe


def within_coactivation(gram, experts):
    """Mean |cos| between two different neurons of the same expert."""
    g = gram.double()
    norms = g.diagonal().clamp_min(1e-12).sqrt()
    sim = g.abs() / norms[:, None] / norms[None, :]
    total, pairs = 0.0, 0
    for members in experts:
        block = sim[members][:, members]
        total += float(block.sum() - block.diagonal().sum())
        pairs += len(members) * (len(members) - 1)
    return total / pairs


def active_share(moe_model):
    """Parameters one token uses / all parameters: the skipped experts are the only idle ones."""
    total = evaluation.count_parameters(moe_model)
    idle = 0
    for layer in moe.moe_layers(moe_model).values():
        per_expert = (layer.gate_proj.numel() + layer.up_proj.numel() + layer.down_proj.numel()) // layer.num_experts
        idle += per_expert * (layer.num_experts - layer.top_k)
    return (total - idle) / total
