#!/usr/bin/env bash
# Fresh-text distillation of the 32-part model with fitted routers (rs1000-lr1e-3), the same
# settings as the 8-part model's 700-step run (ladimo-shared/distill-long.sh). Rerun to resume
# from OUT/distilled/checkpoints. STUDENT names another model to distil.
set -euo pipefail
. "$(dirname "$0")/env.sh"
distil --student "${STUDENT:-$OUT/rs1000-lr1e-3}" --data "$DOC/library" \
    --trainable router,experts,shared --steps 700 --lr 3e-4 --eval-every 80 --checkpoint-every 20 \
    --seed 0 --out "$OUT/distilled" > "$OUT/distill.json"
record "distilled 700 steps" "$OUT/distilled/model"
