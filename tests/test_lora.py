"""Tests of utils.lora: our LoRA / DoRA layers against peft's, counts, sizes, merging, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import utils
from utils.lora import LoRALinear

MODELS = ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen3-0.6B", "google/gemma-3-270m"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(seed))


def _pair(model_id: str, dora: bool, r: int = 4, alpha: float = 8):
    """The same tiny model wrapped by us and by peft, sharing random non-zero adapter weights."""
    base, _ = utils.load_model(model_id)
    ours = copy.deepcopy(base)
    layers = utils.apply_lora(ours, TARGETS, r=r, alpha=alpha, dora=dora)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, use_dora=dora, lora_dropout=0.0)
    theirs = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_B.normal_(0, 0.1, generator=g)  # B = 0 would hide any mistake in the update
            if dora:
                layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            if dora:
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return base, ours, layers, theirs


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_same_outputs_and_gradients_as_peft(tiny, model_id, dora):
    base, ours, layers, theirs = _pair(model_id, dora)
    ids = _ids()
    ours_logits, peft_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, peft_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (ours_logits - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapters do something
    ours_logits.square().mean().backward()
    peft_logits.square().mean().backward()
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        if dora:
            torch.testing.assert_close(layer.lora_magnitude.grad,
                                       peft_layer.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_closed_form_counts_equal_peft_trainable_parameters(tiny, model_id, dora):
    base, ours, _, theirs = _pair(model_id, dora, r=8)
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert utils.lora_parameter_count(base, 8, TARGETS, dora=dora) == peft_trainable
    assert utils.lora_parameter_count(base.config, 8, TARGETS, dora=dora) == peft_trainable
    assert utils.count_parameters(ours, trainable_only=True) == peft_trainable
    assert utils.adapter_size_bytes(ours) == 4 * peft_trainable
    assert utils.adapter_size_bytes(theirs) == 4 * peft_trainable
    assert utils.adapter_size_bytes(peft_trainable, torch.bfloat16) == 2 * peft_trainable


def test_every_projection_counted_from_the_config(tiny):
    model, _ = utils.load_model("Qwen/Qwen3-0.6B")
    targets = list(utils.lora.CONFIG_PROJECTIONS)
    assert utils.lora_parameter_count(model.config, 2, targets) == utils.lora_parameter_count(model, 2, targets)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_zero_b_leaves_the_model_unchanged(tiny, dora):
    base, _ = utils.load_model("google/gemma-3-270m")
    wrapped = copy.deepcopy(base)
    utils.apply_lora(wrapped, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     r=4, alpha=32, dora=dora)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=_ids()).logits, base(input_ids=_ids()).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_gives_a_plain_linear_with_the_same_outputs(tiny, dora):
    _, ours, layers, _ = _pair("HuggingFaceTB/SmolLM2-135M-Instruct", dora)
    name, layer = next(iter(layers.items()))
    merged = layer.merge()
    assert type(merged) is nn.Linear
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=0)
        before = ours(input_ids=_ids()).logits
        utils.merge_lora(ours)
        after = ours(input_ids=_ids()).logits
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_layer_basics_bias_dropout_and_half_precision():
    torch.manual_seed(0)
    base = nn.Linear(12, 6, bias=True)
    layer = LoRALinear(base, r=3, alpha=6, dropout=0.5)
    assert layer.scaling == 2.0 and layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (6, 3)
    assert not base.weight.requires_grad and not base.bias.requires_grad and layer.lora_A.requires_grad
    x = torch.randn(4, 12)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x))  # B = 0
    layer.train()
    with torch.no_grad():
        layer.lora_B.fill_(0.3)
    assert not torch.allclose(layer(x), layer(x))  # dropout on the adapter path only, active in training
    half = LoRALinear(nn.Linear(8, 4).to(torch.bfloat16), r=2, alpha=2, dora=True)
    assert half.lora_A.dtype == torch.float32 and half.lora_magnitude.dtype == torch.float32
    assert half(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert half.merge().weight.dtype == torch.bfloat16


def test_update_energy_share():
    torch.manual_seed(0)
    rank1 = LoRALinear(nn.Linear(12, 6, bias=False), r=1, alpha=2)
    with pytest.raises(ValueError, match="all zeros"):
        utils.lora.update_energy_share(rank1)  # B = 0: nothing trained yet
    with torch.no_grad():
        rank1.lora_B.normal_()
    assert math.isclose(utils.lora.update_energy_share(rank1), 1.0, rel_tol=1e-9)
    rank4 = LoRALinear(nn.Linear(12, 6, bias=False), r=4, alpha=8)
    with torch.no_grad():
        rank4.lora_B.normal_()
    s = torch.linalg.svdvals(rank4.delta_weight().detach().double())
    for k in (1, 2):
        expected = float((s[:k] ** 2).sum() / (s ** 2).sum())
        # the layer's path works on the r x r core in float64; delta_weight() is float32: agree to float32 rounding
        assert math.isclose(utils.lora.update_energy_share(rank4, k), expected, rel_tol=1e-6)
        assert math.isclose(utils.lora.update_energy_share(rank4.delta_weight(), k), expected, rel_tol=1e-9)
    assert utils.lora.update_energy_share(rank4, 1) < 1.0
    assert math.isclose(utils.lora.update_energy_share(rank4, 4), 1.0, rel_tol=1e-9)
    wide = LoRALinear(nn.Linear(12, 3, bias=False), r=5, alpha=5)  # more rank than outputs: R_B is 3 x 5
    with torch.no_grad():
        wide.lora_B.normal_()
    s = torch.linalg.svdvals(wide.delta_weight().detach().double())
    assert math.isclose(utils.lora.update_energy_share(wide, 1), float(s[0] ** 2 / (s ** 2).sum()), rel_tol=1e-6)
    for k in (0, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            utils.lora.update_energy_share(rank4, k)
    with pytest.raises(ValueError, match="2-D"):
        utils.lora.update_energy_share(torch.ones(3))


def test_apply_lora_freezes_everything_else(tiny):
    model, _ = utils.load_model("Qwen/Qwen3-0.6B")
    layers = utils.apply_lora(model, "v_proj", r=2, alpha=4)
    assert len(layers) == model.config.num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_size_on_disk_of_a_saved_peft_adapter(tiny, tmp_path):
    _, _, _, theirs = _pair("HuggingFaceTB/SmolLM2-135M-Instruct", dora=False)
    theirs.save_pretrained(tmp_path)
    n = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    on_disk = utils.adapter_size_bytes(tmp_path)
    assert 4 * n < on_disk < 4 * n + 64_000  # the weights plus the safetensors header
    assert utils.adapter_size_bytes(tmp_path / "adapter_model.safetensors") == on_disk


# --- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -2, 1.5, True])
def test_rank_must_be_positive(tiny_llama, r):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        utils.apply_lora(model, ["q_proj"], r=r)
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        utils.lora_parameter_count(model, r, ["q_proj"])


def test_unknown_target_lists_the_linear_layers(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"'qkv'.*q_proj.*v_proj") as info:
        utils.apply_lora(model, ["q_proj", "qkv"], r=4)
    assert "down_proj" in str(info.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was half-wrapped
    with pytest.raises(ValueError, match="Pass the model itself"):
        utils.lora_parameter_count(model.config, 4, ["lm_head"])


def test_other_bad_inputs(tiny_llama, tmp_path):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="non-empty list"):
        utils.apply_lora(model, [], r=4)
    with pytest.raises(TypeError, match="list of names"):
        utils.apply_lora(model, 3, r=4)
    with pytest.raises(ValueError, match="alpha"):
        utils.apply_lora(model, ["q_proj"], r=4, alpha=0)
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=2)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(3, 3), r=2, dropout=1.0)
    with pytest.raises(TypeError, match="config"):
        utils.lora_parameter_count("model", 4, ["q_proj"])
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        utils.adapter_size_bytes(tmp_path)
    with pytest.raises(ValueError, match="no adapter parameters"):
        utils.adapter_size_bytes(model)
    with pytest.raises(TypeError, match="torch.dtype"):
        utils.adapter_size_bytes(100, "float16")
    utils.apply_lora(model, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        utils.apply_lora(model, ["v_proj"], r=2)


def test_train_lora_adapter_trains_only_the_adapter_and_merges(tiny):
    from utils import extraction as ex

    model, tokenizer = utils.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    records = utils.load_records("clinical_notes", split="train", n=6)
    loader = ex.make_sft_dataloader(records, tokenizer, batch_size=2, max_length=512, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model, history = utils.train_lora_adapter(copy.deepcopy(model), loader, steps=4, rank=4, alpha=8,
                                                   loss_fn=ex.answer_loss, progress=False)
    assert history["settings"]["steps"] == 4 and len(history["loss"]) == 4  # 3 batches: cycles into a 2nd epoch
    assert history["trainable_parameters"] == utils.lora_parameter_count(model, 4, utils.lora.CONFIG_PROJECTIONS)
    assert not peft_model.training
    merged = peft_model.merge_and_unload()
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, frozen[n])]
    assert changed and all(n.split(".")[-2] in utils.lora.CONFIG_PROJECTIONS for n in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # the original is untouched


def test_train_lora_adapter_bad_inputs(tiny_llama):
    model, _ = tiny_llama
    batches = [{"input_ids": _ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}]
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            utils.train_lora_adapter(model, batches, steps=steps)
    with pytest.raises(ValueError, match="dataloader is empty"):
        utils.train_lora_adapter(model, [], steps=1)
    with pytest.raises(TypeError, match="must have a length"):
        utils.train_lora_adapter(model, iter(batches), steps=1)
    with pytest.raises(ValueError, match="no_such_proj"):
        utils.train_lora_adapter(model, batches, steps=1, target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="rank"):
        utils.train_lora_adapter(model, batches, steps=1, rank=0)


def test_train_lora_adapter_on_a_float16_base(tiny):
    """A T4's case: a float16 base, a float32 adapter (peft's default), loss scaling; the base stays put."""
    from utils import extraction as ex

    model, tokenizer = utils.load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype=torch.float16)
    records = utils.load_records("clinical_notes", split="train", n=6)
    loader = ex.make_sft_dataloader(records, tokenizer, batch_size=2, max_length=512, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model, history = utils.train_lora_adapter(model, loader, steps=3, rank=4, alpha=8, lr=1e-2,
                                                   loss_fn=ex.answer_loss, progress=False)
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["settings"]["mixed_precision"] == "torch.float16"
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it learned
    for name, p in peft_model.base_model.model.named_parameters():
        if "lora_" not in name:
            assert p.dtype == torch.float16 and torch.equal(p, base[name.replace("base_layer.", "")])
