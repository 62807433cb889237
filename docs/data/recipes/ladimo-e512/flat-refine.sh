#!/usr/bin/env bash
# Equal combine weights as a model option (`--combine-temperature 1000`) instead of
# scale_gates.py, and the experts trained under them: the 512-part split of run.sh at top-198
# (79.90% of the dense model), experts = the dense neurons, factored routers fitted alone
# (1,000 router-only steps, as router-only.sh), then 100 refinement steps per block (experts and
# shared expert, router frozen, MSE against the dense FFN) under the fitted router's choice with
# equal weights. Reuses run.sh's recording in OUT/work. Evaluated with its own and oracle routing.
set -euo pipefail
. "$(dirname "$0")/env.sh"
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts 512 --shared-experts 128 \
    --top-k 198 --router-rank 64 --router-init random --combine-temperature 1000 \
    --calib "$DOC/library" --calib-tokens 100000 --layerwise-steps 0 --router-steps 1000 \
    --router-lr 1e-3 --refine-steps 100 --lr 1e-3 --seed 0 --work-dir "$OUT/work" --keep-work \
    --json --out "$OUT/flat-refine" > "$OUT/flat-refine.convert.json"
echo "flat-refine convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
for routing in "" "--oracle 198"; do
    record "flat-refine${routing:+ $routing}" "$OUT/flat-refine" $routing --reference "$GGUF"
done
