"""Does each notebook's `full` profile fit a Colab T4? Peak memory of its heaviest steps, measured.

    python scripts/t4_budget.py                          every step, one fresh process each
    python scripts/t4_budget.py --only CH02_NB02          one notebook (or a step id, e.g. CH05_NB02:repair)
    python scripts/t4_budget.py --markdown --budget-gb 15
    python scripts/t4_budget.py --max-batches 1           calibration/evaluation loaders cut to one batch
    python scripts/t4_budget.py --count-held              tensors left over from earlier cells counted, not allocated
    python scripts/t4_budget.py --tiny                    tiny models, the tiny profile's settings (seconds)
    python scripts/t4_budget.py --list                    the steps and what each one runs
    python scripts/t4_budget.py --from-json a.json b.json --markdown   the table of saved runs, merged

For every step the script builds the notebook's real architecture at its REAL size with random weights
(`utils.real_config`: no download, no tokenizer), in the dtype a T4 gets from `utils.load_model` (no
bfloat16 on a T4: float16, except Gemma 3 in float32), reads the notebook's `parameters` cell with
RLLM_PROFILE=full (MODEL_ID, batch sizes, MAX_LENGTH, calibration sizes, grad_accum ...), feeds random
token ids in dataloaders of plain dicts, and runs what the notebook runs: the public `utils` functions
(`utils.distill`, `utils.prune_glu`, `utils.block_importance`, `utils.perplexity`, ...), optipfair where
the notebook calls it, and the notebook's own from-scratch training loop (its functions are read from
the notebook). The models and large tensors the notebook still holds at that point (earlier copies,
logits kept in module-level names) are resident too; the names are checked in the notebook's code.

Measure:
* on a CUDA GPU, `torch.cuda.max_memory_allocated` (tensors only: the CUDA context, a few hundred MB, and
  the caching allocator's slack come on top). A GPU with bfloat16 is made to choose a T4's dtypes.
* on a CPU, the peak resident memory (VmHWM) of a fresh process per step, minus its resident memory after
  the imports. This is an ESTIMATE of the GPU figure: no CUDA context or caching allocator, other kernels
  and their scratch buffers, lazily touched pages.

Each step is split into phases (load, calibration, training ...); the peak is the largest phase peak, and
the phase is reported. Optimizer steps are cut to 2 (AdamW's state exists from the first step on, so the
second step is the steady state); `--max-batches` cuts calibration and evaluation loaders (the peak of a
pass is reached within one batch: nothing in these steps grows with the number of batches).

Running out of memory is a result: a step stopped by it (a CUDA out-of-memory error, or on a CPU the kernel
killing the process when the host's RAM is full) is reported with the peak it had reached, marked "≥": a
lower bound, taken from a file the step's process keeps up to date.

Exit status: 0 when every step fits the budget; 1 when one does not (a step stopped by running out of memory
above the budget counts); 2 when a step could not be measured (failed, or stopped below the budget).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import utils  # noqa: E402
from utils.models import _resolve_dtype  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
DEFAULT_BUDGET_GB = 15.0
TINY_VOCAB = 512
OPTIMIZER_STEPS = 2  # the first creates AdamW's state; the second is the steady state
GB = 1e9


# --- reading the notebooks -------------------------------------------------------------------

def notebook_path(name: str) -> Path:
    """The notebook whose file name starts with ``name`` (e.g. ``CH02_NB02``)."""
    found = sorted(NOTEBOOKS.glob(f"*/{name}*.ipynb"))
    if len(found) != 1:
        raise SystemExit(f"Expected one notebook named {name}*.ipynb under notebooks/, found {len(found)}.")
    return found[0]


def code_cells(name: str) -> list[str]:
    cells = json.loads(notebook_path(name).read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _parameters_source(name: str) -> str:
    cells = json.loads(notebook_path(name).read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return "".join(cell["source"])
    raise SystemExit(f"{name} has no cell tagged 'parameters'.")


def notebook_parameters(name: str, profile: str = "full") -> dict:
    """The values of a notebook's ``parameters`` cell, evaluated in ``profile`` (``utils.budget`` reads it)."""
    previous = os.environ.get(utils.profiles.ENV_VAR)
    os.environ[utils.profiles.ENV_VAR] = profile
    try:
        namespace: dict = {}
        exec(compile(_parse(_parameters_source(name)), f"{name}:parameters", "exec"), namespace)
    finally:
        if previous is None:
            os.environ.pop(utils.profiles.ENV_VAR, None)
        else:
            os.environ[utils.profiles.ENV_VAR] = previous
    return {k: v for k, v in namespace.items() if k.isupper()}


def _parse(source: str) -> ast.Module:
    # IPython magics and shell lines are not Python: blank them out.
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def alive_names(name: str, names: list[str], before: str) -> list[str]:
    """Which of ``names`` the notebook has assigned, and not deleted, in the cells before the first cell
    that contains ``before``: the module-level objects still held when that cell runs."""
    assigned: set[str] = set()
    for source in code_cells(name):
        if before in source:
            return [n for n in names if n in assigned]
        for node in ast.walk(_parse(source)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
            elif isinstance(node, ast.Delete):
                for target in node.targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name):
                            assigned.discard(sub.id)
    raise SystemExit(f"{name}: no code cell contains {before!r}; update the step in scripts/t4_budget.py.")


