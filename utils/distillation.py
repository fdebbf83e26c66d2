"""Knowledge distillation: recover a pruned model's quality from the original model (CH02, CH06).

The teacher is the model before pruning; the student is the pruned copy. The student learns
to match the teacher's *soft targets* (its temperature-softened next-token distribution,
Hinton et al., 2015, *Distilling the Knowledge in a Neural Network*), optionally blended with
ordinary cross-entropy on the text and with a *feature* term that pulls chosen student blocks'
hidden states towards teacher blocks' (Romero et al., 2015, *FitNets*; Sun et al., 2019,
*Patient Knowledge Distillation*).

Two refinements the book's recovery chapter uses, both off by default here:

* the **skew KL** (Ko et al., 2024, *DistiLLM*): the soft target is compared with a *mixture* of the
  teacher's and the student's distributions, ``KL(p || skew * p + (1 - skew) * q)``, which stays
  bounded (at most ``-log skew``) when the freshly pruned student is far from the teacher;
  ``skew = 0`` is the plain KL;
* the **feature dynamics** term: besides *where* each mapped block's hidden state is (the feature
  term), match *how it moves* from one mapped block to the next, the direction of
  ``h[l+1] - h[l]`` in the student against the teacher's.

    from utils import distill, distillation_loss, plot_history
    history = distill(student, teacher, train_dl, max_steps=30, eval_dataloader=test_dl)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import batch_tensors
from .evaluation import perplexity
from .precision import device_of
from .structure import decoder_blocks
from .training import train

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
#: A newer setting points lower: starting from ``prune_depth``'s model (linear maps folded in; 6 of 30 blocks), 30 steps
#: on 64 wikitext texts with lr 1e-4 ended closer to the base than 5e-4 on every domain of
#: ``scripts/recovery_transfer.py`` (test split, 2 seeds: worst other domain 2.18x the base vs 2.33x; wikitext 1.17x vs
#: 1.19x). The default stays 5e-4 until the notebooks that use it are re-run with 1e-4 (CH06 README).
DEFAULT_LR = 5e-4
DEFAULT_WARMUP_STEPS = 3
DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 2.0
#: The skew KL's teacher share: 0, the plain KL. CH06_NB01's `cpu` run (SmolLM2-135M, prune_depth's 6-block cut,
#: 30 steps x 3 seeds) put the compound loss (skew 0.1 + features + dynamics) against logits only within the
#: seed spreads on all three domains (cosmopedia 28.27 vs 28.73, spreads 0.62; wikitext 19.27 vs 19.44, 1.15;
#: sms_spam 177.2 vs 180.3, 32.1), and skew KL alone as well; so the defaults stay plain KL, logits only.
DEFAULT_SKEW = 0.0


# --- the loss --------------------------------------------------------------------------------

def _check_weights(temperature: float, alpha: float, beta: float, skew: float = 0.0, gamma: float = 0.0) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive number (2.0 is a good start), got {temperature!r}.")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (weight of the soft loss; 1 - alpha weighs the "
                         f"cross-entropy), got {alpha!r}.")
    if not isinstance(beta, (int, float)) or beta < 0 or math.isinf(beta):
        raise ValueError(f"beta must be >= 0 (weight of the feature loss; 0 switches it off), got {beta!r}.")
    if not isinstance(skew, (int, float)) or not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1): the teacher's share in the mixture the student is compared with "
                         f"(0 = plain KL; DistiLLM uses 0.1), got {skew!r}.")
    if not isinstance(gamma, (int, float)) or gamma < 0 or math.isinf(gamma):
        raise ValueError(f"gamma must be >= 0 (weight of the feature-dynamics loss; 0 switches it off), "
                         f"got {gamma!r}.")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


#: Positions per chunk are chosen so that one float32 temporary holds about this many numbers (128 MiB):
#: a 262k-token vocabulary (Gemma 3) gives chunks of 128 positions, SmolLM2's 49k chunks of 682.
CHUNK_ELEMENTS = 2**25


def _log_target_mixture(log_pt: torch.Tensor, log_ps: torch.Tensor, skew: float) -> torch.Tensor:
    """``log(skew * p + (1 - skew) * q)`` from the two log-distributions (``log q`` itself when skew is 0)."""
    if skew == 0:
        return log_ps
    return torch.logaddexp(log_pt + math.log(skew), log_ps + math.log1p(-skew))


class _SoftAndCrossEntropy(torch.autograd.Function):
    """Soft-target (skew) KL and next-token cross-entropy of flattened ``[N, vocab]`` logits, computed in
    chunks of positions, forward and backward.

    Autograd would keep several vocabulary-sized tensors per batch alive until the backward pass
    (softened log-probabilities of both models, their exponentials, a float32 copy of the logits):
    with Gemma 3's 262k vocabulary at 8 x 128 tokens each one is a gigabyte. Here only the two logits
    tensors are kept; the backward pass recomputes each chunk and writes the closed-form gradient
    ``T * (softmax(z_s / T) - softmax(z_t / T))`` (soft term) and ``softmax(z_s) - onehot`` (CE).

    With ``skew`` = s > 0 the soft term is ``KL(p || m)``, ``m = s p + (1 - s) q``, and its gradient with
    respect to the student's logits is ``T (1 - s) q * (sum_k q_k r_k - r)`` with ``r = p / m`` (the chain
    rule through the softmax; at s = 0, r = p / q and it reduces to ``T (q - p)``).
    """

    @staticmethod
    def forward(ctx, student, teacher, soft_weights, ce_targets, ce_weight, temperature, skew=0.0):
        n, vocab = student.shape
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        dtype = torch.promote_types(student.dtype, torch.float32)  # at least float32 for the softmaxes
        soft = torch.zeros((), dtype=dtype, device=student.device)
        ce = torch.zeros((), dtype=dtype, device=student.device)
        for start in range(0, n, chunk):
            zs, zt = student[start:start + chunk].to(dtype), teacher[start:start + chunk].to(dtype)
            log_ps, log_pt = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
            kl = (log_pt.exp() * (log_pt - _log_target_mixture(log_pt, log_ps, skew))).sum(-1)
            soft += (kl * soft_weights[start:start + chunk]).sum()
            targets = ce_targets[start:start + chunk]
            if (targets != IGNORE_INDEX).any():
                ce += F.cross_entropy(zs, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(student, teacher, soft_weights, ce_targets)
        ctx.temperature, ctx.ce_weight, ctx.chunk, ctx.skew = temperature, ce_weight, chunk, skew
        return soft * temperature**2, ce * ce_weight

    @staticmethod
    def backward(ctx, grad_soft, grad_ce):
        student, teacher, soft_weights, ce_targets = ctx.saved_tensors
        t, chunk, skew = ctx.temperature, ctx.chunk, ctx.skew
        grad = torch.empty_like(student)
        dtype = torch.promote_types(student.dtype, torch.float32)
        for start in range(0, student.shape[0], chunk):
            zs, zt = student[start:start + chunk].to(dtype), teacher[start:start + chunk].to(dtype)
            if skew == 0:
                g = F.softmax(zs / t, -1) - F.softmax(zt / t, -1)
            else:
                log_ps, log_pt = F.log_softmax(zs / t, -1), F.log_softmax(zt / t, -1)
                q, r = log_ps.exp(), (log_pt - _log_target_mixture(log_pt, log_ps, skew)).exp()
                g = (1.0 - skew) * q * ((q * r).sum(-1, keepdim=True) - r)
            g = g * (soft_weights[start:start + chunk, None] * t)
            g = g * grad_soft
            targets = ce_targets[start:start + chunk]
            valid = targets != IGNORE_INDEX
            if valid.any():
                p = F.softmax(zs, -1) * valid[:, None]
                rows = valid.nonzero().squeeze(1)
                p[rows, targets[rows]] -= 1.0
                g = g + p * (grad_ce * ctx.ce_weight)
            grad[start:start + chunk] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _soft_and_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
                 labels: torch.Tensor | None, temperature: float,
                 skew: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, CE) of ``[batch, seq, vocab]`` logits; see :class:`_SoftAndCrossEntropy`."""
    vocab = student_logits.size(-1)
    positions = student_logits.shape[:-1]
    if mask is None:
        weights = torch.full(positions, 1.0 / max(1, positions.numel()), device=student_logits.device)
    else:
        weights = mask.float() / mask.float().sum().clamp_min(1.0)
    targets = torch.full(positions, IGNORE_INDEX, dtype=torch.long, device=student_logits.device)
    if labels is not None:
        targets[:, :-1] = labels[:, 1:]  # position t predicts the label at t + 1
    ce_weight = 1.0 / max(1, int((targets != IGNORE_INDEX).sum()))
    return _SoftAndCrossEntropy.apply(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                                      weights.reshape(-1), targets.reshape(-1), ce_weight, float(temperature),
                                      float(skew))


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     mask: torch.Tensor | None = None, *, temperature: float = 2.0, skew: float = 0.0) -> torch.Tensor:
    """``T^2 * KL(p || skew * p + (1 - skew) * q)``, averaged over counted positions, where
    ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``.

    ``skew = 0`` (the default) is the plain ``KL(p || q)`` of Hinton et al. (2015); ``skew > 0`` is the skew KL
    of DistiLLM (Ko et al., 2024), bounded by ``-T^2 log(skew)`` however far the student is. ``mask`` (same
    shape as the logits without the vocabulary axis) marks the positions that count. The ``T^2`` factor keeps
    the gradients' size independent of ``T``. Computed in chunks of positions, so no extra vocabulary-sized
    tensor stays alive for the backward pass (see :class:`_SoftAndCrossEntropy`).
    """
    _check_weights(temperature, 0.5, 0.0, skew)
    return _soft_and_ce(student_logits, teacher_logits, mask, None, temperature, skew)[0]


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


