#!/usr/bin/env bash
# FDSL few-shot test only (the seed's test_few_shot.sh, docs/design/fdsl.md section 6), with the checkpoints that
# trainAndTest.sh trained under the same MODEL_NAME: VisA with the LAST epoch of the MVTec-trained run, MVTec with
# the LAST epoch of the VisA-trained run (last.pth). As the original: no NAM on the stitched window map
# (winuseConvRes=0) and results in results/<visa|mvtec>/few_shot/MODEL_NAME_winmode<WINMODE>/s<K>shot/seed<SEED>/.
# usage: bash test_few_shot.sh MODEL_NAME DEVICE USE_NAM WINMODE WIN_SIZE WIN_STRIDE WIN_WEIGHT SEED KSHOTS
set -euo pipefail
FDSL_SCRIPT=test_few_shot.sh FDSL_DEFAULT_MVTEC=data/mvtec FDSL_DEFAULT_VISA=data/visa
source "$(dirname "${BASH_SOURCE[0]}")/fdsl/driver_common.sh"
fdsl_parse_args "$@"
fdsl_setup_env

for ckpt in "$EXP_TRAINED_ON_MVTEC/last.pth" "$EXP_TRAINED_ON_VISA/last.pth"; do
  [ -f "$ckpt" ] || { echo "error: checkpoint $ckpt not found: run trainAndTest.sh with MODEL_NAME $MODEL_NAME" \
    "(and the same BACKBONE/IMAGE_SIZE) first" >&2; exit 2; }
done
OUT_NAME="${MODEL_NAME}_winmode$WINMODE"
echo "== test VisA ($VISA_ROOT), $KSHOTS-shot, seed $SEED, with $EXP_TRAINED_ON_MVTEC/last.pth"
fdsl_test "$VISA_ROOT" "$EXP_TRAINED_ON_MVTEC/last.pth" "results/visa/few_shot/$OUT_NAME/s${KSHOTS}shot/seed$SEED" 0
echo "== test MVTec ($MVTEC_ROOT), $KSHOTS-shot, seed $SEED, with $EXP_TRAINED_ON_VISA/last.pth"
fdsl_test "$MVTEC_ROOT" "$EXP_TRAINED_ON_VISA/last.pth" "results/mvtec/few_shot/$OUT_NAME/s${KSHOTS}shot/seed$SEED" 0
