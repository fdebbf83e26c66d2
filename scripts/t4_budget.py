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

NOTEBOOKS = ROOT / "notebooks"
DEFAULT_BUDGET_GB = 15.0
TINY_VOCAB = 1024  # the tiny tokenizer's (data/): steps that tokenize text need every id to exist
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

    class Tracker(ast.NodeVisitor):  # depth first, in source order: a `del` counts only after the assignment
        def visit_Name(self, node: ast.Name) -> None:
            if isinstance(node.ctx, ast.Store):
                assigned.add(node.id)

        def visit_Delete(self, node: ast.Delete) -> None:
            for target in node.targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        assigned.discard(sub.id)

    for source in code_cells(name):
        if before in source:
            return [n for n in names if n in assigned]
        Tracker().visit(_parse(source))
    raise SystemExit(f"{name}: no code cell contains {before!r}; update the step in scripts/t4_budget.py.")


def notebook_kwargs(name: str, call: str | tuple[str, ...], namespace: dict, *, skip: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of the notebook's first call to ``call`` (e.g. ``"utils.distill"``, or a tuple of the
    names it may be called by), evaluated in ``namespace`` (the notebook's parameters and the step's stand-ins for
    its objects), minus ``skip``.

    So a keyword the notebook adds to that call (a memory setting, say) is used here too."""
    calls = (call,) if isinstance(call, str) else tuple(call)
    call = " / ".join(calls)
    for source in code_cells(name):
        for node in ast.walk(_parse(source)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in calls:
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
    """The dtype ``utils.load_model`` picks on a T4 (a CUDA GPU without bfloat16): the precision policy's."""
    return utils.precision.precision_policy(utils.precision.SIMULATED_T4).load_dtype(model_type)


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
    cpu_half: str = "bfloat16"  # on a CPU, float16 models are built in this dtype (see --cpu-float16-as)
    seed: int = 0

    @property
    def profile(self) -> str:
        return "tiny" if self.tiny else "full"

    def params(self, notebook: str) -> dict:
        return notebook_parameters(notebook, self.profile)

    def build(self, model_id: str, dtype: torch.dtype | None = None):
        """``model_id``'s architecture at real size (tiny width with ``--tiny``), random weights, T4 dtype (or
        ``dtype`` where the notebook asks ``utils.load_model`` for one)."""
        config = utils.tiny_config(model_id, TINY_VOCAB) if self.tiny else utils.real_config(model_id)
        dtype = dtype or t4_dtype(config.model_type)
        built = dtype
        if dtype == torch.float16 and not self.device.startswith("cuda") and self.cpu_half != "float16":
            built = getattr(torch, self.cpu_half)  # the same 2 bytes per element, fast CPU kernels
            note = (f"float16 built as {self.cpu_half} on the CPU (same bytes per element; this CPU's float16 "
                    "matmuls are hundreds of times slower)")
            if note not in self.meter.notes:
                self.meter.notes.append(note)
        torch.manual_seed(self.seed)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=built)
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
    kwargs = notebook_kwargs(notebook, ("utils.distill", "distillation.distill"), {**p, "utils": utils, **objects},
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
    teacher, student, eval_dl, train_dl, held = _ch02_nb02_setup(ctx, p, "distill(student, teacher")
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
    """CH06_NB01 §5: ``utils.distill`` with the compound loss (skew KL + features + feature dynamics through the
    kept-block map, the heaviest of its runs), then perplexity; the notebook still holds the hidden states of
    §3-4 and the logits of §3."""
    p = ctx.params("CH06_NB01")
    teacher, removed, _, eval_dl = _ch06_setup(ctx, "CH06_NB01", p)
    n_blocks = teacher.config.num_hidden_layers
    kept = utils.kept_blocks(n_blocks, removed)
    pruned = utils.remove_blocks(copy.deepcopy(teacher), removed)  # the notebook's `pruned`, copied for each run
    student = copy.deepcopy(pruned)
    hidden = (p["BATCH_SIZE"], p["MAX_LENGTH"], teacher.config.hidden_size)
    logits = (p["BATCH_SIZE"], p["MAX_LENGTH"], teacher.config.vocab_size)
    dtype = next(teacher.parameters()).dtype
    with ctx.meter.phase("tensors kept from §2"):
        held = ctx.held("CH06_NB01", ["s_h", "t_h", "_"], "distill(student, teacher",
                        {"s_h": (hidden, dtype, len(kept)), "t_h": (hidden, dtype, len(kept)), "_": (logits, dtype, 1)})
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS, p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("utils.distill (compound loss)"):
        student = copy.deepcopy(pruned)  # the loop's new student, the old one still alive
        utils.distill(student, teacher, train_dl, **_distill_kwargs(ctx, "CH06_NB01", p),
                      layer_map=utils.make_layer_map(len(kept), n_blocks, "kept", removed=removed), beta=p["BETA"],
                      skew=p["SKEW"], gamma=p["GAMMA"])
    with ctx.meter.phase("perplexity"):
        utils.perplexity(student, eval_dl, progress=False)
    ctx.settings.insert(0, f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['STEPS']} steps, "
                           f"beta {p['BETA']}, skew {p['SKEW']}, gamma {p['GAMMA']}")
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


def ch06_nb03_challenge(ctx: Context) -> None:
    """CH06_NB03: the default recipe's student kept (``utils.distill``), the reader's recipe training a second copy
    of the pruned model inside the check (the reference solution: T=1), perplexity; then the published model
    written with ``publish.save_with_card`` and reloaded with ``utils.load_model`` beside it (the card check)."""
    p = ctx.params("CH06_NB03")
    teacher, removed, _, eval_dl = _ch06_setup(ctx, "CH06_NB03", p)
    pruned = utils.remove_blocks(copy.deepcopy(teacher), removed)
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS, p["BATCH_SIZE"], p["MAX_LENGTH"])
    reference = copy.deepcopy(pruned)
    with ctx.meter.phase("utils.distill (the default recipe)"):
        utils.distill(reference, teacher, train_dl, **_distill_kwargs(ctx, "CH06_NB03", p))
    with ctx.meter.phase("utils.distill (a second copy: the reader's recipe)"):
        student = copy.deepcopy(pruned)
        utils.distill(student, teacher, train_dl, temperature=1.0, max_steps=OPTIMIZER_STEPS, progress=False)
    with ctx.meter.phase("perplexity"):
        utils.perplexity(student, eval_dl, progress=False)
    with ctx.meter.phase("save_with_card + reload"), tempfile.TemporaryDirectory() as folder:
        utils.publish.save_with_card(student, _tokenizer(), folder, base_model=p["MODEL_ID"], changes=["cut"],
                                     results={"perplexity": 1.0})
        reloaded, _ = utils.load_model(folder, device=ctx.device)
        del reloaded
    ctx.settings.insert(0, f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['STEPS']} steps per "
                           "recipe; teacher, pruned, reference and the reader's student resident")


