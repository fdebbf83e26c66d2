"""One training loop for every chapter that trains: distillation (CH02, CH06), LoRA (CH07),
recovery after attention surgery (CH08), routers (CH09).

    from utils import train, causal_lm_loss
    history = train(model, dataloader, max_steps=50, lr=2e-4, eval_fn=lambda m: perplexity(m, test_dl))

What the loop does, in the order a reader would write it by hand:

* AdamW over the parameters that train (``requires_grad=True``; frozen ones get no gradient and no
  optimizer state);
* a learning rate that warms up linearly, then decays along a cosine to 10 % of ``lr``;
* ``grad_accum`` batches per optimizer step, and optionally ``micro_batch_size``: each batch is cut
  into smaller chunks whose gradients are accumulated (about the same update, less memory);
* gradient-norm clipping, and mixed precision as :mod:`utils.precision` decides: a float32 model on a
  GPU is autocast to bfloat16 where the GPU has it natively, else to float16 with loss scaling (never
  float16 for Gemma, whose activations overflow it); a half-precision model (float16 on a T4) computes in
  its own dtype while AdamW updates **float32 master copies** of the parameters that train, never the
  half-precision weights themselves (float16's smallest steps and AdamW's ``eps`` underflow there);
* a length of run set one of two ways: ``max_steps`` optimizer steps exactly (the data is read again
  from the start as often as that takes, so a shuffling loader reshuffles), or ``epochs`` passes over
  the data (one pass when neither is given; passing both is an error);
* a progress bar, a history of every step, and an evaluation callback.

The loss is a function ``loss_fn(model, batch)``: the default :func:`causal_lm_loss` is next-token
cross-entropy; :func:`utils.distill` passes a distillation loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .precision import HALF_DTYPES, device_of, dtype_of, precision_policy, to_device

IGNORE_INDEX = -100
MIN_LR_RATIO = 0.1

LossFn = Callable[[torch.nn.Module, dict], "torch.Tensor | tuple[torch.Tensor, dict]"]


def lm_labels(batch: dict) -> torch.Tensor:
    """The batch's ``labels`` if it has them, else ``input_ids`` with padding replaced by -100."""
    if "labels" in batch:
        return batch["labels"]
    if "input_ids" not in batch:
        raise ValueError("A training batch needs 'input_ids' (and 'attention_mask'); got keys "
                         f"{sorted(batch)}. Build batches with utils.make_dataloader.")
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    return labels if mask is None else labels.masked_fill(mask == 0, IGNORE_INDEX)


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``batch``, mean over the positions that count.

    ``batch["labels"]`` (same shape as ``input_ids``, -100 where nothing is learned) decides which
    tokens are targets; without it every real (non-padding) token is. Position ``t``'s logits predict
    the label at ``t + 1`` (the Hugging Face convention).
    """
    labels = lm_labels(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   use_cache=False).logits
    targets = labels[:, 1:]
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # nothing to learn in this batch: a zero that still has a graph
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype ``model`` trains in under autocast, or None for plain float32 (see
    :meth:`utils.precision.PrecisionPolicy.autocast_dtype`): a half-precision model its own dtype; a
    float32 model on a GPU bfloat16 where native, else float16 (None for Gemma); None on a CPU."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return precision_policy().on(device_of(model)).autocast_dtype(dtype_of(model), model_type)


class MasterWeights:
    """float32 copies of the half-precision parameters that train: what AdamW updates.

    AdamW run directly on float16 weights breaks: its second-moment estimate and ``eps=1e-8`` underflow,
    and an update smaller than the weight's float16 step is lost. So the optimizer holds a float32
    "master" copy of each half-precision parameter; after each backward pass :meth:`grads_to_masters`
    hands it the gradient (in float32), and after each optimizer step :meth:`masters_to_model` writes the
    rounded result back into the model. float32 parameters (a LoRA adapter on a float16 base, say) are
    their own masters and cost nothing extra.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True) if p.dtype in HALF_DTYPES else p)
                      for p in params]
        self.params = [master for _, master in self.pairs]

    @property
    def copies(self) -> int:
        """How many parameters have a separate float32 copy."""
        return sum(p is not master for p, master in self.pairs)

    def grads_to_masters(self) -> None:
        for p, master in self.pairs:
            if p is not master:
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, master in self.pairs:
            if p is not master:
                p.copy_(master)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up over ``warmup`` steps, then a cosine decay from 1 to ``MIN_LR_RATIO`` at ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _to_device(batch: dict, device: torch.device) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(f"Training batches must be dicts of tensors (input_ids, attention_mask, ...), got "
                        f"{type(batch).__name__}. Build them with utils.make_dataloader.")
    return to_device(batch, device)


