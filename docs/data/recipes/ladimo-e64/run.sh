#!/usr/bin/env bash
# 64 parts (16 shared + top-26 of 48: 65.6% of each FFN, 79.8% of the parameters, the whole
# 80% budget from the start), built like ladimo-e32-fit's best model: router supervision,
# 100 layer-wise steps, 1,000 router-only steps. Then evaluated with its own and oracle routing.
set -euo pipefail
. "$(dirname "$0")/env.sh"
mkdir -p "$OUT"
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts 64 --shared-experts 16 --top-k 26 \
    --router-init random --router-loss 1 --calib "$DOC/library" --calib-tokens 100000 \
    --layerwise-steps 100 --lr 3e-3 --router-steps 1000 --router-lr 1e-3 --seed 0 \
    --work-dir "$OUT/work" --json --out "$OUT/layerwise" > "$OUT/layerwise.convert.json"
echo "layerwise convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
for routing in "" "--oracle 26"; do
    record "layerwise${routing:+ $routing}" "$OUT/layerwise" $routing
done
