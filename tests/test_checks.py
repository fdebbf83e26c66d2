"""utils.tolerances: from-scratch checks that pass in every dtype and still catch a wrong formula."""

import pytest
import torch

import utils
from utils import tolerances

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rms_norm(x, weight, eps):
    """RMSNorm as CH03 writes it: in float32, scaled by the weight, cast back."""
    x32 = x.float()
    return (weight.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def no_weight(x, weight, eps):
    return rms_norm(x, torch.ones_like(weight), eps)


def mean_abs(x, weight, eps):
    x32 = x.float()
    return (weight.float() * x32 / (x32.abs().mean(-1, keepdim=True) + eps)).to(x.dtype)


def layer_norm_style(x, weight, eps):
    return rms_norm(x - x.mean(-1, keepdim=True), weight, eps)


@pytest.fixture(scope="module")
def qwen_norm_and_mlp():
    model, _ = utils.load_model("Qwen/Qwen3-0.6B")  # the tiny profile in the tests
    block = model.model.layers[0]
    with torch.no_grad():  # a random gain, so that forgetting the weight shows
        block.input_layernorm.weight.copy_(1.0 + 0.5 * torch.randn(block.input_layernorm.weight.shape,
                                                                  generator=torch.Generator().manual_seed(0)))
    return block.input_layernorm, block.mlp


def test_values_per_dtype():
    assert tolerances(torch.float32) == {"atol": 1e-5, "rtol": 1e-5}
    assert tolerances(torch.float16) == {"atol": 1e-3, "rtol": 1e-3}
    assert tolerances(torch.bfloat16) == {"atol": 1e-2, "rtol": 1e-2}



def test_atol_scales_with_the_reference():
    small = torch.tensor([0.02, -0.01], dtype=torch.bfloat16)
    assert tolerances(small)["rtol"] == 1e-2
    assert tolerances(small)["atol"] == pytest.approx(1e-2 * 0.02, rel=1e-2)
    assert tolerances(torch.tensor([-300.0, 1.0]))["atol"] == pytest.approx(300 * 1e-5)
    assert tolerances(torch.zeros(3))["atol"] > 0


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "float32", None])
def test_non_float_dtypes_are_refused_with_a_hint(bad):
    with pytest.raises(ValueError, match="torch.equal"):
        tolerances(bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_from_scratch_matches_the_module_in_every_dtype(qwen_norm_and_mlp, dtype):
    norm, _ = qwen_norm_and_mlp
    norm = norm.to(dtype)
    x = (3 * torch.randn(4, 16, norm.weight.shape[0], generator=torch.Generator().manual_seed(1))).to(dtype)
    with torch.no_grad():
        theirs = norm(x)
        torch.testing.assert_close(rms_norm(x, norm.weight, norm.variance_epsilon), theirs, **tolerances(theirs))
        shifted = norm(x + 0.5)  # a non-zero mean, so that subtracting it shows
        for wrong in (no_weight, mean_abs, layer_norm_style):
            with pytest.raises(AssertionError):
                torch.testing.assert_close(wrong(x + 0.5, norm.weight, norm.variance_epsilon), shifted,
                                           **tolerances(shifted))


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_from_scratch_matches_the_module_in_every_dtype(qwen_norm_and_mlp, dtype):
    _, mlp = qwen_norm_and_mlp
    mlp = mlp.to(dtype)
    x = torch.randn(2, 5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        theirs = mlp(x)
        ours = (mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        torch.testing.assert_close(ours, theirs, **tolerances(theirs))
        swapped = (mlp.act_fn(x @ mlp.up_proj.weight.T) * (x @ mlp.gate_proj.weight.T)) @ mlp.down_proj.weight.T
        with pytest.raises(AssertionError):  # activation on the wrong branch
            torch.testing.assert_close(swapped, theirs, **tolerances(theirs))


def test_check_damping_accepts_positive_numbers_only():
    from utils.checks import check_damping

    for good in (1e-6, 0.1, 1, 10.0):
        check_damping(good, 1.0)
    for bad in (0, -0.5, float("inf"), float("nan"), True, "1", None):
        with pytest.raises(ValueError, match=r"damping must be a positive number \(0.1 is the default\)"):
            check_damping(bad, 0.1)
