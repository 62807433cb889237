#!/usr/bin/env bash
# Fresh-text distillation of the 32-part model with fitted routers (rs1000-lr1e-3), the same
# settings as the 8-part model's 700-step run (ladimo-shared/distill-long.sh). Rerun to resume
# from OUT/distilled/checkpoints. STUDENT names another model to distil.
set -euo pipefail
. "$(dirname "$0")/env.sh"
"$BIN" distill --teacher "$GGUF" --student "${STUDENT:-$OUT/rs1000-lr1e-3}" \
    --data "$DOC/library" --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss kl:1 \
    --trainable router,experts,shared --steps 700 --lr 3e-4 --batch-size 4 --seq-len 256 \
    --eval-every 80 --checkpoint-every 20 --seed 0 --json --out "$OUT/distilled" > "$OUT/distill.json"
"$BIN" eval "$OUT/distilled/model" --text "$TEXT" --max-tokens 8192 --window 1024 --json \
    | sed 's/^{/{"name":"distilled 700 steps",/' >> "$OUT/results.jsonl"
