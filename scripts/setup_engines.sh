#!/usr/bin/env bash
# Builds the inference engines the `engines` test tier compares with, each in its own virtual
# environment at the repository root (they share nothing with .venv: no torch, no cqil):
#
#   .venv-llama   llama-cpp-python (llama.cpp), built from source for this CPU family
#
# Idempotent: an engine whose venv exists and imports is skipped. Run the tier with
#   .venv/bin/python -m pytest -m engines tests/test_gguf.py
set -euo pipefail
cd "$(dirname "$0")/.."

# ------------------------------------------------------------------ llama.cpp
# 0.3.36 vendors a llama.cpp whose deci graph reads per-layer head counts and FFN lengths and adds
# optional q/k/v, output and FFN biases (what cqil.export.gguf writes). GGML_NATIVE=OFF: a portable build
# (no -march=native), so a venv built on one CI machine runs on another. Building takes 10-20 minutes
# on 2 cores; CMAKE_BUILD_PARALLEL_LEVEL uses every core.
LLAMA_CPP_PYTHON_VERSION=0.3.36
if [[ -x .venv-llama/bin/python ]] && .venv-llama/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "llama.cpp: .venv-llama is ready ($(.venv-llama/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)'))"
else
  rm -rf .venv-llama
  python3 -m venv .venv-llama
  .venv-llama/bin/python -m pip install -q --upgrade pip
  .venv-llama/bin/python -m pip install -q numpy
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    .venv-llama/bin/python -m pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
  .venv-llama/bin/python -c "import llama_cpp; print('llama.cpp: built llama-cpp-python', llama_cpp.__version__)"
fi