def notebook_kwargs(name: str, call: str, namespace: dict, *, skip: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of the notebook's first call to ``call`` (e.g. ``"utils.distill"``), evaluated in
    ``namespace`` (the notebook's parameters and the step's stand-ins for its objects), minus ``skip``.

    So a keyword the notebook adds to that call (a memory setting, say) is used here too."""
    for source in code_cells(name):
        for node in ast.walk(_parse(source)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == call:
                kwargs = {}
                for keyword in node.keywords:
                    if keyword.arg is None or keyword.arg in skip:  # **mapping: the step passes it itself
                        continue
                    try:
                        kwargs[keyword.arg] = eval(ast.unparse(keyword.value), dict(namespace))
                    except NameError as error:
                        raise SystemExit(f"{name}: {call}({keyword.arg}=...) uses {error.name!r}, which "
                                         "scripts/t4_budget.py does not provide; update the step.") from error
                return kwargs
    raise SystemExit(f"{name} no longer calls {call}; update the step in scripts/t4_budget.py.")


def notebook_functions(name: str, names: list[str], namespace: dict) -> dict:
    """Define the notebook's own functions ``names`` (read from its code cells) in ``namespace``."""
    found = {}
    for source in code_cells(name):
        for node in _parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                found[node.name] = node
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"{name} no longer defines {missing}; update the step in scripts/t4_budget.py.")
    module = ast.Module(body=[found[n] for n in names], type_ignores=[])
    exec(compile(module, f"{name}:functions", "exec"), namespace)
    return {n: namespace[n] for n in names}


# --- the T4's dtype and the models ------------------------------------------------------------

def t4_dtype(model_type: str) -> torch.dtype:
    """The dtype ``utils.load_model`` picks on a T4 (a CUDA GPU without bfloat16)."""
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        return _resolve_dtype(None, "cuda", model_type)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Meter:
    """Peak memory per phase: CUDA allocated bytes, or the process's peak resident memory (VmHWM)."""

    device: str
    phases: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.cuda = self.device.startswith("cuda")
        self._libc = None
        with contextlib.suppress(OSError):
            self._libc = ctypes.CDLL("libc.so.6")
        self.can_reset = self.cuda or self._clear_refs()
        if not self.can_reset:
            self.notes.append("/proc/self/clear_refs not writable: each phase's peak is the process's peak so far")
        self._reset()
        self.baseline = torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")
        self.current: str | None = None  # the phase running now
        self.counted = 0  # bytes of tensors counted by size instead of allocated (Context.held, --count-held)
        self.failed: str | None = None  # the phase an exception left

    @property
    def measure(self) -> str:
        return "cuda" if self.cuda else "cpu-rss"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes

    @staticmethod
    def _clear_refs() -> bool:
        try:  # writing 5 resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def _reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        if self._libc is not None:
            with contextlib.suppress(AttributeError):
                self._libc.malloc_trim(0)  # hand freed heap pages back, so they do not count in the next phase
        if self.can_reset:
            self._clear_refs()

    def _peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
        return self.running_peak()

    def running_peak(self) -> int:
        """The current phase's peak so far (no synchronisation: safe from a watchdog thread), plus the bytes
        counted without being allocated (``--count-held``)."""
        # After malloc_trim the process can sit below its post-import baseline: a phase never uses less than 0.
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated() - self.baseline) + self.counted
        return max(0, self._status("VmHWM") - self.baseline) + self.counted

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._reset()
        self.current = name
        try:
            yield
        except BaseException:
            self.failed = name
            raise
        finally:
            self.phases.append((name, self._peak()))
            self.current = None


