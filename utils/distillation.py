"""Knowledge distillation: recover a pruned model's quality from the original model (CH02, CH06).

The teacher is the model before pruning; the student is the pruned copy. The student learns
to match the teacher's *soft targets* (its temperature-softened next-token distribution,
Hinton et al., 2015, *Distilling the Knowledge in a Neural Network*), optionally blended with
ordinary cross-entropy on the text and with a *feature* term that pulls chosen student blocks'
hidden states towards teacher blocks' (Romero et al., 2015, *FitNets*; Sun et al., 2019,
*Patient Knowledge Distillation*).

    from utils import distill, distillation_loss, plot_history
    history = distill(student, teacher, train_dl, max_steps=30, eval_dataloader=test_dl)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import batch_tensors
from .depth import decoder_blocks
from .evaluation import _device_of, perplexity

IGNORE_INDEX = -100

#: Defaults of :func:`distill`, set for short recovery runs (CH02_NB02 records how far 30 steps get).
#: Tuned on SmolLM2-135M with 6 of 30 blocks removed and 30 steps of 8 x 128 wikitext tokens, evaluated
#: on held-out wikitext and cosmopedia. The learning rate was chosen first (with alpha 0.9): 5e-4
#: recovered more than 2e-4 or 1e-3, which overshoots in so few steps. The blend, temperature and feature
#: term were compared next (``scripts/sweep_distill.py`` re-runs that comparison for RESULTS.md). An even
#: blend of soft targets and cross-entropy (alpha 0.5) recovered far more than alpha 0.9: in a short run
#: the true next tokens of in-domain text are the most direct signal. Cross-entropy alone (alpha 0) did
#: about as well on the training domain but clearly worse on held-out text of another domain: the
#: teacher's soft targets keep the student close to the original model there. alpha 0.3 and T=1 were
#: each a little better than the defaults in that one setting, and a feature term through the kept-block
#: map changed nothing; alpha 0.5 and T=2 stay the documented, balanced defaults.
DEFAULT_LR = 5e-4
DEFAULT_WARMUP_STEPS = 3
DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 2.0


# --- the loss --------------------------------------------------------------------------------

def _check_weights(temperature: float, alpha: float, beta: float) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive number (2.0 is a good start), got {temperature!r}.")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (weight of the soft loss; 1 - alpha weighs the "
                         f"cross-entropy), got {alpha!r}.")
    if not isinstance(beta, (int, float)) or beta < 0 or math.isinf(beta):
        raise ValueError(f"beta must be >= 0 (weight of the feature loss; 0 switches it off), got {beta!r}.")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     mask: torch.Tensor | None = None, *, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over counted positions.

    ``mask`` (same shape as the logits without the vocabulary axis) marks the positions that
    count. The ``T^2`` factor keeps the gradients' size independent of ``T`` (Hinton et al., 2015).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def feature_loss(hidden_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of ``1 - cosine(student_hidden, teacher_hidden)``, per counted position."""
    terms = []
    for i, (student_h, teacher_h) in enumerate(hidden_pairs):
        if student_h.shape != teacher_h.shape:
            raise ValueError(f"hidden_pairs[{i}]: student hidden {tuple(student_h.shape)} and teacher hidden "
                             f"{tuple(teacher_h.shape)} differ. Feature distillation needs the same width; "
                             "add a projection or use logits only (beta=0).")
        cosine = F.cosine_similarity(student_h.float(), teacher_h.float(), dim=-1)
        terms.append(_masked_mean(1.0 - cosine, mask))
    if not terms:
        raise ValueError("hidden_pairs is empty: pass at least one (student_hidden, teacher_hidden) pair, "
                         "or None with beta=0.")
    return torch.stack(terms).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, *, temperature: float = DEFAULT_TEMPERATURE,
                      alpha: float = DEFAULT_ALPHA,
                      hidden_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      beta: float = 0.0, return_parts: bool = False):
    """The distillation loss of one batch of a causal language model.

    ``loss = alpha * soft + (1 - alpha) * CE + beta * feature`` where

    * ``soft`` = :func:`soft_target_loss`: KL divergence between the teacher's and the student's
      next-token distributions softened by ``temperature``, times ``temperature**2``;
    * ``CE`` = cross-entropy of the student on ``labels`` (Hugging Face convention: ``labels``
      has the shape of ``input_ids``; position ``t``'s logits predict ``labels[t + 1]``);
    * ``feature`` = :func:`feature_loss` on ``hidden_pairs`` (only when ``beta > 0``).

    Positions whose label is ``-100`` (padding) are left out of the soft and feature terms, and
    CE ignores them as targets. With ``labels=None`` every position counts and there is no CE
    term: ``loss = soft + beta * feature``.

    Args:
        student_logits, teacher_logits: ``[batch, seq, vocab]`` tensors of the same shape.
        labels: ``[batch, seq]`` token ids with ``-100`` where nothing should be learned.
        return_parts: also return a dict of the parts as floats (``soft``, ``ce``, ``feature``).
    """
    _check_weights(temperature, alpha, beta)
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError("Logits must be [batch, seq, vocab]; got student "
                         f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}.")
    if student_logits.size(-1) != teacher_logits.size(-1):
        raise ValueError(f"Vocabulary mismatch: the student scores {student_logits.size(-1)} tokens, the teacher "
                         f"{teacher_logits.size(-1)}. Distillation needs the same tokenizer and vocabulary; "
                         "prune and distil from the same base model.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: feed both models the same batch.")
    mask = None
    if labels is not None:
        if labels.shape != student_logits.shape[:2]:
            raise ValueError(f"labels must be [batch, seq] = {tuple(student_logits.shape[:2])}, "
                             f"got {tuple(labels.shape)}.")
        mask = labels != IGNORE_INDEX
    soft = soft_target_loss(student_logits, teacher_logits, mask, temperature=temperature)
    parts = {"soft": soft}
    if labels is not None:
        targets = labels[:, 1:]
        if (targets != IGNORE_INDEX).any():
            ce = F.cross_entropy(student_logits[:, :-1].float().reshape(-1, student_logits.size(-1)),
                                 targets.reshape(-1), ignore_index=IGNORE_INDEX)
        else:
            ce = student_logits.sum() * 0.0
        parts["ce"] = ce
        loss = alpha * soft + (1.0 - alpha) * ce
    else:
        loss = soft
    if beta > 0:
        if not hidden_pairs:
            raise ValueError("beta > 0 needs hidden_pairs: a list of (student_hidden, teacher_hidden).")
        feat = feature_loss(hidden_pairs, mask)
        parts["feature"] = feat
        loss = loss + beta * feat
    if return_parts:
        return loss, {k: float(v.detach()) for k, v in parts.items()}
    return loss