def ch06_nb04_data_scaling(ctx: Context) -> None:
    """CH06_NB04: one point of the data-scaling series (``utils.distill`` with its defaults on a fresh copy of the
    pruned model, teacher and pruned resident), then the perplexity of the recovered student. The number of texts
    changes how many steps a point takes, not its peak: the batches are the same size. The multiple-choice task
    (lm-eval, batches of 16 short items) is lighter than a training step and is not measured."""
    p = ctx.params("CH06_NB04")
    teacher, removed, _, eval_dl = _ch06_setup(ctx, "CH06_NB04", p)
    pruned = utils.remove_blocks(copy.deepcopy(teacher), removed)
    train_dl = ctx.batches(teacher, OPTIMIZER_STEPS, p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("utils.distill (one point of the series)"):
        student = copy.deepcopy(pruned)
        utils.distill(student, teacher, train_dl, **_distill_kwargs(ctx, "CH06_NB04", p))
    with ctx.meter.phase("perplexity"):
        utils.perplexity(student, eval_dl, progress=False)
    ctx.settings.insert(0, f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} steps of a point (sizes "
                           f"{', '.join(f'{n:,}' for n in p['SIZES'])} texts, {p['EPOCHS']} pass each); teacher, "
                           "pruned and the student resident")


# --- CH07-CH12 and the appendices ----------------------------------------------------------------

def _tokenizer():
    """The tiny profile's tokenizer (from data/): steps that need text (generation, prompts, bias pairs) use it on
    the real-size model. Its ids are a subset of every vocabulary here; prompts are shorter than the real
    tokenizer's, which the settings say where it matters."""
    tokenizer = utils.models._tiny_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _profile(name: str) -> Iterator[None]:
    """Run a data loader of ``utils`` as in profile ``name`` (its sample files in data/: no Hub here)."""
    previous = os.environ.get(utils.profiles.ENV_VAR)
    os.environ[utils.profiles.ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(utils.profiles.ENV_VAR, None)
        else:
            os.environ[utils.profiles.ENV_VAR] = previous


def _copies(model, n: int) -> list:
    return [copy.deepcopy(model) for _ in range(n)]


def _alive_copies(ctx: Context, notebook: str, names: list[str], before: str, model) -> list:
    """Deep copies of ``model`` for the model names the notebook still holds when ``before`` runs (read from its
    code, like :meth:`Context.held`); said in the settings."""
    alive = alive_names(notebook, names, before)
    if alive:
        ctx.settings.append(f"notebook still holds {', '.join(alive)} (a model each)")
    return _copies(model, len(alive))


def _train_batches(ctx: Context, model, batch_size: int, length: int, steps: int = OPTIMIZER_STEPS) -> list[dict]:
    return ctx.batches(model, steps, batch_size, length)


def _train_last_blocks(model, n: int | None) -> None:
    """Freeze every parameter but those of the last ``n`` decoder blocks (``None``: leave them all trainable)."""
    if not n:
        return
    model.requires_grad_(False)
    for block in utils.depth.decoder_blocks(model)[-n:]:
        block.requires_grad_(True)


def ch07_nb01_quantization(ctx: Context) -> None:
    """CH07_NB01: the float32 model (the notebook loads it with dtype=torch.float32), our LoRA/DoRA copy and
    peft's resident (cell 11), then a fake-quantised NF4 + double-quant copy and its perplexity (cell 21)."""
    from peft import LoraConfig, get_peft_model

    p = ctx.params("CH07_NB01")
    with ctx.meter.phase("load (float32)"):
        model = ctx.build(p["MODEL_ID"], dtype=torch.float32)
    eval_dl = ctx.batches(model, ctx.n_batches(p["EVAL_TEXTS"], 8), 8, p["MAX_LENGTH"])
    with ctx.meter.phase("ours + peft DoRA copies"):
        ours = copy.deepcopy(model)
        utils.apply_lora(ours, p["TARGET_MODULES"], r=p["RANK"], alpha=p["ALPHA"], dora=True)
        theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=p["RANK"], lora_alpha=p["ALPHA"], lora_dropout=0.0,
                                                                 target_modules=p["TARGET_MODULES"], use_dora=True))
        with torch.no_grad():
            batch = {k: v[:2, :64].to(ctx.device) for k, v in eval_dl[0].items()}
            ours(**batch), theirs(**batch)
    del ours, theirs
    with ctx.meter.phase("fake-quantised copy + perplexity"):
        quantised = utils.fake_quantize_model(model, "nf4", 4, p["BLOCK_SIZE"], double_quant=True)
        utils.perplexity(model, eval_dl, progress=False)
        utils.perplexity(quantised, eval_dl, progress=False)
    ctx.settings.append(f"eval {len(eval_dl)} batch(es) of 8x{p['MAX_LENGTH']}, float32 as the notebook asks")


def _generate(ctx: Context, model, batch_size: int, prompt_tokens: int, new_tokens: int) -> None:
    """Greedy generation of ``new_tokens`` for ``batch_size`` random prompts (min_new_tokens: no early stop)."""
    ids = torch.randint(1, model.config.vocab_size, (batch_size, prompt_tokens), generator=torch.Generator()
                        .manual_seed(ctx.seed)).to(ctx.device)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def ch07_nb02_lora(ctx: Context) -> None:
    """CH07_NB02: ``specialist.add_lora`` on a copy, trained with ``specialist.train_specialist``'s loop
    (``utils.train`` at the notebook's batch, length and micro-batch), then GEN_BATCH notes generated together
    (MAX_NEW_TOKENS each) with the base model resident; then a fresh base with the adapter reloaded and merged
    (three models resident) and the merged specialist written with ``publish.save_with_card``."""
    from utils import specialist

    p = ctx.params("CH07_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    with ctx.meter.phase("specialist.add_lora copy + utils.train"):
        peft_model = specialist.add_lora(copy.deepcopy(model), rank=p["RANK"], alpha=p["ALPHA"],
                                         target_modules=p["TARGET_MODULES"], last_blocks=p["LORA_LAST_BLOCKS"])
        history = utils.train(peft_model, _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"]),
                              max_steps=OPTIMIZER_STEPS, lr=p["LR"], micro_batch_size=p.get("MICRO_BATCH"),
                              progress=False)
    peft_model.eval()
    with ctx.meter.phase("generate GEN_BATCH answers"):
        _generate(ctx, peft_model, p["GEN_BATCH"], p["MAX_LENGTH"], p["MAX_NEW_TOKENS"])
    with ctx.meter.phase("reload on a fresh base, merge, save_with_card"), tempfile.TemporaryDirectory() as folder:
        merged = specialist.add_lora(ctx.build(p["MODEL_ID"]), rank=p["RANK"], alpha=p["ALPHA"],
                                     target_modules=p["TARGET_MODULES"],
                                     last_blocks=p["LORA_LAST_BLOCKS"]).merge_and_unload()
        utils.publish.save_with_card(merged, _tokenizer(), folder, base_model=p["MODEL_ID"], changes=["LoRA"],
                                     results={"schema compliance": 1.0})
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']} in micro-batches of {p.get('MICRO_BATCH')}, "
                        f"{OPTIMIZER_STEPS} of {p['STEPS']} steps, trained tensors "
                        f"{sorted({str(q.dtype) for q in peft_model.parameters() if q.requires_grad})} "
                        f"(float32 masters: {history['settings']['float32_master_copies']}); generation "
                        f"{p['GEN_BATCH']} prompts of {p['MAX_LENGTH']} tokens (an upper bound of a note) "
                        f"+ {p['MAX_NEW_TOKENS']} new")


