# Shared by trainAndTest.sh and test_few_shot.sh (sourced, not run). Parses and checks the seed's nine positional
# arguments and the environment; on a wrong call prints the usage and exits 2.
#   MODEL_NAME DEVICE USE_NAM WINMODE WIN_SIZE WIN_STRIDE WIN_WEIGHT SEED KSHOTS
# Environment: MVTEC_ROOT (data/mvtec), VISA_ROOT (data/visa), BACKBONE (ViT-L-14-336), IMAGE_SIZE (backbone
# default), EPOCHS_MVTEC (5), EPOCHS_VISA (11), PYTHON (.venv/bin/python if present, else python3),
# PRETRAINED (CLIP tag or weights file, or `random`; default openai for CLIP), EXTRA_TRAIN_ARGS / EXTRA_TEST_ARGS
# (appended to fdsl.train / fdsl.test), PROTOCOL (paper when BACKBONE is ViT-L-14-336, else ours: paper = the
# configs/fdsl/paper_*.yaml files, the original's protocol; ours = configs/fdsl/{train,train_visa,test}.yaml),
# TEST_EPOCH_VISA / TEST_EPOCH_MVTEC (the epoch tested on VisA, of the MVTec-trained run, and on MVTec, of the
# VisA-trained run; paper: EPOCHS_MVTEC and 5 (or EPOCHS_VISA if smaller), as the original with its epoch_11 bug
# fixed; ours: the last epoch of each run),
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
             NPROC=1 (processes per step, launched with torchrun when above 1) EXTRA_TRAIN_ARGS= EXTRA_TEST_ARGS=
             PROTOCOL=<paper for ViT-L-14-336, else ours> TEST_EPOCH_VISA=<5> TEST_EPOCH_MVTEC=<5>
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
  if [ -z "${PROTOCOL:-}" ]; then
    if [ "$BACKBONE" = ViT-L-14-336 ]; then PROTOCOL=paper; else PROTOCOL=ours; fi
  fi
  [[ "$PROTOCOL" == paper || "$PROTOCOL" == ours ]] || fdsl_bad "PROTOCOL must be paper or ours, got '$PROTOCOL'"
  if [ "$PROTOCOL" = paper ]; then
    # the original tests VisA with the MVTec run's epoch_11 (never trained: its last epoch, 5, here) and MVTec
    # with epoch_5 of the 11-epoch VisA run (kept)
    DEFAULT_EPOCH_VISA=$EPOCHS_MVTEC DEFAULT_EPOCH_MVTEC=$(( EPOCHS_VISA < 5 ? EPOCHS_VISA : 5 ))
    TRAIN_CONFIG_MVTEC="$REPO/configs/fdsl/paper_train.yaml" TRAIN_CONFIG_VISA="$REPO/configs/fdsl/paper_train_visa.yaml"
    TEST_CONFIG="$REPO/configs/fdsl/paper_test.yaml"
  else
    DEFAULT_EPOCH_VISA=$EPOCHS_MVTEC DEFAULT_EPOCH_MVTEC=$EPOCHS_VISA
    TRAIN_CONFIG_MVTEC="$REPO/configs/fdsl/train.yaml" TRAIN_CONFIG_VISA="$REPO/configs/fdsl/train_visa.yaml"
    TEST_CONFIG="$REPO/configs/fdsl/test.yaml"
  fi
  TEST_EPOCH_VISA=${TEST_EPOCH_VISA:-$DEFAULT_EPOCH_VISA}
  TEST_EPOCH_MVTEC=${TEST_EPOCH_MVTEC:-$DEFAULT_EPOCH_MVTEC}
  [[ "$TEST_EPOCH_VISA" =~ ^[1-9][0-9]*$ && "$TEST_EPOCH_VISA" -le "$EPOCHS_MVTEC" ]] \
    || fdsl_bad "TEST_EPOCH_VISA must be an epoch of the MVTec-trained run, 1..$EPOCHS_MVTEC (got '$TEST_EPOCH_VISA')"
  [[ "$TEST_EPOCH_MVTEC" =~ ^[1-9][0-9]*$ && "$TEST_EPOCH_MVTEC" -le "$EPOCHS_VISA" ]] \
    || fdsl_bad "TEST_EPOCH_MVTEC must be an epoch of the VisA-trained run, 1..$EPOCHS_VISA (got '$TEST_EPOCH_MVTEC')"
  echo "== FDSL protocol: $PROTOCOL (PROTOCOL=paper|ours); VisA tested with epoch $TEST_EPOCH_VISA of the MVTec run," \
    "MVTec with epoch $TEST_EPOCH_MVTEC of the VisA run"
  COMMON=(--backbone "$BACKBONE" --device "$DEVICE")
  [ -n "${IMAGE_SIZE:-}" ] && COMMON+=(--image-size "$IMAGE_SIZE")
  [ -n "${PRETRAINED:-}" ] && COMMON+=(--pretrained "$PRETRAINED")
  TAG="$BACKBONE${IMAGE_SIZE:+_$IMAGE_SIZE}"
  # Checkpoints are named after the dataset they will be TESTED on, as in the original (exps/visa = trained on MVTec).
  EXP_TRAINED_ON_MVTEC="exps/visa/$TAG/fewshot/$MODEL_NAME"
  EXP_TRAINED_ON_VISA="exps/mvtec/$TAG/fewshot/$MODEL_NAME"
}

# fdsl_train DATASET_ROOT SAVE_DIR EPOCHS CONFIG FLAGS...
fdsl_train() {
  local root=$1 out=$2 epochs=$3 config=$4
  shift 4
  # shellcheck disable=SC2086  # EXTRA_TRAIN_ARGS is a word list on purpose
  "${LAUNCH[@]}" -m fdsl.train --config "$config" --dataset-root "$root" --save-dir "$out" --epochs "$epochs" \
    --use-nam "$USE_NAM" "$@" "${COMMON[@]}" ${EXTRA_TRAIN_ARGS:-}
}

# fdsl_test DATASET_ROOT CHECKPOINT SAVE_DIR
# The stitched window map goes through the shared NAM whenever USE_NAM=1, in both drivers: the original's
# winuseConvRes only toggles extra window maps that its layer selection drops.
fdsl_test() {
  # shellcheck disable=SC2086  # EXTRA_TEST_ARGS is a word list on purpose
  "${LAUNCH[@]}" -m fdsl.test --config "$TEST_CONFIG" --dataset-root "$1" --checkpoint "$2" --save-dir "$3" \
    --k-shot "$KSHOTS" --seed "$SEED" --use-nam "$USE_NAM" --win-mode "$WINMODE" --win-size "$WIN_SIZE" \
    --win-stride "$WIN_STRIDE" --win-weight "$WIN_WEIGHT" --win-use-nam 1 "${COMMON[@]}" ${EXTRA_TEST_ARGS:-}
}
