"""utils.publish: a saved folder reloads to the same logits (surgery included), the card holds every change and
number, the Hub is asked only with a repository id and a token (mocked: no network), bad inputs say what to do."""

from __future__ import annotations

import copy

import huggingface_hub
import pytest
import torch
from tiny_families import _tiny

import utils
from utils import moe, publish
from utils.attention import remove_attention, removed_attention
from utils.depth import remove_blocks
from utils.lora import apply_lora

BASE = "Qwen/Qwen3-0.6B"
CHANGES = ["removed decoder blocks 3-5 (angular distance)", "recovered by distillation: 2 steps | skew KL"]
RESULTS = {"perplexity (wikitext test)": 21.734512, "perplexity before recovery": 48.5, "parameters": 1_298_000,
           "recovered share": torch.tensor(0.6125), "device": "CPU (x86_64)"}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _save(model, tokenizer, folder, **kwargs):
    options = {"base_model": BASE, "changes": CHANGES, "results": RESULTS, **kwargs}
    return publish.save_with_card(model, tokenizer, folder, **options)


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return _tiny("qwen3", tokenizer)


@pytest.mark.parametrize("cut", ["none", "depth", "attention"])
def test_the_folder_reloads_to_the_same_logits(cut, qwen, tokenizer, loader, tmp_path, capsys):
    model = copy.deepcopy(qwen)
    if cut == "depth":
        model = remove_blocks(model, [3, 4, 5])
    elif cut == "attention":
        model = remove_attention(model, [1, 4])
    folder = _save(model, tokenizer, tmp_path / "model")
    assert "Nothing was pushed" in capsys.readouterr().out
    reloaded, reloaded_tokenizer = utils.load_model(folder, device="cpu")
    batch = next(iter(loader))
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), atol=1e-5, rtol=0)
    assert reloaded.config.num_hidden_layers == model.config.num_hidden_layers
    assert len(reloaded_tokenizer) == len(tokenizer)
    if cut == "depth":
        assert reloaded.config.removed_layers == [3, 4, 5]
    if cut == "attention":
        assert removed_attention(reloaded) == [1, 4]


def test_a_mixture_of_experts_is_saved_as_the_course_exports_it(tokenizer, loader, tmp_path):
    model = _tiny("llama", tokenizer)
    moe.moefy(model, 4, 2, dataloader=loader, layers=[1], progress=False)
    moe.set_routing(model, combine="softmax")  # the rule transformers' MoE blocks use (save_moe says so)
    folder = _save(model, tokenizer, tmp_path / "moe", base_model="meta-llama/Llama-3.2-1B")
    reloaded, _ = utils.load_model(folder, device="cpu")
    assert reloaded.config.model_type == "qwen2_moe"
    batch = next(iter(loader))
    assert (_logits(reloaded, batch) - _logits(model, batch)).abs().max() < 1e-4
    assert "Qwen2-MoE" in (folder / "README.md").read_text()


def test_the_card_lists_every_change_and_number(qwen, tokenizer, tmp_path):
    model = remove_blocks(copy.deepcopy(qwen), [3, 4, 5])
    folder = _save(model, tokenizer, tmp_path / "card", tags=["distillation"], notebook="CH06_NB03",
                   recipe={"lr": 5e-4, "skew": 0.1, "layer_map": [0, 1, 2]})
    card = publish.read_card(folder)
    meta = card["metadata"]
    assert meta["base_model"] == BASE and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["rearchitecting-llms", "distillation"] and meta["library_name"] == "transformers"
    assert card["changes"] == CHANGES  # the '|' survives the table escaping
    assert set(card["results"]) == set(RESULTS)
    for name, value in RESULTS.items():
        got = card["results"][name]
        if isinstance(value, str):
            assert got == value
        else:
            assert got == pytest.approx(float(value), rel=1e-5), name
    assert isinstance(card["results"]["parameters"], int)
    text = (folder / "README.md").read_text()
    assert publish.COURSE_URL in text and "CH06_NB03" in text and "skew: 0.1" in text and "`tiny` profile" in text
    assert f"{len(utils.structure.decoder_blocks(model))} decoder blocks" in text
    assert f"{utils.count_parameters(model):,} parameters" in text


