#!/usr/bin/env bash
# The Quant-Noise table on any plain-text corpus (README.md in this folder).
#   recipes/lm/run.sh TRAIN.txt VALID.txt TEST.txt OUTDIR [--size small|base] [--jobs N] [--only table|finetune] [--from CKPT]
# Python: $PYTHON if set, else the repository's .venv (`make venv`, `make demo` or `make test` create it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "run.sh: no Python at $PY; run 'make venv' in $ROOT first (or set PYTHON=/path/to/venv/bin/python)" >&2
  exit 2
fi
exec "$PY" "$ROOT/recipes/lm/lm_recipe.py" "$@"