@dataclass
class Context:
    """What a step needs: profile, device, loader sizes, the meter and the settings it reports."""

    tiny: bool
    device: str
    max_batches: int | None
    meter: Meter
    settings: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    count_held: bool = False
    dtypes: set[str] = field(default_factory=set)
    seed: int = 0

    @property
    def profile(self) -> str:
        return "tiny" if self.tiny else "full"

    def params(self, notebook: str) -> dict:
        return notebook_parameters(notebook, self.profile)

    def build(self, model_id: str):
        """``model_id``'s architecture at real size (tiny width with ``--tiny``), random weights, T4 dtype."""
        config = utils.tiny_config(model_id, TINY_VOCAB) if self.tiny else utils.real_config(model_id)
        dtype = t4_dtype(config.model_type)
        torch.manual_seed(self.seed)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        model.generation_config.pad_token_id = 0
        self.models.add(model_id)
        self.dtypes.add(_dtype_name(dtype))
        return model

    def n_batches(self, n_texts: int, batch_size: int) -> int:
        n = math.ceil(n_texts / batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def batches(self, model, n: int, batch_size: int, length: int) -> list[dict]:
        """``n`` batches of random token ids, as plain dicts; the last row ends in padding."""
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for _ in range(n):
            ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
            mask = torch.ones_like(ids)
            if batch_size > 1:
                mask[-1, length * 3 // 4:] = 0
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    def held(self, notebook: str, names: list[str], before: str, shapes: dict[str, tuple]) -> list:
        """The large tensors that the notebook still holds in module-level names at this point: allocated and
        touched, or with ``count_held`` only counted (their bytes are added to every later peak: they are
        plain resident tensors, so their share of the peak is exactly their size)."""
        alive = alive_names(notebook, names, before)
        tensors, total = [], 0
        for name in alive:
            shape, dtype, count = shapes[name]
            total += count * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not self.count_held:
                tensors += [torch.empty(shape, dtype=dtype, device=self.device).fill_(0.5) for _ in range(count)]
        if self.count_held:
            self.meter.counted += total
        if alive:
            how = "counted, not allocated" if self.count_held else "allocated"
            self.settings.append(f"notebook still holds {', '.join(alive)} ({total / GB:.2f} GB, {how})")
        return tensors


# --- the steps ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    id: str
    title: str
    run: Callable[[Context], None]

    @property
    def notebook(self) -> str:
        return self.id.split(":")[0]


def _last(model, n: int) -> list[int]:
    total = len(utils.depth.decoder_blocks(model))
    return list(range(total - n, total))


def _distill_kwargs(ctx: Context, notebook: str, p: dict, **objects) -> dict:
    """The notebook's own keyword arguments to ``utils.distill``, cut to OPTIMIZER_STEPS optimizer steps."""
    kwargs = notebook_kwargs(notebook, "utils.distill", {**p, "utils": utils, **objects},
                             skip=("epochs", "max_steps", "progress"))
    ctx.settings.append("utils.distill(" + (", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
                                            or "defaults") + ")")
    return {**kwargs, "max_steps": OPTIMIZER_STEPS, "progress": False}


def _short(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return f"<{len(value)} batches>"
    return repr(value)


def ch02_nb01_copies(ctx: Context) -> None:
    """CH02_NB01: the base model and three cut copies (by hand, utils, optipfair) resident; two models'
    logits compared on one batch (cells 13, 19), perplexity of the optipfair copy (cell 23)."""
    import optipfair

    p = ctx.params("CH02_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    n_blocks = model.config.num_hidden_layers
    n_remove = max(1, round(p["N_REMOVE_FRACTION"] * n_blocks))
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("three cut copies"):
        by_hand = utils.remove_blocks(copy.deepcopy(model), _last(model, n_remove))
        with_utils = utils.remove_blocks(copy.deepcopy(model), _last(model, n_remove))
        with_optipfair = optipfair.prune_model(copy.deepcopy(model), pruning_type="DEPTH",
                                               num_layers_to_remove=n_remove, layer_selection_method="last",
                                               show_progress=False)
    batch = {k: v.to(ctx.device) for k, v in eval_dl[0].items()}
    with ctx.meter.phase("two models' logits compared"), torch.no_grad():
        torch.allclose(with_optipfair(**batch).logits, by_hand(**batch).logits)
    with ctx.meter.phase("perplexity"):
        utils.perplexity(with_optipfair, eval_dl, progress=False)
    del with_utils
    ctx.settings.append(f"4 models resident; batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, "
                        f"{len(eval_dl)} eval batch(es) of {math.ceil(p['N_EVAL'] / p['BATCH_SIZE'])}")


def _teacher_and_batches(ctx: Context, p: dict):
    """The depth-pruning notebooks' start: the teacher ("load" phase), how many blocks REMOVE_FRACTION
    removes, and calibration and evaluation batches of 8 (CH02_NB02, CH06)."""
    with ctx.meter.phase("load"):
        teacher = ctx.build(p["MODEL_ID"])
    n_remove = max(1, round(p["REMOVE_FRACTION"] * teacher.config.num_hidden_layers))
    calib = ctx.batches(teacher, ctx.n_batches(p["CALIBRATION_TEXTS"], 8), 8, p["MAX_LENGTH"])
    eval_dl = ctx.batches(teacher, ctx.n_batches(p["EVAL_TEXTS"], 8), 8, p["MAX_LENGTH"])
    return teacher, n_remove, calib, eval_dl


def _ch02_nb02_setup(ctx: Context, p: dict, before: str):
    teacher, n_remove, calib, eval_dl = _teacher_and_batches(ctx, p)
    with ctx.meter.phase("choose blocks, copy, perplexity"):
        removed = utils.choose_blocks_to_remove(teacher, calib, n_remove, progress=False)
        student = utils.remove_blocks(copy.deepcopy(teacher), removed)
        utils.perplexity(teacher, eval_dl, progress=False)
        utils.perplexity(student, eval_dl, progress=False)
    shape = (p["BATCH_SIZE"], p["MAX_LENGTH"], teacher.config.vocab_size)
    dtype = next(teacher.parameters()).dtype
    with ctx.meter.phase("logits kept from the loss section"):
        held = ctx.held("CH02_NB02", ["t_logits", "s_logits", "noisy"], before,
                        {"t_logits": (shape, dtype, 1), "s_logits": (shape, dtype, 1), "noisy": (shape, dtype, 1)})
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS * p["GRAD_ACCUM"], p["BATCH_SIZE"], p["MAX_LENGTH"])
    return teacher, student, eval_dl, train_dl, held


def ch02_nb02_scratch(ctx: Context) -> None:
    """CH02_NB02 §4: the notebook's own distillation loop (``train_from_scratch``, read from the notebook)
    on a copy of the student: teacher, student and the copy resident."""
    import torch.nn.functional as F  # noqa: N812
    from tqdm.auto import tqdm

    p = ctx.params("CH02_NB02")
    teacher, student, eval_dl, _, held = _ch02_nb02_setup(ctx, p, "def train_from_scratch")
    batch_size = p.get("SCRATCH_BATCH_SIZE", p["BATCH_SIZE"])  # the hand-written loop has its own batch size
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS * p["GRAD_ACCUM"], batch_size, p["MAX_LENGTH"])
    namespace = {"torch": torch, "F": F, "tqdm": tqdm, "utils": utils, "device": torch.device(ctx.device)}
    fns = notebook_functions("CH02_NB02", ["kd_loss", "labels_of", "train_from_scratch"], namespace)
    with ctx.meter.phase("train_from_scratch"):
        fns["train_from_scratch"](copy.deepcopy(student), teacher, train_dl, eval_dl, OPTIMIZER_STEPS,
                                  grad_accum=p["GRAD_ACCUM"], temperature=p["TEMPERATURE"], alpha=p["ALPHA"])
    ctx.settings.insert(0, f"batch {batch_size}x{p['MAX_LENGTH']}, grad_accum {p['GRAD_ACCUM']}, "
                           f"{OPTIMIZER_STEPS} of {p['SCRATCH_STEPS']} steps; teacher + student + copy")
    del held


def ch02_nb02_distill(ctx: Context) -> None:
    """CH02_NB02 §5: ``utils.distill`` with the notebook's batch, grad_accum and held-out evaluation."""
    p = ctx.params("CH02_NB02")
    teacher, student, eval_dl, train_dl, held = _ch02_nb02_setup(ctx, p, "utils.distill(")
    with ctx.meter.phase("utils.distill"):
        utils.distill(student, teacher, train_dl, **_distill_kwargs(ctx, "CH02_NB02", p, eval_dl=eval_dl))
    ctx.settings.insert(0, f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, grad_accum {p['GRAD_ACCUM']}, "
                           f"{OPTIMIZER_STEPS} of {p['DISTILL_STEPS']} steps, eval {len(eval_dl)} batch(es) of 8")
    del held


def ch03_nb01_live(ctx: Context) -> None:
    """CH03_NB01: every architecture on the meta device (no tensor memory), then the one live model: a
    forward pass and 20 generated tokens on a short prompt."""
    p = ctx.params("CH03_NB01")
    with ctx.meter.phase("meta skeletons"):
        skeletons = {mid: utils.build_on_meta(mid) for mid in p["MODEL_IDS"]}
    with ctx.meter.phase("load live model"):
        live = ctx.build(p["LIVE_MODEL_ID"])
    ids = torch.randint(0, live.config.vocab_size, (1, 10), device=ctx.device)
    with ctx.meter.phase("forward + generate 20 tokens"), torch.no_grad():
        live(input_ids=ids)
        live.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    ctx.settings.append(f"{len(skeletons)} architectures built on meta only (0 bytes of tensors); "
                        "live model: 1 prompt of 10 tokens, 20 new tokens")


def ch04_nb01_depth(ctx: Context) -> None:
    """CH04_NB01: block importance and the default selection on the calibration batches, then the base
    model, the default-pruned copy and optipfair's copy resident while perplexity runs (cell 25)."""
    import optipfair

    p = ctx.params("CH04_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    n_remove = max(1, round(p["N_REMOVE_FRACTION"] * model.config.num_hidden_layers))
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    held_out = ctx.batches(model, ctx.n_batches(p["N_EVAL"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("block_importance + choose_blocks_to_remove"):
        scores = utils.block_importance(model, calib, progress=False)
        chosen = utils.choose_blocks_to_remove(model, calib, n_remove, progress=False)
    with ctx.meter.phase("two pruned copies"):
        default_pruned = utils.remove_blocks(copy.deepcopy(model), chosen)
        lowest = sorted(sorted(range(len(scores)), key=scores.__getitem__)[:n_remove])
        reference = optipfair.prune_model(copy.deepcopy(model), pruning_type="DEPTH", layer_indices=lowest,
                                          layer_selection_method="custom", show_progress=False)
    with ctx.meter.phase("perplexity, 3 models resident"):
        utils.perplexity(reference, held_out, progress=False)
    del default_pruned
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {len(calib)} calibration batch(es); "
                        "the 'iterative' strategy repeats the block_importance pass; lm-eval (GPU only) not measured")


def ch05_nb01_static(ctx: Context) -> None:
    """CH05_NB01: the base model and three MAW-pruned copies (from scratch, optipfair, utils.prune_glu)
    resident at once (cell 17), then a sweep copy and perplexity beside the base and the first copy."""
    import optipfair

    p = ctx.params("CH05_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"], 8), 8, p["MAX_LENGTH"])
    with ctx.meter.phase("three pruned copies"):
        ours = utils.prune_glu(copy.deepcopy(model), p["RATIO"], method="maw", progress=False)
        lib = optipfair.prune_model(copy.deepcopy(model), pruning_type="MLP_GLU", neuron_selection_method="MAW",
                                    pruning_percentage=100 * p["RATIO"], show_progress=False)
        helper = utils.prune_glu(copy.deepcopy(model), p["RATIO"], method="maw", progress=False)
    del lib, helper
    with ctx.meter.phase("sweep copy + perplexity"):
        pruned = utils.prune_glu(copy.deepcopy(model), max(p["SWEEP"]), method="maw", progress=False)
        utils.perplexity(pruned, eval_dl, progress=False)
    del ours
    ctx.settings.append(f"ratio {p['RATIO']}, batch 8x{p['MAX_LENGTH']}, {len(eval_dl)} eval batch(es)")


def ch05_nb02_repair(ctx: Context) -> None:
    """CH05_NB02 §4: ``utils.prune_glu(copy, RATIO, dataloader=calib)``: Gram matrices of the MLP
    activations, a few layers per pass, and the least-squares repair, beside the base model."""
    p = ctx.params("CH05_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, p["MAX_LENGTH"])
    with ctx.meter.phase("prune_glu with Gram repair"):
        utils.prune_glu(copy.deepcopy(model), p["RATIO"], dataloader=calib, progress=False)
    width = model.config.intermediate_size
    group = max(1, utils.width.GRAM_BUDGET_BYTES // (width * width * 4))
    ctx.settings.append(f"ratio {p['RATIO']}, {len(calib)} of {math.ceil(p['N_CALIB'] / 8)} calibration batches "
                        f"of 8x{p['MAX_LENGTH']}; Gram {width}x{width} float32, {group} layers per pass")


def ch05_nb02_scores(ctx: Context) -> None:
    """CH05_NB02 §2-3: ``utils.activation_norms`` on the calibration batches, then optipfair's data-driven
    pruning of a copy while the base and the last plain-cut copy are resident (cell 11)."""
    import optipfair

    p = ctx.params("CH05_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, p["MAX_LENGTH"])
    with ctx.meter.phase("activation_norms"):
        norms = utils.activation_norms(model, calib, progress=False)
    with ctx.meter.phase("plain-cut copy + optipfair hybrid (dataloader)"):
        pruned = utils.prune_glu(copy.deepcopy(model), p["RATIO"],
                                 scores=utils.scores_from_activations(model, norms), progress=False)
        optipfair.prune_model(copy.deepcopy(model), pruning_type="MLP_GLU", neuron_selection_method="MAW",
                              pruning_percentage=100 * p["RATIO"], dataloader=calib, show_progress=False)
    del pruned
    ctx.settings.append(f"ratio {p['RATIO']}, {len(calib)} of {math.ceil(p['N_CALIB'] / 8)} calibration batches "
                        f"of 8x{p['MAX_LENGTH']}")


def _ch06_setup(ctx: Context, name: str, p: dict):
    teacher, n_remove, calib, eval_dl = _teacher_and_batches(ctx, p)
    with ctx.meter.phase("choose blocks + perplexity"):
        removed = sorted(utils.choose_blocks_to_remove(teacher, calib, n_remove, progress=False))
        utils.perplexity(teacher, eval_dl, progress=False)
    return teacher, removed, calib, eval_dl


def ch06_nb01_features(ctx: Context) -> None:
    """CH06_NB01 §3: ``utils.distill`` with logits + features through the kept-block map (the heaviest of
    its three runs), then perplexity; the notebook still holds the hidden states and logits of §2."""
    p = ctx.params("CH06_NB01")
    teacher, removed, _, eval_dl = _ch06_setup(ctx, "CH06_NB01", p)
    n_blocks = teacher.config.num_hidden_layers
    kept = utils.kept_blocks(n_blocks, removed)
    student = utils.remove_blocks(copy.deepcopy(teacher), removed)
    hidden = (p["BATCH_SIZE"], p["MAX_LENGTH"], teacher.config.hidden_size)
    logits = (p["BATCH_SIZE"], p["MAX_LENGTH"], teacher.config.vocab_size)
    dtype = next(teacher.parameters()).dtype
    with ctx.meter.phase("tensors kept from §2"):
        held = ctx.held("CH06_NB01", ["s_h", "t_h", "_"], "utils.distill(",
                        {"s_h": (hidden, dtype, len(kept)), "t_h": (hidden, dtype, len(kept)), "_": (logits, dtype, 1)})
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS, p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("utils.distill (logits + features)"):
        student = utils.remove_blocks(copy.deepcopy(teacher), removed)  # the loop's new student, old one alive
        utils.distill(student, teacher, train_dl, **_distill_kwargs(ctx, "CH06_NB01", p),
                      layer_map=utils.make_layer_map(len(kept), n_blocks, "kept", removed=removed), beta=p["BETA"])
    with ctx.meter.phase("perplexity"):
        utils.perplexity(student, eval_dl, progress=False)
    ctx.settings.insert(0, f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['STEPS']} steps, "
                           f"beta {p['BETA']}")
    del held


def ch06_nb01_optipfair(ctx: Context) -> None:
    """CH06_NB01 §4: ``optipfair.distill_model`` (logits only; it trains every parameter, embeddings too)."""
    import optipfair

    p = ctx.params("CH06_NB01")
    teacher, removed, _, _ = _ch06_setup(ctx, "CH06_NB01", p)
    student = utils.remove_blocks(copy.deepcopy(teacher), removed)
    accumulation = p.get("OPTIPFAIR_ACCUMULATION", 1)  # the notebook's micro-batches for this call
    micro = p["BATCH_SIZE"] // accumulation
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS * accumulation, micro, p["MAX_LENGTH"])
    with ctx.meter.phase("optipfair.distill_model"):
        optipfair.distill_model(student, teacher, train_dl, alpha=1 - p["ALPHA"], beta=p["ALPHA"], gamma=0.0,
                                delta=0.0, temperature=p["TEMPERATURE"], epochs=1,
                                learning_rate=utils.distillation.DEFAULT_LR, accumulation_steps=accumulation,
                                show_progress=False)
    ctx.settings.append(f"{accumulation} micro-batch(es) of {micro}x{p['MAX_LENGTH']} per step, "
                        f"{OPTIMIZER_STEPS} of {p['STEPS']} steps")


def ch06_nb02_width(ctx: Context) -> None:
    """CH06_NB02: the width-pruned student (``utils.prune_glu`` with calibration data, as many parameters
    as the depth-pruned one), then ``utils.distill`` with the notebook's defaults and perplexity."""
    p = ctx.params("CH06_NB02")
    teacher, removed, calib, eval_dl = _ch06_setup(ctx, "CH06_NB02", p)
    params_base = utils.count_parameters(teacher)
    blocks = utils.depth.decoder_blocks(teacher)
    params_depth = params_base - sum(q.numel() for i in removed for q in blocks[i].parameters())
    mlp_params = sum(q.numel() for n, q in teacher.named_parameters() if ".mlp." in n)
    ratio = min(0.9, (params_base - params_depth) / mlp_params)
    with ctx.meter.phase("prune_glu (width student)"):
        student = utils.prune_glu(copy.deepcopy(teacher), ratio, dataloader=calib, progress=False)
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS, p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("utils.distill"):
        utils.distill(student, teacher, train_dl, **_distill_kwargs(ctx, "CH06_NB02", p))
    with ctx.meter.phase("perplexity"):
        utils.perplexity(student, eval_dl, progress=False)
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['STEPS']} steps, "
                        f"width ratio {ratio:.2f}")


STEPS: list[Step] = [
    Step("CH02_NB01:copies", "4 models + logits + perplexity", ch02_nb01_copies),
    Step("CH02_NB02:scratch", "from-scratch KD loop (notebook code)", ch02_nb02_scratch),
    Step("CH02_NB02:distill", "utils.distill + eval", ch02_nb02_distill),
    Step("CH03_NB01:live", "meta skeletons + live generate", ch03_nb01_live),
    Step("CH04_NB01:depth", "block importance, 3 models + perplexity", ch04_nb01_depth),
    Step("CH05_NB01:static", "4 models (3 pruned copies) + perplexity", ch05_nb01_static),
    Step("CH05_NB02:scores", "activation_norms + optipfair hybrid", ch05_nb02_scores),
    Step("CH05_NB02:repair", "prune_glu(dataloader): Gram + repair", ch05_nb02_repair),
    Step("CH06_NB01:features", "utils.distill logits + features", ch06_nb01_features),
    Step("CH06_NB01:optipfair", "optipfair.distill_model", ch06_nb01_optipfair),
    Step("CH06_NB02:width", "prune_glu student + utils.distill", ch06_nb02_width),
]


def select(only: list[str] | None) -> list[Step]:
    """The steps whose id or notebook matches one of ``only`` (case-insensitive prefixes); all by default."""
    if not only:
        return list(STEPS)
    wanted = [w.strip().lower() for item in only for w in item.split(",") if w.strip()]
    chosen = [s for s in STEPS if any(s.id.lower().startswith(w) for w in wanted)]
    if not chosen:
        raise SystemExit(f"No step matches {only}. Steps: " + ", ".join(s.id for s in STEPS))
    return chosen


# --- one step in this process -------------------------------------------------------------------

def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _partial_row(step: Step, ctx: Context, meter: Meter) -> dict:
    """What is known of a step that has not finished: the phases so far and the current phase's peak."""
    phases = list(meter.phases)
    if meter.current is not None:
        phases.append((meter.current, meter.running_peak()))
    return {"step": step.id, "notebook": step.notebook, "title": step.title, "model": ", ".join(sorted(ctx.models)),
            "dtype": ", ".join(sorted(ctx.dtypes)), "settings": "; ".join(ctx.settings), "phases": phases,
            "current": meter.current, "measure": meter.measure, "notes": meter.notes, "profile": ctx.profile}


def _watch(path: Path, snapshot: Callable[[], dict], stop: threading.Event, every: float = 0.5) -> None:
    """Write ``snapshot()`` to ``path`` every ``every`` seconds, so that a process killed for memory leaves
    its last peak behind."""
    while not stop.wait(every):
        with contextlib.suppress(Exception):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot()))
            os.replace(tmp, path)