def feature_dynamics_loss(hidden_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """How the representation *moves*: mean over consecutive pairs of ``1 - cosine(Δ student, Δ teacher)``,
    per counted position, where ``Δ`` is the step from one mapped block's output to the next one's.

    ``hidden_pairs`` are (student, teacher) hidden states in block order (as :func:`feature_loss` takes
    them). Pair ``i`` and ``i + 1`` give the student's step ``h_s[i+1] - h_s[i]`` and the teacher's
    ``h_t[i+1] - h_t[i]`` (across however many teacher blocks the map skips there); the loss is 0 when
    every step points the same way, whatever its length.

    Raises:
        ValueError: fewer than two pairs (a step needs two states), or shapes that differ.
    """
    if len(hidden_pairs) < 2:
        raise ValueError(f"feature_dynamics_loss needs at least two (student, teacher) pairs in block order, "
                         f"got {len(hidden_pairs)}: the dynamics are the steps between consecutive mapped blocks.")
    steps = []
    for i in range(len(hidden_pairs) - 1):
        (s0, t0), (s1, t1) = hidden_pairs[i], hidden_pairs[i + 1]
        if not s0.shape == t0.shape == s1.shape == t1.shape:
            raise ValueError(f"hidden_pairs[{i}] and [{i + 1}] hold different shapes "
                             f"({[tuple(x.shape) for x in (s0, t0, s1, t1)]}): feature dynamics need the same "
                             "width in student and teacher.")
        steps.append((s1.float() - s0.float(), t1.float() - t0.float()))
    return feature_loss(steps, mask)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, *, temperature: float = DEFAULT_TEMPERATURE,
                      alpha: float = DEFAULT_ALPHA,
                      hidden_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      beta: float = 0.0, skew: float = 0.0, gamma: float = 0.0, return_parts: bool = False):
    """The distillation loss of one batch of a causal language model.

    ``loss = alpha * soft + (1 - alpha) * CE + beta * feature + gamma * dynamics`` where

    * ``soft`` = :func:`soft_target_loss`: KL divergence between the teacher's and the student's
      next-token distributions softened by ``temperature``, times ``temperature**2`` (the skew KL
      with ``skew > 0``);
    * ``CE`` = cross-entropy of the student on ``labels`` (Hugging Face convention: ``labels``
      has the shape of ``input_ids``; position ``t``'s logits predict ``labels[t + 1]``);
    * ``feature`` = :func:`feature_loss` on ``hidden_pairs`` (only when ``beta > 0``);
    * ``dynamics`` = :func:`feature_dynamics_loss` on ``hidden_pairs`` (only when ``gamma > 0``).

    Positions whose label is ``-100`` (padding) are left out of the soft, feature and dynamics terms,
    and CE ignores them as targets. With ``labels=None`` every position counts and there is no CE
    term: ``loss = soft + beta * feature + gamma * dynamics``.

    Args:
        student_logits, teacher_logits: ``[batch, seq, vocab]`` tensors of the same shape.
        labels: ``[batch, seq]`` token ids with ``-100`` where nothing should be learned.
        skew: the teacher's share in the mixture of the skew KL, in [0, 1) (0 = plain KL).
        return_parts: also return a dict of the parts as floats (``soft``, ``ce``, ``feature``,
            ``dynamics``).
    """
    _check_weights(temperature, alpha, beta, skew, gamma)
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
    soft, ce = _soft_and_ce(student_logits, teacher_logits, mask, labels, temperature, skew)
    parts = {"soft": soft}
    if labels is not None:
        parts["ce"] = ce
        loss = alpha * soft + (1.0 - alpha) * ce
    else:
        loss = soft
    for name, weight, weight_name, term in (("feature", beta, "beta", feature_loss),
                                            ("dynamics", gamma, "gamma", feature_dynamics_loss)):
        if weight > 0:
            if not hidden_pairs:
                raise ValueError(f"{weight_name} > 0 needs hidden_pairs: a list of (student_hidden, teacher_hidden) "
                                 "in block order.")
            parts[name] = term(hidden_pairs, mask)
            loss = loss + weight * parts[name]
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