def ch07_nb03_adapters(ctx: Context) -> None:
    """CH07_NB03 §3-5: LoRA trained (``utils.train`` in micro-batches of MICRO_BATCH), its logits on one batch kept
    and the copy freed; DoRA trained and kept (the exercise reads it); full fine-tuning (float32 masters + AdamW on
    every weight) only where SKIP_METHODS does not leave it out (``full`` does: 16 bytes a weight); GEN_BATCH
    answers generated; a sweep copy trained beside the base and DoRA; two adapters loaded on one more copy.
    QLoRA/QDoRA (4-bit bitsandbytes base, CUDA) hold less than a float16 copy: not measured here."""
    from peft import LoraConfig, get_peft_model

    p = ctx.params("CH07_NB03")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    batches = _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"])
    probe = {k: v.to(ctx.device) for k, v in batches[0].items()}

    def adapted(dora: bool):
        return get_peft_model(copy.deepcopy(model), LoraConfig(
            r=p["RANK"], lora_alpha=p["ALPHA_PER_RANK"] * p["RANK"], lora_dropout=0.0,
            target_modules=p["TARGET_MODULES"], use_dora=dora, task_type="CAUSAL_LM"))

    kept = {}
    with ctx.meter.phase("LoRA trained, logits kept, freed; DoRA trained and kept"):
        for dora in (False, True):
            m = adapted(dora)
            utils.train(m, batches, max_steps=OPTIMIZER_STEPS, lr=p["LR"], micro_batch_size=p.get("MICRO_BATCH"),
                        progress=False)
            with torch.no_grad():
                kept[f"logits {dora}"] = m.eval()(**probe).logits
            if dora:
                kept["DoRA"] = m
            del m
    if "full fine-tuning" not in p.get("SKIP_METHODS", []):
        with ctx.meter.phase("full fine-tuning"):
            full = copy.deepcopy(model)
            utils.train(full, batches, max_steps=OPTIMIZER_STEPS, lr=p["FULL_FT_LR"],
                        micro_batch_size=p.get("MICRO_BATCH"), progress=False)
            del full
    with ctx.meter.phase("generate GEN_BATCH answers (DoRA)"):
        _generate(ctx, kept["DoRA"], p["GEN_BATCH"], p["MAX_LENGTH"], p["MAX_NEW_TOKENS"])
    with ctx.meter.phase("sweep copy (rank 32) + utils.train"):
        m = get_peft_model(copy.deepcopy(model), LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                                            target_modules=p["TARGET_MODULES"], task_type="CAUSAL_LM"))
        utils.train(m, batches, max_steps=OPTIMIZER_STEPS, lr=p["LR"], micro_batch_size=p.get("MICRO_BATCH"),
                    progress=False)
        del m
    with ctx.meter.phase("two adapters on one copy + logits"), torch.no_grad():
        multi = adapted(False)
        multi.eval()(**probe)
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']} in micro-batches of {p.get('MICRO_BATCH')}, "
                        f"{OPTIMIZER_STEPS} of {p['STEPS']} steps; skipped: {p.get('SKIP_METHODS') or 'nothing'}; "
                        f"generation {p['GEN_BATCH']} x ({p['MAX_LENGTH']} + {p['MAX_NEW_TOKENS']}); "
                        "QLoRA not measured")


def ch07_nb04_rank1_lab(ctx: Context) -> None:
    """CH07_NB04 (lab): for each rank of RANKS a copy with ``utils.lora.apply_lora`` on the target projections,
    trained with ``utils.train`` (all copies kept, as the notebook keeps them), then a merged copy of each (kept too),
    then GEN_BATCH answers generated by a merged copy with everything else resident."""
    from utils import lora

    p = ctx.params("CH07_NB04")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    batches = _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"])
    trained, merged = {}, {}
    with ctx.meter.phase("rank-r copies: apply_lora + utils.train (all kept)"):
        for rank in p["RANKS"]:
            trained[rank] = copy.deepcopy(model)
            lora.apply_lora(trained[rank], p["TARGET_MODULES"], r=rank, alpha=p["ALPHA_PER_RANK"] * rank)
            utils.train(trained[rank], batches, max_steps=OPTIMIZER_STEPS, lr=p["LR"], progress=False)
            trained[rank].eval()
    with ctx.meter.phase("merged copies + generate GEN_BATCH answers"):
        for rank in p["RANKS"]:
            merged[rank] = lora.merge_lora(copy.deepcopy(trained[rank])).eval()
        _generate(ctx, merged[max(p["RANKS"])], p["GEN_BATCH"], p["MAX_LENGTH"], p["MAX_NEW_TOKENS"])
    ctx.settings.append(f"ranks {p['RANKS']}, batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of "
                        f"{p['STEPS']} steps each; generation {p['GEN_BATCH']} prompts of {p['MAX_LENGTH']} tokens "
                        f"+ {p['MAX_NEW_TOKENS']} new")


def ch08_nb01_kv(ctx: Context) -> None:
    """CH08_NB01: perplexity of the evaluation batches (4 x MAX_LENGTH) and generation through the cache: a
    PREFIX_TOKENS prompt and STATIC_CACHE_LEN new tokens, dynamic and static cache (the quantised caches hold less)."""
    p = ctx.params("CH08_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_TEXTS"], 4), 4, p["MAX_LENGTH"])
    with ctx.meter.phase("perplexity + generation through the cache"):
        utils.perplexity(model, eval_dl, progress=False)
        _generate(ctx, model, 1, p["PREFIX_TOKENS"], p["STATIC_CACHE_LEN"])
        ids = torch.randint(1, model.config.vocab_size, (1, p["PREFIX_TOKENS"])).to(ctx.device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p["STATIC_CACHE_LEN"],
                           min_new_tokens=p["STATIC_CACHE_LEN"], do_sample=False, cache_implementation="static",
                           pad_token_id=0)
    ctx.settings.append(f"eval {len(eval_dl)} batch(es) of 4x{p['MAX_LENGTH']}; the memory plot's 65k-token contexts "
                        "are a formula, not allocated; vLLM (GPU only) not measured")


LM_EVAL_LENGTH = 256  # tokens per request in the stand-in for lm-eval's scoring (context + choice of a standard task)


