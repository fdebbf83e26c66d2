"""Ship a rearchitected model: its weights, its tokenizer and a model card, in one folder (CH06_NB03, CH12).

A model that nobody can reload, or whose numbers nobody can read, is not finished. :func:`save_with_card` writes
a standard model folder the way the course saves models everywhere (``save_pretrained``; a Qwen2-MoE checkpoint for
a model turned into a mixture of experts, as :func:`utils.moe.save_moe` writes it), so that
:func:`utils.load_model` reloads it, recorded surgery included. Beside the weights it writes ``README.md``: a
Hugging Face model card whose YAML front matter names the base model, the licence and the tags, followed by what
was removed or changed, every measured number in a table, how the model was made, and the course's link.

It pushes to the Hugging Face Hub only when it is given both a repository id (``push_to``) and a token; otherwise
it prints where the folder is and how to push it. :func:`read_card` reads a card back (front matter, changes,
results), for a test or an exercise check::

    from utils import publish
    folder = publish.save_with_card(student, tokenizer, "runs/my_model", base_model="Qwen/Qwen3-0.6B",
                                    changes=["removed decoder blocks 12-17"], results={"perplexity": 18.2})
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .evaluation import count_parameters
from .models import HUB_ID_PATTERN
from .profiles import get_profile
from .structure import decoder_blocks


def _course_url() -> str:
    """Where the course lives (every card links to it): the setup cell's ``REPO_URL``, the one place that names it
    (a fork sets ``RLLM_REPO_URL``, as for the setup cell); without a checkout, a plain description."""
    if os.environ.get("RLLM_REPO_URL"):
        return os.environ["RLLM_REPO_URL"]
    setup = Path(__file__).resolve().parent.parent / "notebooks" / "setup_cell.py"
    found = re.search(r'REPO_URL = os\.environ\.get\("RLLM_REPO_URL", "([^"]+)"\)', setup.read_text(encoding="utf-8")) \
        if setup.is_file() else None
    return found.group(1) if found else "the course's repository"


#: Where the course lives; every card links to it.
COURSE_URL = _course_url()
#: The tags every card gets (a reader's own ``tags`` come after them).
DEFAULT_TAGS = ("rearchitecting-llms",)
#: The licence of each course model, as the Hub spells it: a model derived from one keeps its licence.
KNOWN_LICENSES = {
    "distilbert/distilgpt2": "apache-2.0",
    "meta-llama/llama-3.2-1b": "llama3.2",
    "google/gemma-3-270m": "gemma",
    "qwen/qwen3-0.6b": "apache-2.0",
    "huggingfacetb/smollm2-1.7b-instruct": "apache-2.0",
    "huggingfacetb/smollm2-135m-instruct": "apache-2.0",
    "microsoft/phi-4-mini-instruct": "mit",
}
#: The prefix :func:`utils.load_model` gives a tiny random model's ``name_or_path`` in the ``tiny`` profile.
TINY_PREFIX = "tiny-random/"
CHANGES_HEADING = "## What was changed"
RESULTS_HEADING = "## Measured"


# --- checking the input ----------------------------------------------------------------------

def license_of(base_model: str) -> str | None:
    """The Hub licence id of a course model (``"gemma"`` for ``google/gemma-3-270m``), or ``None`` if unknown.

    A tiny profile's stand-in (``"tiny-random/<id>"``) gets the licence of the model it stands in for.
    """
    name = base_model.removeprefix(TINY_PREFIX).strip().lower()
    return KNOWN_LICENSES.get(name)


def _checked_changes(changes) -> list[str]:
    if isinstance(changes, str) or not isinstance(changes, Sequence):
        raise ValueError(f"changes must be a list of sentences, one per change (e.g. ['removed decoder blocks "
                         f"12-17', 'recovered by distillation, 30 steps']), got {type(changes).__name__}.")
    cleaned = [c.strip() for c in changes if isinstance(c, str) and c.strip()]
    if not changes or len(cleaned) != len(changes):
        raise ValueError("changes must list at least one change, each a non-empty sentence: a card that does "
                         "not say what was removed or changed tells the reader nothing.")
    return cleaned


def _checked_value(name: str, value) -> float | int | str:
    """A result as a plain number (or a non-empty string); ValueError for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)) or (isinstance(value, str)
                                                                                 and not value.strip()):
        raise ValueError(f"results[{name!r}] = {value!r} is not a number: the card's table holds measured "
                         "numbers (int, float or a one-element tensor) or a short text such as 'n/a'. Pass the "
                         "number itself, e.g. float(ppl), not a list, a dict, None or True/False.")
    if isinstance(value, numbers.Integral):
        return int(value)
    return value.strip() if isinstance(value, str) else float(value)