#: The options of :func:`utils.train` that :func:`distill` takes (as keywords) and passes on unchanged.
TRAIN_OPTIONS = ("max_steps", "epochs", "lr", "warmup_steps", "grad_accum", "micro_batch_size", "weight_decay",
                 "max_grad_norm", "progress")


def train_options(options: dict) -> dict:
    """The keyword arguments :func:`distill` gives :func:`utils.train`: ``options`` over distill's own
    defaults (``lr=DEFAULT_LR``, ``warmup_steps=DEFAULT_WARMUP_STEPS``; the rest are train's).

    Raises:
        TypeError: an option that is not one of :data:`TRAIN_OPTIONS` (the message lists them).
    """
    unknown = sorted(set(options) - set(TRAIN_OPTIONS))
    if unknown:
        raise TypeError(f"distill got unknown option(s) {', '.join(unknown)}. Its own are temperature, alpha, beta, "
                        f"skew, gamma, layer_map, eval_dataloader and train_embeddings; it passes these on to "
                        f"utils.train: "
                        f"{', '.join(TRAIN_OPTIONS)}.")
    return {"lr": DEFAULT_LR, "warmup_steps": DEFAULT_WARMUP_STEPS, **options}


def _check_pair(student: torch.nn.Module, teacher: torch.nn.Module, *, temperature: float, alpha: float,
                beta: float, layer_map, skew: float = 0.0, gamma: float = 0.0) -> list[int] | None:
    """Check that ``student`` can learn from ``teacher`` with these weights; the resolved layer map
    (``None`` without a feature or dynamics term)."""
    _check_weights(temperature, alpha, beta, skew, gamma)
    if student is teacher:
        raise ValueError("student and teacher are the same object: deep-copy the model before pruning "
                         "(student = copy.deepcopy(teacher)).")
    if _vocab_size(student) != _vocab_size(teacher):
        raise ValueError(f"Vocabulary mismatch: student {_vocab_size(student)} tokens, teacher "
                         f"{_vocab_size(teacher)}. Distil from the model the student was pruned from.")
    if (beta > 0 or gamma > 0) and layer_map is None:
        raise ValueError("beta > 0 (feature loss) or gamma > 0 (feature dynamics) needs a layer_map: 'uniform', "
                         "'last', 'kept' or a list of teacher block indices, e.g. kept_blocks(num_teacher_layers, "
                         "removed).")
    if not (beta > 0 or gamma > 0):
        return None
    mapping = _resolve_layer_map(layer_map, student, teacher)
    if gamma > 0 and len(mapping) < 2:
        raise ValueError("gamma > 0 (feature dynamics) needs a student with at least two blocks: the dynamics are "
                         "the steps between consecutive mapped blocks.")
    return mapping


