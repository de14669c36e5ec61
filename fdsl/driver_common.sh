# Shared by trainAndTest.sh and test_few_shot.sh (sourced, not run). Parses and checks the seed's nine positional
# arguments and the environment; on a wrong call prints the usage and exits 2.
#   MODEL_NAME DEVICE USE_NAM WINMODE WIN_SIZE WIN_STRIDE WIN_WEIGHT SEED KSHOTS
# Environment: MVTEC_ROOT (data/mvtec), VISA_ROOT (data/visa), BACKBONE (ViT-L-14-336), IMAGE_SIZE (backbone
# default), EPOCHS_MVTEC (5), EPOCHS_VISA (11), PYTHON (.venv/bin/python if present, else python3),
# PRETRAINED (CLIP tag or weights file; default openai for CLIP), EXTRA_TEST_ARGS (appended to fdsl.test),
# NPROC (1; above 1 every python step runs as `torchrun --standalone --nproc_per_node NPROC -m ...`, i.e.
# `$PYTHON -m torch.distributed.run`: DDP training, test classes shared out over the processes).

fdsl_usage() {
  cat >&2 <<USAGE
usage: bash $FDSL_SCRIPT MODEL_NAME DEVICE USE_NAM WINMODE WIN_SIZE WIN_STRIDE WIN_WEIGHT SEED KSHOTS
  MODEL_NAME  name of the run (folders exps/<dataset>/.../MODEL_NAME and results/<dataset>/few_shot/...)
  DEVICE      cpu or a CUDA index (0)
  USE_NAM     1 = Neighbor Aggregation Module, 0 = without
  WINMODE     nan (no LFE) | mul (blend with the LFE window branch) | onlywin
  WIN_SIZE    LFE window side in feature-grid cells (paper: 13)
  WIN_STRIDE  LFE window stride in cells (paper: 2)
  WIN_WEIGHT  weight of the window branch in mul mode (paper: 0.5)
  SEED        seed of the k-shot support draw
  KSHOTS      k: 1, 2 or 4
example: bash $FDSL_SCRIPT fdsl 0 1 mul 13 2 0.5 14 1
environment: MVTEC_ROOT=$FDSL_DEFAULT_MVTEC VISA_ROOT=$FDSL_DEFAULT_VISA BACKBONE=ViT-L-14-336 IMAGE_SIZE=<backbone default>
             EPOCHS_MVTEC=5 EPOCHS_VISA=11 PYTHON=<.venv/bin/python or python3> PRETRAINED=<openai for CLIP>
             NPROC=1 (processes per step, launched with torchrun when above 1)
USAGE
  exit 2
}

fdsl_bad() { echo "error: $1" >&2; fdsl_usage; }

fdsl_parse_args() {
  [ "$#" -eq 9 ] || fdsl_bad "expected 9 arguments, got $#"
  MODEL_NAME=$1 DEVICE=$2 USE_NAM=$3 WINMODE=$4 WIN_SIZE=$5 WIN_STRIDE=$6 WIN_WEIGHT=$7 SEED=$8 KSHOTS=$9
  [[ "$MODEL_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || fdsl_bad "MODEL_NAME '$MODEL_NAME' must be letters, digits, . _ -"
  [[ "$DEVICE" == cpu || "$DEVICE" =~ ^[0-9]+$ || "$DEVICE" =~ ^cuda(:[0-9]+)?$ ]] \
    || fdsl_bad "DEVICE '$DEVICE' must be cpu or a CUDA index"
  [[ "$USE_NAM" == 0 || "$USE_NAM" == 1 ]] || fdsl_bad "USE_NAM must be 0 or 1, got '$USE_NAM'"
  [[ "$WINMODE" == nan || "$WINMODE" == mul || "$WINMODE" == onlywin ]] \
    || fdsl_bad "WINMODE must be nan, mul or onlywin, got '$WINMODE'"
  for pair in "WIN_SIZE:$WIN_SIZE" "WIN_STRIDE:$WIN_STRIDE" "SEED:$SEED" "KSHOTS:$KSHOTS"; do
    [[ "${pair#*:}" =~ ^[0-9]+$ ]] || fdsl_bad "${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
  done
  [[ "$WIN_WEIGHT" =~ ^[0-9]*\.?[0-9]+$ ]] || fdsl_bad "WIN_WEIGHT must be a number in [0, 1], got '$WIN_WEIGHT'"
  [ "$KSHOTS" -ge 1 ] || fdsl_bad "KSHOTS must be at least 1"
}

fdsl_setup_env() {
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
  fi
  MVTEC_ROOT=${MVTEC_ROOT:-$FDSL_DEFAULT_MVTEC}
  VISA_ROOT=${VISA_ROOT:-$FDSL_DEFAULT_VISA}
  BACKBONE=${BACKBONE:-ViT-L-14-336}
  EPOCHS_MVTEC=${EPOCHS_MVTEC:-5}
  EPOCHS_VISA=${EPOCHS_VISA:-11}
  [[ "$EPOCHS_MVTEC" =~ ^[1-9][0-9]*$ && "$EPOCHS_VISA" =~ ^[1-9][0-9]*$ ]] \
    || fdsl_bad "EPOCHS_MVTEC and EPOCHS_VISA must be positive integers"
  NPROC=${NPROC:-1}
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || fdsl_bad "NPROC must be a positive integer, got '$NPROC'"
  LAUNCH=("$PYTHON")  # torchrun is torch.distributed.run; run through $PYTHON so the same interpreter is used
  if [ "$NPROC" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC"); fi
  COMMON=(--backbone "$BACKBONE" --device "$DEVICE")
  [ -n "${IMAGE_SIZE:-}" ] && COMMON+=(--image-size "$IMAGE_SIZE")
  [ -n "${PRETRAINED:-}" ] && COMMON+=(--pretrained "$PRETRAINED")
  TAG="$BACKBONE${IMAGE_SIZE:+_$IMAGE_SIZE}"
  # Checkpoints are named after the dataset they will be TESTED on, as in the original (exps/visa = trained on MVTec).
  EXP_TRAINED_ON_MVTEC="exps/visa/$TAG/fewshot/$MODEL_NAME"
  EXP_TRAINED_ON_VISA="exps/mvtec/$TAG/fewshot/$MODEL_NAME"
}

# fdsl_test DATASET_ROOT CHECKPOINT SAVE_DIR WIN_USE_NAM
fdsl_test() {
  # shellcheck disable=SC2086  # EXTRA_TEST_ARGS is a word list on purpose
  "${LAUNCH[@]}" -m fdsl.test --dataset-root "$1" --checkpoint "$2" --save-dir "$3" --k-shot "$KSHOTS" --seed "$SEED" \
    --use-nam "$USE_NAM" --win-mode "$WINMODE" --win-size "$WIN_SIZE" --win-stride "$WIN_STRIDE" \
    --win-weight "$WIN_WEIGHT" --win-use-nam "$4" "${COMMON[@]}" ${EXTRA_TEST_ARGS:-}
}