def _free() -> None:
    utils.precision.free_memory()


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def ch08_nb02_cuts(ctx: Context) -> None:
    """CH08_NB02 (after the T4 redesign): the base and ONE other model at a time. The block cut measured and freed,
    then the attention cut kept with its logits on one batch; the attention cut freed and the portable (zeroed,
    full-size) copy compared with those logits (§5; §6 builds it again, and its reloaded copies, the same way);
    the recovery by ``utils.distill`` only where RECOVER is true (cpu/tiny: a 3B student does not fit a T4);
    then §8's sweep: the largest drop-k cut beside the base, scored at the notebook's BATCH_SIZE (a stand-in for
    lm-eval: forward passes of LM_EVAL_LENGTH tokens; the standard tasks need the Hub). The models the notebook
    still holds at §6 and §8 are read from its code (none, if the redesign holds)."""
    p = ctx.params("CH08_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    n_blocks = model.config.num_hidden_layers
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    scores = utils.sublayer_importance(model, calib)["attention"]
    block = utils.depth.decoder_blocks(model)[0]
    n_attention = round(p["N_BLOCKS_CUT"] * _n_params(block) / (_n_params(block.self_attn)  # as the notebook's §1
                                                                 + _n_params(block.input_layernorm)))
    chosen = utils.choose_attention_to_remove(model, None, n_attention, scores=scores)
    with ctx.meter.phase("block cut + perplexity, freed; attention cut + perplexity"):
        block_cut = utils.remove_blocks(copy.deepcopy(model), utils.choose_blocks_to_remove(
            model, calib, p["N_BLOCKS_CUT"], progress=False))
        utils.perplexity(block_cut, eval_dl, progress=False)
        del block_cut
        _free()
        attention_cut = utils.remove_attention(copy.deepcopy(model), chosen)
        utils.perplexity(attention_cut, eval_dl, progress=False)
        batch = {k: v.to(ctx.device) for k, v in eval_dl[0].items()}
        with torch.no_grad():
            cut_logits = attention_cut(**batch).logits
    others = _alive_copies(ctx, "CH08_NB02", ["block_cut", "attention_cut", "with_block0", "reloaded", "loaded"],
                           "zeroed.save_pretrained", model)
    with ctx.meter.phase("portable full-size copy vs the kept logits"):
        del attention_cut
        _free()
        zeroed = utils.remove_attention(copy.deepcopy(model), chosen, portable=True)
        with torch.no_grad():
            (zeroed(**batch).logits - cut_logits).abs().max()
        del zeroed
        _free()
    del others
    if p["RECOVER"]:
        with ctx.meter.phase("utils.distill + eval (RECOVER)"):
            attention_cut = utils.remove_attention(copy.deepcopy(model), chosen)
            student = copy.deepcopy(attention_cut)
            utils.distill(student, model, _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"]),
                          max_steps=OPTIMIZER_STEPS, eval_dataloader=eval_dl, progress=False)
            del student, attention_cut
            _free()
        ctx.settings.append(f"distill {OPTIMIZER_STEPS} of {p['DISTILL_STEPS']} steps")
    else:
        ctx.settings.append("no distillation (RECOVER is False)")
    others = _alive_copies(ctx, "CH08_NB02", ["block_cut", "zeroed", "with_block0", "reloaded", "loaded", "plain",
                                              "student"], "compare_models(", model)
    smallest_k = min((k for k in p["DROP_K"] if k), default=1)
    with ctx.meter.phase(f"drop-{smallest_k} cut + scoring at BATCH_SIZE (lm-eval stand-in)"):
        drop = utils.remove_attention(copy.deepcopy(model), utils.choose_attention_to_remove(
            model, None, min(smallest_k, n_blocks - 1), scores=scores))
        requests = ctx.batches(model, 1, p["BATCH_SIZE"], LM_EVAL_LENGTH)
        for m in (model, drop):
            utils.perplexity(m, requests, progress=False)
    ctx.settings.insert(0, f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, eval {len(eval_dl)} batch(es); sweep stand-in "
                           f"{p['BATCH_SIZE']}x{LM_EVAL_LENGTH}")
    del others


def ch08_nb03_bypass(ctx: Context) -> None:
    """CH08_NB03 (after the T4 redesign): the base, and one copy at a time. §1's two switched-off copies measured one
    after the other; the one-pass scoring of a skip pattern at batch 8; the cache bytes under a live bypass; then the
    decode timing's largest setting: TIMING_BATCH prompts of LONG_CONTEXT tokens, prefilled once, the base and
    TIMED_AT_ONCE copies (all four methods where it is None) in one alternation, a bypass copy first."""
    from utils import bypass
    from utils.kv_cache import prompt_cache_bytes

    p = ctx.params("CH08_NB03")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"], 8), 8, p["MAX_LENGTH"])
    blocks = list(range(1, 1 + p["MEAN_SKIPPED"]))
    with ctx.meter.phase("two removal copies, one at a time + perplexity"):
        utils.perplexity(model, eval_dl, progress=False)
        for build in (lambda: utils.remove_attention(copy.deepcopy(model), blocks), lambda: copy.deepcopy(model)):
            other = build()
            utils.perplexity(other, eval_dl, progress=False)
            del other
            _free()
    with ctx.meter.phase("one-pass scoring + cache bytes under the bypass"):
        n_texts = sum(int(b["input_ids"].shape[0]) for b in eval_dl)
        bypass.perplexity_with_skips(model, eval_dl, prefix_tokens=p["PROMPT_SHARE"], skips=[blocks] * n_texts,
                                     skip_from="decode", progress=False)
        with bypass.attention_bypass(model, rule=lambda signal: blocks):
            prompt_cache_bytes(model, eval_dl, prefix_tokens=p["PROMPT_SHARE"], decode_first=True, progress=False)
    batch, together = p["TIMING_BATCH"], p["TIMED_AT_ONCE"] or 4
    with ctx.meter.phase(f"decode timing, batch {batch}, long context, prefill once, base + {together} copies"):
        kinds = ["bypass", "static", "early", "late"][:together]
        copies = {"base": model}
        for kind in kinds:
            copies[kind] = (utils.remove_attention(copy.deepcopy(model), blocks) if kind == "static"
                            else copy.deepcopy(model))
        prompt = " ".join(["word"] * p["LONG_CONTEXT"])
        with contextlib.ExitStack() as stack:
            for kind in kinds:
                if kind != "static":
                    stack.enter_context(bypass.attention_bypass(copies[kind], rule=lambda signal: blocks,
                                                                decide_after=0 if kind == "early" else None))
            inputs = {k: v.to(ctx.device) for k, v in _tokenizer()([prompt] * batch, return_tensors="pt").items()}
            with torch.no_grad():  # the notebook's own prefill, to learn each bypass's decision
                copies[kinds[0]](**inputs, use_cache=True, logits_to_keep=1)
            utils.measure_decode(copies, _tokenizer(), [prompt] * batch, new_tokens=2, runs=1, warmup=0,
                                 prefill="once", ideals={k: 1.1 for k in kinds if k != "static"})
        del copies
    ctx.settings.append(f"eval {len(eval_dl)} batch(es) of 8x{p['MAX_LENGTH']}, timing {batch}x{p['LONG_CONTEXT']} "
                        f"(tiny tokenizer: about that many tokens), {together} cop{'y' if together == 1 else 'ies'} "
                        "beside the base")


def ch08_nb04_decode(ctx: Context) -> None:
    """CH08_NB04 (after the T4 redesign): the base and CUTS_AT_ONCE cuts (both, where it is None) per alternation;
    ``utils.measure_decode`` at the largest batch (dynamic cache) and with a static cache, the attention cut (the
    larger) first. The compiled run (COMPILE, full only) is not measured here."""
    p = ctx.params("CH08_NB04")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    n_blocks = model.config.num_hidden_layers
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, p["MAX_LENGTH"])
    attention = utils.choose_attention_to_remove(model, calib, p["N_ATTENTION"])
    depth = utils.choose_blocks_to_remove(model, calib, max(1, round(p["DEPTH_FRACTION"] * n_blocks)), progress=False)
    builders = [lambda: utils.remove_attention(copy.deepcopy(model), attention),
                lambda: utils.remove_blocks(copy.deepcopy(model), depth)]
    together = p["CUTS_AT_ONCE"] or len(builders)
    tokenizer = _tokenizer()
    prompts = p["PROMPTS"][:max(p["BATCH_SIZES"])]
    with ctx.meter.phase(f"base + {together} cut(s), measure_decode batch {len(prompts)} dynamic + static cache"):
        models = {"base": model, **{f"cut {i}": build() for i, build in enumerate(builders[:together])}}
        utils.measure_decode(models, tokenizer, prompts, new_tokens=p["NEW_TOKENS"], runs=1, warmup=0)
        utils.measure_decode(models, tokenizer, prompts[:1], new_tokens=p["NEW_TOKENS"], runs=1, warmup=0,
                             cache="static")
        del models
    ctx.settings.append(f"{len(prompts)} prompts (tiny tokenizer), {p['NEW_TOKENS']} new tokens, 1 run of "
                        f"{p['RUNS']}; compile=True (full) not measured")