class _FrozenTeacher:
    """``with _FrozenTeacher(teacher):`` the teacher in eval mode without gradients; its
    ``requires_grad`` flags and its mode restored on the way out."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher

    def __enter__(self) -> None:
        self.grad_flags = [p.requires_grad for p in self.teacher.parameters()]
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.was_training = self.teacher.training
        self.teacher.eval()

    def __exit__(self, *exc) -> bool:
        for p, flag in zip(self.teacher.parameters(), self.grad_flags):
            p.requires_grad_(flag)
        self.teacher.train(self.was_training)
        return False


def _student_params(student: torch.nn.Module, train_embeddings: bool) -> list[torch.nn.Parameter]:
    """The student's parameters that train: those with ``requires_grad``, minus the input embeddings
    unless ``train_embeddings``."""
    embeddings = student.get_input_embeddings() if hasattr(student, "get_input_embeddings") else None
    frozen_ids = set() if train_embeddings or embeddings is None else {id(p) for p in embeddings.parameters()}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen_ids]
    if not params:
        raise ValueError("The student has no trainable parameter (all requires_grad=False).")
    return params


def _distill_loss_fn(teacher: torch.nn.Module, device: torch.device, mapping: list[int] | None,
                     hooks: tuple[_BlockOutputs, _BlockOutputs] | None, *, temperature: float, alpha: float,
                     beta: float, skew: float = 0.0, gamma: float = 0.0):
    """``loss_fn(student, batch)`` for :func:`utils.train`: :func:`distillation_loss` and its parts,
    the teacher's logits computed without gradients, block outputs read from ``hooks``."""
    def loss_fn(model, batch):
        input_ids, mask = batch_tensors(batch, device)
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        student_logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        pairs = ([(hooks[0].outputs[i], hooks[1].outputs[j]) for i, j in enumerate(mapping)]
                 if mapping else None)
        return distillation_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                                 hidden_pairs=pairs, beta=beta, skew=skew, gamma=gamma, return_parts=True)
    return loss_fn


