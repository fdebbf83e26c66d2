"""Writing a notebook's key figures as JSON under ``runs/<profile>/`` for the results collector."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

import torch

from .profiles import get_profile, runs_dir


def environment() -> dict[str, Any]:
    """Profile, date, hardware and library versions, stored with every result."""
    import transformers

    try:
        import optipfair

        optipfair_version = getattr(optipfair, "__version__", "installed")
    except ImportError:
        optipfair_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return {
        "profile": get_profile(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optipfair": optipfair_version,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float):
        return round(value, 6)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return value


def save_results(notebook: str, results: dict[str, Any]) -> Path:
    """Write ``results`` (plus the environment) to ``runs/<profile>/<notebook>.json``; return the path."""
    if not notebook or "/" in notebook:
        raise ValueError("notebook must be a plain name such as 'CH03_NB01_anatomy'.")
    if not isinstance(results, dict):
        raise TypeError("results must be a dict of JSON-serialisable values.")
    path = runs_dir() / f"{notebook}.json"
    payload = {"notebook": notebook, "environment": environment(), "results": _plain(results)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    print(f"Results written to {path}")
    return path


def load_results(name: str, profile: str | None = None) -> dict[str, Any] | None:
    """The ``results`` dict that :func:`save_results` wrote for ``name`` (a notebook, or a script such as
    ``"BENCH_pruning_domains"``) in ``runs/<profile>/``, or ``None`` when that run has not been made yet."""
    if not name or "/" in name:
        raise ValueError("name must be a plain name such as 'CH03_NB01_anatomy' or 'BENCH_pruning_domains'.")
    if profile is not None and profile not in ("full", "cpu", "tiny"):
        raise ValueError(f"profile must be 'full', 'cpu' or 'tiny' (or None for the active one), got {profile!r}.")
    path = runs_dir(profile) / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["results"]
