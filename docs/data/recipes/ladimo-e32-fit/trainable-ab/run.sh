#!/usr/bin/env bash
# A/B: which parameters to train in a further distillation stage of the best model.
# 40 steps from the same start, same data order (seed 2), constant lr 1.5e-4 after warm-up.
set -euo pipefail
. "$(dirname "$0")/../env.sh"
M=$OUT/distilled-top13-more/model
for t in router,experts,shared router,experts,shared,attention,norms; do
  distil --student "$M" --policy "$OUT/top13.json" --data $FRESH --trainable $t --steps 40 \
    --lr 1.5e-4 --min-lr-ratio 1 --checkpoint-every 1000 --seed 2 --out "$OUT/ab/$t" \
    > "$OUT/ab/$t.json"
done
