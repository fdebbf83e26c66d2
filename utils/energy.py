"""Energy and cost per token (APPC): hardware energy counters where they exist, CPU time everywhere.

Two counters measure energy rather than estimate it:

* **NVML** (NVIDIA GPUs from Volta on): ``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver
  loaded, per GPU (``pip install nvidia-ml-py`` provides ``pynvml``);
* **RAPL** (Intel, and recent AMD, CPUs on Linux): ``/sys/class/powercap/intel-rapl:N/energy_uj``, microjoules
  per CPU package, a counter that wraps around at ``max_energy_range_uj``. It is often readable by root only.

:class:`EnergyMeter` reads whichever exist, plus wall-clock and process CPU time (all threads), around a block of
code; a counter that is missing reads ``None`` — never an estimate. :func:`measure_energy` runs several jobs
alternately through :func:`utils.time_alternately` (the course's one timing loop) with a meter around each call,
and subtracts an idle baseline where energy is measured. :func:`token_costs` turns that into cost per token for
prefill and decode, per model, next to the FLOPs ideal.

A counter has a resolution: NVML's total moves in steps, some GPUs refresh it only every few tens of milliseconds,
and a prefill takes milliseconds. Metered alone, such a call reads 0 J, or less than the idle power times its
duration: a ratio of two such readings means nothing. So where a counter exists, :func:`measure_energy` repeats each
job inside one meter window until the window lasts ``min_window_s`` and the counter moved by more than
``min_joules``, and reports the readings per call; a reading that is still zero or negative (after subtracting
idle power) is rejected, with a message, and gives no ratio.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .speed import as_prompt_list, check_models, generation_inputs, ideal_speedup, speedup, sync_all, time_alternately

POWERCAP_ROOT = Path("/sys/class/powercap")
NVML_INSTALL = "pip install nvidia-ml-py"
#: Where an energy counter exists: the shortest metered window (seconds) and the smallest counter change (joules)
#: that :func:`measure_energy` accepts before it stops adding repetitions of a job to the window.
MIN_WINDOW_S = 1.0
MIN_JOULES = 1.0
MAX_REPEATS = 10_000


# --- the counters -------------------------------------------------------------------------

def rapl_domains(powercap_root: str | Path = POWERCAP_ROOT) -> list[Path]:
    """The readable top-level RAPL domains (one per CPU package, ``intel-rapl:N``) under ``powercap_root``.

    Sub-domains (``intel-rapl:N:M``: cores, uncore, DRAM) are left out: the package already contains the first
    two, and adding them would count energy twice. Empty when the folder is missing or unreadable.
    """
    root = Path(powercap_root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not re.fullmatch(r"intel-rapl:\d+", path.name):
            continue
        try:
            int((path / "energy_uj").read_text())
            int((path / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue  # not readable (often root only) or not a counter
        found.append(path)
    return found


def _nvml():
    """The initialised ``pynvml`` module, or None with the reason."""
    try:
        import pynvml
    except ImportError:
        return None, f"pynvml is not installed (`{NVML_INSTALL}`)"
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no usable NVIDIA driver
        return None, f"NVML did not start ({type(error).__name__}: no NVIDIA driver?)"
    return pynvml, None


def nvml_devices() -> tuple[list[dict], str | None]:
    """NVIDIA GPUs whose total-energy counter can be read: ``([{"index", "name", "handle"}, ...], note)``."""
    pynvml, note = _nvml()
    if pynvml is None:
        return [], note
    devices, skipped = [], []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # NVMLError_NotSupported on GPUs older than Volta
            skipped.append(name)
            continue
        devices.append({"index": index, "name": name, "handle": handle})
    if not devices:
        return [], "no GPU with an energy counter" + (f" ({', '.join(skipped)} have none)" if skipped else "")
    return devices, None


def energy_sources(*, powercap_root: str | Path = POWERCAP_ROOT) -> dict:
    """Which energy counters this machine offers, and why the others are missing.

    Returns ``{"nvml": [GPU names], "nvml_note": why none (or None), "rapl": [domain folders], "rapl_note": ...,
    "energy_counter": True when at least one counter is readable, "cpu_time": True}`` (process CPU time is always
    available; it is a cost, not an energy).
    """
    devices, nvml_note = nvml_devices()
    domains = rapl_domains(powercap_root)
    if domains:
        rapl_note = None
    elif not Path(powercap_root).is_dir():
        rapl_note = f"{powercap_root} does not exist (no RAPL driver: not Linux, a VM, or not an Intel/AMD CPU)"
    else:
        rapl_note = f"no readable intel-rapl:N/energy_uj under {powercap_root} (often root only: see the APPC README)"
    return {"nvml": [d["name"] for d in devices], "nvml_note": nvml_note, "rapl": [str(p) for p in domains],
            "rapl_note": rapl_note, "energy_counter": bool(devices or domains), "cpu_time": True}


class EnergyMeter:
    """Measure a block of code: ``with EnergyMeter() as meter: work()``, then ``meter.result()``.

    Reads, before and after: wall clock (``time.perf_counter``), the process's CPU time (all threads,
    ``time.process_time``), every readable RAPL package counter (µJ, with wrap-around) and every NVML GPU energy
    counter (mJ). CUDA work is synchronised before each reading. A counter that does not exist reads ``None``.
    A RAPL counter that wrapped once is corrected; a block longer than one full range (``max_energy_range_uj``,
    usually hundreds of kJ: tens of minutes at full power) could hide a second wrap, so meter shorter blocks.

    Args:
        gpu, cpu: read NVML / RAPL (default: both, where available).
        powercap_root: where the RAPL folders live (tests point it at a fake folder).
    """

    def __init__(self, *, gpu: bool = True, cpu: bool = True, powercap_root: str | Path = POWERCAP_ROOT):
        self._domains = rapl_domains(powercap_root) if cpu else []
        self._gpus = nvml_devices()[0] if gpu else []
        self._start: dict | None = None
        self._result: dict | None = None

    def counters(self) -> dict[str, int]:
        """How many counters this meter reads: ``{"rapl": packages, "nvml": GPUs}``."""
        return {"rapl": len(self._domains), "nvml": len(self._gpus)}

    def _read(self) -> dict:
        sync_all()
        reading = {"wall": time.perf_counter(), "cpu": time.process_time(),
                   "rapl": [int((d / "energy_uj").read_text()) for d in self._domains], "gpu": []}
        if self._gpus:
            import pynvml

            reading["gpu"] = [pynvml.nvmlDeviceGetTotalEnergyConsumption(g["handle"]) for g in self._gpus]
        return reading

    def __enter__(self) -> EnergyMeter:
        self._result = None
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        start = self._start
        rapl = None
        if self._domains:
            rapl = 0.0
            for domain, a, b in zip(self._domains, start["rapl"], end["rapl"]):
                delta = b - a
                if delta < 0:  # the counter wrapped around once (it counts up to max_energy_range_uj)
                    delta += int((domain / "max_energy_range_uj").read_text())
                rapl += delta / 1e6
        gpu = sum(b - a for a, b in zip(start["gpu"], end["gpu"])) / 1e3 if self._gpus else None
        joules = None if rapl is None and gpu is None else (rapl or 0.0) + (gpu or 0.0)
        self._result = {"wall_s": end["wall"] - start["wall"], "cpu_s": end["cpu"] - start["cpu"],
                        "cpu_joules": rapl, "gpu_joules": gpu, "joules": joules}

    def result(self) -> dict[str, float | None]:
        """``{"wall_s", "cpu_s", "cpu_joules" (RAPL), "gpu_joules" (NVML), "joules" (their sum)}``.

        None where no counter exists."""
        if self._result is None:
            raise RuntimeError("The meter has not finished: read result() after the `with EnergyMeter() as m:` block.")
        return dict(self._result)


# --- measuring jobs -----------------------------------------------------------------------

def idle_baseline(seconds: float = 2.0, **meter_kwargs) -> dict[str, float | None]:
    """What the machine uses doing nothing: a meter around ``time.sleep(seconds)``.

    Returns the meter's reading plus ``watts`` (joules / wall seconds; None without a counter). Subtracting
    ``watts * duration`` from a measurement leaves the energy the work itself added.
    """
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}.")
    with EnergyMeter(**meter_kwargs) as meter:
        time.sleep(seconds)
    reading = meter.result()
    reading["watts"] = None if reading["joules"] is None else reading["joules"] / reading["wall_s"]
    return reading


def _repeats_for(job: Callable[[], object], min_window_s: float, min_joules: float, max_repeats: int,
                 meter_kwargs: dict) -> tuple[int, list[dict]]:
    """How many calls of ``job`` one meter window needs: double (or scale) until the window lasts ``min_window_s``
    and the energy counter moved by more than ``min_joules`` (0: no energy criterion); never more than
    ``max_repeats`` calls, and no more tries once a window lasted ``max(10 * min_window_s, 10)`` seconds (a counter
    that has not moved by then is broken, or the work draws nothing). Returns the count and the calibration
    readings."""
    repeats, tried = 1, []
    give_up_s = max(10 * min_window_s, 10.0)  # a counter that has not moved by then never will (or barely)
    while True:
        with EnergyMeter(**meter_kwargs) as meter:
            for _ in range(repeats):
                job()
        reading = meter.result()
        tried.append({**reading, "repeats": repeats})
        long_enough = reading["wall_s"] >= min_window_s
        moved = reading["joules"] is None or min_joules <= 0 or reading["joules"] > min_joules
        if (long_enough and moved) or repeats >= max_repeats or reading["wall_s"] >= give_up_s:
            return repeats, tried
        by_time = math.ceil(repeats * min_window_s / max(reading["wall_s"], 1e-9)) if not long_enough else repeats
        repeats = min(max_repeats, max(2 * repeats, by_time))


def _reject_non_positive(name: str, runs: list[dict]) -> str | None:
    """Mark readings of zero or less (raw, or after subtracting idle power) as rejected; the message, or None."""
    raw = dynamic = 0
    for r in runs:
        if r["joules"] is not None and r["joules"] <= 0:
            raw += 1
            r["joules"] = r["dynamic_joules"] = None
            r["rejected"] = "non-positive energy reading"
        elif r["dynamic_joules"] is not None and r["dynamic_joules"] <= 0:
            dynamic += 1
            r["dynamic_joules"] = None
            r["rejected"] = "non-positive energy after subtracting idle power"
    if not (raw or dynamic):
        return None
    return (f"{name}: {raw + dynamic} of {len(runs)} energy readings were zero or less"
            + (f" ({dynamic} only after subtracting idle power)" if dynamic else "")
            + ": the window was too short for the counter's resolution, or the idle baseline drifted (another "
            "process?). They are rejected and give no energy value or ratio; raise min_window_s / min_joules, or "
            "measure longer work.")


def measure_energy(jobs: Mapping[str, Callable[[], object]], *, runs: int = 3, warmup: int = 1, idle_s: float = 1.0,
                   min_window_s: float | None = None, min_joules: float | None = None, max_repeats: int = MAX_REPEATS,
                   **meter_kwargs) -> dict:
    """Run ``jobs`` alternately (:func:`utils.time_alternately`) with an :class:`EnergyMeter` around every call.

    Where an energy counter exists, each job is first calibrated: it is repeated inside one meter window until
    the window lasts ``min_window_s`` (default :data:`MIN_WINDOW_S`) and the counter moved by more than
    ``min_joules`` (default :data:`MIN_JOULES`), at most ``max_repeats`` times; every metered call then runs the
    job that many times, and its readings are divided by that count (per call). Without a counter nothing is
    repeated (CPU time has a fine resolution) unless ``min_window_s`` is given.

    Returns ``{"energy_measured": bool, "sources": energy_sources(), "idle": idle_baseline(idle_s) or None,
    "notes": [messages about rejected readings], "jobs": {name: {"runs": [per-call readings of the timed calls,
    each with "repeats" and "window_s"], "repeats", "wall_s", "cpu_s", "joules", "dynamic_joules": medians,
    "note": message or None}}}``. ``dynamic_joules`` subtracts the idle power times the call's duration. A reading
    of zero or less (raw, or after subtracting idle power) is rejected: it reads None, the run gets a
    ``"rejected"`` reason, the job's median of that key is None and its ``note`` (also printed) says why. Every
    energy number is None when no counter exists (then ``cpu_s`` is the cost to report).
    """
    for name, job in jobs.items():
        if not callable(job):
            raise TypeError(f"jobs[{name!r}] is a {type(job).__name__}, not a function: wrap the work in a lambda.")
    for label, value in (("min_window_s", min_window_s), ("min_joules", min_joules)):
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{label} must be a number >= 0 (or None for the default), got {value!r}.")
    if not isinstance(max_repeats, int) or max_repeats < 1:
        raise ValueError(f"max_repeats must be an integer >= 1, got {max_repeats!r}.")
    sources = energy_sources(**({"powercap_root": meter_kwargs["powercap_root"]} if "powercap_root" in meter_kwargs
                                else {}))
    counter = any(EnergyMeter(**meter_kwargs).counters().values())
    if min_window_s is None:
        min_window_s = MIN_WINDOW_S if counter else 0.0
    if min_joules is None:
        min_joules = MIN_JOULES if counter else 0.0
    readings: dict[str, list[dict]] = {name: [] for name in jobs}
    repeats = {name: 1 for name in jobs}
    if min_window_s > 0 or (counter and min_joules > 0):  # else one call per window, no calibration
        for name, job in jobs.items():
            repeats[name], _ = _repeats_for(job, min_window_s, min_joules, max_repeats, meter_kwargs)

    def metered(name, job):
        n = repeats[name]

        def call():
            with EnergyMeter(**meter_kwargs) as meter:
                for _ in range(n):
                    job()
            window = meter.result()
            per_call = {k: (None if v is None else v / n) for k, v in window.items()}
            readings[name].append({**per_call, "repeats": n, "window_s": window["wall_s"],
                                   "window_joules": window["joules"]})
        return call

    idle = idle_baseline(idle_s, **meter_kwargs) if idle_s else None
    time_alternately({name: metered(name, job) for name, job in jobs.items()}, runs=runs, warmup=warmup)
    out = {"energy_measured": False, "sources": sources, "idle": idle, "notes": [], "jobs": {}}
    watts = idle["watts"] if idle and idle["watts"] is not None else None
    for name, all_runs in readings.items():
        timed = all_runs[warmup:]  # the warm-up calls were metered too; drop them
        for r in timed:
            r["dynamic_joules"] = None if r["joules"] is None or watts is None else r["joules"] - watts * r["wall_s"]
        energy_read = any(r["joules"] is not None for r in timed)
        note = _reject_non_positive(name, timed)
        entry = {"runs": timed, "repeats": repeats[name], "note": note}
        for key in ("wall_s", "cpu_s", "joules", "dynamic_joules"):
            values = [r[key] for r in timed]
            entry[key] = None if any(v is None for v in values) else statistics.median(values)
        if note:
            out["notes"].append(note)
            print(note)
        out["energy_measured"] = out["energy_measured"] or energy_read
        out["jobs"][name] = entry
    return out


# --- token_costs, step by step --------------------------------------------------------------

#: What a cost per token of :func:`token_costs` is measured in, by the reading it comes from.
_COST_UNITS = {"dynamic_joules": "energy (idle subtracted)", "joules": "energy", "cpu_s": "CPU time"}


def _generate_jobs(models: Mapping[str, torch.nn.Module], tokenizer, inputs: dict[str, torch.Tensor],
                   new_tokens: int) -> dict[str, Callable[[], object]]:
    """Two greedy ``generate`` jobs per model, ``"name|first"`` (1 token) and ``"name|all"`` (``new_tokens``,
    end-of-sequence ignored), on the model's device."""
    common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    jobs = {}
    for name, model in models.items():
        on_device = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
        for phase, n in (("first", 1), ("all", new_tokens)):
            jobs[f"{name}|{phase}"] = (lambda model=model, on_device=on_device, n=n:
                                       model.generate(**on_device, max_new_tokens=n, min_new_tokens=n, **common))
    return jobs


