"""Tests of utils.precision: the one precision-and-device policy (hardware -> dtypes, loss scaling)."""

from __future__ import annotations

import pytest
import torch

from utils import precision
from utils.precision import CPU, SIMULATED_T4, Hardware, PrecisionPolicy

A100 = Hardware("A100", cuda=True, native_bf16=True)
REAL_T4 = Hardware("Tesla T4", cuda=True, native_bf16=False)


@pytest.mark.parametrize("hardware, llama, gemma, autocast_fp32, scaler", [
    (CPU, torch.float32, torch.float32, None, False),
    (A100, torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    (REAL_T4, torch.float16, torch.float32, torch.float16, True),
    (SIMULATED_T4, torch.float16, torch.float32, torch.float16, True),
])
def test_the_policy_table(hardware, llama, gemma, autocast_fp32, scaler):
    policy = precision.precision_policy(hardware)
    assert policy.load_dtype("llama") == llama and policy.compute_dtype("llama") == llama
    assert policy.load_dtype("gemma3_text") == gemma
    assert policy.autocast_dtype(torch.float32, "llama") == autocast_fp32
    assert policy.needs_grad_scaler(policy.autocast_dtype(torch.float32, "llama")) is scaler
    assert policy.autocast_dtype(torch.float16, "llama") == torch.float16  # a half model computes in its dtype
    assert policy.autocast_dtype(torch.float32, "gemma3") is (None if not hardware.native_bf16 else torch.bfloat16)


def test_t4_gemma_never_gets_float16():
    policy = precision.precision_policy(REAL_T4)
    assert policy.load_dtype("gemma3") == torch.float32
    assert policy.autocast_dtype(torch.float32, "gemma3") is None


def test_describe_names_the_hardware_and_the_choice():
    assert "float16" in precision.precision_policy(SIMULATED_T4).describe()
    assert "master" in precision.precision_policy(SIMULATED_T4).describe()
    assert "float32" in precision.precision_policy(CPU).describe()


def test_hardware_from_the_environment(monkeypatch):
    monkeypatch.setenv("RLLM_HARDWARE", " T4 ")
    assert precision.detect_hardware() == SIMULATED_T4 and precision.precision_policy().simulated
    monkeypatch.setenv("RLLM_HARDWARE", "cpu")
    assert precision.detect_hardware() == CPU
    monkeypatch.setenv("RLLM_HARDWARE", "auto")
    assert precision.detect_hardware().cuda == torch.cuda.is_available()
    monkeypatch.delenv("RLLM_HARDWARE")
    assert precision.detect_hardware().cuda == torch.cuda.is_available()


def test_unknown_hardware_says_what_is_known(monkeypatch):
    monkeypatch.setenv("RLLM_HARDWARE", "tpu")
    with pytest.raises(ValueError, match="auto.*cpu.*t4"):
        precision.detect_hardware()


def test_policy_rejects_what_is_not_hardware():
    with pytest.raises(TypeError, match="Hardware"):
        precision.precision_policy("t4")
    assert isinstance(precision.precision_policy(CPU), PrecisionPolicy)


def test_default_device_is_where_pytorch_can_compute(monkeypatch):
    monkeypatch.setenv("RLLM_HARDWARE", "t4")
    assert precision.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_and_dtype_of_a_model():
    model = torch.nn.Linear(2, 2).half()
    assert precision.device_of(model) == torch.device("cpu")
    assert precision.dtype_of(model) == torch.float16
    assert precision.dtype_of(torch.nn.ReLU()) == torch.float32  # no parameter: the default
    assert precision.device_of(torch.nn.ReLU()) == torch.device("cpu")
    for fn in (precision.device_of, precision.dtype_of):
        with pytest.raises(TypeError, match="torch.nn.Module"):
            fn("model")


def test_to_device_keeps_the_structure_and_the_dtypes():
    from transformers import BatchEncoding

    model = torch.nn.Linear(2, 2)
    ids = torch.tensor([[1, 2]])
    batch = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones(1, 2, dtype=torch.long), "n": 3})
    moved = precision.to_device(batch, model)
    assert isinstance(moved, dict) and moved["n"] == 3 and moved["input_ids"].dtype == torch.long
    assert torch.equal(moved["input_ids"], ids)
    pair = precision.to_device((ids, [ids]), "cpu")
    assert isinstance(pair, tuple) and isinstance(pair[1], list)
    assert precision.to_device("text", model) == "text"
    with pytest.raises(RuntimeError):
        precision.to_device(ids, "no-such-device")


def test_the_policy_on_a_device():
    a100 = precision.precision_policy(A100)
    assert a100.on("cuda:0") is a100
    assert a100.on("cpu").hardware == CPU and a100.on(torch.device("cpu")).load_dtype("llama") == torch.float32
    t4 = precision.precision_policy(SIMULATED_T4)
    assert t4.on("cpu") is t4  # a simulated T4 keeps the T4's decisions for tensors on the CPU
    with pytest.raises(RuntimeError):
        a100.on("no-such-device")


def test_free_memory_collects_what_is_no_longer_referenced():
    import weakref

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.me = self  # a reference cycle: `del` alone leaves it alive until the collector runs

    holder = Holder()
    alive = weakref.ref(holder)
    del holder
    left = precision.free_memory()
    assert alive() is None
    assert left is None if not torch.cuda.is_available() else isinstance(left, int)
