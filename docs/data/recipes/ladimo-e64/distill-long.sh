#!/usr/bin/env bash
# Third stage, long: the 64-part model after both stages (distill.sh, distill-more.sh), distilled
# 6,000 more steps at its own top-26 on all of python3.11-doc but tutorial/ (~2 passes), held-out
# evaluation every 200 steps: it tells apart extrapolate.py's two fits (one reaches the 80%
# target at ~7,400 steps in all, the other levels off above it). ~21 h on 2 cores, so it runs
# over many sessions: rerun to resume from OUT/distilled-long/checkpoints (the newest, every 20
# steps). LR overrides the peak rate (lr-ab/run.sh compares rates).
set -euo pipefail
. "$(dirname "$0")/env.sh"
distil --student "$OUT/distilled-top13-more/model" --data $FRESH \
    --trainable router,experts,shared --steps 6000 --lr "${LR:-1.5e-4}" --warmup-steps 50 \
    --eval-every 200 --checkpoint-every 20 --seed 3 --out "$OUT/distilled-long" \
    > "$OUT/distill-long.json"
record "distilled 700 + 400 + 6,000 steps" "$OUT/distilled-long/model"