def _split(batch: dict, size: int | None) -> list[tuple[dict, float]]:
    """Cut a batch into chunks of ``size`` rows; each chunk comes with its share of the batch."""
    rows = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if size is None or rows is None or rows <= size:
        return [(batch, 1.0)]
    chunks = []
    for start in range(0, rows, size):
        part = {k: v[start:start + size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in batch.items()}
        chunks.append((part, min(size, rows - start) / rows))
    return chunks


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


# --- the settings of a run -------------------------------------------------------------------

@dataclass(frozen=True)
class TrainOptions:
    """The settings of one :func:`train` run, checked when built (see :func:`train` for each one).

    ``train`` builds it from its keyword arguments (:func:`utils.distill` forwards some of them:
    :data:`utils.distillation.TRAIN_OPTIONS`).

    Raises:
        ValueError: a count that is not a positive integer (``grad_accum``; ``max_steps``, ``epochs``,
            ``micro_batch_size`` and ``eval_every`` may also be None), both ``max_steps`` and ``epochs``
            given, ``lr`` not a positive finite number, ``warmup_steps`` not an integer >= 0.
    """

    max_steps: int | None
    epochs: int | None
    lr: float
    warmup_steps: int
    grad_accum: int
    micro_batch_size: int | None
    weight_decay: float
    max_grad_norm: float | None
    eval_every: int | None
    eval_after_epoch: bool
    progress: bool
    desc: str

    def __post_init__(self) -> None:
        _check_positive_int("epochs", self.epochs, allow_none=True)
        _check_positive_int("grad_accum", self.grad_accum)
        _check_positive_int("max_steps", self.max_steps, allow_none=True)
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"Pass max_steps or epochs, not both (got max_steps={self.max_steps}, "
                             f"epochs={self.epochs}): max_steps=N trains exactly N optimizer steps, reading the "
                             "data again as often as needed; epochs=E trains E passes over the data.")
        _check_positive_int("micro_batch_size", self.micro_batch_size, allow_none=True)
        _check_positive_int("eval_every", self.eval_every, allow_none=True)
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or math.isinf(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}.")

    @property
    def passes(self) -> int | None:
        """Passes over the data the run makes at most: ``epochs`` (1 by default), or None (as many as
        ``max_steps`` needs)."""
        return None if self.max_steps is not None else (self.epochs or 1)

    def total_steps(self, n_batches: int) -> int:
        """Optimizer steps of the run over ``n_batches`` batches per pass: ``max_steps`` when given
        (whatever ``n_batches`` is), else ``epochs`` passes of ``ceil(n_batches / grad_accum)`` steps."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(n_batches / self.grad_accum) * self.passes


def _sized(dataloader: Iterable[dict]) -> tuple[Iterable[dict], int]:
    """``dataloader`` and its number of batches (an iterable without ``len`` is read into a list)."""
    try:
        n_batches = len(dataloader)
    except TypeError:
        dataloader = list(dataloader)
        n_batches = len(dataloader)
    if n_batches == 0:
        raise ValueError("The training dataloader is empty: build it from at least one text "
                         "(utils.make_dataloader(utils.load_texts('wikitext', n=64), tokenizer)).")
    return dataloader, n_batches


# --- which parameters train ------------------------------------------------------------------

def _chosen_params(model: torch.nn.Module,
                   params: Iterable[torch.nn.Parameter] | None) -> list[torch.nn.Parameter]:
    """``params`` as a list, or the model's parameters with ``requires_grad=True``; never nothing."""
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not chosen or not any(p.is_floating_point() for p in chosen):
        raise ValueError("Nothing to train: the model has no parameter with requires_grad=True "
                         "(or params is empty). Unfreeze what should learn, or pass params=[...].")
    return chosen


