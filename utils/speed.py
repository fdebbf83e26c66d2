"""Speed: the course's one timing harness (forward pass, generation, decoding) and the FLOPs ideal it is judged by.

ONE timing loop (``_alternate``) serves every speed measurement of the course: :func:`compare_speed` and its thin
wrappers :func:`measure_forward` / :func:`measure_generation` / :func:`compare_forward`, and
:func:`time_alternately` for arbitrary functions (e.g. "scoring costs how many forward passes?"). Models are timed
**alternately** (A, B, C, A, B, C, ...) so that a drift of the machine hits every model alike, and a speed-up is
judged against the FLOPs ideal (:func:`ideal_speedup`) with a verdict from :data:`SPEED_VERDICTS`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import torch

from .data import batch_tensors
from .precision import device_of


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """``prompts`` as a list of strings (one string becomes a list of one).

    Raises ``ValueError`` unless it is a non-empty string or a non-empty list of non-empty strings.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty string or a non-empty list of non-empty strings.")
    return prompts


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
    A mixture-of-experts layer (:class:`utils.moe.GLUMoE`) adds only the experts one token runs
    (its ``active_expert_parameters()``); its router and shared expert are ``nn.Linear`` and count as such.
    """
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            total += weight.numel()
        elif callable(getattr(module, "active_expert_parameters", None)):
            total += module.active_expert_parameters()
    return total


def ideal_speedup(base: torch.nn.Module, pruned: torch.nn.Module) -> float:
    """Speed-up predicted from FLOPs: ``matmul_parameters(base) / matmul_parameters(pruned)``.

    A forward pass costs about two FLOPs per matmul weight per token, so this is the ratio a
    compute-bound forward pass could reach. It ignores attention's context-length terms, so it is
    a guide, not a promise; :func:`compare_speed` sets the measured ratios next to it.
    """
    smaller = matmul_parameters(pruned)
    if smaller == 0:
        raise ValueError("The pruned model has no Linear layer: nothing to compare.")
    return matmul_parameters(base) / smaller


# --- the timing loop ------------------------------------------------------------------------

#: Verdicts of :func:`compare_speed` for one measured speed-up, from the ratio's spread over runs.
SPEED_VERDICTS: dict[str, str] = {
    "single_run": "one run only: the spread, and so the noise, is unknown",
    "within_noise": "the spread over runs includes x1.00: no difference can be measured",
    "plausible": "outside noise and inside the plausible band between x1.00 and the FLOPs ideal",
    "too_fast": "faster than the FLOPs ideal by more than the spread (and the tolerance) allows",
    "too_slow": "slower than the plausible band by more than the spread (and the tolerance) allows",
}


def sync_all() -> None:
    """Wait for queued CUDA work to finish (if CUDA is in use), so a clock read afterwards includes it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _alternate(jobs: Mapping[Hashable, Callable[[], object]], runs: int, warmup: int,
               cpu: dict[Hashable, list[float]] | None = None) -> dict[Hashable, list[float]]:
    """The course's one timing loop: ``warmup`` untimed rounds, then ``runs`` timed rounds; every round
    calls each job once, in the order of ``jobs``. Returns the wall-clock seconds of each timed call, per
    job; when a dict is passed as ``cpu``, it receives the process's CPU seconds (all threads) per call."""
    times: dict[Hashable, list[float]] = {key: [] for key in jobs}
    if cpu is not None:
        cpu.update({key: [] for key in jobs})
    for round_ in range(warmup + runs):
        for key, job in jobs.items():
            sync_all()
            start, start_cpu = time.perf_counter(), time.process_time()
            job()
            sync_all()
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu[key].append(time.process_time() - start_cpu)
    return times


def _check_counts(runs: int, warmup: int) -> None:
    if not isinstance(runs, int) or not isinstance(warmup, int) or runs < 1 or warmup < 0:
        raise ValueError(f"Use runs >= 1 and warmup >= 0 (whole numbers); got runs={runs!r}, warmup={warmup!r}.")


def _spread(seconds: list[float]) -> dict[str, float | list[float]]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "runs_s": list(seconds)}


