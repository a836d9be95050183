#!/usr/bin/env bash
# The lab's loop on MoNuSeg, as a user runs it: export training tiles, train the hovernet-monuseg nucleus model,
# and evaluate it against the built-in `nuclei` model on the held-out images (whole images, Dice, AJI, PQ...).
#
#   bench/train_monuseg.sh            # one GPU: training stops after MAX_MINUTES (4); about 5 min in all
#
# Settings (environment variables, defaults in brackets): DEVICE [cuda], EPOCHS [60], MAX_MINUTES [4],
# BATCH [32], CROP [256], SAMPLES (crops per epoch) [2048], PATIENCE [15], RESUME (1: continue an interrupted
# run), DATA [../shared/data/monuseg-train], WORK (dataset and metrics) [/tmp/qpbridge-monuseg],
# CARD [models/hovernet-monuseg], MODEL_DIR (model folder written) [models/hovernet-monuseg],
# PYTHON [.venv/bin/python].
# The split is export-tiles' own (by image, a quarter held out: 3 of the 13 images). Writes MODEL_DIR/weights.pt,
# config.json and training.json, and WORK/metrics-<model>.json for both models.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/monuseg-train}
WORK=${WORK:-/tmp/qpbridge-monuseg}
CARD=${CARD:-models/hovernet-monuseg}
MODEL_DIR=${MODEL_DIR:-models/hovernet-monuseg}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-60}
MAX_MINUTES=${MAX_MINUTES:-4}
BATCH=${BATCH:-32}
CROP=${CROP:-256}
SAMPLES=${SAMPLES:-2048}
PATIENCE=${PATIENCE:-15}

start=$(date +%s)
if [[ "${RESUME:-0}" != 1 ]]; then
    rm -rf "$WORK"
    "$PYTHON" -m qpbridge export-tiles "$DATA" -o "$WORK/tiles" --mpp 0.25 --size 512 --format instance \
        --val-fraction 0.25 --licence "CC BY-NC-SA 4.0"
fi
resume=()
[[ "${RESUME:-0}" == 1 ]] && resume=(--resume)
"$PYTHON" -m qpbridge train --card "$CARD" --data "$WORK/tiles" --out "$MODEL_DIR" --epochs "$EPOCHS" \
    --device "$DEVICE" --batch-size "$BATCH" --crop "$CROP" --samples-per-epoch "$SAMPLES" \
    --max-minutes "$MAX_MINUTES" --patience "$PATIENCE" "${resume[@]}"

# The held-out images whole, with their outlines, in a folder of their own.
mkdir -p "$WORK/val"
"$PYTHON" - "$WORK/tiles/dataset.json" "$DATA" "$WORK/val" <<'PY'
import json
import sys
from pathlib import Path

info = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
data, val = Path(sys.argv[2]).resolve(), Path(sys.argv[3])
for name in sorted({t["source"] for t in info["tiles"] if t["split"] == "val"}):
    for f in data.glob(f"{Path(name).stem}.*"):
        link = val / f.name
        if not link.exists():
            link.symlink_to(f)
    print("held out:", name)
PY
for model in nuclei "$MODEL_DIR"; do
    "$PYTHON" -m qpbridge evaluate --model "$model" --data "$WORK/val" --mpp 0.25 --device "$DEVICE" \
        -o "$WORK/metrics-$(basename "$model").json"
done
ls -l "$MODEL_DIR/weights.pt"
echo "total $(( $(date +%s) - start )) s"
