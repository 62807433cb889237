#!/usr/bin/env bash
# Second stage: the 32-part model after distill.sh's 700 steps, distilled 400 more steps under
# top-13 in every layer (top13.json, 79.7% activated: the whole 80% budget), at half the peak
# learning rate and another data order (seed 1). Rerun to resume. MOEKIT_RECIPE_OUT names another
# model folder; POLICY set empty runs without top13.json (the model's own top-k); STUDENT and DIST
# name another model to start from and another output folder (summary in DIST.json).
set -euo pipefail
. "$(dirname "$0")/env.sh"
POLICY=${POLICY-$OUT/top13.json}
DIST=${DIST:-$OUT/distilled-top13-more}
distil --student "${STUDENT:-$OUT/distilled/model}" ${POLICY:+--policy "$POLICY"} --data "$DOC/library" \
    --trainable router,experts,shared --steps 400 --lr 1.5e-4 --eval-every 80 --checkpoint-every 20 \
    --seed 1 --out "$DIST" > "$DIST.json"
UNDER=${POLICY:+top-13}
record "distilled 700 steps, then 400 under ${UNDER:-its own top-k}" \
    "$DIST/model" ${POLICY:+--policy "$DIST/model/policy.json"}