@contextmanager
def _only_these_train(model: torch.nn.Module, chosen: list[torch.nn.Parameter]):
    """Freeze every parameter of ``model`` not in ``chosen`` (no gradient at all: memory and time).

    On the way out, whatever happened: no gradient left on ``chosen``, every ``requires_grad`` as it
    was, and the model back in the mode (train or eval) it was in.
    """
    all_params = list(model.parameters())
    chosen_ids = {id(p) for p in chosen}
    grad_flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(id(p) in chosen_ids)
    was_training = model.training
    try:
        yield
    finally:
        for p in chosen:
            p.grad = None
        for p, flag in zip(all_params, grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


# --- the optimizer, in the precision the policy chooses -----------------------------------------

@dataclass
class _Optimizer:
    """AdamW over float32 master weights, with a GradScaler where the policy needs one."""

    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    masters: MasterWeights
    adamw: torch.optim.AdamW


def _optimizer_for(model: torch.nn.Module, chosen: list[torch.nn.Parameter], options: TrainOptions) -> _Optimizer:
    """The autocast dtype (:func:`autocast_dtype`), a GradScaler for float16, float32 masters of
    ``chosen`` (:class:`MasterWeights`) and AdamW over those masters."""
    amp_dtype = autocast_dtype(model)
    needs_scaler = precision_policy().needs_grad_scaler(amp_dtype)
    scaler = torch.amp.GradScaler(device_of(model).type) if needs_scaler else None
    masters = MasterWeights(chosen)
    adamw = torch.optim.AdamW(masters.params, lr=options.lr, weight_decay=options.weight_decay)
    return _Optimizer(amp_dtype, scaler, masters, adamw)


def _optimizer_step(opt: _Optimizer, lr: float, max_grad_norm: float | None) -> None:
    """One update at learning rate ``lr``: gradients to the masters, unscale, clip, AdamW (skipped by
    the scaler when a gradient overflowed), masters back into the model, gradients cleared."""
    for group in opt.adamw.param_groups:
        group["lr"] = lr
    opt.masters.grads_to_masters()
    if opt.scaler:
        opt.scaler.unscale_(opt.adamw)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(opt.masters.params, max_grad_norm)
    if opt.scaler:
        opt.scaler.step(opt.adamw)  # skipped when a gradient overflowed; the scale then shrinks
        opt.scaler.update()
    else:
        opt.adamw.step()
    opt.masters.masters_to_model()
    opt.adamw.zero_grad(set_to_none=True)


# --- the loop --------------------------------------------------------------------------------

class _Loop:
    """One run of :func:`train`: the model, its optimizer, the step count and the history."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, eval_fn, options: TrainOptions,
                 opt: _Optimizer, total_steps: int):
        self.model, self.loss_fn, self.eval_fn, self.options = model, loss_fn, eval_fn, options
        self.opt, self.total_steps, self.device = opt, total_steps, device_of(model)
        self.step, self.passes, self.batches = 0, 0, 0
        self.part_names: list[str] = []
        self.history: dict = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_epoch": [], "eval": []}

    def autocast(self):
        dtype = self.opt.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def evaluate(self, epoch: int) -> None:
        """Call ``eval_fn`` in eval mode without gradients, once per step, and log what it returns."""
        history = self.history
        if self.eval_fn is None or (history["eval_step"] and history["eval_step"][-1] == self.step):
            return
        self.model.eval()
        with torch.no_grad(), self.autocast():
            value = self.eval_fn(self.model)
        history["eval_step"].append(self.step)
        history["eval_epoch"].append(epoch)
        history["eval"].append(value)
        self.model.train()

    def backward(self, batch: dict, sums: dict[str, float]) -> None:
        """Forward and backward pass of one batch (micro-batch by micro-batch), its loss parts added
        to ``sums`` weighted by each micro-batch's share of the rows."""
        options = self.options
        for part, share in _split(batch, options.micro_batch_size):
            with self.autocast():
                out = self.loss_fn(self.model, part)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            if not torch.isfinite(loss):
                raise FloatingPointError(f"The loss became {loss.item()} at step {self.step}: lower lr "
                                         f"(now {options.lr}) or train in float32.")
            scaled = loss * (share / options.grad_accum)
            (self.opt.scaler.scale(scaled) if self.opt.scaler else scaled).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * share
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value) * share
                if key not in self.part_names:
                    self.part_names.append(key)

    def update(self, sums: dict[str, float], count: int, epoch: int, bar) -> None:
        """One optimizer step on the accumulated gradients of ``count`` batches; log it."""
        options = self.options
        _optimizer_step(self.opt, options.lr * lr_factor(self.step, self.total_steps, options.warmup_steps),
                        options.max_grad_norm)
        self.step += 1
        self.history["step"].append(self.step)
        self.history["lr"].append(self.opt.adamw.param_groups[0]["lr"])
        for key in ["loss", *self.part_names]:
            self.history.setdefault(key, []).append(sums.get(key, 0.0) / count)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", epoch=epoch)
        if options.eval_every and self.step % options.eval_every == 0 and self.step < self.total_steps:
            self.evaluate(epoch)

    def epoch(self, dataloader: Iterable[dict], epoch: int, bar) -> None:
        """One pass over ``dataloader`` (or less, when the last step comes first), ``grad_accum``
        batches per optimizer step (the last step of a pass takes what is left).

        Raises:
            ValueError: the pass yielded no batch (an empty loader, or a one-shot iterator read before).
        """
        self.opt.adamw.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        count = read = 0
        for batch in dataloader:
            self.backward(_to_device(batch, self.device), sums)
            count, read = count + 1, read + 1
            if count < self.options.grad_accum:
                continue
            self.update(sums, count, epoch, bar)
            sums, count = {}, 0
            if self.step >= self.total_steps:
                break
        if count:  # the batches left at the end of the pass make one more (smaller) step
            self.update(sums, count, epoch, bar)
        self.batches += read
        if not read:
            raise ValueError(f"Pass {epoch} over the training data yielded no batch: pass a loader that can be "
                             "read again (a DataLoader or a list of batches), not an iterator or an empty one.")
        if self.options.eval_after_epoch or self.step >= self.total_steps:
            self.evaluate(epoch)

    def run(self, dataloader: Iterable[dict]) -> None:
        """Evaluate, then train pass after pass over ``dataloader`` until the last step (``max_steps``: as
        many passes as that takes; otherwise ``epochs`` passes)."""
        options = self.options
        try:
            self.evaluate(0)
            self.model.train()
            bar = tqdm(total=self.total_steps, desc=options.desc, disable=not options.progress)
            while self.step < self.total_steps and (options.passes is None or self.passes < options.passes):
                self.passes += 1
                self.epoch(dataloader, self.passes, bar)
            bar.close()
        finally:
            self.opt.adamw.zero_grad(set_to_none=True)


