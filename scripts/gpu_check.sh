#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): proves the CUDA paths on one GPU in under 8 minutes, no install step.
#   bash scripts/gpu_check.sh            # on a GPU machine; JSON to $OUT (or runs/gpu_check/), table on stdout
#   bash scripts/gpu_check.sh --quick    # the same steps on CPU with tiny shapes (CI)
# Python: $PYTHON, else the first of .venv/bin/python, python3, python that imports torch (it needs torch, transformers, accelerate
# and peft; pytest is used when present).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
  : "${PYTHON:?no python with torch found: set PYTHON=/path/to/python}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
