"""utils.check_model_access: the access check before a gated model's first load, with a fake Hub (no network)."""

from __future__ import annotations

import importlib.util
import types

import pytest

import utils
from utils import hub, models

LLAMA = "meta-llama/Llama-3.2-1B"
GEMMA = "google/gemma-3-270m"


def _response(status: int):
    httpx = pytest.importorskip("httpx2") if importlib.util.find_spec("httpx2") else pytest.importorskip("httpx")
    return httpx.Response(status, request=httpx.Request("GET", f"https://huggingface.co/api/models/{LLAMA}"))


class _FakeApi:
    """``model_info`` says whether the repo is gated; ``auth_check`` raises ``denied`` when given one."""

    def __init__(self, gated=False, denied: Exception | None = None, info_error: Exception | None = None):
        self.gated, self.denied, self.info_error = gated, denied, info_error
        self.calls: list[tuple[str, str, object]] = []

    def model_info(self, repo_id, token=None):
        self.calls.append(("model_info", repo_id, token))
        if self.info_error is not None:
            raise self.info_error
        return types.SimpleNamespace(id=repo_id, gated=self.gated)

    def auth_check(self, repo_id, token=None):
        self.calls.append(("auth_check", repo_id, token))
        if self.denied is not None:
            raise self.denied


@pytest.fixture
def full(monkeypatch):
    """The full profile with the Hub 'online' (the fake one): HF_HUB_OFFLINE unset for this test."""
    monkeypatch.setenv("RLLM_PROFILE", "full")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _hub(monkeypatch, api: _FakeApi, token: str | None):
    monkeypatch.setattr(hub, "_api", lambda: api)
    monkeypatch.setattr(hub, "_token", lambda: token)
    return api


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the check must not ask the Hub here")

    monkeypatch.setattr(hub, "_api", refuse)
    monkeypatch.setattr(hub, "_token", refuse)


def _assert_steps(out: str, model_id: str):
    assert models.access_steps(model_id) in out  # the one text GatedModelError gives too
    assert f"https://huggingface.co/{model_id}" in out and "accept the licence" in out
    assert "HF_TOKEN" in out and "key icon" in out and "Notebook access" in out and "Restart session" in out
    assert "RLLM_PROFILE=cpu" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("profile", ["cpu", "tiny"])
def test_cpu_and_tiny_print_one_line_and_ask_no_one(monkeypatch, capsys, profile):
    monkeypatch.setenv("RLLM_PROFILE", profile)
    _no_network(monkeypatch)
    assert utils.check_model_access(LLAMA) == "skipped"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"[{profile} profile]" in out and "no Hub access needed" in out


@pytest.mark.parametrize("bad", ["", "   ", None, 3, ["meta-llama/Llama-3.2-1B"]])
def test_empty_or_non_string_id_is_a_clear_error(monkeypatch, bad):
    _no_network(monkeypatch)
    with pytest.raises(ValueError, match="non-empty string"):
        utils.check_model_access(bad)