def ch09_nb01_moe(ctx: Context) -> None:
    """CH09_NB01 (after the T4 redesign): dense model, MoE copy (E experts, k = E/2) and the width-pruned model
    at the same active neurons resident; ``utils.distill`` of the MoE and of the pruned model on their last
    RECOVERY_LAST_BLOCKS blocks; then the dense and pruned models freed, the export saved, reloaded with
    ``utils.load_model`` and compared on EXPORT_CHECK_BATCHES batches. The co-activation Gram matrices live in
    host memory (CPU tensors) on a GPU: the MoE is split at random here (same shapes, no Gram pass)."""
    from utils import moe

    p = ctx.params("CH09_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    dtype = next(model.parameters()).dtype
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"]["wikitext"], p["BATCH_SIZE"]), p["BATCH_SIZE"],
                          p["MAX_LENGTH"])
    k = p["K_HALF"]
    with ctx.meter.phase("MoE copy + perplexity"):
        moe_model = copy.deepcopy(model)
        moe.moefy(moe_model, p["NUM_EXPERTS"], k, method="random", router="zeros", progress=False)
        utils.perplexity(moe_model, eval_dl, progress=False)
    with ctx.meter.phase("width-pruned copies (prune_glu with repair)"):
        pruned = utils.prune_glu(copy.deepcopy(model), 1 - k / p["NUM_EXPERTS"], dataloader=calib, progress=False)
        utils.perplexity(pruned, eval_dl, progress=False)
    train_dl = _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"])
    trained = {}
    for name, student in (("MoE", moe_model), ("pruned", pruned)):
        with ctx.meter.phase(f"utils.distill ({name}, last blocks)"):
            _train_last_blocks(student, p.get("RECOVERY_LAST_BLOCKS"))
            history = utils.distill(student, model, train_dl, max_steps=OPTIMIZER_STEPS, progress=False)
            student.requires_grad_(True)
            trained[name] = history["settings"]["trainable_parameters"]
    del model, pruned, student  # as the notebook does before its export
    with ctx.meter.phase("export: save, utils.load_model, compare"), tempfile.TemporaryDirectory() as folder:
        moe.set_routing(moe_model, combine="softmax", temperature=100.0)
        moe.save_moe(moe_model, _tokenizer(), folder)
        reloaded, _ = utils.load_model(folder, dtype=dtype, device=ctx.device)
        check_dl = eval_dl[:p["EXPORT_CHECK_BATCHES"]] if p.get("EXPORT_CHECK_BATCHES") else eval_dl
        moe.compare_logits(moe_model, reloaded, check_dl)
        reloaded.set_experts_implementation("eager")
        moe.compare_logits(moe_model, reloaded, check_dl)
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['RECOVERY_STEPS']} "
                        f"steps, last {p.get('RECOVERY_LAST_BLOCKS')} blocks trained "
                        f"({', '.join(f'{n} {v / 1e6:.1f}M' for n, v in trained.items())} parameters); "
                        f"{len(calib)} calibration batch(es); random split (Gram matrices stay in host memory)")


def ch09_nb02_upcycle(ctx: Context) -> None:
    """CH09_NB02: the CH07 specialist made here when no folder or Hub id gives one (its heaviest case:
    ``specialist.add_lora`` on a copy, trained with ``utils.train`` at SPECIALIST_BATCH in micro-batches, merged),
    the upcycled model built from the base and the specialist, the specialist freed, router-only training with the
    load-balancing loss, then the export reloaded with ``utils.load_model`` and compared on EXPORT_CHECK_BATCHES
    batches."""
    from utils import moe, specialist

    p = ctx.params("CH09_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    dtype = next(model.parameters()).dtype
    n = model.config.num_hidden_layers
    layers = list(range(n - p["UPCYCLE_LAST"], n))
    second = p["DOMAINS"][1]
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"][second], p["BATCH_SIZE"]), p["BATCH_SIZE"],
                          p["MAX_LENGTH"])
    train_dl = _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("specialist trained here: add_lora + utils.train on a copy, merged"):
        clinical = specialist.add_lora(copy.deepcopy(model), rank=p["RANK"], alpha=p["ALPHA"])
        utils.train(clinical, _train_batches(ctx, model, p["SPECIALIST_BATCH"], p["MAX_LENGTH"]),
                    max_steps=OPTIMIZER_STEPS, lr=p["SPECIALIST_LR"], micro_batch_size=p.get("SPECIALIST_MICRO_BATCH"),
                    progress=False)
        clinical = clinical.merge_and_unload().eval()
    with ctx.meter.phase("upcycle + router training"):
        upcycled = moe.upcycle(copy.deepcopy(model), layers, [model, clinical], top_k=2, seed=ctx.seed)
        del clinical
        moe.set_routing(upcycled, top_k=2, noise_std=p["NOISE_STD"])
        utils.train(upcycled, train_dl, moe.router_loss_fn(p["BALANCE_WEIGHT"], top_k=1), max_steps=OPTIMIZER_STEPS,
                    lr=p["ROUTER_LR"], params=moe.router_parameters(upcycled), progress=False)
        moe.set_routing(upcycled, noise_std=0.0)
        upcycled.eval()
    with ctx.meter.phase("export: save, utils.load_model, compare"), tempfile.TemporaryDirectory() as folder:
        moe.save_moe(upcycled, _tokenizer(), folder)
        reloaded, _ = utils.load_model(folder, dtype=dtype, device=ctx.device)
        check_dl = eval_dl[:p["EXPORT_CHECK_BATCHES"]] if p.get("EXPORT_CHECK_BATCHES") else eval_dl
        moe.compare_logits(upcycled, reloaded, check_dl)
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, specialist batch {p['SPECIALIST_BATCH']} in "
                        f"micro-batches of {p.get('SPECIALIST_MICRO_BATCH')}, {OPTIMIZER_STEPS} of "
                        f"{p['SPECIALIST_STEPS']} specialist and {p['ROUTER_STEPS']} router steps; blocks "
                        f"{layers[0]}-{layers[-1]} upcycled")


