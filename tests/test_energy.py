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

    monkeypatch.setattr(energy.time, "sleep", lambda s: advance(int(s * 2e6)))  # idle: 2 W, instantly
    calls = []
    out = energy.measure_energy({"work": lambda: (calls.append(1), advance(3_000_000))}, runs=3, warmup=2,
                                idle_s=0.5, powercap_root=root)
    assert len(calls) == 5 and len(out["jobs"]["work"]["runs"]) == 3
    assert out["energy_measured"] is True and out["idle"]["joules"] == pytest.approx(1.0)
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
        assert cut["ideal_speedup"] > 1 and isinstance(cut["cost_ratio"], float)
        assert cut["verdict"] in utils.SPEED_VERDICTS
        assert "cost_ratio" not in base
    assert out["models"]["pruned"]["prefill"]["ideal_speedup"] == pytest.approx(utils.ideal_speedup(model, pruned))
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 2"):
        energy.token_costs({"base": model}, tok, ["x"], new_tokens=1)