def time_alternately(jobs: Mapping[str, Callable[[], object]], *, runs: int = 3, warmup: int = 1) -> dict[str, dict]:
    """Time several functions **alternately** (A, B, C, A, B, C, ...) after ``warmup`` untimed rounds.

    The same loop as :func:`compare_speed`, for work that is not "a model on a dataloader", e.g.
    ``time_alternately({"scoring": lambda: block_importance(m, dl), "forward": lambda: run(m, dl)})``.
    Returns, per name, ``median_s``, ``min_s``, ``max_s`` and ``runs_s`` (every timed call).
    """
    if not jobs:
        raise ValueError("jobs is empty: pass e.g. {'a': function_a, 'b': function_b}.")
    for name, job in jobs.items():
        if not callable(job):
            raise TypeError(f"jobs[{name!r}] is a {type(job).__name__}, not a function: wrap the work in a lambda.")
    _check_counts(runs, warmup)
    return {name: _spread(seconds) for name, seconds in _alternate(jobs, runs, warmup).items()}


def speedup(base_seconds: list[float], seconds: list[float], ideal: float | None, tolerance: float) -> dict:
    """Speed-up of a model over the base from paired runs (round r of the base against round r of the model).

    Pairing the runs of one round cancels a slow drift of the machine; ``ratio`` is the median of the
    paired ratios, ``min``/``max`` their spread. The plausible band runs from x1.00 to the FLOPs
    ``ideal`` (either order), widened by ``tolerance`` for what a FLOPs count leaves out.
    """
    paired = [b / max(s, 1e-12) for b, s in zip(base_seconds, seconds)]
    ratio, low, high = statistics.median(paired), min(paired), max(paired)
    share = None
    if ideal is not None and abs(ideal - 1.0) > 1e-9:
        share = (ratio - 1.0) / (ideal - 1.0)
    band_low, band_high = (min(1.0, ideal), max(1.0, ideal)) if ideal is not None else (1.0, 1.0)
    median_outside = None  # where the median lies when the range still meets the band
    if ideal is not None and ratio > band_high * (1 + tolerance):
        median_outside = "above"
    elif ideal is not None and ratio < band_low / (1 + tolerance):
        median_outside = "below"
    if len(paired) < 2:
        verdict = "single_run"
    elif low <= 1.0 <= high:
        verdict = "within_noise"
    elif ideal is not None and low > band_high * (1 + tolerance):
        verdict = "too_fast"
    elif ideal is not None and high < band_low / (1 + tolerance):
        verdict = "too_slow"
    else:
        verdict = "plausible"
    return {"ratio": ratio, "min": low, "max": high, "paired_ratios": paired, "ideal": ideal,
            "share_of_ideal_gain": share, "verdict": verdict, "flag": verdict in ("too_fast", "too_slow"),
            "median_outside_band": median_outside}


def check_models(models: Mapping[str, torch.nn.Module], base: str | None) -> tuple[list[str], str]:
    """Validate a ``{name: model}`` dict and the base's name (default: the first); return (names, base)."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models is empty (or not a dict): pass e.g. {'base': base_model, 'pruned': pruned_model}.")
    for name, model in models.items():
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not a torch model.")
    names = list(models)
    base = names[0] if base is None else base
    if base not in models:
        raise ValueError(f"base={base!r} is not one of the models {names}: pass the name of the reference model.")
    return names, base


def generation_inputs(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``prompts`` as one left-padded batch (``input_ids``, ``attention_mask``) for ``generate``.

    The tokenizer's ``padding_side`` is restored afterwards; a tokenizer without a pad token raises ``ValueError``.
    """
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("The tokenizer has no pad token, so prompts cannot form one batch: set "
                         "tokenizer.pad_token = tokenizer.eos_token first.")
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous_side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --- compare_speed, step by step ------------------------------------------------------------

#: generate() arguments that compare_speed sets itself, so every model does the same work.
_FIXED_GENERATE_KWARGS = {"max_new_tokens", "min_new_tokens", "do_sample", "input_ids", "attention_mask"}