def run_step(step: Step, *, tiny: bool, device: str, max_batches: int | None, threads: int | None = None,
             progress: Path | None = None, count_held: bool = False) -> dict:
    """Run one step here and return its row (peak bytes, phases, settings).

    Running out of memory is a result, not a crash: the row then holds the peak reached so far as a lower
    bound (``lower_bound``). With ``progress``, a watchdog thread keeps that partial row in a file, for the
    parent to read when the kernel kills this process.
    """
    previous_threads = torch.get_num_threads()
    if threads or tiny:
        torch.set_num_threads(threads or 1)  # tiny tensors gain nothing from threads on a busy machine
    # On a GPU with bfloat16, make utils choose a T4's dtypes (load_model) and autocast (distill).
    patcher = mock.patch("torch.cuda.is_bf16_supported", return_value=False) if device.startswith("cuda") else None
    stop = threading.Event()
    try:
        if patcher:
            patcher.start()
        with contextlib.suppress(ImportError):
            import optipfair  # noqa: F401  (imported before the baseline, like torch and transformers)
        meter = Meter(device)
        ctx = Context(tiny=tiny, device=device, max_batches=max_batches, meter=meter, count_held=count_held)
        if progress is not None:
            threading.Thread(target=_watch, args=(progress, lambda: _partial_row(step, ctx, meter), stop),
                             daemon=True).start()
        start = time.perf_counter()
        try:
            step.run(ctx)
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            row = _partial_row(step, ctx, meter)
            where = row["current"] or meter.failed
            return _lower_bound(row, f"out of memory ({type(error).__name__}) in phase '{where}'")
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        if patcher:
            patcher.stop()
        torch.set_num_threads(previous_threads)
    name, peak = max(meter.phases, key=lambda item: item[1])
    return {
        "step": step.id, "notebook": step.notebook, "title": step.title, "model": ", ".join(sorted(ctx.models)),
        "dtype": ", ".join(sorted(ctx.dtypes)), "settings": "; ".join(ctx.settings), "peak_bytes": peak,
        "peak_phase": name, "phases": meter.phases, "measure": meter.measure, "notes": meter.notes,
        "seconds": seconds, "profile": ctx.profile,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }


