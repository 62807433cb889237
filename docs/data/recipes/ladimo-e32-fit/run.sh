#!/usr/bin/env bash
# 32 parts (8 shared + top-12 of 24), layer-wise with router supervision as ladimo-e32, then
# router-only fitting (--router-steps); the work directory is kept so that other router
# settings reuse the recording and the trained blocks. Usage: run.sh STEPS LR [REFINE]
set -euo pipefail
STEPS=$1 LR=$2 REFINE=${3:-0}
. "$(dirname "$0")/env.sh"
NAME=rs$STEPS-lr$LR
[ "$REFINE" = 0 ] || NAME=$NAME-refine$REFINE
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts 32 --shared-experts 8 --top-k 12 \
    --router-init random --router-loss 1 --calib "$DOC/library" --calib-tokens 100000 \
    --layerwise-steps 100 --lr 3e-3 --router-steps "$STEPS" --router-lr "$LR" --refine-steps "$REFINE" --seed 0 \
    --work-dir "$OUT/work" --keep-work --json --out "$OUT/$NAME" > "$OUT/$NAME.convert.json"
echo "$NAME convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
start=$(date +%s)
record "$NAME" "$OUT/$NAME"
echo "$NAME eval $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
