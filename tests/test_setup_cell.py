"""The notebooks' setup cell (notebooks/setup_cell.py), executed outside Colab and in a simulated Colab.

Nothing here needs the network: the simulated Colab clones a local git repository, or a path that does
not exist, and pip is replaced by a stand-in.
"""

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = (ROOT / "notebooks" / "setup_cell.py").read_text(encoding="utf-8")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def run_cell() -> dict:
    namespace: dict = {}
    exec(compile(SETUP, "setup_cell.py", "exec"), namespace)
    return namespace


@pytest.fixture
def clean(monkeypatch):
    """Outside Colab, no override variables, and sys.path restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    for name in ("RLLM_REPO_URL", "RLLM_REPO_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def colab(clean, tmp_path):
    """A simulated Colab runtime whose working folder is an empty tmp folder."""
    clean.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    workdir = tmp_path / "content"
    workdir.mkdir()
    clean.chdir(workdir)
    return workdir


class PipLog(list):
    """The pip commands the cell ran; ``status`` is the exit status the stand-in returns."""

    status = 0


@pytest.fixture
def fake_pip(clean):
    """Replace `pip install` by a stand-in (no network); git still runs for real."""
    calls, real_run = PipLog(), subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd[0] == "pip":
            calls.append(cmd)
            return subprocess.CompletedProcess(cmd, calls.status, "pip output\n", "")
        return real_run(cmd, *args, **kwargs)

    clean.setattr(subprocess, "run", run)
    return calls


@pytest.fixture
def origin(tmp_path):
    """A local git repository shaped like the course (utils/__init__.py, requirements.txt)."""
    repo = tmp_path / "origin"
    (repo / "utils").mkdir(parents=True)
    (repo / "utils" / "__init__.py").write_text("")
    (repo / "requirements.txt").write_text("# nothing\n")
    git = ["git", "-c", "user.name=course", "-c", "user.email=course@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "."], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "-q", "-m", "course"], check=True)
    return repo


def test_finds_the_repository_from_a_notebook_folder(clean):
    clean.chdir(ROOT / "notebooks" / "CH03_transformer_anatomy")
    namespace = run_cell()
    assert namespace["root"] == ROOT
    assert sys.path[0] == str(ROOT)


def test_outside_the_repository_says_where_to_start_jupyter(clean, tmp_path):
    clean.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="start Jupyter inside the course repo, or set RLLM_REPO_DIR") as info:
        run_cell()
    assert str(tmp_path) in str(info.value)


def test_repo_dir_variable_points_at_the_repository(clean, tmp_path):
    clean.chdir(tmp_path)
    clean.setenv("RLLM_REPO_DIR", str(ROOT))
    assert run_cell()["root"] == ROOT


@needs_git
def test_colab_failed_clone_stops_at_once_and_says_what_to_do(colab, capsys, clean):
    missing = colab.parent / "no-such-repository"
    clean.setenv("RLLM_REPO_URL", str(missing))
    with pytest.raises(RuntimeError) as info:
        run_cell()
    message = str(info.value)
    assert "git clone" in message and str(missing) in message
    assert "RLLM_REPO_URL" in message and "network" in message and "re-run" in message
    out = capsys.readouterr().out
    assert f"$ git clone --depth 1 {missing} course" in out
    assert "does not exist" in out or "fatal" in out  # git's own explanation is shown
    assert not (colab / "course").exists()
    assert str(colab / "course") not in sys.path


@needs_git
def test_colab_clones_installs_and_puts_the_clone_on_the_path(colab, origin, fake_pip, clean):
    clean.setenv("RLLM_REPO_URL", str(origin))
    namespace = run_cell()
    assert namespace["root"] == colab / "course"
    assert sys.path[0] == str(colab / "course")
    assert fake_pip == [["pip", "install", "-q", "-r", "course/requirements.txt"]]
    run_cell()  # a second run neither clones nor installs again
    assert len(fake_pip) == 1


@needs_git
def test_colab_failed_install_removes_the_clone_so_a_rerun_retries(colab, origin, fake_pip, clean):
    clean.setenv("RLLM_REPO_URL", str(origin))
    fake_pip.status = 1
    with pytest.raises(RuntimeError, match="pip install -q -r course/requirements.txt` failed"):
        run_cell()
    assert not (colab / "course").exists()
    fake_pip.status = 0
    assert run_cell()["root"] == colab / "course"


def test_the_repository_url_lives_in_one_place():
    url = next(line for line in SETUP.splitlines() if line.startswith("REPO_URL")).split('"')[3]
    assert url.startswith("https://")
    holders = [p for p in list(ROOT.glob("utils/*.py")) + list(ROOT.glob("scripts/*.py"))
               if url in p.read_text(encoding="utf-8")]
    assert holders == [], f"the clone URL belongs in notebooks/setup_cell.py only, not in {holders}"