def _lower_bound(row: dict, why: str) -> dict:
    """A partial row (see :func:`_partial_row`) turned into a result: its peak so far is a lower bound."""
    row = dict(row)
    phases = row.get("phases") or []
    if phases:
        row["peak_phase"], row["peak_bytes"] = max(phases, key=lambda item: item[1])
        row["lower_bound"] = True
    row["error"] = why
    return row


# --- the driver ----------------------------------------------------------------------------------

def _child_command(step: Step, args, result: Path, progress: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.id, "--result", str(result),
           "--progress", str(progress), "--device", args.device]
    if args.tiny:
        cmd.append("--tiny")
    if args.max_batches is not None:
        cmd += ["--max-batches", str(args.max_batches)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.count_held:
        cmd.append("--count-held")
    return cmd


def failed_row(step: Step, returncode: int, stderr: str, progress: Path | None) -> dict:
    """The row of a child process that did not finish: killed (by the kernel, for memory: the usual reason
    for SIGKILL here) or failed with an error. With a progress file, the peak reached so far is kept."""
    if returncode < 0:
        why = f"killed by signal {-returncode}" + (" (the host ran out of memory)" if returncode == -9 else "")
    else:
        why = (stderr.strip().splitlines() or ["no output"])[-1]
    partial = None
    if progress is not None and progress.exists():
        with contextlib.suppress(ValueError):
            partial = json.loads(progress.read_text())
    if not partial:
        return {"step": step.id, "notebook": step.notebook, "title": step.title, "error": why}
    if partial.get("current"):
        why += f" in phase '{partial['current']}'"
    return _lower_bound(partial, why)


def verdict(row: dict, budget_gb: float) -> bool | None:
    """``True``/``False``: fits the budget or not; ``None``: unknown (the step failed below the budget)."""
    if "peak_bytes" not in row:
        return None
    over = row["peak_bytes"] > budget_gb * GB
    if row.get("lower_bound"):
        return False if over else None
    return not over


def measure_all(steps: list[Step], args) -> list[dict]:
    rows = []
    for k, step in enumerate(steps, 1):
        print(f"[{k}/{len(steps)}] {step.id}: {step.title} ...", file=sys.stderr, flush=True)
        if args.in_process:
            try:
                row = run_step(step, tiny=args.tiny, device=args.device, max_batches=args.max_batches,
                               threads=args.threads, count_held=args.count_held)
            except Exception as error:  # report the failure, go on with the next step
                row = {"step": step.id, "notebook": step.notebook, "title": step.title,
                       "error": f"{type(error).__name__}: {error}"}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                result, progress = Path(tmp) / "row.json", Path(tmp) / "progress.json"
                proc = subprocess.run(_child_command(step, args, result, progress), capture_output=True, text=True,
                                      timeout=args.step_timeout)
                if proc.returncode == 0 and result.exists():
                    row = json.loads(result.read_text())
                else:
                    row = failed_row(step, proc.returncode, proc.stderr, progress)
        row["fits"] = verdict(row, args.budget_gb)
        if "peak_bytes" in row:
            bound = ">= " if row.get("lower_bound") else ""
            print(f"    peak {bound}{row['peak_bytes'] / GB:.2f} GB ({row['peak_phase']})"
                  + (f" in {row['seconds']:.0f} s" if "seconds" in row else ""), file=sys.stderr, flush=True)
        if "error" in row:
            print(f"    FAILED: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
        if args.json:  # after every step, so that a long run keeps what it has measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"environment": environment(args), "rows": rows}, indent=1))
    return rows


COLUMNS = ["notebook", "step", "model", "dtype", "settings", "peak GB", "peak phase", "measure", "fits"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        fits = {True: "yes", False: "no", None: "unknown"}[r.get("fits")]
        if "peak_bytes" not in r:
            out.append([r["notebook"], r["title"], r.get("model", ""), r.get("dtype", ""), r.get("settings", ""),
                        "failed", r["error"], r.get("measure", ""), fits])
            continue
        peak = ("≥ " if r.get("lower_bound") else "") + f"{r['peak_bytes'] / GB:.2f}"
        phase = r["peak_phase"] + (f" ({r['error']})" if "error" in r else "")
        out.append([r["notebook"], r["title"], r["model"], r["dtype"], r["settings"], peak, phase, r["measure"], fits])
    return out


def render(rows: list[dict], *, markdown: bool) -> str:
    body = table_rows(rows)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(c), *(len(line[i]) for line in body)) if body else len(c) for i, c in enumerate(COLUMNS)]
    widths[4] = min(widths[4], 60)
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(cell[:w].ljust(w) for cell, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def describe_measure(rows: list[dict], budget_gb: float) -> str:
    measures = {r.get("measure") for r in rows if "measure" in r}
    parts = [f"Budget: {budget_gb:g} GB (1 GB = 1e9 bytes; a T4 has 15.8e9 bytes, of which the CUDA context takes "
             "some)."]
    if "cpu-rss" in measures:
        parts.append("cpu-rss: peak resident memory of a fresh process per step, minus its resident memory after "
                     "the imports (Linux VmHWM, reset per phase). An ESTIMATE of GPU memory: no CUDA context or "
                     "caching allocator, different kernels.")
    if "cuda" in measures:
        parts.append("cuda: torch.cuda.max_memory_allocated per phase (tensors only; add the CUDA context and the "
                     "allocator's slack).")
    if any(r.get("lower_bound") for r in rows):
        parts.append("≥: the step was stopped by running out of memory (on a CPU: the host's RAM, shared with other "
                     "processes); the figure is the peak it reached first, a lower bound.")
    if any(r.get("profile") == "tiny" for r in rows):
        parts.append("TINY MODE: tiny models and the tiny profile's settings; the numbers say nothing about a T4.")
    return "\n".join(parts)


def environment(args) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit.stdout.strip() or None, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "max_batches": args.max_batches, "threads": args.threads, "count_held": args.count_held,
            "tiny": args.tiny,
            "budget_gb": args.budget_gb}


def load_rows(paths: list[Path], step_ids: list[str]) -> tuple[list[dict], list[str]]:
    """Rows saved with ``--json``, merged (a later file's row replaces an earlier one of the same step), in the
    order of :data:`STEPS`, restricted to ``step_ids``; and one line per file saying where it was measured."""
    by_step: dict[str, dict] = {}
    sources = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            rows = data["rows"]
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"--from-json {path}: not a file written by --json ({error}).") from error
        env = data.get("environment", {})
        sources.append(f"{Path(path).name}: {', '.join(r['step'] for r in rows)} measured {env.get('date')} at "
                       f"commit {env.get('commit')} on {env.get('gpu') or env.get('cpu')} ({env.get('device')}), "
                       f"max_batches={env.get('max_batches')}, count_held={env.get('count_held', False)}")
        by_step.update({row["step"]: row for row in rows})
    order = {step_id: k for k, step_id in enumerate(s.id for s in STEPS)}
    chosen = [row for step_id, row in by_step.items() if step_id in step_ids]
    return sorted(chosen, key=lambda row: order.get(row["step"], len(order))), sources


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="notebooks or step ids to run (prefixes, e.g. CH02_NB02 or CH05_NB02:repair)")
    parser.add_argument("--budget-gb", type=float, default=DEFAULT_BUDGET_GB, help="memory budget (default 15)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", type=Path, help="also write the rows and the environment to this file")
    parser.add_argument("--tiny", action="store_true", help="tiny models and the tiny profile's settings (a test)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="cut calibration and evaluation loaders to this many batches (default: as the notebook)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own; 1 with --tiny)")
    parser.add_argument("--count-held", action="store_true",
                        help="count the tensors a notebook still holds from earlier cells by their size instead of "
                             "allocating them (for a host with too little free memory; the peak is the same)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the steps in this process (faster start; peaks of later steps may include "
                             "memory the earlier ones did not hand back)")
    parser.add_argument("--step-timeout", type=float, default=None, help="seconds allowed for each step")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="PATH",
                        help="print the table of rows saved with --json instead of measuring (later files win)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_batches is not None and args.max_batches < 1:
        parser.error("--max-batches must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.budget_gb <= 0:
        parser.error("--budget-gb must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        step = next((s for s in STEPS if s.id == args.child), None)
        if step is None:
            raise SystemExit(f"Unknown step {args.child!r}.")
        row = run_step(step, tiny=args.tiny, device=args.device, max_batches=args.max_batches, threads=args.threads,
                       progress=args.progress, count_held=args.count_held)
        args.result.write_text(json.dumps(row))
        return 0
    steps = select(args.only)
    if args.list:
        for s in steps:
            doc = " ".join((s.run.__doc__ or "").split())
            print(f"{s.id:22s} {doc}")
        return 0
    if args.from_json:
        rows, sources = load_rows(args.from_json, [s.id for s in steps])
        for row in rows:
            row["fits"] = verdict(row, args.budget_gb)
    else:
        rows = measure_all(steps, args)
        sources = []
    print(render(rows, markdown=args.markdown))
    print()
    print(describe_measure(rows, args.budget_gb))
    if args.max_batches is not None:
        print(f"Calibration and evaluation loaders cut to {args.max_batches} batch(es) (--max-batches).")
    for line in sources:
        print(line)
    if any(r["fits"] is None for r in rows):
        return 2  # a step could not be measured
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
