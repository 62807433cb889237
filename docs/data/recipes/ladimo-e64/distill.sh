#!/usr/bin/env bash
# Fresh-text distillation of the 64-part model (run.sh), the same settings as the 32-part
# model's first stage (ladimo-e32-fit/distill.sh). Rerun to resume
# from OUT/distilled/checkpoints.
set -euo pipefail
. "$(dirname "$0")/env.sh"
"$BIN" distill --teacher "$GGUF" --student "$OUT/layerwise" \
    --data "$DOC/library" --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss kl:1 \
    --trainable router,experts,shared --steps 700 --lr 3e-4 --batch-size 4 --seq-len 256 \
    --eval-every 80 --checkpoint-every 20 --seed 0 --json --out "$OUT/distilled" > "$OUT/distill.json"
"$BIN" eval "$OUT/distilled/model" --text "$TEXT" --max-tokens 8192 --window 1024 --json \
    | sed 's/^{/{"name":"distilled 700 steps",/' >> "$OUT/results.jsonl"
