"""Tests of utils.training: the one training loop (schedule, accumulation, micro-batches, freezing)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import utils
from utils.training import causal_lm_loss, lm_labels, lr_factor, train


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _batches(n: int = 4, rows: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 48, (rows, 10), generator=g),
             "attention_mask": torch.ones(rows, 10, dtype=torch.long)} for _ in range(n)]


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    factors = [lr_factor(step, 10, 2) for step in range(10)]
    assert factors[0] < factors[1] < factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert lr_factor(10, 10, 2) == pytest.approx(0.1)


def test_labels_default_to_input_ids_without_padding():
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert lm_labels(batch).tolist() == [[5, 6, -100]]
    batch["labels"] = torch.tensor([[-100, 6, 7]])
    assert lm_labels(batch).tolist() == [[-100, 6, 7]]
    with pytest.raises(ValueError, match="input_ids"):
        lm_labels({"attention_mask": torch.ones(1, 2)})


def test_causal_lm_loss_equals_the_models_own_loss():
    model, batch = _model(), _batches(1)[0]
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :4] = -100  # the prompt is not learned
    expected = model(**batch).loss
    torch.testing.assert_close(causal_lm_loss(model, batch), expected)


def test_train_lowers_the_loss_and_keeps_a_history():
    model = _model()
    data = _batches(2)
    history = train(model, data * 8, max_steps=12, lr=3e-3, eval_fn=lambda m: 1.0, eval_every=5,
                    progress=False)
    assert history["step"] == list(range(1, 13)) and len(history["lr"]) == 12
    assert sum(history["loss"][-3:]) < sum(history["loss"][:3])
    assert history["eval_step"] == [0, 5, 10, 12]
    assert history["settings"]["steps"] == 12 and not model.training


def test_micro_batches_give_the_same_update_as_the_whole_batch():
    data = _batches(2)
    whole, split = _model(), _model()
    train(whole, data, max_steps=2, lr=1e-2, warmup_steps=0, progress=False)
    train(split, data, max_steps=2, lr=1e-2, warmup_steps=0, micro_batch_size=1, progress=False)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_counts_optimizer_steps():
    history = train(_model(), _batches(5), epochs=2, grad_accum=2, progress=False)
    assert len(history["step"]) == 6  # ceil(5 / 2) per epoch
    assert history["settings"]["grad_accum"] == 2


def test_frozen_parameters_get_no_gradient_and_do_not_move():
    model = _model()
    embed = model.get_input_embeddings().weight
    before = embed.detach().clone()
    seen = []

    def loss_fn(m, batch):
        loss = causal_lm_loss(m, batch)
        seen.append(embed.requires_grad)
        return loss

    params = [p for p in model.parameters() if p is not embed]
    train(model, _batches(2), loss_fn, max_steps=2, lr=1e-2, params=params, progress=False)
    assert seen == [False, False] and embed.grad is None
    torch.testing.assert_close(embed.detach(), before)
    assert embed.requires_grad  # restored afterwards


def test_loss_parts_are_logged():
    def loss_fn(m, batch):
        loss = causal_lm_loss(m, batch)
        return loss, {"half": float(loss.detach()) / 2}

    history = train(_model(), _batches(2), loss_fn, max_steps=2, progress=False)
    assert history["half"] == pytest.approx([v / 2 for v in history["loss"]])


@pytest.mark.parametrize("kwargs, match", [
    ({"max_steps": 0}, "max_steps"), ({"epochs": 0}, "epochs"), ({"grad_accum": 1.5}, "grad_accum"),
    ({"lr": 0}, "lr"), ({"micro_batch_size": 0}, "micro_batch_size"), ({"warmup_steps": -1}, "warmup"),
    ({"params": []}, "Nothing to train"),
])
def test_train_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(_model(), _batches(1), progress=False, **kwargs)


def test_train_rejects_empty_data_and_non_dict_batches():
    with pytest.raises(ValueError, match="empty"):
        train(_model(), [], progress=False)
    with pytest.raises(TypeError, match="dicts of tensors"):
        train(_model(), [torch.zeros(2, 3, dtype=torch.long)], progress=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        train("model", _batches(1), progress=False)


def test_a_diverging_loss_stops_with_advice():
    def loss_fn(m, batch):
        return causal_lm_loss(m, batch) * math.inf

    model = _model()
    with pytest.raises(FloatingPointError, match="lower lr"):
        train(model, _batches(1), loss_fn, progress=False)
    assert all(p.requires_grad for p in model.parameters())


def test_distill_and_train_share_the_loop():
    teacher = _model()
    student = copy.deepcopy(teacher)
    history = utils.distill(student, teacher, _batches(2), max_steps=2, micro_batch_size=2, progress=False)
    assert history["settings"]["micro_batch_size"] == 2 and len(history["soft"]) == 2