def test_text_that_is_no_hub_id_is_a_clear_error(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(ValueError, match="not a Hugging Face Hub id: use 'owner/name'"):
        utils.check_model_access("llama 3.2 1b")


def test_a_local_folder_needs_no_access(full, monkeypatch, capsys, tmp_path):
    _no_network(monkeypatch)
    assert utils.check_model_access(tmp_path) == "local"
    assert "local folder" in capsys.readouterr().out


def test_offline_mode_is_said_without_asking(monkeypatch, capsys):
    monkeypatch.setenv("RLLM_PROFILE", "full")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_network(monkeypatch)
    assert utils.check_model_access(LLAMA) == "offline"
    out = capsys.readouterr().out
    assert "HF_HUB_OFFLINE" in out and "local cache" in out and "RLLM_PROFILE=cpu" in out


@pytest.mark.parametrize("error", [ConnectionError("[Errno -3] Temporary failure in name resolution"),
                                   TimeoutError("timed out")])
def test_unreachable_hub_is_a_message_not_a_stack_trace(full, monkeypatch, capsys, error):
    _hub(monkeypatch, _FakeApi(info_error=error), token="hf_x")
    assert utils.check_model_access(LLAMA) == "unreachable"
    out = capsys.readouterr().out
    assert "not reachable" in out and "RLLM_PROFILE=cpu" in out and "Traceback" not in out


def test_a_model_that_is_not_gated_is_said_quietly(full, monkeypatch, capsys):
    api = _hub(monkeypatch, _FakeApi(gated=False), token=None)
    assert utils.check_model_access("Qwen/Qwen3-0.6B") == "open"
    assert capsys.readouterr().out == "Qwen/Qwen3-0.6B is not gated: no token needed.\n"
    assert [call[0] for call in api.calls] == ["model_info"]


@pytest.mark.parametrize("model_id", [LLAMA, GEMMA])
def test_gated_model_without_a_token_prints_the_steps(full, monkeypatch, capsys, model_id):
    api = _hub(monkeypatch, _FakeApi(gated="manual"), token=None)
    assert utils.check_model_access(model_id) == "no_token"
    out = capsys.readouterr().out
    assert "no Hugging Face token" in out
    _assert_steps(out, model_id)
    assert "auth_check" not in [call[0] for call in api.calls]
    if model_id == LLAMA:
        assert "Meta approves Llama access by hand" in out and "hours" in out


def test_gated_model_without_access_prints_the_steps(full, monkeypatch, capsys):
    from huggingface_hub.errors import GatedRepoError

    denied = GatedRepoError("403 Client Error. Cannot access gated repo", response=_response(403))
    api = _hub(monkeypatch, _FakeApi(gated="manual", denied=denied), token="hf_secret")
    assert utils.check_model_access(LLAMA) == "no_access"
    out = capsys.readouterr().out
    assert "no access to it yet" in out and "pending" in out and "Meta approves Llama access by hand" in out
    _assert_steps(out, LLAMA)
    assert ("auth_check", LLAMA, "hf_secret") in api.calls
    assert "hf_secret" not in out  # never print the token


def test_gated_model_with_access_is_granted(full, monkeypatch, capsys):
    api = _hub(monkeypatch, _FakeApi(gated="auto"), token="hf_secret")
    assert utils.check_model_access(GEMMA) == "granted"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "has access" in out and "hf_secret" not in out
    assert [call[0] for call in api.calls] == ["model_info", "auth_check"]


def test_misspelled_id_and_refused_token(full, monkeypatch, capsys):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    missing = RepositoryNotFoundError("404 Client Error. Repository Not Found", response=_response(404))
    _hub(monkeypatch, _FakeApi(info_error=missing), token=None)
    assert utils.check_model_access("meta-llama/Llama-3.2-1b-typo") == "not_found"
    assert "check the spelling" in capsys.readouterr().out
    refused = HfHubHTTPError("401 Client Error: Unauthorized. Invalid credentials", response=_response(401))
    _hub(monkeypatch, _FakeApi(info_error=refused), token="hf_revoked")
    assert utils.check_model_access(LLAMA) == "bad_token"
    out = capsys.readouterr().out
    assert "refused this session's token" in out and "hf_revoked" not in out
    _assert_steps(out, LLAMA)


def test_gated_model_error_and_the_check_share_one_text_and_show_no_stack_trace():
    error = models.GatedModelError(f"{LLAMA} is gated.\n{models.access_steps(LLAMA)}")
    lines = error._render_traceback_()  # what IPython shows instead of a traceback
    assert lines[0] == f"GatedModelError: {LLAMA} is gated." and "Traceback" not in "\n".join(lines)
    assert "\n".join(lines[1:]) == models.access_steps(LLAMA)
    assert "RLLM_PROFILE=cpu" in models.unreachable_help()


def test_unknown_gating_asks_auth_check_and_does_not_claim_gated(full, monkeypatch, capsys):
    api = _hub(monkeypatch, _FakeApi(gated=None), token="hf_secret")  # an old Hub answer without the field
    assert utils.check_model_access("Qwen/Qwen3-0.6B") == "granted"
    assert capsys.readouterr().out == "Qwen/Qwen3-0.6B: this session's token has access.\n"
    assert [call[0] for call in api.calls] == ["model_info", "auth_check"]


def test_a_missing_folder_is_a_clear_error(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="looks like a folder"):
        utils.check_model_access("./no/such/model")
    assert hub.HUB_ID_PATTERN is models.HUB_ID_PATTERN and utils.models.GatedModelError is utils.GatedModelError
