#!/usr/bin/env bash
# Fresh-text distillation of the 32-part model with fitted routers (rs1000-lr1e-3), the same
# settings as the 8-part model's 700-step run (ladimo-shared/distill-long.sh). Rerun to resume
# from DIST/checkpoints. STUDENT names another model to distil, POLICY a per-layer policy to
# train and evaluate under, DIST another output folder (default OUT/distilled).
set -euo pipefail
. "$(dirname "$0")/env.sh"
DIST=${DIST:-$OUT/distilled}
distil --student "${STUDENT:-$OUT/rs1000-lr1e-3}" ${POLICY:+--policy "$POLICY"} --data "$DOC/library" \
    --trainable router,experts,shared --steps 700 --lr 3e-4 --eval-every 80 --checkpoint-every 20 \
    --seed 0 --out "$DIST" > "$(dirname "$DIST")/distill.json"
record "distilled 700 steps${POLICY:+ under the policy}" "$DIST/model" \
    ${POLICY:+--policy "$DIST/model/policy.json"}