def _check_speed_arguments(models, dataloader, tokenizer, prompts, base, runs, warmup, tolerance, generate_kwargs,
                           decode_ideal) -> tuple[list[str], str, dict]:
    """Validate :func:`compare_speed`'s arguments; return (the model names, the base's name, ``generate_kwargs``)."""
    names, base = check_models(models, base)
    _check_counts(runs, warmup)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 (a share, e.g. 0.05), got {tolerance!r}.")
    if prompts is not None and tokenizer is None:
        raise ValueError("prompts need a tokenizer to become token ids: pass tokenizer=... to time generation.")
    if tokenizer is not None and prompts is None:
        raise ValueError("A tokenizer was given without prompts: pass prompts=[...] to time generation, "
                         "or leave out tokenizer.")
    if dataloader is None and prompts is None:
        raise ValueError("Nothing to time: pass a dataloader (forward pass) and/or prompts with a tokenizer "
                         "(generation).")
    generate_kwargs = dict(generate_kwargs or {})
    fixed = _FIXED_GENERATE_KWARGS & set(generate_kwargs)
    if fixed:
        raise ValueError(f"generate_kwargs may not set {sorted(fixed)}: compare_speed sets them so every model "
                         "does the same work (use max_new_tokens=... for the length).")
    unknown = sorted(set(decode_ideal or {}) - set(models))
    if unknown:
        raise ValueError(f"decode_ideal names {unknown}, which are not among the models {names}.")
    return names, base, generate_kwargs


def _forward_jobs(models: Mapping[str, torch.nn.Module], dataloader: Iterable[dict]) -> tuple[dict, int]:
    """One job per model, keyed ``("forward", name)``: a forward pass (no KV cache) over all the dataloader's
    batches, moved to each device once. Returns the jobs and the number of real tokens in the batches."""
    batches = list(dataloader)
    if not batches:
        raise ValueError("The dataloader is empty: nothing to time.")
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    on_device: dict[torch.device, list] = {}
    for name, model in models.items():
        device = device_of(model)
        if device not in on_device:
            on_device[device] = [batch_tensors(b, device) for b in batches]

        def forward(model=model, tensors=on_device[device]):
            for input_ids, mask in tensors:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)

        jobs[("forward", name)] = forward
    return jobs, sum(int(mask.sum()) for _, mask in next(iter(on_device.values())))


def _generation_jobs(models: Mapping[str, torch.nn.Module], tokenizer, prompts: str | Sequence[str],
                     max_new_tokens: int, generate_kwargs: dict) -> tuple[dict, list[str]]:
    """Two jobs per model: greedy ``generate`` of one token (keyed ``("first_token", name)``; all models first),
    then of ``max_new_tokens`` (``("generation", name)``), end-of-sequence ignored. Returns the jobs and the
    prompts as a list."""
    prompts = as_prompt_list(prompts)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 (one first token, then decoding), got {max_new_tokens!r}.")
    inputs = generation_inputs(tokenizer, prompts)
    common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, **generate_kwargs)
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    for kind, n_tokens in (("first_token", 1), ("generation", max_new_tokens)):
        for name, model in models.items():
            on_model = {k: v.to(device_of(model)) for k, v in inputs.items()}

            def generate(model=model, on_model=on_model, n=n_tokens):
                model.generate(**on_model, max_new_tokens=n, min_new_tokens=n, **common)

            jobs[(kind, name)] = generate
    return jobs, prompts


def _time_in_eval_mode(models: Mapping[str, torch.nn.Module], jobs: dict, runs: int,
                       warmup: int) -> tuple[dict, dict]:
    """Run ``jobs`` through the timing loop with every model in eval mode (each model's mode is restored
    afterwards). Returns the wall-clock and the CPU seconds of every timed call, per job."""
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    cpu: dict = {}
    try:
        times = _alternate(jobs, runs, warmup, cpu)
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    return times, cpu


def _forward_entry(seconds: list[float], tokens: int, runs: int) -> dict:
    """``compare_speed(...)["models"][name]["forward"]`` from the seconds of the timed forward passes."""
    spread = _spread(seconds)
    return {"seconds": spread["median_s"], "min_s": spread["min_s"], "max_s": spread["max_s"],
            "runs_s": spread["runs_s"], "tokens": tokens, "tokens_per_s": tokens / spread["median_s"], "runs": runs}


