#!/usr/bin/env bash
# The Colab rehearsal on a real CUDA GPU, in one command:
#     bash scripts/rehearse_cuda.sh            (extra arguments go to pytest, e.g. notebooks/CH08_attention)
# Every notebook in the tiny profile (no Hub needed) under the T4's precision policy (RLLM_HARDWARE=t4:
# float16 models, Gemma 3 in float32, float16 autocast with loss scaling), with the tensors on the GPU for
# real, so inputs left on the CPU fail here as they would on Colab. `make rehearse` runs the same notebooks
# with the same policy on a CPU, which catches the dtype problems but not the device ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'No CUDA GPU here: run make rehearse (the T4 simulated on the CPU) instead.')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
RLLM_REHEARSAL=1 RLLM_PROFILE=tiny RLLM_HARDWARE=t4 HF_HUB_OFFLINE=1 MPLBACKEND=Agg \
  "$PY" -m pytest -n "${WORKERS:-4}" --dist loadfile notebooks tests/test_rehearsal.py "$@"
