#!/usr/bin/env bash
# Equal combine weights as a model option (`--combine-temperature 1000`) instead of
# scale_gates.py, and the experts trained under them: the 512-part split of run.sh at top-198
# (79.90% of the dense model), experts = the dense neurons, factored routers fitted alone
# (1,000 router-only steps, as router-only.sh), then 100 refinement steps per block (experts and
# shared expert, router frozen, MSE against the dense FFN) under the fitted router's choice with
# equal weights. Reuses run.sh's recording in OUT/work. Evaluated with its own and oracle routing.
# PARTS, SHARED and TOP_K build another split the same way into OUT/flat-refine-PARTS
# (256 parts: 64 shared + top-100 of 192, 79.9% of the dense model; 128 parts: 32 shared + top-50
# of 96, 79.7%).
set -euo pipefail
. "$(dirname "$0")/env.sh"
PARTS=${PARTS:-512} SHARED=${SHARED:-128} TOP_K=${TOP_K:-198}
NAME=flat-refine$([ "$PARTS" = 512 ] || echo "-$PARTS")
start=$(date +%s)
"$BIN" convert "$GGUF" --method split-importance --experts "$PARTS" --shared-experts "$SHARED" \
    --top-k "$TOP_K" --router-rank 64 --router-init random --combine-temperature 1000 \
    --calib "$DOC/library" --calib-tokens 100000 --layerwise-steps 0 --router-steps 1000 \
    --router-lr 1e-3 --refine-steps 100 --lr 1e-3 --seed 0 --work-dir "$OUT/work" --keep-work \
    --json --out "$OUT/$NAME" > "$OUT/$NAME.convert.json"
echo "$NAME convert $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
for routing in "" "--oracle $TOP_K"; do
    record "$NAME${routing:+ $routing}" "$OUT/$NAME" $routing --reference "$GGUF"
done
