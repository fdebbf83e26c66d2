import pytest

from utils import describe_profile, get_profile, runs_dir
from utils.profiles import cache_dir


@pytest.mark.parametrize("raw,expected", [("tiny", "tiny"), ("CPU", "cpu"), (" full ", "full"), ("", "full")])
def test_get_profile_reads_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("RLLM_PROFILE", raw)
    assert get_profile() == expected


def test_default_profile_is_full(monkeypatch):
    monkeypatch.delenv("RLLM_PROFILE", raising=False)
    assert get_profile() == "full"


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RLLM_PROFILE", "gpu")
    with pytest.raises(ValueError, match="full, cpu, tiny"):
        get_profile()


def test_describe_profile_names_the_profile(tiny):
    assert describe_profile().startswith("RLLM_PROFILE=tiny")


def test_runs_dir_is_per_profile(tiny):
    path = runs_dir()
    assert path.is_dir() and path.name == "tiny" and path.parent.name == "runs"


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLLM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_budget_picks_the_active_profile(monkeypatch):
    from utils import budget

    for profile, expected in (("full", 1), ("cpu", 2), ("tiny", 3)):
        monkeypatch.setenv("RLLM_PROFILE", profile)
        assert budget(full=1, cpu=2, tiny=3) == expected
