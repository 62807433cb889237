#!/usr/bin/env bash
# 256 parts of 6 neurons (64 shared + top-96 of 192: 62.5% of each FFN), built like the 64-part
# model (../ladimo-e64/run.sh): router supervision, 100 layer-wise steps, 1,000 router-only
# steps; then evaluated with its own and oracle routing. The question: how close does a
# learned linear router get to the oracle when parts are this fine (untrained oracle 14.49,
# docs/data/oracle-granularity)? The linear routers (576 x 192 per layer) put the model at
# 80.30% of the dense one, just over the budget; a low-rank router would bring it under.
# Rerun to resume: `moekit convert` continues at the layer it stopped in (OUT/work is kept).
set -euo pipefail
. "$(dirname "$0")/env.sh"
mkdir -p "$OUT"
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts 256 --shared-experts 64 --top-k 96 \
    --router-init random --router-loss 1 --calib "$DOC/library" --calib-tokens 100000 \
    --layerwise-steps 100 --lr 3e-3 --router-steps 1000 --router-lr 1e-3 --seed 0 \
    --work-dir "$OUT/work" --keep-work --json --out "$OUT/layerwise" > "$OUT/layerwise.convert.json"
echo "layerwise convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
for routing in "" "--oracle 96"; do
    record "layerwise${routing:+ $routing}" "$OUT/layerwise" $routing --reference "$GGUF"
done
