"""Solutions of CH11_NB01's exercises."""

import torch


@torch.no_grad()
def signed_scores(model, tokenizer, pairs, layer):
    """Mean over pairs of [mean over tokens of a(target prompt) - the same for the other prompt], one layer."""
    captured = {}
    down_proj = model.model.layers[layer].mlp.down_proj
    handle = down_proj.register_forward_pre_hook(lambda module, inputs: captured.update(a=inputs[0][0]))
    try:
        total = 0.0
        for pair in pairs:
            means = []
            for prompt in (pair["target_prompt"], pair["other_prompt"]):
                model(**tokenizer(prompt, return_tensors="pt").to(model.device))
                means.append(captured["a"].float().mean(0).cpu())  # [tokens, neurons] -> [neurons]
            total = total + (means[0] - means[1])
    finally:
        handle.remove()
    return total / len(pairs)


def relative_scores(signed, typical):
    """|signed| / (typical + 1 % of the layer's median typical magnitude).

    Why below 2: for one pair, |mean a(target) - mean a(other)| <= mean |a(target)| + mean |a(other)|; averaged
    over the pairs, |signed| <= 2 x typical (typical is the mean |a| over both prompts of every pair), and the
    floor makes the denominator strictly larger than typical.
    """
    floor = 0.01 * typical.median(dim=1, keepdim=True).values
    return signed.abs() / (typical + floor)
