#!/usr/bin/env bash
# A/B: is the distillation of the best model limited by its learning rate? 40 steps from the
# same start (the 64-part model after both stages), same data order (seed 2, all of
# python3.11-doc but tutorial/), constant peak lr after the 10-step warm-up, its own top-26.
# Each run ~9 minutes on 2 cores; outputs in OUT/lr-ab/LR.
set -euo pipefail
. "$(dirname "$0")/../env.sh"
mkdir -p "$OUT/lr-ab"
for lr in ${LRS:-1.5e-4 6e-4}; do
  distil --student "$OUT/distilled-top13-more/model" --data $FRESH \
    --trainable router,experts,shared --steps 40 --lr "$lr" --min-lr-ratio 1 \
    --checkpoint-every 1000 --seed 2 --out "$OUT/lr-ab/$lr" > "$OUT/lr-ab/$lr.json"
done