def _generation_entry(times: dict, cpu: dict, name: str, batch: int, max_new_tokens: int, runs: int) -> dict:
    """``compare_speed(...)["models"][name]["generation"]``: latency, time to first token, and one decoding step
    per run (``generate(max_new_tokens) - generate(1)`` of the same round, over the ``max_new_tokens - 1`` steps),
    in wall-clock and in CPU seconds."""
    latency, ttft = _spread(times[("generation", name)]), _spread(times[("first_token", name)])
    entry = {
        "latency_s": latency["median_s"], "latency_min_s": latency["min_s"],
        "latency_max_s": latency["max_s"], "latency_runs_s": latency["runs_s"],
        "ttft_s": ttft["median_s"], "ttft_min_s": ttft["min_s"], "ttft_max_s": ttft["max_s"],
        "ttft_runs_s": ttft["runs_s"],
        "tokens_per_s": batch * max_new_tokens / latency["median_s"],
        "decode_tokens_per_s": batch * (max_new_tokens - 1) / max(latency["median_s"] - ttft["median_s"], 1e-9),
        "step_s": max(latency["median_s"] - ttft["median_s"], 0.0) / (max_new_tokens - 1),
        "batch_size": batch, "new_tokens": max_new_tokens, "runs": runs,
    }
    steps = max_new_tokens - 1
    decode_runs = [max(g - f, 0.0) / steps for g, f in zip(latency["runs_s"], ttft["runs_s"])]
    decode_cpu = [max(g - f, 0.0) / steps for g, f in zip(cpu[("generation", name)], cpu[("first_token", name)])]
    entry["decode_step_runs_s"] = decode_runs
    entry["decode_step_cpu_s"] = statistics.median(decode_cpu)
    entry["decode_step_cpu_runs_s"] = decode_cpu
    return entry


def _add_speedups(result: dict, times: dict, name: str, decode_ideal: Mapping[str, float] | None,
                  tolerance: float) -> None:
    """Add ``speedup`` (and ``generation_lags_forward``) over the base to ``result["models"][name]``."""
    base = result["base"]
    entry = result["models"][name]
    speedups = {kind: speedup(times[(kind, base)], times[(kind, name)], entry["ideal_speedup"], tolerance)
                for kind in ("forward", "first_token", "generation") if (kind, name) in times}
    if "generation" in entry:
        ideal = (decode_ideal or {}).get(name, entry["ideal_speedup"])
        base_gen = result["models"][base]["generation"]
        speedups["decode"] = speedup(base_gen["decode_step_runs_s"], entry["generation"]["decode_step_runs_s"],
                                     ideal, tolerance)
        speedups["decode_cpu"] = speedup(base_gen["decode_step_cpu_runs_s"],
                                         entry["generation"]["decode_step_cpu_runs_s"], ideal, tolerance)
    entry["speedup"] = speedups
    if "forward" in speedups and "generation" in speedups:
        entry["generation_lags_forward"] = speedups["generation"]["max"] < speedups["forward"]["min"]