def distill(student: torch.nn.Module, teacher: torch.nn.Module, dataloader, *,
            temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA, beta: float = 0.0,
            skew: float = DEFAULT_SKEW, gamma: float = 0.0, layer_map=None, eval_dataloader=None,
            train_embeddings: bool = False, **options) -> dict:
    """Train ``student`` to imitate ``teacher`` on ``dataloader``; return the history.

    The teacher is frozen (eval mode, no gradients). The training itself is :func:`utils.train`:
    AdamW, ``grad_accum`` batches per optimizer step (each cut into chunks of ``micro_batch_size``
    rows when memory is short), linear warm-up for ``warmup_steps`` steps then a cosine decay to 10%
    of ``lr``, mixed precision on a GPU. The embedding table is frozen unless ``train_embeddings``:
    it is tied to the output head in most small models and does not need to move to repair a cut;
    frozen, it gets no gradient at all.

    Args:
        dataloader: batches of dicts with ``input_ids`` and ``attention_mask``
            (e.g. :func:`utils.make_dataloader`); padding is excluded from every term.
        temperature, alpha, beta, skew, gamma: see :func:`distillation_loss` (``alpha`` weighs the soft loss,
            ``skew`` makes it the skew KL, ``beta`` weighs the feature term and ``gamma`` the feature dynamics).
        layer_map: ``None`` (logits only), ``"uniform"``, ``"last"``, ``"kept"`` (a student made by
            :func:`utils.remove_blocks`, which records the removed blocks in its config), or a list
            with one teacher block index per student block (e.g. :func:`kept_blocks`). With a map
            and ``beta > 0`` or ``gamma > 0``, the feature terms compare those blocks' outputs.
        eval_dataloader: held-out text; perplexity is measured before training, after each
            pass over ``dataloader``, and at the end.
        **options: passed on to :func:`utils.train` (:data:`TRAIN_OPTIONS`): ``max_steps`` (exactly that
            many optimizer steps, reading ``dataloader`` again as often as needed) or ``epochs`` (that many
            passes; one pass when neither is given, a ValueError when both are), ``lr=DEFAULT_LR`` (5e-4),
            ``warmup_steps=DEFAULT_WARMUP_STEPS`` (3), ``grad_accum=1``, ``micro_batch_size=None``,
            ``weight_decay=0.0``, ``max_grad_norm=1.0``, ``progress=True``.

    Returns:
        A dict: ``step``, ``loss``, ``soft``, ``ce``, ``feature``, ``dynamics``, ``lr`` (one entry per
        optimizer step), ``eval_step``/``eval_epoch``/``eval_ppl`` (evaluations), ``layer_map``,
        ``seconds`` and ``settings``.

    Raises:
        TypeError: an option that is neither distill's own nor one of :data:`TRAIN_OPTIONS`.
    """
    forwarded = train_options(options)
    weights = {"temperature": temperature, "alpha": alpha, "beta": beta, "skew": skew, "gamma": gamma}
    mapping = _check_pair(student, teacher, layer_map=layer_map, **weights)
    device = device_of(student)
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    with _FrozenTeacher(teacher):
        params = _student_params(student, train_embeddings)
        hooks = (_BlockOutputs(student, range(len(mapping))), _BlockOutputs(teacher, mapping)) if mapping else None

        def evaluate(model):
            return perplexity(model, eval_dataloader, progress=False)

        try:
            history = train(student, dataloader, _distill_loss_fn(teacher, device, mapping, hooks, **weights),
                            params=params, eval_fn=evaluate if eval_dataloader is not None else None,
                            desc="distill", **forwarded)
        finally:
            for block_outputs in hooks or ():
                block_outputs.remove()
    for key in ("soft", "ce", "feature", "dynamics"):
        history.setdefault(key, [0.0] * len(history["step"]))
    history["eval_ppl"] = history.pop("eval")
    history["layer_map"] = mapping
    history["settings"].update({**weights, "train_embeddings": train_embeddings})
    return history


