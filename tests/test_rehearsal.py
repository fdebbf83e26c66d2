"""The precision policy under a simulated T4, and the rehearsal's own environment (``make rehearse``)."""

import os

import pytest
import torch

import utils
from utils import precision


@pytest.fixture
def t4(monkeypatch):
    monkeypatch.setenv(precision.HARDWARE_ENV, "t4")
    monkeypatch.setenv("RLLM_PROFILE", "tiny")


def test_simulated_t4_loads_half_precision_except_gemma(t4):
    llama, _ = utils.load_model("meta-llama/Llama-3.2-1B")
    gemma, _ = utils.load_model("google/gemma-3-270m")
    assert utils.precision.dtype_of(llama) == torch.float16
    assert utils.precision.dtype_of(gemma) == torch.float32
    assert utils.device_of(llama).type == utils.precision.default_device()  # a CPU keeps them; a GPU takes them


def test_simulated_t4_trains_with_masters_and_loss_scaling(t4):
    model, tokenizer = utils.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    loader = utils.make_dataloader(utils.load_texts("wikitext", n=8), tokenizer, batch_size=4, max_length=32)
    history = utils.train(model, loader, max_steps=2, lr=1e-3, progress=False)
    assert history["settings"]["mixed_precision"] == "torch.float16"
    assert history["settings"]["loss_scaling"] is True
    assert history["settings"]["float32_master_copies"] > 0
    assert all(map(lambda v: v == v and abs(v) < 1e4, history["loss"]))


def test_explicit_cpu_hardware_keeps_float32(monkeypatch):
    monkeypatch.setenv(precision.HARDWARE_ENV, "cpu")
    monkeypatch.setenv("RLLM_PROFILE", "tiny")
    model, _ = utils.load_model("meta-llama/Llama-3.2-1B")
    assert utils.precision.dtype_of(model) == torch.float32


@pytest.mark.skipif(os.environ.get("RLLM_REHEARSAL") != "1", reason="only under `make rehearse`")
def test_the_rehearsal_runs_as_a_t4():
    """`make rehearse` must really run the notebooks in half precision, or it rehearses nothing."""
    assert os.environ.get(precision.HARDWARE_ENV) == "t4"
    assert precision.precision_policy().hardware == precision.SIMULATED_T4
    model, _ = utils.load_model("meta-llama/Llama-3.2-1B")
    assert utils.precision.dtype_of(model) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the whole rehearsal")
def test_the_cuda_rehearsal_script_says_what_to_do_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "rehearse_cuda.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode != 0 and "make rehearse" in done.stderr