def _settings(options: TrainOptions, loop: _Loop, chosen: list[torch.nn.Parameter], opt: _Optimizer) -> dict:
    """The ``settings`` entry of the history: what the run was asked for, and what it did (``steps``,
    ``epochs``: passes begun, the last one possibly partial, ``batches``: batches read)."""
    return {"lr": options.lr, "warmup_steps": options.warmup_steps, "grad_accum": options.grad_accum,
            "micro_batch_size": options.micro_batch_size, "max_steps": options.max_steps, "steps": loop.step,
            "epochs": loop.passes, "batches": loop.batches, "weight_decay": options.weight_decay,
            "max_grad_norm": options.max_grad_norm, "trainable_parameters": sum(p.numel() for p in chosen),
            "mixed_precision": str(opt.amp_dtype) if opt.amp_dtype else None,
            "float32_master_copies": opt.masters.copies, "loss_scaling": opt.scaler is not None}


def train(model: torch.nn.Module, dataloader: Iterable[dict], loss_fn: LossFn | None = None, *,
          max_steps: int | None = None, epochs: int | None = None, lr: float = 5e-4, warmup_steps: int = 3,
          grad_accum: int = 1, micro_batch_size: int | None = None, weight_decay: float = 0.0,
          max_grad_norm: float | None = 1.0, params: Iterable[torch.nn.Parameter] | None = None,
          eval_fn: Callable[[torch.nn.Module], float | dict] | None = None, eval_every: int | None = None,
          eval_after_epoch: bool = True, progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` on ``dataloader`` with AdamW; return the history.

    Args:
        dataloader: yields dicts of tensors (``input_ids``, ``attention_mask``, optionally ``labels``
            and anything ``loss_fn`` reads); every tensor is moved to the model's device.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss, or ``(loss, {"part": float})``
            to log parts of it. Default :func:`causal_lm_loss`.
        max_steps, epochs: how long to train; give one of them, not both (a ValueError). ``max_steps``:
            exactly that many optimizer steps, reading ``dataloader`` again from the start as often as
            needed (a shuffling DataLoader draws a new order each pass). ``epochs``: that many passes.
            Neither: one pass. The learning-rate schedule spans the steps the run will make.
        lr, warmup_steps: peak learning rate; linear warm-up, then cosine decay to 10 % (:func:`lr_factor`).
        grad_accum: batches per optimizer step (a larger effective batch at the same memory).
        micro_batch_size: cut each batch into chunks of this many rows, accumulating their gradients
            weighted by their share of the rows: the memory of a smaller batch, and the same update
            whenever the loss is a mean over rows with equally many counted tokens (close otherwise).
        params: the parameters to optimise. Default: every parameter with ``requires_grad=True``.
            Parameters not listed are frozen for the run (no gradient, no optimizer state) and
            their ``requires_grad`` is restored afterwards.
        eval_fn: ``eval_fn(model)`` -> a float or a dict, called (in eval mode, without gradients)
            before training, every ``eval_every`` optimizer steps, after each pass over the data when
            ``eval_after_epoch`` and at the end.

    Returns:
        A dict with ``step``, ``loss``, ``lr`` (one entry per optimizer step), one list per loss
        part, ``eval_step``/``eval_epoch``/``eval`` (each evaluation), ``seconds`` and ``settings`` (what
        was asked, and what was done: ``steps``, ``epochs`` = passes begun, ``batches`` read).

    Raises:
        ValueError: bad settings (see :class:`TrainOptions`), both ``max_steps`` and ``epochs``, an empty
            dataloader, nothing to train.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"train expects a torch.nn.Module, got {type(model).__name__}.")
    options = TrainOptions(max_steps=max_steps, epochs=epochs, lr=lr, warmup_steps=warmup_steps,
                           grad_accum=grad_accum, micro_batch_size=micro_batch_size, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm, eval_every=eval_every,
                           eval_after_epoch=eval_after_epoch, progress=progress, desc=desc)
    dataloader, n_batches = _sized(dataloader)
    chosen = _chosen_params(model, params)
    with _only_these_train(model, chosen):
        opt = _optimizer_for(model, chosen, options)
        loop = _Loop(model, loss_fn or causal_lm_loss, eval_fn, options, opt, options.total_steps(n_batches))
        start = time.perf_counter()
        loop.run(dataloader)
    history = loop.history
    history["seconds"] = time.perf_counter() - start
    history["settings"] = _settings(options, loop, chosen, opt)
    return history
