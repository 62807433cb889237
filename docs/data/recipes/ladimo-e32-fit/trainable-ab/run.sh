#!/usr/bin/env bash
# A/B: which parameters to train in a further distillation stage of the best model.
# 40 steps from the same start, same data order (seed 2), constant lr 1.5e-4 after warm-up.
set -euo pipefail
. "$(dirname "$0")/../env.sh"
M=$OUT/distilled-top13-more/model
DATA=$(ls -d $DOC/*/ | grep -v -e tutorial -e includes)
for t in router,experts,shared router,experts,shared,attention,norms; do
  "$BIN" distill --teacher "$GGUF" --student "$M" --policy "$OUT/top13.json" \
    --data $DATA --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss kl:1 \
    --trainable $t --steps 40 --lr 1.5e-4 --min-lr-ratio 1 --batch-size 4 --seq-len 256 \
    --checkpoint-every 1000 --seed 2 --json --out "$OUT/ab/$t" > "$OUT/ab/$t.json"
done
