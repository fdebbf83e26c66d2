"""Energy meters (utils.energy): RAPL with a fake powercap folder (wrap-around included), NVML with a fake pynvml,
and the machine as it is (no counter: CPU time only, energy None, never an estimate)."""

from __future__ import annotations

import sys
import time
import types

import pytest

import utils
from utils import energy


def _fake_powercap(root, packages):
    """``packages`` = [(energy_uj, max_energy_range_uj), ...]: one intel-rapl:N folder each, plus a sub-domain."""
    for n, (value, top) in enumerate(packages):
        domain = root / f"intel-rapl:{n}"
        domain.mkdir(parents=True)
        (domain / "energy_uj").write_text(f"{value}\n")
        (domain / "max_energy_range_uj").write_text(f"{top}\n")
        sub = root / f"intel-rapl:{n}:0"  # cores: inside the package, must not be counted twice
        sub.mkdir()
        (sub / "energy_uj").write_text("5\n")
        (sub / "max_energy_range_uj").write_text(f"{top}\n")
    return root


def _set(root, n, value):
    (root / f"intel-rapl:{n}" / "energy_uj").write_text(f"{value}\n")


def _no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails, whatever is installed


def test_rapl_meter_reads_packages_only_and_handles_wrap_around(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    root = _fake_powercap(tmp_path / "powercap", [(1_000_000, 10**9), (10**9 - 500_000, 10**9)])
    assert [p.name for p in energy.rapl_domains(root)] == ["intel-rapl:0", "intel-rapl:1"]
    with energy.EnergyMeter(powercap_root=root) as meter:
        _set(root, 0, 3_500_000)  # +2.5 J
        _set(root, 1, 1_500_000)  # wrapped: 0.5 J to the top, then 1.5 J = 2.0 J
    out = meter.result()
    assert out["cpu_joules"] == pytest.approx(4.5)
    assert out["joules"] == pytest.approx(4.5) and out["gpu_joules"] is None
    assert out["wall_s"] >= 0 and out["cpu_s"] >= 0


def test_unreadable_or_missing_powercap_means_no_counter(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    assert energy.rapl_domains(tmp_path / "absent") == []
    broken = tmp_path / "powercap" / "intel-rapl:0"
    broken.mkdir(parents=True)
    (broken / "energy_uj").write_text("not a number")
    assert energy.rapl_domains(tmp_path / "powercap") == []
    sources = energy.energy_sources(powercap_root=tmp_path / "absent")
    assert sources["energy_counter"] is False and "does not exist" in sources["rapl_note"]
    assert "pynvml is not installed" in sources["nvml_note"] and "nvidia-ml-py" in sources["nvml_note"]
    assert "often root only" in energy.energy_sources(powercap_root=tmp_path / "powercap")["rapl_note"]


def test_meter_without_counters_reports_cpu_time_and_none(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    with energy.EnergyMeter(powercap_root=tmp_path / "absent") as meter:
        start = time.process_time()
        while time.process_time() - start < 0.05:  # burn some CPU
            pass
        time.sleep(0.05)
    out = meter.result()
    assert out["joules"] is None and out["cpu_joules"] is None and out["gpu_joules"] is None
    assert out["cpu_s"] >= 0.04 and out["wall_s"] >= 0.09


def test_result_before_the_block_ends_is_a_clear_error(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    meter = energy.EnergyMeter(powercap_root=tmp_path)
    with pytest.raises(RuntimeError, match="after the `with EnergyMeter"):
        meter.result()


class _FakeNVML(types.ModuleType):
    """Two GPUs: one with an energy counter (mJ) that advances on every read, one too old to have it."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.energy = 10_000

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100" if handle == 0 else "Fake K80"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if handle == 1:
            raise self.NVMLError("Not Supported")
        self.energy += 1_500  # 1.5 J between two reads
        return self.energy


def test_nvml_meter_with_a_fake_driver(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML())
    devices, note = energy.nvml_devices()
    assert [d["name"] for d in devices] == ["Fake H100"] and note is None
    sources = energy.energy_sources(powercap_root=tmp_path / "absent")
    assert sources["nvml"] == ["Fake H100"] and sources["energy_counter"] is True
    with energy.EnergyMeter(powercap_root=tmp_path / "absent") as meter:
        pass
    out = meter.result()
    assert out["gpu_joules"] == pytest.approx(1.5) and out["joules"] == pytest.approx(1.5)
    assert out["cpu_joules"] is None
    with energy.EnergyMeter(gpu=False, powercap_root=tmp_path / "absent") as meter:
        pass
    assert meter.result()["joules"] is None


def test_nvml_that_cannot_start_is_reported(monkeypatch):
    fake = _FakeNVML()

    def fail():
        raise fake.NVMLError("Driver Not Loaded")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert energy.nvml_devices() == ([], "NVML did not start (NVMLError: no NVIDIA driver?)")


def test_measure_energy_drops_warmup_and_subtracts_idle(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    root = _fake_powercap(tmp_path / "powercap", [(0, 10**12)])
    state = {"uj": 0}

    def advance(uj):
        state["uj"] += uj
        _set(root, 0, state["uj"])

    real_sleep = time.sleep
    monkeypatch.setattr(energy.time, "sleep", lambda s: (advance(int(s * 2e6)), real_sleep(s)))  # idle: 2 W
    calls = []
    out = energy.measure_energy({"work": lambda: (calls.append(1), advance(3_000_000))}, runs=3, warmup=2,
                                idle_s=0.05, min_window_s=0, min_joules=0, powercap_root=root)  # no repetition
    assert len(calls) == 5 and len(out["jobs"]["work"]["runs"]) == 3
    assert out["energy_measured"] is True and out["idle"]["joules"] == pytest.approx(0.1)
    assert out["idle"]["watts"] == pytest.approx(2.0, rel=0.5) and out["notes"] == []
    job = out["jobs"]["work"]
    assert job["joules"] == pytest.approx(3.0)
    assert job["dynamic_joules"] == pytest.approx(3.0 - out["idle"]["watts"] * job["wall_s"])
    with pytest.raises(TypeError, match="wrap the work in a lambda"):
        energy.measure_energy({"x": 3}, powercap_root=root)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        energy.idle_baseline(0)


def test_token_costs_without_counters_report_cpu_seconds(models, tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    model, tok = models()
    pruned = models()[0]
    utils.prune_glu(pruned, 0.5)
    out = energy.token_costs({"base": model, "pruned": pruned}, tok, ["The river flows", "A cat sat on"],
                             new_tokens=3, runs=2, warmup=1, idle_s=0.01, powercap_root=tmp_path / "absent")
    assert out["energy_measured"] is False and out["cost_unit"] == "cpu_seconds"
    assert out["decode_tokens"] == 2 * 2 and out["prompt_tokens"] > 0
    for phase in ("prefill", "decode"):
        base, cut = out["models"]["base"][phase], out["models"]["pruned"][phase]
        assert base["joules_per_token"] is None and base["dynamic_joules_per_token"] is None
        assert base["cpu_seconds_per_1k_tokens"] > 0 or phase == "decode"
        assert cut["ideal_speedup"] > 1
        if cut["cost_ratio"] is None:  # a decode difference of CPU times at or below zero: rejected, never a ratio
            assert "no cost ratio" in cut["rejected"] and cut["verdict"] is None
        else:
            assert isinstance(cut["cost_ratio"], float) and cut["cost_ratio"] > 0 and cut["rejected"] is None
            assert cut["verdict"] in utils.SPEED_VERDICTS
        assert "cost_ratio" not in base
    assert out["models"]["pruned"]["prefill"]["ideal_speedup"] == pytest.approx(utils.ideal_speedup(model, pruned))
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 2"):
        energy.token_costs({"base": model}, tok, ["x"], new_tokens=1)


# --- a counter coarser than the work: repeat until the window is long enough, reject readings <= 0 ----------------

class _CoarseNVML(_FakeNVML):
    """One GPU whose counter moves in steps of ``step_mj`` (its resolution); the work adds ``energy_mj`` exactly."""

    def __init__(self, step_mj: int = 100):
        super().__init__()
        self.true_mj, self.step_mj = 0.0, step_mj

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(self.true_mj // self.step_mj) * self.step_mj


def test_short_jobs_are_repeated_until_the_counter_resolves_them(tmp_path, monkeypatch):
    nvml = _CoarseNVML(step_mj=100)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    calls = []

    def prefill():  # 30 mJ: a third of the counter's step
        calls.append(1)
        nvml.true_mj += 30

    out = energy.measure_energy({"prefill": prefill}, runs=3, warmup=1, idle_s=0, min_window_s=0, min_joules=1.0,
                                powercap_root=tmp_path / "absent")
    job = out["jobs"]["prefill"]
    assert job["repeats"] >= 34  # > 1 J of work in every window: 34 calls of 30 mJ
    assert all(r["repeats"] == job["repeats"] and r["window_joules"] > 1.0 for r in job["runs"])
    assert job["joules"] == pytest.approx(0.030, abs=0.1 / job["repeats"])  # within one step per window
    assert job["note"] is None and out["notes"] == [] and out["energy_measured"] is True
    # the calibration doubled the repeats (1, 2, 4, ...) until the window held > 1 J, then 1 + 3 metered windows
    assert len(calls) == sum(2 ** k for k in range(job["repeats"].bit_length())) + 4 * job["repeats"]


def test_window_long_enough_in_time_too(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _CoarseNVML(step_mj=1))
    out = energy.measure_energy({"nap": lambda: time.sleep(0.002)}, runs=2, warmup=0, idle_s=0, min_window_s=0.05,
                                min_joules=0, powercap_root=tmp_path / "absent")
    job = out["jobs"]["nap"]
    assert job["repeats"] > 1 and all(r["window_s"] >= 0.04 for r in job["runs"])
    assert job["wall_s"] == pytest.approx(0.002, rel=2.0)  # per call, not per window


def test_zero_readings_are_rejected_with_a_message(tmp_path, monkeypatch, capsys):
    nvml = _CoarseNVML(step_mj=100)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    state = {"n": 0}

    def prefill():
        nvml.true_mj += 30
        state["n"] += 1

    out = energy.measure_energy({"prefill": prefill}, runs=6, warmup=0, idle_s=0, min_window_s=0, min_joules=0,
                                powercap_root=tmp_path / "absent")  # one call per window: most read 0 J
    job = out["jobs"]["prefill"]
    rejected = [r for r in job["runs"] if r.get("rejected")]
    assert rejected and all(r["joules"] is None for r in rejected)
    assert all(r["joules"] > 0 for r in job["runs"] if not r.get("rejected"))
    assert job["joules"] is None and job["dynamic_joules"] is None  # no median over a partial, biased set
    assert "zero or less" in job["note"] and "min_window_s" in job["note"] and out["notes"] == [job["note"]]
    assert job["note"] in capsys.readouterr().out


def test_energy_below_idle_is_rejected(tmp_path, monkeypatch):
    nvml = _CoarseNVML(step_mj=1)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    def idle_sleep(seconds):  # a busy idle: 1000 W while "idle", instantly
        nvml.true_mj += seconds * 1e6

    monkeypatch.setattr(energy.time, "sleep", idle_sleep)
    out = energy.measure_energy({"work": lambda: setattr(nvml, "true_mj", nvml.true_mj + 5)}, runs=2, warmup=0,
                                idle_s=0.5, min_window_s=0, min_joules=0, powercap_root=tmp_path / "absent")
    job = out["jobs"]["work"]
    assert job["joules"] == pytest.approx(0.005) and job["dynamic_joules"] is None
    assert all(r["rejected"] == "non-positive energy after subtracting idle power" for r in job["runs"])
    assert "after subtracting idle power" in job["note"]


def test_token_costs_give_no_ratio_from_non_positive_energy(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", _CoarseNVML(step_mj=100))  # nothing moves it: every reading is 0 J
    model, tok = models()
    pruned = models()[0]
    utils.prune_glu(pruned, 0.5)
    out = energy.token_costs({"base": model, "pruned": pruned}, tok, ["The river flows"], new_tokens=2, runs=2,
                             warmup=0, idle_s=0, min_window_s=0, min_joules=0, powercap_root=tmp_path / "absent")
    assert out["energy_measured"] is True and out["cost_unit"] == "joules"
    printed = capsys.readouterr().out
    for phase in ("prefill", "decode"):
        cut = out["models"]["pruned"][phase]
        assert cut["cost_ratio"] is None and cut["cost_ratio_min"] is None and cut["verdict"] is None
        assert "no cost ratio" in cut["rejected"] and cut["rejected"] in printed and cut["rejected"] in out["notes"]
        assert out["models"]["base"][phase]["joules_per_token"] is None


def test_bad_window_settings_are_clear_errors(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    with pytest.raises(ValueError, match="min_window_s must be a number >= 0"):
        energy.measure_energy({"x": lambda: None}, min_window_s=-1, powercap_root=tmp_path)
    with pytest.raises(ValueError, match="max_repeats must be an integer >= 1"):
        energy.measure_energy({"x": lambda: None}, max_repeats=0, powercap_root=tmp_path)
