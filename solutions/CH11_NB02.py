"""Solutions of CH11_NB02's exercises."""

import torch


def removed_per_layer(scores, ratio, protect_layers, per_layer):
    """How many neurons Fair Pruning takes from each layer, without pruning."""
    n_layers, width = scores.shape
    counts = [0] * n_layers
    open_layers = [i for i in range(n_layers) if i not in protect_layers]
    if per_layer:
        for i in open_layers:
            counts[i] = max(1, int(ratio * width))
        return counts
    k = max(1, round(ratio * n_layers * width))  # a share of every neuron, the protected ones included
    masked = scores.abs().float().clone()
    masked[list(protect_layers)] = -1.0
    for flat in torch.topk(masked.flatten(), k).indices.tolist():
        counts[flat // width] += 1
    return counts


@torch.no_grad()
def _continuation_logprob(model, tokenizer, prompt, continuation):
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + continuation)["input_ids"]
    logits = model(torch.tensor([whole], device=model.device)).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole)))


def stereotype_score(model, tokenizer, probe):
    """[log p(stereo | target) - log p(anti | target)] - [log p(stereo | other) - log p(anti | other)]."""
    def preference(prompt):
        return (_continuation_logprob(model, tokenizer, prompt, probe["stereo"])
                - _continuation_logprob(model, tokenizer, prompt, probe["anti"]))
    return preference(probe["target_prompt"]) - preference(probe["other_prompt"])
