#!/usr/bin/env bash
# Second stage: the 32-part model after distill.sh's 700 steps, distilled 400 more steps under
# top-13 in every layer (top13.json, 79.7% activated: the whole 80% budget), at half the peak
# learning rate and another data order (seed 1). Rerun to resume. MOEKIT_RECIPE_OUT names another
# model folder; POLICY set empty runs without top13.json (the model's own top-k).
set -euo pipefail
. "$(dirname "$0")/env.sh"
POLICY=${POLICY-$OUT/top13.json}
"$BIN" distill --teacher "$GGUF" --student "$OUT/distilled/model" ${POLICY:+--policy "$POLICY"} \
    --data "$DOC/library" --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss kl:1 \
    --trainable router,experts,shared --steps 400 --lr 1.5e-4 --batch-size 4 --seq-len 256 \
    --eval-every 80 --checkpoint-every 20 --seed 1 --json --out "$OUT/distilled-top13-more" \
    > "$OUT/distill-top13-more.json"
"$BIN" eval "$OUT/distilled-top13-more/model" --text "$TEXT" --max-tokens 8192 --window 1024 \
    ${POLICY:+--policy "$OUT/distilled-top13-more/model/policy.json"} --json \
    | sed "s/^{/{\"name\":\"distilled 700 steps, then 400 under ${POLICY:+top-13}${POLICY:-its own top-k}\",/" \
    >> "$OUT/results.jsonl"
