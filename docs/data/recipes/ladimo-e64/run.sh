#!/usr/bin/env bash
# 64 parts (16 shared + top-26 of 48: 65.6% of each FFN, 79.8% of the parameters, the whole
# 80% budget from the start), built like ladimo-e32-fit's best model: router supervision,
# 100 layer-wise steps, 1,000 router-only steps. Then evaluated with its own and oracle routing.
# PARTS, SHARED and TOP_K build another split the same way, ROUTER_RANK factors its routers
# (../ladimo-e512/run.sh), KEEP_WORK=1 keeps OUT/work (the recording and trained blocks) after
# success.
set -euo pipefail
. "$(dirname "$0")/env.sh"
PARTS=${PARTS:-64} SHARED=${SHARED:-16} TOP_K=${TOP_K:-26}
mkdir -p "$OUT"
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts "$PARTS" --shared-experts "$SHARED" \
    --top-k "$TOP_K" ${ROUTER_RANK:+--router-rank "$ROUTER_RANK"} --router-init random --router-loss 1 --calib "$DOC/library" \
    --calib-tokens 100000 --layerwise-steps 100 --lr 3e-3 --router-steps 1000 --router-lr 1e-3 \
    --seed 0 --work-dir "$OUT/work" ${KEEP_WORK:+--keep-work} --json --out "$OUT/layerwise" \
    > "$OUT/layerwise.convert.json"
echo "layerwise convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
for routing in "" "--oracle $TOP_K"; do
    record "layerwise${routing:+ $routing}" "$OUT/layerwise" $routing --reference "$GGUF"
done
