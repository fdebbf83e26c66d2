"""Access to the Hugging Face Hub before a notebook's first load (the ``full`` profile).

Two of the course's models are gated (google/gemma-3-270m, meta-llama/Llama-3.2-1B): their licence must be accepted
on the Hub and the session needs a token. :func:`check_model_access` finds out, before any download, whether this
session can load a model, and prints the steps when it cannot: the same text :class:`utils.GatedModelError` gives
(:func:`utils.models.access_steps`). It never raises for a missing token, a missing access or a Hub it cannot
reach: it prints what to do and returns a short status, and ``load_model`` fails afterwards with the same advice.
In the ``cpu`` and ``tiny`` profiles it prints one line and asks no one.
"""

from __future__ import annotations

import os

from .models import CPU_FALLBACK, HUB_ID_PATTERN, access_steps, hub_problem, local_folder, unreachable_help
from .profiles import get_profile

#: What :func:`check_model_access` can return.
ACCESS_STATUSES = ("skipped", "local", "offline", "open", "granted", "no_token", "no_access", "bad_token",
                   "not_found", "unreachable", "unknown")

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def _token() -> str | None:
    """This session's Hugging Face token: ``HF_TOKEN``, the Colab secret ``HF_TOKEN`` or ``hf auth login``'s file."""
    from huggingface_hub import get_token

    return get_token()


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _OFFLINE_VALUES


def _status_of(error: Exception) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _say_no_token(model_id: str) -> str:
    print(f"{model_id} is gated on the Hugging Face Hub and this session has no Hugging Face token. "
          f"To get access:\n{access_steps(model_id)}")
    return "no_token"


def _checked_id(model_id: str | os.PathLike) -> str:
    """``model_id`` as a stripped string; a clear error when it is empty or not a string (or path)."""
    if isinstance(model_id, os.PathLike):
        model_id = os.fspath(model_id)
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"check_model_access expects a model id such as 'meta-llama/Llama-3.2-1B' (a non-empty "
                         f"string), got {model_id!r}.")
    return model_id.strip()


def _without_the_hub(model_id: str) -> str | None:
    """The status when the Hub need not (or must not) be asked: a local folder, the ``cpu``/``tiny``
    profiles, ``HF_HUB_OFFLINE``; ``None`` when it must be. A text that is no Hub id is an error."""
    if local_folder(model_id) is not None:
        print(f"{model_id} is a local folder: no Hub access needed.")
        return "local"
    if not HUB_ID_PATTERN.match(model_id):
        raise ValueError(f"{model_id!r} is not a Hugging Face Hub id: use 'owner/name', e.g. "
                         "'meta-llama/Llama-3.2-1B', or the folder of a saved model.")
    profile = get_profile()
    if profile != "full":
        print(f"[{profile} profile] {model_id}: no Hub access needed (this profile runs offline).")
        return "skipped"
    if _hub_offline():
        print(f"HF_HUB_OFFLINE is set: the Hub was not asked about {model_id}. load_model reads it from the local "
              f"cache if it is there; if not, unset HF_HUB_OFFLINE, or {CPU_FALLBACK}")
        return "offline"
    return None


def _ask_the_hub(model_id: str) -> str:
    """Ask the Hub whether ``model_id`` is gated (``model_info``) and, unless it is open, whether this
    session's token may read it (``auth_check``); print the answer and return the status."""
    token, gated = None, None
    try:
        token = _token()
        api = _api()
        info = api.model_info(model_id, token=token)
        gated = getattr(info, "gated", None)
        if gated is False:
            print(f"{model_id} is not gated: no token needed.")
            return "open"
        if gated and not token:
            return _say_no_token(model_id)
        api.auth_check(model_id, token=token)
    except Exception as error:  # noqa: BLE001 - the point is a message instead of a stack trace
        return _explain_refusal(model_id, error, token)
    print(f"{model_id}: {'gated, and ' if gated else ''}this session's token has access.")
    return "granted"


def _explain_refusal(model_id: str, error: Exception, token: str | None) -> str:
    """Print what ``error`` (raised while asking the Hub about ``model_id``) means, and what to do;
    return the status."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    problem = ("gated" if isinstance(error, GatedRepoError) else None if isinstance(error, RepositoryNotFoundError)
               else hub_problem(error))
    if token and _status_of(error) == 401 and not isinstance(error, RepositoryNotFoundError):
        print(f"The Hub refused this session's token (401) while checking {model_id}: it is mistyped, revoked "
              f"or expired. Create a new one and give it to the session:\n{access_steps(model_id)}")
        return "bad_token"
    if problem == "gated" and not token:
        return _say_no_token(model_id)
    if problem == "gated":
        print(f"{model_id} is gated and this session's token has no access to it yet: the licence is not "
              "accepted with this account, or the request is still pending. To get access:\n"
              + access_steps(model_id))
        return "no_access"
    if isinstance(error, RepositoryNotFoundError):  # (GatedRepoError is one too: handled above)
        print(f"{model_id} was not found on the Hugging Face Hub{' for this token' if token else ''}: check the "
              "spelling (owner/name, case included). If it is a private or gated model, this session needs a "
              f"token with access:\n{access_steps(model_id)}")
        return "not_found"
    if problem == "offline":
        print(f"Could not check access to {model_id}: {unreachable_help()}\n"
              f"(the check said {type(error).__name__}: {first_line})")
        return "unreachable"
    print(f"Could not check access to {model_id} ({type(error).__name__}: {first_line}); load_model will try "
          "anyway and say what went wrong.")
    return "unknown"


def check_model_access(model_id: str | os.PathLike) -> str:
    """Say whether this session can download ``model_id`` from the Hub, and what to do if it cannot.

    Call it once, before a notebook's first ``utils.load_model(MODEL_ID)``. In the ``full`` profile it reads the
    token (``huggingface_hub.get_token()``: the ``HF_TOKEN`` variable, the Colab secret, or a saved login) and asks
    the Hub whether the model is gated (``model_info``) and whether the token may read it (``auth_check``). When
    it may not, it prints the steps: the licence page, the Colab ``HF_TOKEN`` secret, the delay of manual approval
    (Meta's Llama), and the ``cpu`` profile as a way to run without an account.

    Returns one of :data:`ACCESS_STATUSES`: ``"skipped"`` (``cpu``/``tiny``: no network), ``"local"`` (a saved
    folder), ``"offline"`` (``HF_HUB_OFFLINE`` is set: not asked), ``"open"`` (not gated), ``"granted"``,
    ``"no_token"``, ``"no_access"``, ``"bad_token"``, ``"not_found"``, ``"unreachable"`` or ``"unknown"``.

    Raises:
        ValueError: ``model_id`` is not a non-empty string (or path) naming a Hub model or a folder.
        FileNotFoundError: ``model_id`` looks like a folder's path, but no folder is there.
    """
    model_id = _checked_id(model_id)
    status = _without_the_hub(model_id)
    return status if status is not None else _ask_the_hub(model_id)
