"""The clinical specialist of CH07, made once and reused: CH07_NB02 trains and publishes it, CH09_NB02 upcycles it.

CH07_NB02 teaches a model to turn a clinical note into one JSON object with a LoRA adapter, then merges the adapter
into the weights and saves the result with :func:`utils.publish.save_with_card` in :func:`specialist_folder`. CH09_NB02
takes that model's MLPs as the second expert of a mixture of experts, as the book does with the CH07 model. Both
notebooks go through this module, so the folder's name, the adapter's settings and the training loop exist once:

* :func:`specialist_folder` -- where the specialist lives: ``runs/<profile>/CH07_clinical_specialist``;
* :func:`add_lora` -- a ``peft`` LoRA on the chosen projections (of every block, or of the last few);
* :func:`train_specialist` -- the answer-only SFT batches of :mod:`utils.extraction` and the course's one
  training loop (:func:`utils.training.train` with :func:`utils.extraction.answer_loss`);
* :func:`load_specialist` -- the specialist for a base model: from the folder when it is there and fits the base
  model, else from the Hub (``full`` profile, a repository id), else a short training run with the same two
  functions (what it did is returned, for the notebook to say).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from . import extraction
from .models import HUB_ID_PATTERN, load_model
from .profiles import get_profile, runs_dir
from .training import train

#: The folder's name under ``runs/<profile>/``: CH07_NB02 writes it, CH09_NB02 reads it.
SPECIALIST_NAME = "CH07_clinical_specialist"
#: The seven projections of a Llama-style block (attention, then the GLU MLP): CH07's LoRA targets.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The config fields two models must share for one's MLP to replace the other's.
SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")


def specialist_folder(profile: str | None = None) -> Path:
    """Where CH07_NB02 saves the merged clinical specialist: ``runs/<profile>/CH07_clinical_specialist``.

    ``profile`` defaults to the active one (a ``tiny`` specialist is a random model: it never stands in for a
    ``cpu`` or ``full`` one). The folder itself is not created here."""
    return runs_dir(profile) / SPECIALIST_NAME


def _check_lora_settings(rank, alpha, target_modules, last_blocks, n_blocks: int) -> list[str]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer (CH07 uses 8), got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number (the update is scaled by alpha / rank), got {alpha!r}.")
    if isinstance(target_modules, str) or not isinstance(target_modules, Sequence) or not target_modules \
            or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError("target_modules must be a non-empty list of projection names such as "
                         f"['q_proj', 'v_proj'] (all seven: {list(ALL_PROJECTIONS)}), got {target_modules!r}.")
    if last_blocks is not None and (isinstance(last_blocks, bool) or not isinstance(last_blocks, int)
                                    or not 1 <= last_blocks <= n_blocks):
        raise ValueError(f"last_blocks must be None (every block) or an integer from 1 to {n_blocks}, "
                         f"got {last_blocks!r}.")
    return list(target_modules)


def add_lora(model: torch.nn.Module, *, rank: int = 8, alpha: float = 16,
             target_modules: Sequence[str] = ALL_PROJECTIONS, last_blocks: int | None = None):
    """Wrap ``model`` (in place: pass a copy to keep the original) in a ``peft`` LoRA of rank ``rank``.

    Args:
        alpha: the update is ``(alpha / rank) B A x``; ``B`` starts at zero, so the wrapped model starts equal.
        target_modules: the projections that get an adapter, in every chosen block.
        last_blocks: ``None`` for every decoder block, or ``N`` for the last ``N`` only.

    Returns:
        The ``peft`` model; only its ``lora_A`` / ``lora_B`` weights require a gradient (float32 on a
        half-precision base: ``peft`` keeps adapters in float32, so no optimizer steps float16 weights).

    Raises:
        ValueError: a rank, alpha, target list or ``last_blocks`` that cannot describe an adapter, or a
            target name that matches no module of the model.
    """
    from peft import LoraConfig, get_peft_model

    n_blocks = model.config.num_hidden_layers
    targets = _check_lora_settings(rank, alpha, target_modules, last_blocks, n_blocks)
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"No Linear layer of this model is named {missing}; its projections are "
                         f"{sorted(present)}.")
    blocks = list(range(n_blocks - last_blocks, n_blocks)) if last_blocks else None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        layers_to_transform=blocks, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_specialist(peft_model: torch.nn.Module, tokenizer, records: Sequence[Mapping], *, steps: int,
                     batch_size: int = 8, lr: float = 2e-3, warmup_steps: int = 0, max_length: int = 320,
                     micro_batch_size: int | None = None, seed: int = 0, progress: bool = True,
                     desc: str = "LoRA") -> tuple[dict, torch.utils.data.DataLoader]:
    """Train ``peft_model`` on clinical notes: answer-only batches, :func:`utils.training.train`, ``answer_loss``.

    Args:
        records: labelled notes (``utils.load_records("clinical_notes", split="train")``).
        steps: optimizer steps (the loader is read again from the start as often as they need).
        micro_batch_size: rows per forward pass (the gradient of ``batch_size`` rows, the memory of fewer).

    Returns:
        ``(history, loader)``: :func:`utils.training.train`'s history and the shuffled training loader.

    Raises:
        ValueError: ``steps`` not a positive integer, or bad records / sizes (from the loader and the loop).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (optimizer steps), got {steps!r}.")
    loader = extraction.make_sft_dataloader(records, tokenizer, batch_size=batch_size, max_length=max_length,
                                            shuffle=True, seed=seed)
    torch.manual_seed(seed)
    history = train(peft_model, loader, loss_fn=extraction.answer_loss, max_steps=steps, lr=lr,
                    warmup_steps=warmup_steps, micro_batch_size=micro_batch_size, progress=progress, desc=desc)
    return history, loader


