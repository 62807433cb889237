#!/usr/bin/env bash
# The 512-part split of run.sh without block training: the experts stay the dense FFN's
# neurons, and only the factored routers are fitted to the oracle (1,000 router-only steps per
# layer, lr 1e-3, on run.sh's recording in OUT/work). Does the layer-wise MSE under the router's
# combine weights cost more than it gains at 3-neuron parts? Evaluated within the budget
# (top-198) with its own and oracle routing.
set -euo pipefail
. "$(dirname "$0")/env.sh"
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts 512 --shared-experts 128 \
    --top-k 199 --router-rank 64 --router-init random --calib "$DOC/library" \
    --calib-tokens 100000 --layerwise-steps 0 --router-steps 1000 --router-lr 1e-3 \
    --seed 0 --work-dir "$OUT/work" --keep-work --json --out "$OUT/router-only" \
    > "$OUT/router-only.convert.json"
echo "router-only convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
for routing in "--top-k 198" "--oracle 198"; do
    record "router-only $routing" "$OUT/router-only" $routing --reference "$GGUF"
done