def _per_token_runs(measured: dict, name: str, phase: str, key: str, prompt_tokens: int,
                    decode_tokens: int) -> list[float | None]:
    """One model's cost per token of ``phase`` in every timed round, from :func:`measure_energy`'s readings ``key``:
    prefill = the 1-token call / the prompt tokens; decode = (the ``new_tokens`` call - the 1-token call of the same
    round) / the decoded tokens. None where a reading is None."""
    first = measured["jobs"][f"{name}|first"]["runs"]
    if phase == "prefill":
        return [None if r[key] is None else r[key] / prompt_tokens for r in first]
    rest = measured["jobs"][f"{name}|all"]["runs"]
    return [None if a[key] is None or b[key] is None else (b[key] - a[key]) / decode_tokens
            for a, b in zip(first, rest)]


def _median(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def _positive_median(values: list[float | None]) -> float | None:
    """Median of energies per token; None if one is missing or zero or less (no measurement)."""
    return None if any(v is None or v <= 0 for v in values) else statistics.median(values)


def _phase_costs(per_run: Callable[[str, str, str], list], name: str, phase: str, unit_key: str) -> dict:
    """``token_costs(...)["models"][name][phase]`` before the ratio: costs per 1k tokens / per token, and the
    per-run costs in the reported unit."""
    cpu, wall = _median(per_run(name, phase, "cpu_s")), _median(per_run(name, phase, "wall_s"))
    joules = _positive_median(per_run(name, phase, "joules"))
    dynamic = _positive_median(per_run(name, phase, "dynamic_joules"))
    return {"cpu_seconds_per_1k_tokens": 1000 * cpu, "wall_seconds_per_1k_tokens": 1000 * wall,
            "joules_per_token": joules, "dynamic_joules_per_token": dynamic,
            "cost_runs": per_run(name, phase, unit_key)}


def _cost_ratio(per_run: Callable[[str, str, str], list], name: str, base: str, phase: str, unit_key: str,
                ideal: float, tolerance: float) -> tuple[dict, str | None]:
    """The cost ratio of ``name`` over ``base`` for ``phase`` (:func:`utils.speed.speedup`'s rules), and None; or,
    when a reading is zero or less (or rejected), no ratio and the message (printed) that says why."""
    base_runs, model_runs = per_run(base, phase, unit_key), per_run(name, phase, unit_key)
    bad = sum(1 for v in base_runs + model_runs if v is None or v <= 0)
    if bad:
        message = (f"{name}, {phase}: no cost ratio. {bad} of the {len(base_runs) + len(model_runs)} "
                   f"readings of {_COST_UNITS[unit_key]} per token (this model's and {base}'s) were zero or less, or "
                   "rejected: the measured windows were too short for the counter, or the difference "
                   "of two calls was smaller than the noise. Measure more tokens (new_tokens, a larger "
                   "batch), or longer windows (min_window_s).")
        print(message)
        return dict(cost_ratio=None, cost_ratio_min=None, cost_ratio_max=None, ideal_speedup=ideal, verdict=None,
                    rejected=message), message
    ratio = speedup(base_runs, model_runs, ideal, tolerance)
    return dict(cost_ratio=ratio["ratio"], cost_ratio_min=ratio["min"], cost_ratio_max=ratio["max"],
                ideal_speedup=ideal, verdict=ratio["verdict"], rejected=None), None



@torch.no_grad()
def token_costs(models: Mapping[str, torch.nn.Module], tokenizer, prompts: Sequence[str], *, new_tokens: int = 16,
                runs: int = 3, warmup: int = 1, idle_s: float = 1.0, base: str | None = None,
                tolerance: float = 0.05, min_window_s: float | None = None, min_joules: float | None = None,
                max_repeats: int = MAX_REPEATS, **meter_kwargs) -> dict:
    """Cost per token of prefill and decode for several models, measured alternately; ratios next to the ideal.

    Per round and model: ``generate`` of 1 token (the prefill, plus one step) and of ``new_tokens`` tokens
    (exactly that many, greedy). Prefill per token = the first call / the prompt tokens; decode per token =
    (second - first) / the ``new_tokens - 1`` later tokens of every prompt (the same subtraction as
    :func:`utils.compare_speed`). All prompts form one left-padded batch.

    Returns ``energy_measured``, ``sources``, ``idle``, ``cost_unit`` (``"joules"`` with a counter, else
    ``"cpu_seconds"``), ``prompt_tokens``, ``decode_tokens``, ``calls_per_window`` (``{"model|first" or
    "model|all": generate calls per meter window}``), ``notes`` (rejected readings), and ``models[name]`` with,
    per phase (``"prefill"``, ``"decode"``): ``cpu_seconds_per_1k_tokens``, ``wall_seconds_per_1k_tokens``,
    ``joules_per_token`` and ``dynamic_joules_per_token`` (None without a counter), and for every model but the
    base ``cost_ratio`` (base cost / model cost, > 1 = cheaper, median of the paired rounds), its ``min``/``max``,
    ``ideal_speedup`` (FLOPs: :func:`utils.ideal_speedup` for prefill, :func:`utils.attention.ideal_decode_speedup`
    for decode) and the ``verdict`` of :func:`utils.compare_speed`'s rules.

    Where a counter exists, each ``generate`` call is repeated inside its meter window until the window is long
    enough for the counter (``min_window_s``, ``min_joules``: see :func:`measure_energy`). A cost reading of zero or
    less (an energy reading rejected by :func:`measure_energy`, or a decode cost that came out non-positive after
    the subtraction) gives **no ratio**: ``cost_ratio``, its ``min``/``max`` and ``verdict`` are None and
    ``rejected`` says why (also printed, and listed in ``notes`` with :func:`measure_energy`'s messages).
    """
    from .attention import ideal_decode_speedup

    names, base = check_models(models, base)
    prompts = as_prompt_list(prompts)
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2 (one first token, then decoding), got {new_tokens!r}.")
    inputs = generation_inputs(tokenizer, prompts)
    batch, width = inputs["input_ids"].shape
    prompt_tokens = int(inputs["attention_mask"].sum())
    decode_tokens = batch * (new_tokens - 1)
    measured = measure_energy(_generate_jobs(models, tokenizer, inputs, new_tokens), runs=runs, warmup=warmup,
                              idle_s=idle_s, min_window_s=min_window_s, min_joules=min_joules,
                              max_repeats=max_repeats, **meter_kwargs)
    energy = measured["energy_measured"]
    unit_key = "dynamic_joules" if energy and measured["idle"] is not None else "joules" if energy else "cpu_s"

    def per_run(name: str, phase: str, key: str) -> list[float | None]:
        return _per_token_runs(measured, name, phase, key, prompt_tokens, decode_tokens)

    context = width + new_tokens / 2
    out = {"energy_measured": energy, "sources": measured["sources"], "idle": measured["idle"],
           "cost_unit": "joules" if energy else "cpu_seconds", "prompt_tokens": prompt_tokens,
           "decode_tokens": decode_tokens, "batch_size": batch, "new_tokens": new_tokens, "runs": runs,
           "base": base, "notes": list(measured["notes"]),
           "calls_per_window": {job: entry["repeats"] for job, entry in measured["jobs"].items()}, "models": {}}
    for name in names:
        entry = {}
        for phase in ("prefill", "decode"):
            entry[phase] = _phase_costs(per_run, name, phase, unit_key)
            if name != base:
                ideal = (ideal_speedup(models[base], models[name]) if phase == "prefill"
                         else ideal_decode_speedup(models[base], models[name], context))
                ratio, message = _cost_ratio(per_run, name, base, phase, unit_key, ideal, tolerance)
                entry[phase].update(ratio)
                if message:
                    out["notes"].append(message)
        out["models"][name] = entry
    return out
