"""Solutions of CH10_NB01's exercises."""

import torch

from utils import activations, precision, structure


@torch.no_grad()
def negative_gate_share(model, dataloader):
    """Per block: the share of (real token, neuron) pairs whose gate pre-activation is negative."""
    blocks = structure.decoder_blocks(model)
    store = {}
    handles = [b.mlp.gate_proj.register_forward_hook(lambda m, args, out, i=i: store.__setitem__(i, out))
               for i, b in enumerate(blocks)]
    negative, total = [0] * len(blocks), [0] * len(blocks)
    try:
        for batch in dataloader:
            batch = precision.to_device(batch, model)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            real = batch["attention_mask"].bool()
            for i in range(len(blocks)):
                gates = store[i][real]
                negative[i] += int((gates < 0).sum())
                total[i] += gates.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [n / t for n, t in zip(negative, total)]


def loudest_neurons(model, tokenizer, prompt, layer, k):
    """The k neurons of block `layer` with the largest mean |input of down_proj| over the prompt's tokens."""
    values = activations.capture_activations(model, tokenizer, prompt, "down_proj_input", layers=[layer])
    loudness = values["down_proj_input"][0].abs().mean(0)
    return torch.topk(loudness, k).indices.tolist()
