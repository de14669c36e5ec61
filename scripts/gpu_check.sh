#!/usr/bin/env bash
# One-command GPU check (issue 14): FDSL paper mode (mul, k=1, one class) and PCSNet paper mode (k=8, one class, a
# few epochs) on a small tree built here (or on MVTEC_ROOT), real weights when present, else random (said loudly).
# Prints per stage: seconds per image, training seconds, peak GPU memory, precision / TF32. Exits non-zero with one
# line when there is no CUDA device or a stage fails.
#   bash scripts/gpu_check.sh [--random-weights] [--device 0] [--out gpu_check_out] [--stages fdsl,pcsnet]
#   bash scripts/gpu_check.sh --smoke      # the same stages on the CPU with tiny sizes (a test of this script)
#   bash scripts/gpu_check.sh --dry-run    # print the commands only
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$REPO/scripts/gpu_check.py" "$@"