def ch09_nb03_three_experts(ctx: Context) -> None:
    """CH09_NB03 (lab): one copy per expert whose last UPCYCLE_LAST blocks' MLPs train (``utils.train``, all copies
    kept), the three-expert upcycled model built from them, the copies freed, then router-only training with
    ``moe.router_loss_fn`` and a perplexity pass."""
    from utils import moe

    p = ctx.params("CH09_NB03")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    layers = _last(model, p["UPCYCLE_LAST"])
    train_dl = _train_batches(ctx, model, p["BATCH_SIZE"], p["MAX_LENGTH"])
    eval_dl = ctx.batches(model, ctx.n_batches(p["N_EVAL"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    specialists = []
    with ctx.meter.phase("experts: utils.train of the last MLPs, one copy per domain"):
        for _ in p["EXPERTS"]:
            specialist = copy.deepcopy(model)
            params = [q for i in layers for q in utils.glu_mlps(specialist)[i].parameters()]
            utils.train(specialist, train_dl, max_steps=OPTIMIZER_STEPS, lr=p["EXPERT_LR"], params=params,
                        progress=False)
            specialists.append(specialist.eval())
    with ctx.meter.phase("upcycle + router training + perplexity"):
        upcycled = moe.upcycle(copy.deepcopy(model), layers, specialists, top_k=len(specialists), seed=ctx.seed)
        del specialists
        moe.set_routing(upcycled, noise_std=p["NOISE_STD"])
        utils.train(upcycled, train_dl, moe.router_loss_fn(p["BALANCE_WEIGHT"]), max_steps=OPTIMIZER_STEPS,
                    lr=p["ROUTER_LR"], params=moe.router_parameters(upcycled), progress=False)
        moe.set_routing(upcycled, noise_std=0.0)
        utils.perplexity(upcycled.eval(), eval_dl, progress=False)
    ctx.settings.append(f"batch {p['BATCH_SIZE']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['EXPERT_STEPS']} expert "
                        f"and {p['ROUTER_STEPS']} router steps; {len(p['EXPERTS'])} experts in blocks "
                        f"{layers[0]}-{layers[-1]}")


def ch10_nb01_glu(ctx: Context) -> None:
    """CH10_NB01: ``utils.glu_statistics`` over the notebook's loader (every block's gate and up activations of a
    batch of BATCH_SIZE x MAX_LENGTH), and ``utils.capture_activations`` of every capture point on the prompts."""
    p = ctx.params("CH10_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    loader = ctx.batches(model, ctx.n_batches(p["N_TEXTS"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("glu_statistics + capture_activations"):
        utils.glu_statistics(model, loader, eps=p["EPS"], progress=False)
        utils.capture_activations(model, _tokenizer(), p["PROMPTS"], list(utils.CAPTURE_POINTS),
                                  batch_size=len(p["PROMPTS"]))
    ctx.settings.append(f"{len(loader)} batch(es) of {p['BATCH_SIZE']}x{p['MAX_LENGTH']}")


def ch10_nb02_ablations(ctx: Context) -> None:
    """CH10_NB02: neuron importance (data-driven hybrid) and block importance on the held-out batches, then a copy
    without one block and its perplexity beside the base (cell 29)."""
    p = ctx.params("CH10_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    held_out = ctx.batches(model, ctx.n_batches(p["N_TEXTS"], p["BATCH_SIZE"]), p["BATCH_SIZE"], p["MAX_LENGTH"])
    with ctx.meter.phase("neuron_importance (hybrid) + block_importance"):
        utils.neuron_importance(model, method="hybrid", dataloader=held_out, progress=False)
        utils.block_importance(model, held_out, progress=False)
    with ctx.meter.phase("one-block cut copy + perplexity"):
        cut = utils.remove_blocks(copy.deepcopy(model), [model.config.num_hidden_layers // 2])
        utils.perplexity(model, held_out, progress=False)
        utils.perplexity(cut, held_out, progress=False)
    ctx.settings.append(f"{len(held_out)} batch(es) of {p['BATCH_SIZE']}x{p['MAX_LENGTH']}")


def _bias_pairs():
    with _profile("tiny"):
        return utils.load_bias_pairs("calibration", tokenizer=_tokenizer())


def ch11_nb01_scale(ctx: Context) -> None:
    """CH11_NB01: bias scores on the calibration pairs, then the downstream measures of cell 21 with neurons
    scaled in place: perplexity at batch 8 x MAX_LENGTH (the heaviest of them)."""
    p = ctx.params("CH11_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    ppl_dl = ctx.batches(model, ctx.n_batches(p["N_PPL"], 8), 8, p["MAX_LENGTH"])
    tokenizer = _tokenizer()
    with ctx.meter.phase("bias scores + scaled neurons + perplexity"):
        relative = utils.relative_bias_scores(model, tokenizer, _bias_pairs())
        chosen = utils.top_neurons(relative, p["TOP_K"], protect_layers=p["PROTECT_LAYERS"])
        with utils.scale_neurons(model, chosen, p["SCALE"]):
            utils.perplexity(model, ppl_dl, progress=False)
    ctx.settings.append(f"{len(ppl_dl)} batch(es) of 8x{p['MAX_LENGTH']}; bias pairs from data/ (tiny tokenizer)")


def ch11_nb02_copies(ctx: Context) -> None:
    """CH11_NB02: the stereotype attribution (a backward pass through the model, §3); then §6: the base, the
    fair-pruned model (the sweep's largest share), a plain pruned copy and a zeroed copy resident, two batches of
    logits compared; then perplexity of the fair-pruned model on both domains."""
    from utils import bias

    p = ctx.params("CH11_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    n_layers, width = model.config.num_hidden_layers, model.config.intermediate_size
    evals = ctx.batches(model, ctx.n_batches(p["N_EVAL"], 8), 8, p["MAX_LENGTH"])
    with ctx.meter.phase("stereotype attribution (activations x gradients)"):
        with _profile("tiny"):
            probes = bias.first_templates(bias.attribution_probes(), 1)
        bias.stereotype_attribution(model, _tokenizer(), probes)
    scores = torch.rand(n_layers, width, generator=torch.Generator().manual_seed(ctx.seed))
    with ctx.meter.phase("fair, plain and zeroed copies + logits"):
        fair = copy.deepcopy(model)
        removed = utils.fair_prune(fair, scores, max(p["SWEEP"]), protect_layers=p["PROTECT_LAYERS"])
        plain = copy.deepcopy(fair)
        zeroed = copy.deepcopy(model)
        utils.zero_neurons(zeroed, removed)
        batch = {k: v.to(ctx.device) for k, v in evals[0].items()}
        with torch.no_grad():
            pruned_logits = plain(**batch).logits
            float((pruned_logits - zeroed(**batch).logits).abs()[batch["attention_mask"].bool()].max())
    del plain, zeroed, pruned_logits
    with ctx.meter.phase("perplexity"):
        utils.perplexity(fair, evals, progress=False)
    ctx.settings.append(f"{len(evals)} batch(es) of 8x{p['MAX_LENGTH']}; random scores (the same shapes)")


def ch11_nb03_benchmark(ctx: Context) -> None:
    """CH11_NB03: the base, the intervened and the fair-pruned models resident; ``utils.score_choices`` at the
    notebook's BATCH_SIZE on benchmark items (data/ sample, tiny tokenizer: shorter than real prompts)."""
    p = ctx.params("CH11_NB03")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    n_layers, width = model.config.num_hidden_layers, model.config.intermediate_size
    scores = torch.rand(n_layers, width, generator=torch.Generator().manual_seed(ctx.seed))
    with ctx.meter.phase("intervened + fair-pruned copies"):
        intervened = copy.deepcopy(model)
        utils.scale_neurons(intervened, utils.top_neurons(scores, p["TOP_K"], protect_layers=p["PROTECT_LAYERS"]),
                            p["SCALE"])
        fair = copy.deepcopy(model)
        utils.fair_prune(fair, scores, p["FAIR_RATIO"], protect_layers=p["PROTECT_LAYERS"])
    with _profile("tiny"):
        items = utils.load_bias_benchmark(n=2 * p["BATCH_SIZE"], seed=p["SEED"])
    with ctx.meter.phase("score_choices, 3 models"):
        for m in (model, intervened, fair):
            utils.score_choices(m, _tokenizer(), items, batch_size=p["BATCH_SIZE"], progress=False)
    ctx.settings.append(f"{len(items)} items at batch {p['BATCH_SIZE']}")


def ch12_nb01_capstone(ctx: Context) -> None:
    """CH12_NB01: the student (``utils.prune_depth`` + ``utils.prune_glu`` with calibration data and the notebook's
    allocation), ``utils.distill`` at 8 x 128; then LoRA (``utils.train_lora_adapter``) on a copy of the student and
    on a copy of the base, batches of LORA_BATCH notes + LORA_REPLAY_ROWS replayed rows; the merged specialist
    distilled again from the base (POST_DISTILL_STEPS, every weight trained) with the student still resident; and
    GEN_BATCH answers generated by each merged model (the first seed's merged models stay resident; later seeds train
    the same way)."""
    p = ctx.params("CH12_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, 320)
    with ctx.meter.phase("prune_depth + prune_glu (student; any alternative the notebook still holds)"):
        student = utils.prune_depth(copy.deepcopy(model), p["CUT_BLOCKS"], calib, progress=False)
        utils.prune_glu(student, ratio=p["WIDTH_RATIO"], dataloader=calib, allocation=p.get("WIDTH_ALLOCATION"),
                        progress=False)
        alt = _alive_copies(ctx, "CH12_NB01", ["alt"], "distill(student, model", student)
    general = _train_batches(ctx, model, 8, 128)  # both distillations read the same batches, as in the notebook
    with ctx.meter.phase("utils.distill"):
        utils.distill(student, model, general, max_steps=OPTIMIZER_STEPS, progress=False)
    student.eval()
    rows = p["LORA_BATCH"] + p.get("LORA_REPLAY_ROWS", 0)
    sft = _train_batches(ctx, model, rows, 320)
    post_steps = p.get("POST_DISTILL_STEPS", 0)
    merged = {}
    with ctx.meter.phase("LoRA on copies of the student and the base (+ the specialist's second distillation) "
                         "+ generation"):
        for name, start in (("specialist", student), ("baseline", model)):
            peft_model, _ = utils.train_lora_adapter(copy.deepcopy(start), sft, steps=OPTIMIZER_STEPS, rank=p["RANK"],
                                                     alpha=p["ALPHA"], lr=p["LORA_LR"], progress=False)
            merged[name] = peft_model.merge_and_unload().eval()
            if name == "specialist" and post_steps:  # the second distillation: every weight of the merged model
                merged[name].train().requires_grad_(True)
                utils.distill(merged[name], model, general, max_steps=OPTIMIZER_STEPS, progress=False)
                merged[name].eval()
            _generate(ctx, merged[name], p["GEN_BATCH"], 320, p["MAX_NEW_TOKENS"])
    post = (f"; second distillation of the merged specialist {OPTIMIZER_STEPS} of {post_steps} steps at 8x128"
            if post_steps else "")
    ctx.settings.append(f"{p.get('WIDTH_ALLOCATION') or 'default'} widths; distill {OPTIMIZER_STEPS} of "
                        f"{p['DISTILL_STEPS']} steps at 8x128; LoRA batch {rows}x320 ({p['LORA_BATCH']} notes + "
                        f"{p.get('LORA_REPLAY_ROWS', 0)} replayed, the notebook's SFT length), {OPTIMIZER_STEPS} of "
                        f"{p['LORA_STEPS']} steps{post}; {p['GEN_BATCH']} prompts of 320 tokens + "
                        f"{p['MAX_NEW_TOKENS']} new")
    del alt


def ch12_nb02_lab(ctx: Context) -> None:
    """CH12_NB02: the cut student (``utils.prune_depth`` on calibration batches of the task's length), ``utils.distill``
    at 8 x 128, then LoRA (``utils.train_lora_adapter``) on a copy of the student and on a copy of the base, each
    merged and scored with ``utils.score_choices``; the base, the student and both merged models stay resident."""
    p = ctx.params("CH12_NB02")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, p["MAX_LENGTH"])
    with ctx.meter.phase("prune_depth (student)"):
        student = utils.prune_depth(copy.deepcopy(model), p["CUT_BLOCKS"], calib, progress=False)
    with ctx.meter.phase("utils.distill"):
        utils.distill(student, model, _train_batches(ctx, model, 8, 128), max_steps=OPTIMIZER_STEPS, progress=False)
    student.eval()
    task = _train_batches(ctx, model, p["LORA_BATCH"], p["MAX_LENGTH"])
    with _profile("tiny"):
        items = utils.benchmarks.local_task("sms_spam_question", n=16)
    merged = {}
    with ctx.meter.phase("LoRA on copies of the student and the base + scoring"):
        for name, start in (("specialist", student), ("base + LoRA", model)):
            peft_model, _ = utils.train_lora_adapter(copy.deepcopy(start), task, steps=OPTIMIZER_STEPS, rank=p["RANK"],
                                                     alpha=p["ALPHA"], lr=p["LORA_LR"], progress=False)
            merged[name] = peft_model.merge_and_unload().eval()
            utils.benchmarks.score_choices(merged[name], _tokenizer(), items, progress=False)
    ctx.settings.append(f"-{p['CUT_BLOCKS']} blocks; distill {OPTIMIZER_STEPS} of {p['DISTILL_STEPS']} steps at 8x128; "
                        f"LoRA batch {p['LORA_BATCH']}x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['LORA_STEPS']} steps "
                        f"per model; {len(items)} sms_spam items scored at batch 16 (tiny tokenizer)")


def appb_nb01_recovery(ctx: Context) -> None:
    """APPB_NB01: the base, the depth-pruned copy and its recovered copy trained by ``utils.distill`` (batch 8);
    lm-eval's scoring then runs these models one at a time (batch BATCH_SIZE of short items: lighter, not
    measured; the standard tasks need the Hub)."""
    p = ctx.params("APPB_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, p["MAX_LENGTH"])
    held_out = ctx.batches(model, ctx.n_batches(p["N_EVAL"], 8), 8, p["MAX_LENGTH"])
    n_remove = max(1, round(p["N_REMOVE_FRACTION"] * model.config.num_hidden_layers))
    with ctx.meter.phase("choose blocks + pruned copy"):
        pruned = utils.remove_blocks(copy.deepcopy(model),
                                     utils.choose_blocks_to_remove(model, calib, n_remove, progress=False))
    with ctx.meter.phase("utils.distill + perplexity"):
        recovered = copy.deepcopy(pruned)
        utils.distill(recovered, model, _train_batches(ctx, model, 8, p["MAX_LENGTH"]), max_steps=OPTIMIZER_STEPS,
                      progress=False)
        for m in (model, pruned, recovered):
            utils.perplexity(m, held_out, progress=False)
    ctx.settings.append(f"batch 8x{p['MAX_LENGTH']}, {OPTIMIZER_STEPS} of {p['DISTILL_STEPS']} steps; lm-eval not "
                        "measured")


def appc_nb01_costs(ctx: Context) -> None:
    """APPC_NB01: the base, width- and depth-pruned copies resident; ``utils.token_costs`` generation of
    NEW_TOKENS for N_PROMPTS prompts of about PROMPT_WORDS words each."""
    p = ctx.params("APPC_NB01")
    with ctx.meter.phase("load"):
        model = ctx.build(p["MODEL_ID"])
    calib = ctx.batches(model, ctx.n_batches(p["N_CALIB"], 8), 8, 96)
    n_remove = max(1, round(p["DEPTH_FRACTION"] * model.config.num_hidden_layers))
    with ctx.meter.phase("width + depth copies"):
        models = {"base": model, "width": utils.prune_glu(copy.deepcopy(model), p["WIDTH_RATIO"], progress=False),
                  "depth": utils.remove_blocks(copy.deepcopy(model),
                                               utils.choose_blocks_to_remove(model, calib, n_remove, progress=False))}
    words = " ".join(["the history of the city begins with a small harbour"] * (p["PROMPT_WORDS"] // 10 + 1))
    prompts = [" ".join(words.split()[:p["PROMPT_WORDS"]])] * p["N_PROMPTS"]
    with ctx.meter.phase("token_costs (generation)"):
        utils.token_costs(models, _tokenizer(), prompts, new_tokens=p["NEW_TOKENS"], runs=1, warmup=0, idle_s=0.1)
    ctx.settings.append(f"{p['N_PROMPTS']} prompts of {p['PROMPT_WORDS']} words, {p['NEW_TOKENS']} new tokens, 1 run")


STEPS: list[Step] = [
    Step("CH02_NB01:copies", "4 models + logits + perplexity", ch02_nb01_copies),
    Step("CH02_NB02:scratch", "from-scratch KD loop (notebook code)", ch02_nb02_scratch),
    Step("CH02_NB02:distill", "utils.distill + eval", ch02_nb02_distill),
    Step("CH03_NB01:live", "meta skeletons + live generate", ch03_nb01_live),
    Step("CH04_NB01:depth", "block importance, 3 models + perplexity", ch04_nb01_depth),
    Step("CH05_NB01:static", "4 models (3 pruned copies) + perplexity", ch05_nb01_static),
    Step("CH05_NB02:scores", "activation_norms + optipfair hybrid", ch05_nb02_scores),
    Step("CH05_NB02:repair", "prune_glu(dataloader): Gram + repair", ch05_nb02_repair),
    Step("CH06_NB01:features", "utils.distill, compound loss", ch06_nb01_features),
    Step("CH06_NB01:optipfair", "optipfair.distill_model", ch06_nb01_optipfair),
    Step("CH06_NB02:width", "prune_glu student + utils.distill", ch06_nb02_width),
    Step("CH06_NB03:challenge", "2 recovered copies (utils.distill), save_with_card + reload", ch06_nb03_challenge),
    Step("CH06_NB04:scaling", "a point of the data series (utils.distill) + perplexity", ch06_nb04_data_scaling),
    Step("CH07_NB01:quantization", "LoRA/DoRA vs peft copies, fake-quantised copy + perplexity (float32)",
         ch07_nb01_quantization),
    Step("CH07_NB02:lora", "specialist.add_lora + utils.train, batched generation, merge + save_with_card",
         ch07_nb02_lora),
    Step("CH07_NB03:adapters", "LoRA, DoRA (kept), full fine-tuning unless skipped, sweep copy, two adapters",
         ch07_nb03_adapters),
    Step("CH07_NB04:ranks", "rank-1 and rank-8 LoRA copies trained and merged, batched generation",
         ch07_nb04_rank1_lab),
    Step("CH08_NB01:kv", "perplexity + generation through the cache", ch08_nb01_kv),
    Step("CH08_NB02:cuts", "base + one cut at a time; distill only where RECOVER; drop-k stand-in", ch08_nb02_cuts),
    Step("CH08_NB03:bypass", "base + one copy at a time; decode at TIMING_BATCH x 1,024", ch08_nb03_bypass),
    Step("CH08_NB04:decode", "base + CUTS_AT_ONCE cuts, measure_decode batch 8 + static cache", ch08_nb04_decode),
    Step("CH09_NB01:moe", "dense + MoE + pruned, utils.distill (last blocks), export", ch09_nb01_moe),
    Step("CH09_NB02:upcycle", "CH07 specialist (trained here: LoRA), upcycle + router training, export",
         ch09_nb02_upcycle),
    Step("CH09_NB03:experts", "three expert copies trained, upcycle + router training", ch09_nb03_three_experts),
    Step("CH10_NB01:glu", "glu_statistics + capture_activations", ch10_nb01_glu),
    Step("CH10_NB02:ablations", "neuron/block importance, cut copy + perplexity", ch10_nb02_ablations),
    Step("CH11_NB01:scale", "bias scores, scaled neurons + perplexity", ch11_nb01_scale),
    Step("CH11_NB02:copies", "attribution backward; 4 models + logits, perplexity", ch11_nb02_copies),
    Step("CH11_NB03:benchmark", "3 models + score_choices", ch11_nb03_benchmark),
    Step("CH12_NB01:capstone", "pruned student + utils.distill, 2 LoRA, second distillation + generation",
         ch12_nb01_capstone),
    Step("CH12_NB02:lab", "depth-cut student + utils.distill, 2 LoRA + score_choices", ch12_nb02_lab),
    Step("APPB_NB01:recovery", "3 models, utils.distill + perplexity", appb_nb01_recovery),
    Step("APPC_NB01:costs", "3 models + token_costs generation", appc_nb01_costs),
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
             progress: Path | None = None, count_held: bool = False, cpu_half: str = "bfloat16") -> dict:
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
        ctx = Context(tiny=tiny, device=device, max_batches=max_batches, meter=meter, count_held=count_held,
                      cpu_half=cpu_half)
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
    cmd += ["--cpu-float16-as", args.cpu_float16_as]
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
                               threads=args.threads, count_held=args.count_held, cpu_half=args.cpu_float16_as)
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
                     "caching allocator, different kernels. float16 models are built in bfloat16 on a CPU unless "
                     "--cpu-float16-as float16 (the same bytes per element; float16 CPU matmuls are very slow).")
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
            "cpu_float16_as": args.cpu_float16_as,
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
    parser.add_argument("--cpu-float16-as", choices=["bfloat16", "float16"], default="bfloat16",
                        help="on a CPU, build the T4's float16 models in this dtype (default bfloat16: the same 2 "
                             "bytes per element, but fast CPU matmuls; float16 ones are far slower here)")
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
                       progress=args.progress, count_held=args.count_held, cpu_half=args.cpu_float16_as)
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
