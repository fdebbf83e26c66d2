"""`make lab`: JupyterLab starts in the course's environment and serves the notebooks.

The test runs the Makefile's own `lab` recipe (without its `setup` prerequisite), headless: bound to
127.0.0.1 on a free port, no browser, a random token, Jupyter's config and runtime files in a temporary
folder. It asks the server's HTTP API for the `notebooks/` folder, then stops it. Bounded in time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 20


def _lab_recipe() -> str:
    """The command line of the Makefile's `lab` target."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^lab:.*\n\t(.+)$", makefile, flags=re.MULTILINE)
    assert match, "The Makefile has no `lab:` target with a one-line recipe."
    assert ".PHONY:" in makefile and " lab" in makefile.split(".PHONY:")[1].splitlines()[0], "lab is not .PHONY"
    return match.group(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (a localhost URL built here)
        return json.load(response)


def test_make_lab_recipe_opens_notebooks_in_the_venv_with_the_profile():
    recipe = _lab_recipe()
    assert recipe.startswith("RLLM_PROFILE=$(PROFILE) $(PY) -m jupyterlab"), recipe
    assert "--ServerApp.default_url=/lab/tree/notebooks" in recipe
    assert re.search(r"^PROFILE \?= cpu$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert "jupyterlab" in (ROOT / "requirements-dev.txt").read_text()


def test_make_lab_serves_the_notebook_folders(tmp_path):
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed in this environment: `make setup` "
                                             "installs it (requirements-dev.txt)")
    port, token = _free_port(), secrets.token_hex(16)
    lab_args = (f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --ServerApp.port_retries=0 "
                f"--IdentityProvider.token={token} --ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI often run as root; Jupyter refuses it
        lab_args += " --allow-root"
    recipe = (_lab_recipe().replace("$(PROFILE)", "tiny").replace("$(PY)", shlex.quote(sys.executable))
              .replace("$(LAB_ARGS)", lab_args))
    assert "$(" not in recipe, f"a Makefile variable the test does not know: {recipe}"
    words = shlex.split(recipe)
    assignments = {}
    while "=" in words[0] and not words[0].startswith("-"):  # the recipe's leading VAR=value words
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    assert assignments == {"RLLM_PROFILE": "tiny"}
    env = dict(os.environ, **assignments, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log = tmp_path / "lab.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(words, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get(f"{base}/api/status", token)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        listing = _get(f"{base}/api/contents/notebooks", token)
        assert listing["type"] == "directory"
        served = {item["name"] for item in listing["content"] if item["type"] == "directory"}
        chapters = {p.name for p in (ROOT / "notebooks").iterdir() if p.is_dir() and p.name.startswith("CH")}
        assert chapters and chapters <= served
        with pytest.raises(urllib.error.HTTPError, match="403"):  # the token is required
            _get(f"{base}/api/contents/notebooks", "wrong-token")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=STOP_TIMEOUT_S)
    assert server.returncode is not None