@torch.no_grad()
def compare_speed(models: Mapping[str, torch.nn.Module], dataloader: Iterable[dict] | None = None, *,
                  tokenizer=None, prompts: str | Sequence[str] | None = None, max_new_tokens: int = 16,
                  base: str | None = None, runs: int = 3, warmup: int = 1, tolerance: float = 0.05,
                  generate_kwargs: Mapping | None = None, decode_ideal: Mapping[str, float] | None = None) -> dict:
    """Forward (prefill) and greedy-generation speed of several models, timed **alternately**.

    Every round times, in this order, one forward pass of each model over all the ``dataloader``'s
    batches (no KV cache), one ``generate`` call of one new token per model (time to first token), and
    one ``generate`` call of ``max_new_tokens`` per model: A, B, C, A, B, C, ... so that a drift of the
    machine (another process, clock changes) hits every model alike. ``warmup`` rounds are not timed.
    Pass a ``dataloader`` to time the forward pass, ``prompts`` with a ``tokenizer`` to time
    generation, or both. All prompts form one left-padded batch and every model produces exactly
    ``max_new_tokens`` for each (end-of-sequence ignored), so the work is the same for all.

    Returns a JSON-friendly dict: ``base`` (the reference name; default: the first model), the
    settings, and ``models[name]`` with

    * ``forward``: ``seconds`` (median), ``min_s``, ``max_s``, ``runs_s``, ``tokens`` (real tokens),
      ``tokens_per_s``, ``runs``;
    * ``generation``: ``latency_s`` (median whole call), ``ttft_s`` (median time to first token),
      their ``*_min_s``/``*_max_s``/``*_runs_s``, ``tokens_per_s``, ``decode_tokens_per_s`` (tokens
      after the first / time after the first), ``step_s`` (one decoding step of the batch),
      ``batch_size``, ``new_tokens``, ``runs``, and with a dataloader ``step_vs_forward``: a decoding
      step's time over the forward pass's time for as many tokens (far above 1: per-step overhead);
    * ``ideal_speedup``: the FLOPs ratio :func:`ideal_speedup` against the base (it counts the
      matmul weights and ignores attention's context-length term, which is small for short contexts);
    * ``speedup`` (every model but the base): for ``forward``, ``first_token`` and ``generation``, the
      ``ratio`` over the base (> 1 is faster; median of the ratios of the runs of the same round), its
      ``min``/``max`` over runs, the ``ideal``, ``share_of_ideal_gain`` = (ratio - 1) / (ideal - 1), a
      ``verdict`` (see :data:`SPEED_VERDICTS`), ``flag`` (True for ``too_fast``/``too_slow``) and
      ``median_outside_band`` (``"above"``/``"below"`` when the median lies beyond the band widened by
      the tolerance while the range still meets it, else None);
    * ``generation_lags_forward`` (when both were timed, every model but the base): True when every
      generation ratio of the runs is below every forward ratio, i.e. generation gains less beyond noise.

    Decoding alone: within each round, ``generate(max_new_tokens) - generate(1)`` is the time of the
    ``max_new_tokens - 1`` token-by-token steps, without the prefill. ``generation`` then also holds
    ``decode_step_runs_s`` (one step, per run) and ``decode_step_cpu_s`` (its median in process CPU-seconds,
    all threads), and ``speedup`` holds ``decode`` (wall clock) and ``decode_cpu`` (CPU time), judged
    against ``decode_ideal[name]`` when given (e.g. :func:`utils.attention.ideal_decode_speedup`, which adds
    attention's context-length term), else against the matmul ideal. ``generate_kwargs`` go to every
    ``generate`` call (e.g. ``{"cache_implementation": "static"}``).

    The plausible band for a ratio runs from x1.00 to the ideal; ``tolerance`` (a share, default 5 %)
    widens it for what the FLOPs count leaves out (attention over the context, memory traffic).
    :func:`speed_conclusion` turns the result into sentences.
    """
    names, base, generate_kwargs = _check_speed_arguments(models, dataloader, tokenizer, prompts, base, runs,
                                                          warmup, tolerance, generate_kwargs, decode_ideal)
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    result: dict = {"base": base, "runs": runs, "warmup": warmup, "tolerance": tolerance,
                    "models": {name: {} for name in names}}
    if dataloader is not None:
        forward_jobs, result["forward_tokens"] = _forward_jobs(models, dataloader)
        jobs.update(forward_jobs)
    if prompts is not None:
        generate_jobs, prompts = _generation_jobs(models, tokenizer, prompts, max_new_tokens, generate_kwargs)
        jobs.update(generate_jobs)
        result["generation_settings"] = {"batch_size": len(prompts), "new_tokens": max_new_tokens}
    times, cpu = _time_in_eval_mode(models, jobs, runs, warmup)

    countable = matmul_parameters(models[base]) > 0
    for name, model in models.items():
        entry = result["models"][name]
        entry["ideal_speedup"] = ideal_speedup(models[base], model) if countable and matmul_parameters(model) else None
        if dataloader is not None:
            entry["forward"] = _forward_entry(times[("forward", name)], result["forward_tokens"], runs)
        if prompts is not None:
            entry["generation"] = _generation_entry(times, cpu, name, len(prompts), max_new_tokens, runs)
            if dataloader is not None:  # one decoding step against the forward pass's time for as many tokens
                per_token = entry["forward"]["seconds"] / entry["forward"]["tokens"]
                entry["generation"]["step_vs_forward"] = entry["generation"]["step_s"] / (len(prompts) * per_token)
    for name in names:
        if name != base:
            _add_speedups(result, times, name, decode_ideal, tolerance)
    return result


_KIND_LABELS = {"forward": "forward", "first_token": "first token", "generation": "generation",
                "decode": "decode", "decode_cpu": "decode, CPU"}


def _verdict_text(s: dict) -> str:
    if s["verdict"] == "single_run":
        return "one run, noise unknown"
    if s["verdict"] == "within_noise":
        return "within noise of x1.00"
    if s["verdict"] == "too_fast":
        return "faster than the FLOPs ideal beyond the spread: suspect noise, or a cost the FLOPs count leaves out"
    if s["verdict"] == "too_slow":
        above = "x1.00" if s["ideal"] >= 1 else "the FLOPs ideal"
        return f"slower than {above} beyond the spread: suspect noise or an overhead"
    if s["median_outside_band"] == "above":
        return "the median is above the ideal, but the range of the runs reaches it"
    if s["median_outside_band"] == "below":
        return "the median is below the plausible band, but the range of the runs reaches it"
    share = s["share_of_ideal_gain"]
    if share is None:
        return "a measurable difference"
    return f"{share:.0%} of the ideal gain" if share >= 0 else "slower than x1.00, by less than the tolerance"


