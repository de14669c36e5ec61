#!/usr/bin/env bash
# FDSL few-shot test only (the seed's test_few_shot.sh, docs/design/fdsl.md section 6), with the checkpoints that
# trainAndTest.sh trained under the same MODEL_NAME: VisA with epoch TEST_EPOCH_VISA of the MVTec-trained run,
# MVTec with epoch TEST_EPOCH_MVTEC of the VisA-trained run (PROTOCOL=paper: 5 and 5, as the original; ours: the
# last epochs). The stitched window map goes through NAM whenever USE_NAM=1 (see fdsl/driver_common.sh).
# Results: results/<visa|mvtec>/few_shot/MODEL_NAME_winmode<WINMODE>/s<K>shot/seed<SEED>/.
# usage: bash test_few_shot.sh MODEL_NAME DEVICE USE_NAM WINMODE WIN_SIZE WIN_STRIDE WIN_WEIGHT SEED KSHOTS
set -euo pipefail
FDSL_SCRIPT=test_few_shot.sh FDSL_DEFAULT_MVTEC=data/mvtec FDSL_DEFAULT_VISA=data/visa
source "$(dirname "${BASH_SOURCE[0]}")/fdsl/driver_common.sh"
fdsl_parse_args "$@"
fdsl_setup_env

CKPT_VISA="$EXP_TRAINED_ON_MVTEC/epoch_$TEST_EPOCH_VISA.pth" CKPT_MVTEC="$EXP_TRAINED_ON_VISA/epoch_$TEST_EPOCH_MVTEC.pth"
for ckpt in "$CKPT_VISA" "$CKPT_MVTEC"; do
  [ -f "$ckpt" ] || { echo "error: checkpoint $ckpt not found: run trainAndTest.sh with MODEL_NAME $MODEL_NAME" \
    "(and the same BACKBONE/IMAGE_SIZE/EPOCHS_*) first" >&2; exit 2; }
done
OUT_NAME="${MODEL_NAME}_winmode$WINMODE"
echo "== test VisA ($VISA_ROOT), $KSHOTS-shot, seed $SEED, with $CKPT_VISA"
fdsl_test "$VISA_ROOT" "$CKPT_VISA" "results/visa/few_shot/$OUT_NAME/s${KSHOTS}shot/seed$SEED"
echo "== test MVTec ($MVTEC_ROOT), $KSHOTS-shot, seed $SEED, with $CKPT_MVTEC"
fdsl_test "$MVTEC_ROOT" "$CKPT_MVTEC" "results/mvtec/few_shot/$OUT_NAME/s${KSHOTS}shot/seed$SEED"