def _checked_results(results) -> dict[str, float | int | str]:
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict {name: measured number}, e.g. {'perplexity (wikitext "
                         "test)': 18.2}: a card without its numbers cannot be checked. Got " + repr(results) + ".")
    bad_names = [k for k in results if not isinstance(k, str) or not k.strip() or "|" in k]
    if bad_names:
        raise ValueError(f"results' names must be non-empty strings without '|' (they become table rows); got "
                         f"{bad_names}.")
    return {k.strip(): _checked_value(k, v) for k, v in results.items()}


def _checked_push(push_to: str | None, token: str | None, base_model: str) -> bool:
    """Whether to push; a ValueError for a repository id without a token, or one that is no Hub id."""
    if push_to is None:
        if token:
            print("A token was given but no push_to: nothing is pushed. Pass push_to='your-name/model-name' to "
                  "publish on the Hub.")
        return False
    if not isinstance(push_to, str) or "/" not in push_to or not HUB_ID_PATTERN.match(push_to.strip()):
        raise ValueError(f"push_to must be a Hub repository id 'your-name/model-name', got {push_to!r}.")
    if not token or not isinstance(token, str):
        raise ValueError(f"push_to={push_to!r} needs a token with write access: create one at "
                         "https://huggingface.co/settings/tokens and pass token=... (on Colab, read it from a "
                         "secret). Nothing was pushed without one.")
    if not HUB_ID_PATTERN.match(base_model) or base_model.startswith(TINY_PREFIX):
        raise ValueError(f"base_model={base_model!r} is not a Hub model id, and the Hub links a card to its base "
                         "model by id: pass the id of the model you started from (a tiny profile's random model "
                         "has none; publish models of the cpu or full profile).")
    return True


def _checked_model(model) -> None:
    if not hasattr(model, "save_pretrained") or not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a transformers model (with save_pretrained), got {type(model).__name__}.")
    if hasattr(model, "peft_config"):
        raise ValueError("model is a peft model: save_pretrained would write the adapter alone. Merge it first "
                         "(model = model.merge_and_unload()), then save.")
    from .lora import LoRALinear

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model holds the course's LoRA layers: merge them first (utils.merge_lora(model)), so "
                         "that the folder is a plain model that reloads anywhere.")


# --- writing the card ------------------------------------------------------------------------

def _cell(text: str) -> str:
    """One line of text, safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def format_value(value: float | int | str) -> str:
    """How the card writes a result: ``1,234`` for an int, seven significant digits for a float (two perplexities
    a hair apart stay apart), text as it is."""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, ".7g")
    return _cell(value)


def parse_value(text: str) -> float | int | str:
    """A card's table cell as the value :func:`format_value` wrote (an int, a float, or the text itself)."""
    text = text.strip().replace("\\|", "|")
    plain = text.replace(",", "")
    for kind in (int, float):
        try:
            return kind(plain)
        except ValueError:
            continue
    return text


def _front_matter(base_model: str, license: str, tags: Sequence[str]) -> str:
    """The card's YAML front matter, written by huggingface_hub (the fields the Hub reads)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base_model, license=license, library_name="transformers",
                         pipeline_tag="text-generation", tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])))
    return f"---\n{data.to_yaml()}\n---\n"


def _model_lines(model, weights_format: str) -> list[str]:
    """What the saved model is, read from the model itself (not from the caller)."""
    config = getattr(model, "config", None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return [f"- architecture: `{getattr(config, 'model_type', type(model).__name__)}`, "
            f"{len(decoder_blocks(model))} decoder blocks, {count_parameters(model):,} parameters, "
            f"weights in {dtype};",
            f"- saved as {weights_format}."]


def _recipe_value(value) -> str:
    """A setting of the recipe as the card writes it."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return format_value(int(value))
    if isinstance(value, numbers.Real):
        return format_value(float(value))
    return _cell(value)