def speed_conclusion(result: dict, name: str | None = None) -> str:
    """Conclusions computed from a :func:`compare_speed` result, a few lines per compared model, e.g.::

        pruned vs base (median of 5 runs [lowest, highest]; FLOPs ideal x1.13):
          forward      x1.13 [x1.10, x1.16]: 100% of the ideal gain
          generation   x1.02 [x0.97, x1.08]: within noise of x1.00
          decode       x1.01 [x0.96, x1.07]: within noise of x1.00

    ``name`` restricts the text to one model. Notebooks print this instead of stating a direction.
    """
    if not isinstance(result, dict) or "models" not in result or "base" not in result:
        raise ValueError("speed_conclusion expects the dict returned by utils.compare_speed.")
    base = result["base"]
    compared = [n for n in result["models"] if n != base]
    if name is not None and name not in compared:
        raise ValueError(f"name={name!r} is not a compared model: use one of {compared}.")
    lines = []
    for n in compared if name is None else [name]:
        entry = result["models"][n]
        ideal = entry["ideal_speedup"]
        runs = f"{result['runs']} run" + ("s" if result["runs"] != 1 else "")
        lines.append(f"{n} vs {base} (median of {runs} [lowest, highest]"
                     + (f"; FLOPs ideal x{ideal:.2f}):" if ideal is not None else "):"))
        for kind, label in _KIND_LABELS.items():
            if kind in entry["speedup"]:
                s = entry["speedup"][kind]
                own_ideal = (f" (ideal x{s['ideal']:.3f} with attention's context term)"
                             if s["ideal"] is not None and ideal is not None and abs(s["ideal"] - ideal) > 1e-9 else "")
                lines.append(f"  {label:<12} x{s['ratio']:.2f} [x{s['min']:.2f}, x{s['max']:.2f}]{own_ideal}: "
                             f"{_verdict_text(s)}")
        if entry.get("generation_lags_forward"):
            line = "  generation gains less than the forward pass, beyond the spread"
            step = result["models"][base]["generation"]["step_vs_forward"]
            if step > 2:  # most of a step is not the arithmetic that the forward pass measures
                line += (f": a decoding step of {base} takes {step:.1f}x the forward pass's time for as many "
                         "tokens, so costs paid per step rather than per FLOP dominate generation here")
            lines.append(line)
    return "\n".join(lines)


def measure_generation(model, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 32,
                       runs: int = 3, warmup: int = 1) -> dict[str, float]:
    """Greedy-generation speed of one model: :func:`compare_speed` with one model and no dataloader.

    Returns ``latency_s`` (median whole ``generate`` call), ``ttft_s`` (time to first token: prefill
    plus one step), ``tokens_per_s`` (new tokens of the batch / latency), ``decode_tokens_per_s``,
    their spreads, ``batch_size``, ``new_tokens`` and ``runs``. To compare models, time them together
    with :func:`compare_speed`, which alternates them.
    """
    if tokenizer is None:
        raise ValueError("measure_generation needs the model's tokenizer to turn the prompts into token ids.")
    return compare_speed({"model": model}, tokenizer=tokenizer, prompts=prompts, max_new_tokens=max_new_tokens,
                         runs=runs, warmup=warmup)["models"]["model"]["generation"]


def measure_forward(model, dataloader: Iterable[dict], *, runs: int = 3, warmup: int = 1) -> dict[str, float]:
    """Forward-pass (prefill) throughput over a dataloader: real tokens per second, median of ``runs``.

    Unlike token-by-token generation, a forward pass over whole sequences is dominated by
    matrix multiplications, so its speed tracks the model's FLOPs. :func:`compare_speed` with one model.
    """
    return compare_speed({"model": model}, dataloader, runs=runs, warmup=warmup)["models"]["model"]["forward"]


def compare_forward(models: dict, dataloader: Iterable[dict], *, runs: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Forward throughput of several models, timed alternately: ``compare_speed(...)["models"][name]["forward"]``
    for every name. Prefer :func:`compare_speed`, which also reports ratios, spreads and verdicts."""
    result = compare_speed(models, dataloader, runs=runs, warmup=warmup)
    return {name: entry["forward"] for name, entry in result["models"].items()}
