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
* a progress bar, a history of every step, and an evaluation callback.

The loss is a function ``loss_fn(model, batch)``: the default :func:`causal_lm_loss` is next-token
cross-entropy; :func:`utils.distill` passes a distillation loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

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
    policy = precision_policy()
    if device_of(model).type != "cuda" and not policy.simulated:
        return dtype_of(model) if dtype_of(model) in HALF_DTYPES else None
    return policy.autocast_dtype(dtype_of(model), model_type)


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


def train(model: torch.nn.Module, dataloader: Iterable[dict], loss_fn: LossFn | None = None, *,
          max_steps: int | None = None, epochs: int = 1, lr: float = 5e-4, warmup_steps: int = 3,
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
        max_steps, epochs: stop after ``max_steps`` optimizer steps, or after ``epochs`` passes,
            whichever comes first.
        lr, warmup_steps: peak learning rate; linear warm-up, then cosine decay to 10 % (:func:`lr_factor`).
        grad_accum: batches per optimizer step (a larger effective batch at the same memory).
        micro_batch_size: cut each batch into chunks of this many rows, accumulating their gradients
            weighted by their share of the rows: the memory of a smaller batch, and the same update
            whenever the loss is a mean over rows with equally many counted tokens (close otherwise).
        params: the parameters to optimise. Default: every parameter with ``requires_grad=True``.
            Parameters not listed are frozen for the run (no gradient, no optimizer state) and
            their ``requires_grad`` is restored afterwards.
        eval_fn: ``eval_fn(model)`` -> a float or a dict, called (in eval mode, without gradients)
            before training, every ``eval_every`` optimizer steps, after each epoch when
            ``eval_after_epoch`` and at the end.

    Returns:
        A dict with ``step``, ``loss``, ``lr`` (one entry per optimizer step), one list per loss
        part, ``eval_step``/``eval_epoch``/``eval`` (each evaluation), ``seconds`` and ``settings``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"train expects a torch.nn.Module, got {type(model).__name__}.")
    _check_positive_int("epochs", epochs)
    _check_positive_int("grad_accum", grad_accum)
    _check_positive_int("max_steps", max_steps, allow_none=True)
    _check_positive_int("micro_batch_size", micro_batch_size, allow_none=True)
    _check_positive_int("eval_every", eval_every, allow_none=True)
    if not isinstance(lr, (int, float)) or not lr > 0 or math.isinf(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
    try:
        n_batches = len(dataloader)
    except TypeError:
        dataloader, n_batches = list(dataloader), None
        n_batches = len(dataloader)
    if n_batches == 0:
        raise ValueError("The training dataloader is empty: build it from at least one text "
                         "(utils.make_dataloader(utils.load_texts('wikitext', n=64), tokenizer)).")
    loss_fn = loss_fn or causal_lm_loss

    all_params = list(model.parameters())
    chosen = [p for p in all_params if p.requires_grad] if params is None else list(params)
    chosen_ids = {id(p) for p in chosen}
    if not chosen or not any(p.is_floating_point() for p in chosen):
        raise ValueError("Nothing to train: the model has no parameter with requires_grad=True "
                         "(or params is empty). Unfreeze what should learn, or pass params=[...].")
    grad_flags = [p.requires_grad for p in all_params]
    for p in all_params:  # frozen parameters get no gradient at all (memory and time)
        p.requires_grad_(id(p) in chosen_ids)

    device = device_of(model)
    amp_dtype = autocast_dtype(model)
    scaler = torch.amp.GradScaler(device.type) if precision_policy().needs_grad_scaler(amp_dtype) else None
    masters = MasterWeights(chosen)
    optimizer = torch.optim.AdamW(masters.params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n_batches / grad_accum)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)

    history: dict = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_epoch": [], "eval": []}
    part_names: list[str] = []
    was_training = model.training

    def evaluate(step: int, epoch: int) -> None:
        if eval_fn is None or (history["eval_step"] and history["eval_step"][-1] == step):
            return
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            value = eval_fn(model)
        history["eval_step"].append(step)
        history["eval_epoch"].append(epoch)
        history["eval"].append(value)
        model.train()

    start = time.perf_counter()
    step = 0
    try:
        evaluate(0, 0)
        model.train()
        bar = tqdm(total=total_steps, desc=desc, disable=not progress)
        for epoch in range(1, epochs + 1):
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            count = 0
            for index, batch in enumerate(dataloader):
                batch = _to_device(batch, device)
                for part, share in _split(batch, micro_batch_size):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = loss_fn(model, part)
                    loss, parts = out if isinstance(out, tuple) else (out, {})
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"The loss became {loss.item()} at step {step}: lower lr "
                                                 f"(now {lr}) or train in float32.")
                    scaled = loss * (share / grad_accum)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * share
                    for key, value in parts.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * share
                        if key not in part_names:
                            part_names.append(key)
                count += 1
                if count < grad_accum and index < n_batches - 1:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(step, total_steps, warmup_steps)
                masters.grads_to_masters()
                if scaler:
                    scaler.unscale_(optimizer)
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(masters.params, max_grad_norm)
                if scaler:
                    scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
                    scaler.update()
                else:
                    optimizer.step()
                masters.masters_to_model()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history["step"].append(step)
                history["lr"].append(optimizer.param_groups[0]["lr"])
                for key in ["loss", *part_names]:
                    history.setdefault(key, []).append(sums.get(key, 0.0) / count)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", epoch=epoch)
                sums, count = {}, 0
                if eval_every and step % eval_every == 0 and step < total_steps:
                    evaluate(step, epoch)
                if step >= total_steps:
                    break
            if eval_after_epoch or step >= total_steps:
                evaluate(step, epoch)
            if step >= total_steps:
                break
        bar.close()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in chosen:
            p.grad = None
        for p, flag in zip(all_params, grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    history["seconds"] = time.perf_counter() - start
    history["settings"] = {"lr": lr, "warmup_steps": warmup_steps, "grad_accum": grad_accum,
                           "micro_batch_size": micro_batch_size, "epochs": epochs, "max_steps": max_steps,
                           "steps": step, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                           "trainable_parameters": sum(p.numel() for p in chosen),
                           "mixed_precision": str(amp_dtype) if amp_dtype else None,
                           "float32_master_copies": masters.copies, "loss_scaling": scaler is not None}
    return history
