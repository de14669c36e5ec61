#!/usr/bin/env bash
# Rebuild the FDSL head that ships as fdsl.test / fdsl.predict's default checkpoint (efficientnet_lite0):
# the dev benchmark's data (built when missing), a 3-epoch head on its whole auxiliary corpus with the CNN default
# FD matching, then the checkpoint without its resume state. 1-3 minutes on 2 CPU cores. The shipped file was
# trained with one thread: OMP_NUM_THREADS=1 reproduces it bit for bit (other thread counts sum in another order).
#   OMP_NUM_THREADS=1 bash scripts/build_head.sh [OUT]    (default OUT: fdsl/weights/devbench_efficientnet_lite0.pth)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-fdsl/weights/devbench_efficientnet_lite0.pth}
py=${PYTHON:-.venv/bin/python}
[ -f devbench_data/folds/all/meta.json ] || "$py" -m data.devbench --root devbench_data
"$py" -m fdsl.train --dataset-root devbench_data/folds/all --save-dir runs/head_all --backbone efficientnet_lite0 \
  --epochs 3 --fd-match joint --progress 0
"$py" -m fdsl.checkpoint --strip runs/head_all/last.pth "$out"