def _how_lines(recipe: Mapping | None, notebook: str | None) -> list[str]:
    """How the model was made: the recipe's settings, then the notebook, the course and the profile."""
    lines = [f"- {_cell(key)}: {_recipe_value(value)}" for key, value in (recipe or {}).items()]
    where = f"notebook `{notebook}` of " if notebook else ""
    lines.append(f"- made with {where}the companion course of the book *Rearchitecting LLMs* ({COURSE_URL}), "
                 f"in its `{get_profile()}` profile.")
    return lines


def render_card(*, title: str, base_model: str, license: str, tags: Sequence[str], changes: list[str],
                results: dict, model_lines: list[str], how_lines: list[str], where: str) -> str:
    """The text of the model card (``README.md``): front matter, changes, measured numbers, how it was made."""
    tiny = get_profile() == "tiny" or base_model.startswith(TINY_PREFIX)
    warning = ("\n> Made in the course's `tiny` profile: a small random stand-in for the base model, for "
               "testing the pipeline. It is not a usable language model.\n" if tiny else "")
    table = "".join(f"| {_cell(name)} | {format_value(value)} |\n" for name, value in results.items())
    return (
        _front_matter(base_model, license, tags)
        + f"\n# {_cell(title)}\n\n`{base_model}`, rearchitected: {len(changes)} change"
        f"{'s' if len(changes) != 1 else ''} listed below, and what they cost and bought, measured.\n{warning}\n"
        f"{CHANGES_HEADING}\n\n" + "".join(f"- {_cell(c)}\n" for c in changes)
        + f"\n{RESULTS_HEADING}\n\n| measure | value |\n| --- | --- |\n{table}\n"
        "## The model\n\n" + "\n".join(model_lines) + "\n\n"
        "## How it was made\n\n" + "\n".join(how_lines) + "\n\n"
        "## Use it\n\n```python\nimport utils  # the course's package: "
        f"{COURSE_URL}\n\nmodel, tokenizer = utils.load_model(\"{where}\")\n```\n\n"
        "`utils.load_model` re-applies any change recorded in the config that `transformers` cannot rebuild by "
        "itself (removed attention sublayers); a model whose changes the config describes fully (fewer blocks, "
        "narrower MLPs) also loads with `transformers.AutoModelForCausalLM.from_pretrained`.\n"
    )


# --- saving, pushing, reading back -----------------------------------------------------------

def _write_weights(model, tokenizer, folder: Path) -> str:
    """Save model and tokenizer the course's way; say in what format (for the card)."""
    from .moe import GLUMoE, save_moe

    if any(isinstance(m, GLUMoE) for m in model.modules()):
        save_moe(model, tokenizer, folder)
        return "a Qwen2-MoE checkpoint (`utils.moe.save_moe`: the course's mixture of experts, exported)"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return "safetensors with `save_pretrained`, tokenizer included"


