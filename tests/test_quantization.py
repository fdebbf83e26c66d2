"""Tests of utils.quantization: level tables, round trips, storage arithmetic, whole models, bad inputs."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import utils
from utils.quantization import QuantizedTensor

# The 16 NF4 values as printed in the QLoRA paper (Dettmers et al., 2023, appendix E).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
FORMATS = [("nf4", 4), ("fp4", 4), ("int", 4), ("int", 8), ("int", 2)]


def _weights(shape=(48, 100), seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- level tables --------------------------------------------------------------------------------

def test_nf4_levels_equal_the_published_table():
    torch.testing.assert_close(utils.nf4_levels(), torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)


def test_nf4_levels_equal_bitsandbytes_table():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (CH07); the comparison runs when installed")
    table = utils.bitsandbytes_levels("nf4")
    torch.testing.assert_close(utils.nf4_levels(), table, atol=1e-6, rtol=0)


def test_bitsandbytes_levels_without_bitsandbytes_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert utils.bitsandbytes_levels("nf4") is None
    assert "pip install" in capsys.readouterr().out
    with pytest.raises(ValueError, match="nf4"):
        utils.bitsandbytes_levels("int")


@pytest.mark.parametrize("kind,bits,count", [("nf4", 4, 16), ("fp4", 4, 15), ("int", 4, 15), ("int", 8, 255),
                                             ("int", 2, 3)])
def test_levels_are_sorted_within_unit_range_with_zero(kind, bits, count):
    levels = utils.quantization_levels(kind, bits)
    assert levels.numel() == count
    assert torch.all(levels[1:] > levels[:-1])
    assert levels.min().item() == -1.0 and levels.max().item() == 1.0
    assert (levels == 0).sum().item() == 1


@pytest.mark.parametrize("kind,bits", [("fp4", 4), ("int", 4), ("int", 8)])
def test_symmetric_formats_are_symmetric(kind, bits):
    levels = utils.quantization_levels(kind, bits)
    torch.testing.assert_close(levels, -levels.flip(0))


def test_nf4_is_asymmetric_with_more_positive_levels():
    levels = utils.nf4_levels()
    assert (levels > 0).sum().item() == 8 and (levels < 0).sum().item() == 7


def test_fp4_levels_are_e2m1_values_over_six():
    magnitudes = sorted({round(v * 6, 6) for v in utils.fp4_levels().abs().tolist()})
    assert magnitudes == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_int_levels_are_evenly_spaced():
    gaps = torch.diff(utils.int_levels(4))
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 7))


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,bits", FORMATS)
@pytest.mark.parametrize("block_size", [64, None])
def test_round_trip_error_is_at_most_half_the_widest_gap(kind, bits, block_size):
    w = _weights()
    q = utils.quantize_blockwise(w, kind, bits, block_size)
    restored = utils.dequantize_blockwise(q)
    assert restored.shape == w.shape and restored.dtype == w.dtype
    half_gap = torch.diff(q.levels).max().item() / 2
    size = w.numel() if block_size is None else block_size
    flat = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % size)).view(-1, size)
    bound = (flat.abs().amax(1, keepdim=True) * half_gap).expand_as(flat).reshape(-1)[: w.numel()]
    assert torch.all((restored - w).reshape(-1).abs() <= bound + 1e-7)


@pytest.mark.parametrize("kind,bits", FORMATS)
def test_values_on_the_grid_come_back_exactly(kind, bits):
    levels = utils.quantization_levels(kind, bits)
    w = (levels.repeat(64 // levels.numel() + 1)[:64] * 0.37).reshape(4, 16)
    w[0, 0] = 0.37  # the block's absmax is exactly the scale
    restored = utils.dequantize_blockwise(utils.quantize_blockwise(w, kind, bits, 64))
    torch.testing.assert_close(restored, w, atol=1e-7, rtol=0)


def test_int8_error_is_below_half_a_step():
    w = _weights((32, 64))
    restored = utils.dequantize_blockwise(utils.quantize_blockwise(w, "int", 8, 64))
    step = w.view(-1, 64).abs().amax(1, keepdim=True) / 127
    assert torch.all((restored - w).view(-1, 64).abs() <= step / 2 + 1e-8)


def test_blocks_beat_one_scale_when_there_is_an_outlier():
    w = _weights((16, 64))
    w[3, 5] = 1.0  # one outlier inflates the per-tensor absmax
    per_tensor = utils.quantization_error(w, utils.quantize_blockwise(w, "int", 4, None))
    per_block = utils.quantization_error(w, utils.quantize_blockwise(w, "int", 4, 64))
    assert per_block["mse"] < per_tensor["mse"] / 10


def test_nf4_beats_int4_on_normal_weights():
    w = _weights((64, 256))
    errors = {k: utils.quantization_error(w, utils.quantize_blockwise(w, k, 4, 64))["mse"] for k in ("nf4", "int")}
    assert errors["nf4"] < errors["int"]


def test_odd_sizes_zero_blocks_and_dtypes_survive():
    w = torch.zeros(3, 5, 7, dtype=torch.bfloat16)  # 105 values: not a multiple of 64, all zero
    w[2, 4, 6] = 0.5
    q = utils.quantize_blockwise(w, "nf4", 4, 64)
    restored = utils.dequantize_blockwise(q)
    assert restored.shape == w.shape and restored.dtype == torch.bfloat16
    assert torch.isfinite(restored.float()).all() and restored[0].abs().sum().item() == 0
    assert restored[2, 4, 6].item() == 0.5
    assert utils.dequantize_blockwise(q, torch.float32).dtype == torch.float32


def test_nf4_matches_bitsandbytes_quantize_4bit():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (CH07); the comparison runs when installed")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = _weights((64, 128))
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = utils.dequantize_blockwise(utils.quantize_blockwise(w, "nf4", 4, 64))
    torch.testing.assert_close(ours, dequantize_4bit(packed, state), atol=1e-6, rtol=0)


def test_double_quantisation_changes_the_error_very_little():
    w = _weights((128, 256))
    plain = utils.quantization_error(w, utils.quantize_blockwise(w, "nf4", 4, 64))
    dq = utils.quantize_blockwise(w, "nf4", 4, 64, double_quant=True)
    assert dq.absmax is None and dq.absmax_quantized.codes.dtype == torch.uint8
    assert utils.quantization_error(w, dq)["mse"] == pytest.approx(plain["mse"], rel=0.02)


def test_quantization_error_fields():
    w = _weights()
    exact = utils.quantization_error(w, w.clone())
    assert exact["mse"] == 0 and exact["relative"] == 0 and exact["sqnr_db"] == math.inf
    err = utils.quantization_error(w, w + 0.01)
    assert err["mse"] == pytest.approx(1e-4, rel=1e-4)
    assert err["max_abs"] == pytest.approx(0.01, rel=1e-4)
    assert err["relative"] == pytest.approx(0.01 * math.sqrt(w.numel()) / w.norm().item(), rel=1e-4)


# --- storage arithmetic --------------------------------------------------------------------------

def test_bits_per_parameter_matches_the_qlora_paper():
    assert utils.bits_per_parameter(4, 64) == 4.5
    assert utils.bits_per_parameter(4, 64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert utils.bits_per_parameter(4, 64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert utils.bits_per_parameter(8, 64, absmax_bits=16) == 8.25


def test_bits_per_parameter_exact_counts():
    assert utils.bits_per_parameter(4, 64, numel=64 * 10) == 4.5
    assert utils.bits_per_parameter(8, None, numel=1000) == 8 + 32 / 1000
    assert utils.bits_per_parameter(4, 64, numel=100) == (128 * 4 + 2 * 32) / 100  # padded to two blocks
    q = utils.quantize_blockwise(_weights((64, 64)), "nf4", 4, 64, double_quant=True)
    expected = (4096 * 4 + 64 * 8 + 32 + 32) / 4096  # codes + 8-bit absmax + one constant per 256 + the mean
    assert q.bits_per_parameter() == pytest.approx(expected)


# --- whole models --------------------------------------------------------------------------------

def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32), nn.ReLU(),
                         nn.ModuleDict({"lm_head": nn.Linear(32, 10)}))


def test_fake_quantize_model_works_on_a_copy_and_skips_lm_head():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = utils.fake_quantize_model(model, "int", 4, 64)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key])
    assert quantized.fake_quantized == ["1"]
    assert torch.equal(quantized[3]["lm_head"].weight, model[3]["lm_head"].weight)
    assert torch.equal(quantized[0].weight, model[0].weight)  # embeddings are not Linear layers
    assert torch.equal(quantized[1].bias, model[1].bias)
    expected = utils.dequantize_blockwise(utils.quantize_blockwise(model[1].weight, "int", 4, 64))
    assert torch.equal(quantized[1].weight, expected)
    assert not torch.equal(quantized[1].weight, model[1].weight)


def test_fake_quantize_model_in_place(tiny):
    model, _ = utils.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        same = utils.fake_quantize_model(model, "nf4", 4, 64, inplace=True)
        after = model(ids).logits
    assert same is model
    assert len(model.fake_quantized) == 7 * model.config.num_hidden_layers
    assert not torch.allclose(before, after)
    levels = utils.nf4_levels()
    w = model.model.layers[0].self_attn.q_proj.weight.reshape(-1, 64)
    ratios = w / w.abs().amax(1, keepdim=True)
    assert torch.isclose(ratios.unsqueeze(-1), levels, atol=1e-5).any(-1).all()  # every value sits on the grid


# --- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "int8"}, "kind='int', bits=8"),
    ({"kind": "nf4", "bits": 3}, "bits=4"),
    ({"kind": "int", "bits": 9}, "from 2 to 8"),
    ({"kind": "int", "bits": 1}, "from 2 to 8"),
    ({"kind": "int", "bits": True}, "bits must be an int"),
    ({"block_size": 0}, "positive int"),
    ({"block_size": -64}, "positive int"),
    ({"block_size": 6.4}, "positive int"),
])
def test_bad_formats_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        utils.quantize_blockwise(_weights(), **kwargs)


def test_bad_tensors_are_clear_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        utils.quantize_blockwise([[0.1, 0.2]])
    with pytest.raises(TypeError, match="floating-point"):
        utils.quantize_blockwise(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        utils.quantize_blockwise(torch.zeros(0))
    with pytest.raises(TypeError, match="quantize_blockwise returned"):
        utils.dequantize_blockwise(torch.zeros(4))
    with pytest.raises(ValueError, match="Shapes differ"):
        utils.quantization_error(torch.zeros(4), torch.zeros(5))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        utils.fake_quantize_model("model")
    with pytest.raises(ValueError, match="No nn.Linear"):
        utils.fake_quantize_model(_tiny_model(), skip=("1", "lm_head"))
    assert isinstance(utils.quantize_blockwise(_weights()), QuantizedTensor)


def test_bad_storage_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="numel"):
        utils.bits_per_parameter(8, None)
    with pytest.raises(ValueError, match="block_size"):
        utils.bits_per_parameter(4, 0)
    with pytest.raises(ValueError, match="bits"):
        utils.bits_per_parameter(0, 64)
    with pytest.raises(ValueError, match="numel"):
        utils.bits_per_parameter(4, 64, numel=-3)


# --- real 4-bit models (bitsandbytes) --------------------------------------------------------------

def test_bnb_cpu_shape_rules():
    # SmolLM2-135M's projections (576 / 192 / 1536 features) fit both; the tiny profile's do not.
    for out_features, in_features in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        assert utils.quantization.bnb_cpu_packing_fits(out_features, in_features)
        assert utils.quantization.bnb_cpu_dequantize_fits(in_features)
    assert not utils.quantization.bnb_cpu_packing_fits(16, 64)  # key projection: 16 outputs, not a multiple of 32
    assert not utils.quantization.bnb_cpu_packing_fits(176, 64)
    assert not utils.quantization.bnb_cpu_packing_fits(64, 176)  # 176 inputs: blocks of 64 straddle rows
    assert not utils.quantization.bnb_cpu_dequantize_fits(176)
    assert utils.quantization.bnb_cpu_dequantize_fits(176, blocksize=16)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        utils.quantization.bnb_cpu_packing_fits(0, 64)
    with pytest.raises(ValueError, match="blocksize"):
        utils.quantization.bnb_cpu_dequantize_fits(64, blocksize=True)


class _Fake4bit(nn.Module):
    """Stands for a bitsandbytes Linear4bit on a CPU with AVX512-BF16 (no bitsandbytes needed)."""

    def __init__(self, out_features, in_features, packed=False):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.weight.quant_state = type("State", (), {"blocksize": 64, "packing_format_for_cpu": packed})()
        self.support_avx512bf16_for_cpu = True


def test_keep_bnb_cpu_packing_safe_switches_off_only_what_does_not_fit():
    model = nn.ModuleDict({"q": _Fake4bit(64, 64), "k": _Fake4bit(16, 64), "down": _Fake4bit(64, 176),
                           "done": _Fake4bit(64, 64, packed=True), "plain": nn.Linear(3, 5)})
    assert utils.quantization.keep_bnb_cpu_packing_safe(model) == ["k", "down"]
    assert [model[n].support_avx512bf16_for_cpu for n in ("q", "k", "down", "done")] == [True, False, False, True]
    assert utils.quantization.keep_bnb_cpu_packing_safe(model) == []  # idempotent
    with pytest.raises(TypeError, match="torch.nn.Module"):
        utils.quantization.keep_bnb_cpu_packing_safe("model")


def _saved_tiny_llama(tmp_path):
    """A 2-block Llama with the tiny profile's awkward shapes: k/v projections of 16 outputs, an MLP of 176."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    return model


