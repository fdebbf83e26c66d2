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
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .evaluation import _generation_inputs, _speedup, _sync_all, ideal_speedup, time_alternately

POWERCAP_ROOT = Path("/sys/class/powercap")
NVML_INSTALL = "pip install nvidia-ml-py"


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

    def _read(self) -> dict:
        _sync_all()
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


def measure_energy(jobs: Mapping[str, Callable[[], object]], *, runs: int = 3, warmup: int = 1, idle_s: float = 1.0,
                   **meter_kwargs) -> dict:
    """Run ``jobs`` alternately (:func:`utils.time_alternately`) with an :class:`EnergyMeter` around every call.

    Returns ``{"energy_measured": bool, "sources": energy_sources(), "idle": idle_baseline(idle_s) or None,
    "jobs": {name: {"runs": [meter readings of the timed calls], "wall_s", "cpu_s", "joules",
    "dynamic_joules": medians}}}``. ``dynamic_joules`` subtracts the idle power times the call's duration;
    every energy number is None when no counter exists (then ``cpu_s`` is the cost to report).
    """
    readings: dict[str, list[dict]] = {name: [] for name in jobs}

    def metered(name, job):
        def call():
            with EnergyMeter(**meter_kwargs) as meter:
                job()
            readings[name].append(meter.result())
        return call

    for name, job in jobs.items():
        if not callable(job):
            raise TypeError(f"jobs[{name!r}] is a {type(job).__name__}, not a function: wrap the work in a lambda.")
    idle = idle_baseline(idle_s, **meter_kwargs) if idle_s else None
    time_alternately({name: metered(name, job) for name, job in jobs.items()}, runs=runs, warmup=warmup)
    sources = energy_sources(**({"powercap_root": meter_kwargs["powercap_root"]} if "powercap_root" in meter_kwargs
                                else {}))
    out = {"energy_measured": False, "sources": sources, "idle": idle, "jobs": {}}
    for name, all_runs in readings.items():
        timed = all_runs[warmup:]  # the warm-up calls were metered too; drop them
        for r in timed:
            watts = idle["watts"] if idle and idle["watts"] is not None else None
            r["dynamic_joules"] = None if r["joules"] is None or watts is None else r["joules"] - watts * r["wall_s"]
        entry = {"runs": timed}
        for key in ("wall_s", "cpu_s", "joules", "dynamic_joules"):
            values = [r[key] for r in timed]
            entry[key] = None if any(v is None for v in values) else statistics.median(values)
        out["energy_measured"] = out["energy_measured"] or entry["joules"] is not None
        out["jobs"][name] = entry
    return out


@torch.no_grad()
def token_costs(models: Mapping[str, torch.nn.Module], tokenizer, prompts: Sequence[str], *, new_tokens: int = 16,
                runs: int = 3, warmup: int = 1, idle_s: float = 1.0, base: str | None = None,
                tolerance: float = 0.05, **meter_kwargs) -> dict:
    """Cost per token of prefill and decode for several models, measured alternately; ratios next to the ideal.

    Per round and model: ``generate`` of 1 token (the prefill, plus one step) and of ``new_tokens`` tokens
    (exactly that many, greedy). Prefill per token = the first call / the prompt tokens; decode per token =
    (second - first) / the ``new_tokens - 1`` later tokens of every prompt (the same subtraction as
    :func:`utils.compare_speed`). All prompts form one left-padded batch.

    Returns ``energy_measured``, ``sources``, ``idle``, ``cost_unit`` (``"joules"`` with a counter, else
    ``"cpu_seconds"``), ``prompt_tokens``, ``decode_tokens``, and ``models[name]`` with, per phase
    (``"prefill"``, ``"decode"``): ``cpu_seconds_per_1k_tokens``, ``wall_seconds_per_1k_tokens``,
    ``joules_per_token`` and ``dynamic_joules_per_token`` (None without a counter), and for every model but the
    base ``cost_ratio`` (base cost / model cost, > 1 = cheaper, median of the paired rounds), its ``min``/``max``,
    ``ideal_speedup`` (FLOPs: :func:`utils.ideal_speedup` for prefill, :func:`utils.attention.ideal_decode_speedup`
    for decode) and the ``verdict`` of :func:`utils.compare_speed`'s rules.
    """
    from .attention import ideal_decode_speedup
    from .evaluation import _as_prompt_list, _check_models

    names, base = _check_models(models, base)
    prompts = _as_prompt_list(prompts)
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2 (one first token, then decoding), got {new_tokens!r}.")
    inputs = _generation_inputs(tokenizer, prompts)
    batch, width = inputs["input_ids"].shape
    prompt_tokens = int(inputs["attention_mask"].sum())
    decode_tokens = batch * (new_tokens - 1)
    common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    jobs = {}
    for name, model in models.items():
        on_device = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
        for phase, n in (("first", 1), ("all", new_tokens)):
            jobs[(name, phase)] = (lambda model=model, on_device=on_device, n=n:
                                   model.generate(**on_device, max_new_tokens=n, min_new_tokens=n, **common))
    measured = measure_energy({f"{name}|{phase}": job for (name, phase), job in jobs.items()}, runs=runs,
                              warmup=warmup, idle_s=idle_s, **meter_kwargs)
    energy = measured["energy_measured"]
    unit_key = "dynamic_joules" if energy and measured["idle"] is not None else "joules" if energy else "cpu_s"

    def per_run(name: str, phase: str, key: str) -> list[float | None]:
        first = measured["jobs"][f"{name}|first"]["runs"]
        if phase == "prefill":
            return [None if r[key] is None else r[key] / prompt_tokens for r in first]
        rest = measured["jobs"][f"{name}|all"]["runs"]
        return [None if a[key] is None or b[key] is None else (b[key] - a[key]) / decode_tokens
                for a, b in zip(first, rest)]

    def median(values):
        return None if any(v is None for v in values) else statistics.median(values)

    context = width + new_tokens / 2
    out = {"energy_measured": energy, "sources": measured["sources"], "idle": measured["idle"],
           "cost_unit": "joules" if energy else "cpu_seconds", "prompt_tokens": prompt_tokens,
           "decode_tokens": decode_tokens, "batch_size": batch, "new_tokens": new_tokens, "runs": runs,
           "base": base, "models": {}}
    for name in names:
        entry = {}
        for phase in ("prefill", "decode"):
            cpu, wall = median(per_run(name, phase, "cpu_s")), median(per_run(name, phase, "wall_s"))
            joules, dynamic = median(per_run(name, phase, "joules")), median(per_run(name, phase, "dynamic_joules"))
            entry[phase] = {"cpu_seconds_per_1k_tokens": 1000 * cpu, "wall_seconds_per_1k_tokens": 1000 * wall,
                            "joules_per_token": joules, "dynamic_joules_per_token": dynamic,
                            "cost_runs": per_run(name, phase, unit_key)}
            if name != base:
                ideal = (ideal_speedup(models[base], models[name]) if phase == "prefill"
                         else ideal_decode_speedup(models[base], models[name], context))
                ratio = _speedup(per_run(base, phase, unit_key), per_run(name, phase, unit_key), ideal, tolerance)
                entry[phase].update(cost_ratio=ratio["ratio"], cost_ratio_min=ratio["min"],
                                    cost_ratio_max=ratio["max"], ideal_speedup=ideal, verdict=ratio["verdict"])
        out["models"][name] = entry
    return out