def _push(folder: Path, push_to: str, token: str, private: bool) -> str:
    """Create the Hub repository if needed and upload the folder; the repository's address."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(push_to, repo_type="model", exist_ok=True, private=private)
        api.upload_folder(repo_id=push_to, folder_path=str(folder), repo_type="model",
                          commit_message="Upload a model rearchitected with the Rearchitecting LLMs course")
    except Exception as error:  # noqa: BLE001 - the folder is saved: say so, and what went wrong
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(f"The folder is saved in {folder}, but pushing it to {push_to} failed "
                           f"({type(error).__name__}: {first_line}). Check that the token has write access and "
                           "that you own that namespace, then call save_with_card again (or run "
                           f"`hf upload {push_to} {folder}`).") from error
    return f"https://huggingface.co/{push_to}"


def save_with_card(model, tokenizer, folder: str | os.PathLike, *, base_model: str, changes: Sequence[str],
                   results: Mapping[str, float | int | str], title: str | None = None, license: str | None = None,
                   tags: Sequence[str] = (), recipe: Mapping | None = None, notebook: str | None = None,
                   push_to: str | None = None, token: str | None = None, private: bool = False) -> Path:
    """Write ``model``, ``tokenizer`` and a model card (``README.md``) to ``folder``; push it when asked.

    Args:
        base_model: the Hub id of the model this one was made from (the card's ``base_model``), e.g.
            ``teacher.name_or_path``.
        changes: one sentence per change ("removed decoder blocks 12-17 (angular distance)", "recovered by
            distillation, 30 steps").
        results: every measured number, ``{name: value}`` (ints, floats, one-element tensors, or a short text
            such as ``"n/a"``): the card's table.
        title: the card's heading. Default: ``"<base model name>, rearchitected"``.
        license: the Hub licence id. Default: the base model's (:data:`KNOWN_LICENSES`); required otherwise.
        tags: tags beyond ``rearchitecting-llms``; ``recipe``: the settings that made the model (listed under
            "How it was made"); ``notebook``: the notebook that made it.
        push_to, token: a Hub repository id (``"your-name/model-name"``) and a token with write access. Both,
            or no push: without them the folder stays local and the function prints how to push it.
        private: create the Hub repository as private (when it does not exist yet).

    Returns:
        The folder. :func:`utils.load_model` reloads it (recorded surgery re-applied) in every profile.

    Raises:
        ValueError: no change listed, no result or one that is not a number, an unknown base model without
            ``license``, ``push_to`` without a token (or not a repository id), a peft model or unmerged LoRA.
        RuntimeError: the push failed (the folder is saved; the message says what to check).
    """
    _checked_model(model)
    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError("base_model must be the Hub id of the model you started from, e.g. teacher.name_or_path.")
    base_model = base_model.strip()
    changes, results = _checked_changes(changes), _checked_results(results)
    license = license or license_of(base_model)
    if not license:
        raise ValueError(f"The licence of {base_model!r} is not known here: pass license=<the base model's licence "
                         "id as its Hub page gives it> (a derived model keeps its base model's licence).")
    pushing = _checked_push(push_to, token, base_model)
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: give a folder to save the model in.")
    folder.mkdir(parents=True, exist_ok=True)
    weights_format = _write_weights(model, tokenizer, folder)
    card = render_card(title=title or f"{base_model.split('/')[-1]}, rearchitected", base_model=base_model,
                       license=license, tags=list(tags), changes=changes, results=results,
                       model_lines=_model_lines(model, weights_format), how_lines=_how_lines(recipe, notebook),
                       where=push_to if pushing else str(folder))
    (folder / "README.md").write_text(card, encoding="utf-8")
    if pushing:
        print(f"Saved in {folder.resolve()} and pushed to {_push(folder, push_to, token, private)}")
    else:
        print(f"Saved in {folder.resolve()}: weights, tokenizer and README.md (the model card). Nothing was pushed. "
              "To publish it on the Hugging Face Hub, call save_with_card again with push_to='your-name/model-name' "
              f"and token=<a token with write access>, or run `hf upload your-name/model-name {folder.resolve()}`.")
    return folder


def read_card(folder: str | os.PathLike) -> dict:
    """Read back a card written by :func:`save_with_card`.

    Returns ``{"metadata": the front matter, "title": str, "changes": [sentences], "results": {name: value}}``
    (values parsed back to int / float where the card wrote numbers).

    Raises:
        FileNotFoundError: ``folder`` holds no ``README.md``.
    """
    from huggingface_hub.repocard import metadata_load

    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: write the folder with publish.save_with_card first.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip() == "---":  # skip the front matter (metadata_load reads it)
        lines = lines[next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), 0) + 1:]
    section, title, changes, results = None, "", [], {}
    for line in lines:
        if line.startswith("# ") and not title:
            title = line[2:].strip()
        elif line.startswith("## "):
            section = line.strip()
        elif section == CHANGES_HEADING and line.startswith("- "):
            changes.append(line[2:].strip().replace("\\|", "|"))
        elif section == RESULTS_HEADING and line.startswith("|") and not line.startswith(("| measure", "| ---")):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 2:
                results[cells[0].replace("\\|", "|")] = parse_value(cells[1])
    return {"metadata": metadata_load(path) or {}, "title": title, "changes": changes, "results": results}