def _reference(model):
    """What the 4-bit model should compute: NF4 fake quantisation, down_proj (176 inputs) kept in float."""
    return utils.fake_quantize_model(model, "nf4", 4, 64, skip=("lm_head", "down_proj"))


@pytest.mark.parametrize("cpu_packing", [False, True])
def test_load_4bit_model_runs_the_tiny_shapes_on_every_cpu(tmp_path, cpu_packing):
    """The CH07 QLoRA base in the tiny profile. On a CPU with AVX512-BF16, bitsandbytes' packed path used to
    fail at the first inference call ("N must be divisible by block_n", k_proj has 16 outputs)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (CH07); the 4-bit checks run when installed")
    from bitsandbytes.nn import Linear4bit

    model = _saved_tiny_llama(tmp_path)
    q4 = utils.quantization.load_4bit_model(tmp_path, device="cpu", double_quant=False, cpu_packing=cpu_packing)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, expected = q4(ids).logits, _reference(model)(ids).logits
    # bitsandbytes' CPU kernel de-quantises layers with 176 inputs wrongly: they stay in float
    assert q4.kept_unquantized == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    layer = q4.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, Linear4bit) and type(layer.mlp.down_proj) is nn.Linear
    packed = utils.quantization.bnb_cpu_packed_path_available() and cpu_packing
    # the packed kernel computes in bfloat16; the generic path de-quantises to the same float32 weights
    torch.testing.assert_close(ours, expected, **utils.checks.tolerances(expected.to(torch.bfloat16) if packed
                                                                           else expected))
    assert getattr(layer.self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False) == packed
    assert not getattr(layer.self_attn.k_proj.weight.quant_state, "packing_format_for_cpu", False)


def test_load_4bit_model_trains_adapters_after_an_evaluation(tmp_path):
    """QLoRA after an evaluation (utils.train's eval_fn does one): every adapter gets a gradient on every CPU."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (CH07); the 4-bit checks run when installed")
    from peft import LoraConfig, get_peft_model

    _saved_tiny_llama(tmp_path)
    q4 = utils.quantization.load_4bit_model(tmp_path, device="cpu")
    peft_model = get_peft_model(q4, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    with torch.no_grad():
        peft_model(ids)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 * 2  # 2 blocks x 2 modules x (A, B)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_load_4bit_model_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="save_pretrained"):
        utils.quantization.load_4bit_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="'nf4' or 'fp4'"):
        utils.quantization.load_4bit_model(tmp_path, quant_type="int4")


def test_load_4bit_model_without_bitsandbytes_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install"):
        utils.quantization.load_4bit_model(tmp_path)
