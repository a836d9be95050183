#!/usr/bin/env bash
# Train the hovernet-monuseg nucleus model on MoNuSeg and compare it with the built-in `nuclei` model on the
# three held-out images (Dice, AJI, PQ per image). Run from anywhere; it works in the repository root.
#
#   bench/train_monuseg.sh                      # one GPU: training stops after MAX_MINUTES (4); about 5 min in all
#
# Settings (environment variables, defaults in brackets): DEVICE [cuda], EPOCHS [60], MAX_MINUTES [4],
# BATCH [32], CROP [256], SAMPLES (crops per epoch) [2048], PATIENCE [15], RESUME (set to 1 to continue an
# interrupted run), DATA [../shared/data/monuseg-train], WORK (dataset folder) [/tmp/qpbridge-monuseg],
# CARD [models/hovernet-monuseg], OUT (model folder written) [models/hovernet-monuseg], PYTHON [.venv/bin/python].
# Writes OUT/weights.pt, OUT/config.json, OUT/training.json and OUT/validation.json (both models' metrics).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/monuseg-train}
WORK=${WORK:-/tmp/qpbridge-monuseg}
CARD=${CARD:-models/hovernet-monuseg}
OUT=${OUT:-models/hovernet-monuseg}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-60}
MAX_MINUTES=${MAX_MINUTES:-4}
BATCH=${BATCH:-32}
CROP=${CROP:-256}
SAMPLES=${SAMPLES:-2048}
PATIENCE=${PATIENCE:-15}
VAL="TCGA-21-5786-01Z-00-DX1 TCGA-AR-A1AS-01Z-00-DX1 TCGA-B0-5710-01Z-00-DX1"  # lung, breast, kidney

start=$(date +%s)
if [[ "${RESUME:-0}" != 1 ]]; then
    rm -rf "$WORK/tiles"
    # shellcheck disable=SC2086
    "$PYTHON" -m qpbridge.training.monuseg "$DATA" -o "$WORK/tiles" --mpp 0.25 --tile 512 --val $VAL
fi
resume=()
[[ "${RESUME:-0}" == 1 ]] && resume=(--resume)
"$PYTHON" -m qpbridge train --card "$CARD" --data "$WORK/tiles" --out "$OUT" --epochs "$EPOCHS" \
    --device "$DEVICE" --batch-size "$BATCH" --crop "$CROP" --samples-per-epoch "$SAMPLES" \
    --max-minutes "$MAX_MINUTES" --patience "$PATIENCE" "${resume[@]}"
# shellcheck disable=SC2086
"$PYTHON" bench/eval_nuclei.py --data "$DATA" --images $VAL --models nuclei "$OUT" --device "$DEVICE" \
    -o "$OUT/validation.json"
ls -l "$OUT/weights.pt"
echo "total $(( $(date +%s) - start )) s"
