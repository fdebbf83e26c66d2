# Setup: on Colab, fetch the course (a fork? set RLLM_REPO_URL) and its requirements; elsewhere, find the checkout.
import os, pathlib, shutil, subprocess, sys  # noqa: E401
REPO_URL = os.environ.get("RLLM_REPO_URL", "https://github.com/rearchitecting-llms/course")
COLAB = "google.colab" in sys.modules
if COLAB and not os.path.isdir("course"):
    for cmd in (f"git clone --depth 1 {REPO_URL} course", "pip install -q -r course/requirements.txt"):
        run = subprocess.run(cmd.split(), capture_output=True, text=True, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
        print(f"$ {cmd}\n{run.stdout}{run.stderr}")
        if run.returncode:
            shutil.rmtree("course", ignore_errors=True)
            raise RuntimeError(f"`{cmd}` failed (output above). Check the network; if the course is not at "
                               f"{REPO_URL} (a fork?), run os.environ['RLLM_REPO_URL'] = '<its URL>', then re-run.")
here = pathlib.Path(os.environ.get("RLLM_REPO_DIR") or ("course" if COLAB else ".")).resolve()
root = next((p for p in (here, *here.parents) if (p / "utils" / "__init__.py").is_file()), None)
if root is None:
    raise RuntimeError(f"No utils/ in {here} or above: start Jupyter inside the course repo, or set RLLM_REPO_DIR.")
sys.path.insert(0, str(root))