def test_the_licence_comes_from_the_base_model_or_must_be_given(qwen, tokenizer, tmp_path):
    assert publish.license_of("google/gemma-3-270m") == "gemma"
    assert publish.license_of("tiny-random/meta-llama/Llama-3.2-1B") == "llama3.2"
    assert publish.license_of("someone/model") is None
    with pytest.raises(ValueError, match="license="):
        _save(qwen, tokenizer, tmp_path / "a", base_model="someone/model")
    folder = _save(qwen, tokenizer, tmp_path / "b", base_model="someone/model", license="mit")
    assert publish.read_card(folder)["metadata"]["license"] == "mit"


class _FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls, never touches the network."""

    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        if self.fail:
            raise ConnectionError("no route to host")
        self.calls.append(("upload_folder", repo_id, folder_path))


@pytest.fixture
def hub(monkeypatch):
    _FakeApi.calls, _FakeApi.fail = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    return _FakeApi


def test_it_pushes_only_with_a_repository_id_and_a_token(qwen, tokenizer, tmp_path, hub, capsys):
    _save(qwen, tokenizer, tmp_path / "local")
    _save(qwen, tokenizer, tmp_path / "token_only", token="hf_x")
    assert hub.calls == []
    assert "nothing is pushed" in capsys.readouterr().out
    with pytest.raises(ValueError, match="token"):
        _save(qwen, tokenizer, tmp_path / "no_token", push_to="me/model")
    assert hub.calls == [] and not (tmp_path / "no_token").exists()  # checked before anything is written
    folder = _save(qwen, tokenizer, tmp_path / "pushed", push_to="me/model", token="hf_x", private=True)
    assert hub.calls == [("init", "hf_x"), ("create_repo", "me/model", {"repo_type": "model", "exist_ok": True,
                                                                        "private": True}),
                         ("upload_folder", "me/model", str(folder))]
    assert "https://huggingface.co/me/model" in capsys.readouterr().out
    assert 'utils.load_model("me/model")' in (folder / "README.md").read_text()


def test_a_failed_push_says_the_folder_is_saved(qwen, tokenizer, tmp_path, hub):
    hub.fail = True
    with pytest.raises(RuntimeError, match="saved in .*ConnectionError"):
        _save(qwen, tokenizer, tmp_path / "m", push_to="me/model", token="hf_x")
    assert (tmp_path / "m" / "README.md").exists() and (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize("options, match", [
    ({"changes": []}, "at least one change"),
    ({"changes": "removed blocks"}, "list of sentences"),
    ({"changes": ["removed blocks", " "]}, "non-empty sentence"),
    ({"results": {}}, "non-empty dict"),
    ({"results": {"ppl": [1.0, 2.0]}}, "not a number"),
    ({"results": {"ppl": None}}, "not a number"),
    ({"results": {"passed": True}}, "not a number"),
    ({"results": {"a | b": 1.0}}, "without '\\|'"),
    ({"base_model": ""}, "Hub id of the model"),
    ({"push_to": "model-without-owner", "token": "hf_x"}, "your-name/model-name"),
    ({"push_to": "me/model", "token": "hf_x", "base_model": "tiny-random/Qwen/Qwen3-0.6B"}, "not a Hub model id"),
])
def test_bad_inputs_say_what_to_do(options, match, qwen, tokenizer, tmp_path, hub):
    with pytest.raises(ValueError, match=match):
        _save(qwen, tokenizer, tmp_path / "m", **options)
    assert hub.calls == []


def test_models_that_would_not_reload_are_refused(qwen, tokenizer, tmp_path):
    adapted = copy.deepcopy(qwen)
    apply_lora(adapted, "q_proj", r=2)
    with pytest.raises(ValueError, match="merge_lora"):
        _save(adapted, tokenizer, tmp_path / "lora")
    with pytest.raises(ValueError, match="transformers model"):
        _save(torch.nn.Linear(2, 2), tokenizer, tmp_path / "linear")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _save(qwen, tokenizer, tmp_path / "file")


def test_read_card_needs_a_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_with_card"):
        publish.read_card(tmp_path)