# --- layer maps ------------------------------------------------------------------------------

def kept_blocks(num_teacher_layers: int, removed: Sequence[int]) -> list[int]:
    """Original indices of the blocks that survive removing ``removed`` from ``num_teacher_layers``.

    This is the natural layer map for a depth-pruned student: student block ``i`` *is* teacher
    block ``kept_blocks(...)[i]``, with the same weights at the start of training.
    """
    removed = set(int(i) for i in removed)
    bad = [i for i in removed if not 0 <= i < num_teacher_layers]
    if bad:
        raise ValueError(f"removed holds {bad}, outside 0..{num_teacher_layers - 1}.")
    return [i for i in range(num_teacher_layers) if i not in removed]


def make_layer_map(num_student_layers: int, num_teacher_layers: int, kind: str = "uniform", *,
                   removed: Sequence[int] | None = None) -> list[int]:
    """Which teacher block each student block imitates, as a list of teacher indices.

    * ``"uniform"``: spread evenly, student block ``i`` -> teacher ``round((i+1) * T / S) - 1``
      (the last student block always maps to the last teacher block);
    * ``"last"``: the deepest teacher blocks, ``i -> i + T - S``;
    * ``"kept"``: the original indices of the kept blocks (needs ``removed``; see :func:`kept_blocks`).
    """
    s, t = int(num_student_layers), int(num_teacher_layers)
    if s < 1 or t < 1 or s > t:
        raise ValueError(f"Need 1 <= student layers <= teacher layers, got {s} and {t}.")
    if kind == "uniform":
        return [round((i + 1) * t / s) - 1 for i in range(s)]
    if kind == "last":
        return [i + t - s for i in range(s)]
    if kind == "kept":
        if removed is None:
            raise ValueError('kind="kept" needs removed=<the removed block indices>.')
        kept = kept_blocks(t, removed)
        if len(kept) != s:
            raise ValueError(f"Removing {t - len(kept)} of {t} blocks leaves {len(kept)}, "
                             f"but the student has {s}.")
        return kept
    raise ValueError(f"Unknown layer map kind {kind!r}: use 'uniform', 'last' or 'kept' (or pass a list).")


