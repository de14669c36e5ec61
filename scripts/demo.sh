#!/usr/bin/env bash
# The offline demo: set-up, build the demo datasets from pip-shipped images, run every method with the
# EfficientNet-Lite0 backbone on the CPU, and print the tables side by side.
#   bash scripts/demo.sh            # everything
#   K_SHOT=2 SEED=1 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
K_SHOT=${K_SHOT:-4}
SEED=${SEED:-0}
OUT=${OUT:-runs/demo}
export BACKBONE=${BACKBONE:-efficientnet_lite0}

echo "== building demo data (demo_data/) =="
$PY data/demo.py --root demo_data

runs=()
echo "== training-free nearest-neighbour baseline (k=$K_SHOT, seed=$SEED) =="
for ds in fabric surfaces textile; do
  $PY -m baseline.knn --dataset-root demo_data/$ds --k-shot "$K_SHOT" --seed "$SEED" \
      --save-dir "$OUT/knn_$ds" --backbone "$BACKBONE" --quiet | tail -n +1 >/dev/null
  runs+=("$OUT/knn_$ds/results.json")
done

echo
echo "== summary (means over classes, %; s/img on this machine) =="
$PY scripts/summarize.py "${runs[@]}"
