"""Measurements every chapter repeats: size, perplexity, speed."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import batch_tensors


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters; shared (tied) tensors are counted once.

    Works on models built on the ``meta`` device too.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"count_parameters expects a torch.nn.Module, got {type(model).__name__}.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def perplexity(model: torch.nn.Module, dataloader: Iterable[dict], *, progress: bool = True,
               desc: str = "perplexity") -> float:
    """Token-weighted perplexity over a whole dataloader, padding excluded.

    ``exp(total negative log-likelihood / number of predicted tokens)``: each position whose
    target token is real (``attention_mask == 1``) counts once, so long and short texts weigh
    by their length rather than per batch.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(dataloader, desc=desc, disable=not progress, leave=False):
        input_ids, mask = batch_tensors(batch, device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("The dataloader holds no token to predict (empty, or every text is one token long).")
    return math.exp(total_nll / total_tokens)


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty string or a non-empty list of non-empty strings.")
    return prompts


@torch.no_grad()
def measure_generation(model, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 32,
                       runs: int = 3, warmup: int = 1) -> dict[str, float]:
    """Time greedy generation, after ``warmup`` untimed runs; medians over ``runs``.

    All prompts form one left-padded batch, and exactly ``max_new_tokens`` tokens are produced
    for each (end-of-sequence is ignored), so two models are compared on the same work.

    Returns a dict with ``latency_s`` (whole generate call), ``ttft_s`` (time to first token:
    prefill plus one step), ``tokens_per_s`` (new tokens of the batch / latency),
    ``decode_tokens_per_s`` (tokens after the first / time after the first),
    ``batch_size``, ``new_tokens`` and ``runs``.
    """
    prompts = _as_prompt_list(prompts)
    if max_new_tokens < 2 or runs < 1 or warmup < 0:
        raise ValueError("Use max_new_tokens >= 2, runs >= 1 and warmup >= 0.")
    device = _device_of(model)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous_side
    inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
    common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)

    def timed(n_tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **common)
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        timed(max_new_tokens)
    ttft = statistics.median(timed(1) for _ in range(runs))
    latency = statistics.median(timed(max_new_tokens) for _ in range(runs))
    batch = len(prompts)
    return {
        "latency_s": latency,
        "ttft_s": ttft,
        "tokens_per_s": batch * max_new_tokens / latency,
        "decode_tokens_per_s": batch * (max_new_tokens - 1) / max(latency - ttft, 1e-9),
        "batch_size": batch,
        "new_tokens": max_new_tokens,
        "runs": runs,
    }


def _forward_seconds(model, batches: list[dict]) -> float:
    """Seconds for one forward pass (no KV cache) over every batch."""
    device = _device_of(model)
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        input_ids, mask = batch_tensors(batch, device)
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_forward(model, dataloader: Iterable[dict], *, runs: int = 3, warmup: int = 1) -> dict[str, float]:
    """Forward-pass (prefill) throughput over a dataloader: real tokens per second, median of ``runs``.

    Unlike token-by-token generation, a forward pass over whole sequences is dominated by
    matrix multiplications, so its speed tracks the model's FLOPs.
    """
    return compare_forward({"model": model}, dataloader, runs=runs, warmup=warmup)["model"]


@torch.no_grad()
def compare_forward(models: dict, dataloader: Iterable[dict], *, runs: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Forward throughput of several models, timed **alternately** (A, B, A, B, ...) on the same batches.

    Timing one model after the other lets a slow drift of the machine (another process, clock
    changes) bias the comparison; alternating spreads it evenly. Returns, per name, the same dict as
    :func:`measure_forward` (median of ``runs``).
    """
    if not models:
        raise ValueError("models is empty: pass e.g. {'base': base_model, 'pruned': pruned_model}.")
    batches = list(dataloader)
    if not batches:
        raise ValueError("The dataloader is empty: nothing to time.")
    if runs < 1 or warmup < 0:
        raise ValueError("Use runs >= 1 and warmup >= 0.")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(warmup + runs):
        for name, model in models.items():
            seconds = _forward_seconds(model, batches)
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: {"seconds": statistics.median(t), "tokens": tokens,
                   "tokens_per_s": tokens / statistics.median(t), "runs": runs} for name, t in times.items()}


def speed_ratios(candidate: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Speed-ups of ``candidate`` over ``base`` (> 1 means faster), for the keys both share.

    Throughputs (keys ending in ``_per_s``) divide candidate by base; times (``_s``) divide
    base by candidate.
    """
    ratios = {}
    for key, value in candidate.items():
        if key not in base or not isinstance(value, float):
            continue
        if key.endswith("_per_s"):
            ratios[key] = value / base[key]
        elif key.endswith("_s") or key == "seconds":
            ratios[key] = base[key] / value
    return ratios


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that take part in a matrix multiplication for every token: all ``nn.Linear`` weights,
    the LM head included (a tied head is counted here even though it shares the embedding tensor),
    plus GPT-2's ``Conv1D`` projections. Embedding look-ups and norms cost no matmul and are left out.
    """
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            total += weight.numel()
    return total


def ideal_speedup(base: torch.nn.Module, pruned: torch.nn.Module) -> float:
    """Speed-up predicted from FLOPs: ``matmul_parameters(base) / matmul_parameters(pruned)``.

    A forward pass costs about two FLOPs per matmul weight per token, so this is the ratio a
    compute-bound forward pass could reach. It ignores attention's context-length terms, so it is
    a guide, not a promise; compare it with the measured :func:`measure_forward` ratio.
    """
    smaller = matmul_parameters(pruned)
    if smaller == 0:
        raise ValueError("The pruned model has no Linear layer: nothing to compare.")
    return matmul_parameters(base) / smaller
