#!/usr/bin/env bash
# The offline demo: set-up, build the demo datasets from pip-shipped images, run every method with the
# EfficientNet-Lite0 backbone on the CPU, and print their tables side by side. Every run writes a report.html beside
# its results.json; the demo ends with runs/demo/index.html linking them all (its path is the last line printed).
#   bash scripts/demo.sh                    # k=4, seed 0 (about 15-20 minutes on 2 cores)
#   K_SHOT=2 SEED=1 bash scripts/demo.sh
#   SKIP="fdsl pcsnet" bash scripts/demo.sh # only the baseline
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
K_SHOT=${K_SHOT:-4}
SEED=${SEED:-0}
OUT=${OUT:-runs/demo}
SKIP=${SKIP:-}
export BACKBONE=${BACKBONE:-efficientnet_lite0}
skip() { [[ " $SKIP " == *" $1 "* ]]; }

echo "== building demo data (demo_data/: textile, materials, surfaces) =="
$PY data/demo.py --root demo_data

runs=()
echo "== training-free nearest-neighbour baseline (k=$K_SHOT, seed=$SEED) =="
for ds in materials surfaces textile; do
  $PY -m baseline.knn --dataset-root demo_data/$ds --k-shot "$K_SHOT" --seed "$SEED" \
      --save-dir "$OUT/knn_$ds" --backbone "$BACKBONE" --quiet >/dev/null
  runs+=("$OUT/knn_$ds/results.json")
done

if ! skip fdsl; then
  echo "== FDSL: the paper's cross-dataset protocol through trainAndTest.sh =="
  echo "   (head trained on materials -> tested on surfaces, trained on surfaces -> tested on materials)"
  # fdsl.test's CNN defaults, chosen on the dev benchmark (not on a demo set): joint FD, support-standardised maps,
  # 0.8 FD + 0.2 ASL, the smoothed map's maximum as the image score. EXTRA_TEST_ARGS adds flags on top.
  MVTEC_ROOT=demo_data/materials VISA_ROOT=demo_data/surfaces EXTRA_TEST_ARGS=${EXTRA_TEST_ARGS-} \
    bash trainAndTest.sh demo cpu 1 nan 16 8 0.5 "$SEED" "$K_SHOT"
  runs+=("results/visa/few_shot/demo/s${K_SHOT}shot/seed$SEED/results.json"
         "results/mvtec/few_shot/demo/s${K_SHOT}shot/seed$SEED/results.json")
fi

if ! skip pcsnet; then
  echo "== PCSNet on surfaces/brick (trains one model per class on the k good images + pseudo anomalies) =="
  $PY main.py --data-root demo_data/surfaces --class-name brick --k-shot "$K_SHOT" --seed "$SEED" \
      --save-dir "$OUT/pcsnet_surfaces_brick" --backbone "$BACKBONE" --quiet
  runs+=("$OUT/pcsnet_surfaces_brick/results.json")
fi

echo "== predict: 4 good fabric photos as references, 12 new ones (6 good, 6 with holes) =="
fabric=demo_data/materials/fabric
$PY -m baseline.predict --reference "$fabric"/train/good/00[0-3].png \
    --images "$fabric"/test/good/00[0-5].png "$fabric"/test/hole/00[0-5].png \
    --out "$OUT/predict_fabric" --backbone "$BACKBONE" --quiet --no-panels >/dev/null

echo
echo "== summary (means over classes, %; s/img measured on this machine) =="
$PY scripts/summarize.py "${runs[@]}"
$PY -m report "${runs[@]}" "$OUT/predict_fabric" --index "$OUT/index.html" >/dev/null
echo
echo "every run's report (curves, histograms, worst cases as image / ground truth / heat map / overlay):"
echo "$(cd "$OUT" && pwd)/index.html"
