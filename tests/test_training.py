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
    settings = history["settings"]
    assert settings["grad_accum"] == 2 and (settings["steps"], settings["epochs"], settings["batches"]) == (6, 2, 10)


class _CountSteps:
    """Counts AdamW's optimizer steps, independently of the history train keeps."""

    def __init__(self, monkeypatch):
        self.count = 0
        step = torch.optim.AdamW.step

        def counted(optimizer, *args, **kwargs):
            self.count += 1
            return step(optimizer, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", counted)


@pytest.mark.parametrize("n_batches, max_steps, grad_accum, passes, batches", [
    (3, 8, 1, 3, 8),  # more steps than one pass: 3 + 3 + 2 batches
    (3, 5, 2, 3, 8),  # 2 steps per pass (2 batches, then the 1 left): 2 + 2 + 1 steps
    (5, 2, 1, 1, 2),  # fewer steps than one pass: stops early
])
def test_max_steps_trains_exactly_that_many_steps(monkeypatch, n_batches, max_steps, grad_accum, passes, batches):
    counter = _CountSteps(monkeypatch)
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"][0, 0].item())
        return causal_lm_loss(m, batch)

    history = train(_model(), _batches(n_batches), loss_fn, max_steps=max_steps, grad_accum=grad_accum,
                    eval_fn=lambda m: 1.0, progress=False)
    assert counter.count == max_steps and history["step"] == list(range(1, max_steps + 1))
    settings = history["settings"]
    assert (settings["steps"], settings["epochs"], settings["batches"], settings["max_steps"]) == (
        max_steps, passes, batches, max_steps)
    assert len(seen) == batches
    assert history["eval_epoch"] == list(range(passes + 1))  # before training, then after every pass


def test_max_steps_reads_a_shuffling_loader_again_in_a_new_order():
    rows = [{"input_ids": torch.full((10,), i), "attention_mask": torch.ones(10, dtype=torch.long)} for i in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=1, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"][0, 0].item())
        return causal_lm_loss(m, batch)

    history = train(_model(), loader, loss_fn, max_steps=16, progress=False)
    assert history["settings"]["epochs"] == 2
    assert sorted(seen[:8]) == sorted(seen[8:]) == list(range(8))  # each pass reads every row once ...
    assert seen[:8] != seen[8:]  # ... in a new order


# epochs=2, grad_accum=2 over 3 batches: ceil(3 / 2) = 2 steps per pass, twice; neither: one pass of 3 steps
@pytest.mark.parametrize("kwargs, total", [({"max_steps": 10}, 10), ({"epochs": 2, "grad_accum": 2}, 4), ({}, 3)])
def test_the_schedule_spans_the_steps_the_run_makes(kwargs, total):
    lr = 1e-3
    history = train(_model(), _batches(3), lr=lr, warmup_steps=2, progress=False, **kwargs)
    assert history["lr"] == pytest.approx([lr * lr_factor(step, total, 2) for step in range(total)])
    assert history["lr"][-1] == pytest.approx(lr * lr_factor(total - 1, total, 2))  # the decay ends with the run


@pytest.mark.parametrize("epochs", [1, 3])
def test_max_steps_and_epochs_together_are_refused(epochs):
    with pytest.raises(ValueError, match="max_steps or epochs, not both"):
        train(_model(), _batches(2), max_steps=4, epochs=epochs, progress=False)
    teacher = _model()
    with pytest.raises(ValueError, match="max_steps or epochs, not both"):
        utils.distill(copy.deepcopy(teacher), teacher, _batches(2), max_steps=4, epochs=epochs, progress=False)


class _Unreadable:
    """A loader that claims batches but yields none after its first ``passes`` reads (an iterator, say)."""

    def __init__(self, batches: list[dict], passes: int):
        self.batches, self.passes = batches, passes

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.passes -= 1
        return iter(self.batches if self.passes >= 0 else [])


@pytest.mark.parametrize("passes", [0, 1])
def test_a_loader_that_yields_nothing_is_an_error_not_an_endless_loop(passes):
    with pytest.raises(ValueError, match=f"Pass {passes + 1} .*yielded no batch"):
        train(_model(), _Unreadable(_batches(2), passes), max_steps=5, progress=False)


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


def _options(**changes) -> utils.training.TrainOptions:
    settings = dict(max_steps=None, epochs=None, lr=5e-4, warmup_steps=3, grad_accum=1, micro_batch_size=None,
                    weight_decay=0.0, max_grad_norm=1.0, eval_every=None, eval_after_epoch=True, progress=False,
                    desc="train")
    return utils.training.TrainOptions(**{**settings, **changes})


def test_train_options_count_the_steps_and_reject_bad_values():
    assert _options(epochs=2, grad_accum=2).total_steps(5) == 6  # ceil(5 / 2) per epoch
    assert _options().total_steps(5) == 5  # neither: one pass
    assert _options(max_steps=4).total_steps(5) == 4
    assert _options(max_steps=50).total_steps(5) == 50  # more than one pass: the data is read again
    for changes, match in [({"epochs": True}, "epochs"), ({"eval_every": 0}, "eval_every"),
                           ({"epochs": 2, "max_steps": 4}, "not both"),
                           ({"lr": math.inf}, "lr"), ({"lr": "1e-3"}, "lr"), ({"warmup_steps": 1.0}, "warmup")]:
        with pytest.raises(ValueError, match=match):
            _options(**changes)
    with pytest.raises(AttributeError):
        _options().lr = 1.0  # frozen: a run's settings do not change under it


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


# --- half precision: what a T4 gets (float16 weights) ------------------------------------------

def test_adamw_directly_on_float16_weights_is_what_breaks():
    """The failure the master weights fix: AdamW's state underflows in float16 (eps=1e-8 is 0 there)."""
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.full((4,), 1e-4, dtype=torch.float16)
    optimizer.step()
    state = optimizer.state[param]["exp_avg_sq"]
    assert state.dtype == torch.float16 and (state == 0).all()  # 1e-8 * (1 - beta2) underflows to 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_trains_with_float32_masters(dtype):
    model = _model().to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = train(model, _batches(2) * 8, max_steps=12, lr=3e-3, progress=False)
    assert all(math.isfinite(v) for v in history["loss"])
    assert sum(history["loss"][-3:]) < sum(history["loss"][:3])
    assert all(p.dtype == dtype for p in model.parameters())  # the model keeps its dtype
    assert all(p.grad is None for p in model.parameters())  # no half-precision gradient left behind
    assert sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()) == len(before)
    settings = history["settings"]
    assert settings["float32_master_copies"] == len(before)
    assert settings["mixed_precision"] == str(dtype)
    assert settings["loss_scaling"] is (dtype == torch.float16)


def test_master_weights_update_small_steps_that_float16_would_lose():
    """An update far below float16's step at 1.0 (about 1e-3) is kept in the master and adds up."""
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    masters = utils.training.MasterWeights([param])
    optimizer = torch.optim.SGD(masters.params, lr=1.0)
    for _ in range(50):
        param.grad = torch.full((3,), 1e-4, dtype=torch.float16)
        masters.grads_to_masters()
        optimizer.step()
        masters.masters_to_model()
    assert param.grad is None and masters.params[0].dtype == torch.float32
    torch.testing.assert_close(masters.params[0], torch.full((3,), 1 - 50e-4))
    assert param[0].item() == pytest.approx(0.995, abs=1e-3)  # 50 steps of 1e-4 that float16 alone would lose


def test_float32_parameters_are_their_own_masters():
    adapter = torch.nn.Parameter(torch.zeros(2))
    masters = utils.training.MasterWeights([adapter, torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    assert masters.params[0] is adapter and masters.copies == 1


def test_float16_distillation_under_a_simulated_t4(monkeypatch):
    monkeypatch.setenv("RLLM_HARDWARE", "t4")
    teacher = _model().to(torch.float16)
    student = copy.deepcopy(teacher)
    student.model.layers = student.model.layers[:1]
    student.config.num_hidden_layers = 1
    history = utils.distill(student, teacher, _batches(2) * 6, max_steps=10, lr=3e-3, progress=False)
    assert all(math.isfinite(v) for v in history["loss"])
    assert sum(history["loss"][-3:]) < sum(history["loss"][:3])
    assert history["settings"]["loss_scaling"] is True
    assert next(student.parameters()).dtype == torch.float16


def test_autocast_follows_the_policy(monkeypatch):
    model = _model()
    monkeypatch.setenv("RLLM_HARDWARE", "cpu")
    assert utils.training.autocast_dtype(model) is None
    assert utils.training.autocast_dtype(copy.deepcopy(model).half()) == torch.float16
    monkeypatch.setenv("RLLM_HARDWARE", "t4")
    assert utils.training.autocast_dtype(model) == torch.float16  # a float32 model on a T4 is autocast
    model.config.model_type = "gemma3_text"
    assert utils.training.autocast_dtype(model) is None  # ... but never Gemma in float16