def same_shape(model: torch.nn.Module, other: torch.nn.Module) -> list[str]:
    """The :data:`SHAPE_FIELDS` on which the two models' configs differ (empty: one's MLPs fit the other)."""
    return [f"{f}: {getattr(model.config, f, None)} vs {getattr(other.config, f, None)}" for f in SHAPE_FIELDS
            if getattr(model.config, f, None) != getattr(other.config, f, None)]


def _from_folder(base, folder: Path):
    """The specialist saved in ``folder`` in the base model's dtype and device, or (None, why not)."""
    if not (folder / "config.json").is_file():
        return None, f"no specialist in {folder} (CH07_NB02 writes it)"
    parameter = next(base.parameters())
    found, _ = load_model(folder, dtype=parameter.dtype, device=str(parameter.device))
    differs = same_shape(base, found)
    if differs:
        del found
        return None, f"the specialist in {folder} does not fit this base model ({'; '.join(differs)})"
    return found, None


def _check_source_args(base_model, specialist_id) -> None:
    if not isinstance(base_model, torch.nn.Module) or not hasattr(base_model, "config"):
        raise ValueError(f"base_model must be the transformers model to upcycle, got {type(base_model).__name__}.")
    if specialist_id is not None and (not isinstance(specialist_id, str) or "/" not in specialist_id
                                      or not HUB_ID_PATTERN.match(specialist_id)):
        raise ValueError(f"specialist_id must be None or a Hub repository id 'owner/name' (the CH07 specialist "
                         f"someone published), got {specialist_id!r}.")


def _check_training_args(records, train_settings, why_not: str) -> None:
    if not isinstance(train_settings, Mapping) or "steps" not in train_settings or not records:
        raise ValueError(f"No specialist found ({why_not}), and none can be trained here without records and "
                         "train_settings: pass records=utils.load_records('clinical_notes', split='train') and "
                         "train_settings={'steps': ..., 'batch_size': ...}, or run CH07_NB02 first.")


def train_here(base_model: torch.nn.Module, tokenizer, records: Sequence[Mapping], **settings):
    """A merged specialist trained now on a copy of ``base_model``: :func:`add_lora`, :func:`train_specialist`,
    then the adapter folded into the weights. Returns ``(model, history)``; ``settings`` are those two functions'
    keyword arguments (``rank``, ``alpha``, ``target_modules``, ``last_blocks``; ``steps``, ``batch_size``, ...)."""
    lora_keys = ("rank", "alpha", "target_modules", "last_blocks")
    lora_kwargs = {k: v for k, v in settings.items() if k in lora_keys}
    train_kwargs = {k: v for k, v in settings.items() if k not in lora_keys}
    peft_model = add_lora(copy.deepcopy(base_model), **lora_kwargs)
    history, _ = train_specialist(peft_model, tokenizer, records, **{"progress": False, **train_kwargs})
    return peft_model.merge_and_unload().eval(), history


def load_specialist(base_model: torch.nn.Module, tokenizer, *, records: Sequence[Mapping] | None = None,
                    specialist_id: str | None = None, folder: str | Path | None = None,
                    train_settings: Mapping | None = None):
    """The CH07 clinical specialist for ``base_model``, and where it came from.

    In this order: the folder (default :func:`specialist_folder`) when it holds a model of the base model's shape;
    in the ``full`` profile, the Hub repository ``specialist_id`` when given (in ``cpu`` / ``tiny`` a Hub id would
    load a substitute, not the specialist: it is ignored, and a line says so); otherwise a specialist trained here
    on ``records`` with :func:`train_here` and ``train_settings`` (the same functions CH07_NB02 uses).

    Returns:
        ``(model, info)``: the merged specialist in the base model's dtype and device (eval mode), and
        ``{"source": "folder" | "hub" | "trained here", "where": str, "reason": str}`` saying why.

    Raises:
        ValueError: ``base_model`` is no model, ``specialist_id`` no Hub id, ``train_settings`` lacks ``steps``,
            or a specialist must be trained and ``records`` is empty.
    """
    _check_source_args(base_model, specialist_id)
    folder = Path(folder) if folder is not None else specialist_folder()
    found, why_not = _from_folder(base_model, folder)
    if found is not None:
        return found, {"source": "folder", "where": str(folder), "reason": "CH07_NB02 saved it there"}
    if specialist_id and get_profile() == "full":
        parameter = next(base_model.parameters())
        found, _ = load_model(specialist_id, dtype=parameter.dtype, device=str(parameter.device))
        differs = same_shape(base_model, found)
        if differs:
            raise ValueError(f"{specialist_id} does not have the base model's shape ({'; '.join(differs)}): "
                             "publish the CH07 specialist of this base model, or set SPECIALIST_ID = None.")
        return found.eval(), {"source": "hub", "where": specialist_id, "reason": why_not}
    if specialist_id:
        why_not += f"; SPECIALIST_ID={specialist_id!r} is read in the full profile only ({get_profile()} here)"
    _check_training_args(records, train_settings, why_not)
    model, history = train_here(base_model, tokenizer, records, **train_settings)
    return model, {"source": "trained here", "where": f"{history['settings']['steps']} LoRA steps in this notebook",
                   "reason": why_not}


def clinical_texts(tokenizer, records: Sequence[Mapping]) -> list[str]:
    """Each record as the chat the specialist was trained on: the minimal prompt, the note, the gold answer and
    the end-of-turn token (plain text, for :func:`utils.make_dataloader` and perplexity)."""
    extraction.validate_records(records)
    end = tokenizer.convert_ids_to_tokens(extraction.end_of_turn_id(tokenizer))
    return [extraction.chat_prompt(tokenizer, r["text"]) + extraction.format_answer(r["label"]) + end
            for r in records]