def _resolve_layer_map(layer_map, student, teacher) -> list[int] | None:
    if layer_map is None:
        return None
    n_s, n_t = len(decoder_blocks(student)), len(decoder_blocks(teacher))
    if isinstance(layer_map, str):
        if layer_map == "kept":
            removed = getattr(student.config, "removed_layers", None)
            if removed is None:
                raise ValueError('layer_map="kept" needs the removed indices; pass '
                                 "layer_map=kept_blocks(num_teacher_layers, removed) instead.")
            return make_layer_map(n_s, n_t, "kept", removed=removed)
        return make_layer_map(n_s, n_t, layer_map)
    layer_map = [int(i) for i in layer_map]
    if len(layer_map) != n_s:
        raise ValueError(f"layer_map has {len(layer_map)} entries but the student has {n_s} blocks: "
                         "give one teacher index per student block.")
    if any(not 0 <= i < n_t for i in layer_map):
        raise ValueError(f"layer_map entries must be teacher block indices in 0..{n_t - 1}, got {layer_map}.")
    return layer_map


class _BlockOutputs:
    """Forward hooks that keep the hidden-state output of chosen decoder blocks."""

    def __init__(self, model: torch.nn.Module, indices: Sequence[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        layers = decoder_blocks(model)
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in sorted(set(indices))]

    def _hook(self, index: int):
        def keep(_module, _inputs, output):
            self.outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --- training --------------------------------------------------------------------------------

def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """Mixed precision on CUDA for float32 weights: bfloat16 where supported, else float16
    (except Gemma, whose activations overflow float16)."""
    param = next(model.parameters())
    if param.device.type != "cuda" or param.dtype != torch.float32:
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    model_type = str(getattr(model.config, "model_type", ""))
    return None if model_type.startswith("gemma") else torch.float16


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distill(student: torch.nn.Module, teacher: torch.nn.Module, dataloader, *, epochs: int = 1,
            max_steps: int | None = None, lr: float = DEFAULT_LR, temperature: float = DEFAULT_TEMPERATURE,
            alpha: float = DEFAULT_ALPHA, layer_map=None, beta: float = 0.0, grad_accum: int = 1,
            eval_dataloader=None, warmup_steps: int = DEFAULT_WARMUP_STEPS, weight_decay: float = 0.0,
            train_embeddings: bool = False, max_grad_norm: float = 1.0, progress: bool = True) -> dict:
    """Train ``student`` to imitate ``teacher`` on ``dataloader``; return the history.

    The teacher is frozen (eval mode, no gradients). Each optimizer step sees ``grad_accum``
    batches; the learning rate warms up linearly for ``warmup_steps`` steps, then follows a
    cosine decay to 10% of ``lr``. Optimizer: AdamW over the student's parameters except the
    embedding table (unless ``train_embeddings``), which is tied to the output head in most
    small models and does not need to move to repair a cut.

    Args:
        dataloader: batches of dicts with ``input_ids`` and ``attention_mask``
            (e.g. :func:`utils.make_dataloader`); padding is excluded from every term.
        epochs, max_steps: train ``epochs`` passes, or stop after ``max_steps`` optimizer steps.
        temperature, alpha, beta: see :func:`distillation_loss` (``alpha`` weighs the soft loss).
        layer_map: ``None`` (logits only), ``"uniform"``, ``"last"``, or a list with one
            teacher block index per student block (e.g. :func:`kept_blocks`). With a map and
            ``beta > 0``, the feature loss compares those blocks' outputs.
        eval_dataloader: held-out text; perplexity is measured before training, after each
            epoch, and at the end when ``max_steps`` stops early.

    Returns:
        A dict: ``step``, ``loss``, ``soft``, ``ce``, ``feature``, ``lr`` (one entry per
        optimizer step), ``eval_step``/``eval_ppl`` (evaluations), ``layer_map``,
        ``seconds`` and ``settings``.
    """
    _check_weights(temperature, alpha, beta)
    if student is teacher:
        raise ValueError("student and teacher are the same object: deep-copy the model before pruning "
                         "(student = copy.deepcopy(teacher)).")
    if _vocab_size(student) != _vocab_size(teacher):
        raise ValueError(f"Vocabulary mismatch: student {_vocab_size(student)} tokens, teacher "
                         f"{_vocab_size(teacher)}. Distil from the model the student was pruned from.")
    try:
        n_batches = len(dataloader)
    except TypeError:
        n_batches = None
    if n_batches == 0:
        raise ValueError("The training dataloader is empty: build it from at least one text "
                         "(utils.make_dataloader(utils.load_texts('wikitext', n=64), tok)).")
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}.")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}.")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if beta > 0 and layer_map is None:
        raise ValueError("beta > 0 (feature loss) needs a layer_map: 'uniform', 'last' or a list of teacher "
                         "block indices, e.g. kept_blocks(num_teacher_layers, removed).")
    mapping = _resolve_layer_map(layer_map, student, teacher) if beta > 0 else None

    device = _device_of(student)
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    amp_dtype = _autocast_dtype(student)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    teacher_grad_flags = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    embeddings = student.get_input_embeddings() if hasattr(student, "get_input_embeddings") else None
    frozen_ids = set() if train_embeddings or embeddings is None else {id(p) for p in embeddings.parameters()}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen_ids]
    if not params:
        raise ValueError("The student has no trainable parameter (all requires_grad=False).")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n_batches / grad_accum) if n_batches else None
    total_steps = max_steps if max_steps is not None else (steps_per_epoch or 1) * epochs
    if max_steps is not None and steps_per_epoch:
        total_steps = min(max_steps, steps_per_epoch * epochs)

    history = {"step": [], "loss": [], "soft": [], "ce": [], "feature": [], "lr": [],
               "eval_step": [], "eval_epoch": [], "eval_ppl": [], "layer_map": mapping}

    def evaluate(step: int, epoch: int) -> None:
        if eval_dataloader is None:
            return
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            ppl = perplexity(student, eval_dataloader, progress=False)
        history["eval_step"].append(step)
        history["eval_epoch"].append(epoch)
        history["eval_ppl"].append(ppl)

    s_hooks = _BlockOutputs(student, range(len(mapping))) if mapping else None
    t_hooks = _BlockOutputs(teacher, mapping) if mapping else None
    start = time.perf_counter()
    was_training = student.training
    use_cache = getattr(student.config, "use_cache", None)
    step = 0
    try:
        evaluate(0, 0)
        student.train()
        bar = tqdm(total=total_steps, desc="distill", disable=not progress)
        done = False
        for epoch in range(1, epochs + 1):
            optimizer.zero_grad(set_to_none=True)
            sums, count = {"loss": 0.0, "soft": 0.0, "ce": 0.0, "feature": 0.0}, 0
            batches = list(dataloader) if n_batches is None else dataloader
            last_index = (len(batches) if n_batches is None else n_batches) - 1
            for index, batch in enumerate(batches):
                input_ids, mask = batch_tensors(batch, device)
                labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                    student_logits = student(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                pairs = [(s_hooks.outputs[i], t_hooks.outputs[j]) for i, j in enumerate(mapping)] if mapping else None
                loss, parts = distillation_loss(student_logits, teacher_logits, labels, temperature=temperature,
                                                alpha=alpha, hidden_pairs=pairs, beta=beta, return_parts=True)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"The loss became {loss.item()} at step {step}: lower lr "
                                             f"(now {lr}) or train in float32.")
                scaled = loss / grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                sums["loss"] += float(loss.detach())
                for key, value in parts.items():
                    sums[key] += value
                count += 1
                if count < grad_accum and index < last_index:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(step, total_steps, warmup_steps)
                if scaler:
                    scaler.unscale_(optimizer)
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history["step"].append(step)
                history["lr"].append(optimizer.param_groups[0]["lr"])
                for key in ("loss", "soft", "ce", "feature"):
                    history[key].append(sums[key] / count)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", epoch=epoch)
                sums, count = {"loss": 0.0, "soft": 0.0, "ce": 0.0, "feature": 0.0}, 0
                if step >= total_steps:
                    done = True
                    break
            student.eval()
            evaluate(step, epoch)
            student.train()
            if done:
                break
        bar.close()
    finally:
        for hooks in (s_hooks, t_hooks):
            if hooks:
                hooks.remove()
        for p, flag in zip(teacher.parameters(), teacher_grad_flags):
            p.requires_grad_(flag)
        student.train(was_training)
        if use_cache is not None:
            student.config.use_cache = use_cache
    history["seconds"] = time.perf_counter() - start
    history["settings"] = {"lr": lr, "temperature": temperature, "alpha": alpha, "beta": beta,
                           "grad_accum": grad_accum, "epochs": epochs, "max_steps": max_steps,
                           "steps": step, "warmup_steps": warmup_steps, "train_embeddings": train_embeddings,
                           "mixed_precision": str(amp_dtype) if amp_dtype else None}
    return history