def recovered_share(ppl_base: float, ppl_pruned: float, ppl_recovered: float) -> float:
    """Share of the lost quality that recovery won back, measured on log-perplexity (the mean NLL).

    ``(log pruned - log recovered) / (log pruned - log base)``: 1.0 means back to the base model's
    perplexity, 0.0 no better than the pruned model, negative worse than the pruned model.

    Why logs: perplexity is the exponential of the loss, so a share computed on raw perplexities is
    dominated by the blow-up of a badly damaged model. A model going from x1000 to x33 the base's
    perplexity has won back 97 % of the raw perplexity gap but only half of the lost log-likelihood
    (log 33 / log 1000 ~ 0.51 left), which is what the loss, and the reader, actually feel.
    Returns NaN when pruning lost nothing (pruned <= base).
    """
    values = {"ppl_base": ppl_base, "ppl_pruned": ppl_pruned, "ppl_recovered": ppl_recovered}
    bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v)}
    if bad:
        raise ValueError(f"Perplexities must be positive, finite numbers; got {bad}.")
    lost = math.log(ppl_pruned) - math.log(ppl_base)
    if lost <= 0:
        return float("nan")
    return (math.log(ppl_pruned) - math.log(ppl_recovered)) / lost


def retention(teacher_score: float, student_score: float, *, lower_is_better: bool = False) -> float:
    """Share of the teacher's score the student keeps: 1.0 is the teacher's level.

    ``student / teacher`` for a score where higher is better (an accuracy), ``teacher / student`` where lower is
    better (a perplexity: ``lower_is_better=True``), so in both cases a value under 1 is a loss and over 1 a
    gain. The book's data-scaling experiments (CH06) average such ratios over benchmarks ("overall retention").

    Raises:
        ValueError: a score that is not a positive, finite number.
    """
    values = {"teacher_score": teacher_score, "student_score": student_score}
    bad = {k: v for k, v in values.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v)}
    if bad:
        raise ValueError(f"Scores must be positive, finite numbers; got {bad}. (A zero accuracy has no ratio: "
                         f"compare differences instead.)")
    return teacher_score / student_score if lower_is_better else student_score / teacher_score


def texts_for_retention(sizes: Sequence[float], retentions: Sequence[float], target: float) -> float:
    """How many training texts a straight line through ``(log size, retention)`` needs to reach ``target``.

    Fits ``retention = a + b * ln(size)`` by least squares over every point given (repeat a size once per seed)
    and solves it for ``target``. Returns ``inf`` when the fitted line does not rise (``b <= 0``). It is an
    extrapolation from a few points: read it as an order of magnitude, and only over the range where a
    straight line in log size is a fair description of the points.

    Raises:
        ValueError: fewer than two distinct sizes, a size that is not positive, or lengths that differ.
    """
    sizes, retentions = [float(s) for s in sizes], [float(r) for r in retentions]
    if len(sizes) != len(retentions):
        raise ValueError(f"sizes and retentions differ in length ({len(sizes)} and {len(retentions)}): give one "
                         f"retention per size.")
    if any(not s > 0 or math.isinf(s) for s in sizes):
        raise ValueError(f"Sizes are numbers of texts, positive and finite; got {sizes}.")
    if len(set(sizes)) < 2:
        raise ValueError("A line needs at least two distinct sizes.")
    x = [math.log(s) for s in sizes]
    mx, my = sum(x) / len(x), sum(retentions) / len(retentions)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, retentions)) / sum((a - mx) ** 2 for a in x)
    if slope <= 0:
        return math.inf
    return math.exp(mx + (float(target) - my) / slope)


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
              "ce": (":", None, "cross-entropy"), "feature": ("-.", None, "feature (1 - cos)"),
              "dynamics": ((0, (1, 3)), None, "feature dynamics (1 - cos of steps)")}
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
