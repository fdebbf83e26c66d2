"""Solutions of CH02_NB02's exercises."""

import torch

from utils import precision


def _positions(batch):
    """Positions whose next token is real (the ones a language model is scored on)."""
    mask = batch["attention_mask"].bool()
    real = torch.zeros_like(mask)
    real[:, :-1] = mask[:, 1:] & mask[:, :-1]
    return real


@torch.no_grad()
def teacher_entropy(teacher, dataloader, temperature):
    """Mean entropy (nats) of softmax(teacher logits / T) over positions with a real next token."""
    total, count = 0.0, 0
    for batch in dataloader:
        batch = precision.to_device(batch, teacher)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        real = _positions(batch)
        total += float(entropy[real].sum())
        count += int(real.sum())
    return total / count


@torch.no_grad()
def top1_agreement(student, teacher, dataloader):
    """Share of positions (real next token) where both models rank the same token first."""
    same, count = 0, 0
    for batch in dataloader:
        batch = precision.to_device(batch, teacher)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        agree = student(**inputs).logits.argmax(-1) == teacher(**inputs).logits.argmax(-1)
        real = _positions(batch)
        same += int(agree[real].sum())
        count += int(real.sum())
    return same / count