def recovered_share(ppl_base: float, ppl_pruned: float, ppl_recovered: float) -> float:
    """Share of the lost quality that recovery won back: ``(pruned - recovered) / (pruned - base)``.

    1.0 means back to the base model's perplexity, 0.0 means no better than the pruned model.
    """
    lost = ppl_pruned - ppl_base
    if lost <= 0:
        return float("nan")
    return (ppl_pruned - ppl_recovered) / lost


def plot_history(history: dict, *, title: str = "Distillation", ax=None):
    """Training loss (total, soft, CE, feature) per step and held-out perplexity per evaluation."""
    import matplotlib.pyplot as plt

    if not history.get("step"):
        raise ValueError("The history holds no training step: run utils.distill(...) first.")
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    else:
        axes = ax
        fig = axes[0].figure
    styles = {"loss": ("-", "o", "total"), "soft": ("--", None, "soft (KL, x T^2)"),
              "ce": (":", None, "cross-entropy"), "feature": ("-.", None, "feature (1 - cos)")}
    for key, (line, marker, label) in styles.items():
        values = history.get(key) or []
        if values and any(v != 0 for v in values):
            axes[0].plot(history["step"], values, linestyle=line, marker=marker, markersize=3, label=label)
    axes[0].set(title=f"{title}: training loss", xlabel="optimizer step", ylabel="loss")
    axes[0].legend()
    if history.get("eval_ppl"):
        axes[1].plot(history["eval_step"], history["eval_ppl"], marker="s", linestyle="-", color="black")
        for x, y in zip(history["eval_step"], history["eval_ppl"]):
            axes[1].annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    else:
        axes[1].text(0.5, 0.5, "no eval_dataloader", ha="center", va="center", transform=axes[1].transAxes)
    axes[1].set(title=f"{title}: held-out perplexity", xlabel="optimizer step", ylabel="perplexity")
    fig.tight_layout()
    return fig
