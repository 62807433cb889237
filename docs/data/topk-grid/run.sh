#!/usr/bin/env bash
# `moekit profile` on the 512-part model (384 routed experts of 3 neurons, top-198; the
# flat-distilled model of ladimo-e512/flat-distill.sh) with the default grid of 64 top-k rules
# per layer and with every k (--top-k-rules 384): time, and whether the chosen policies differ.
# RULES="64" runs one of them. Small calibration (1,024 library/ tokens, 512 for selection):
# every k takes ~40 minutes on 2 cores even so. Output in $CACHE/topk-grid (OUT).
set -euo pipefail
. "$(dirname "$0")/../../../scripts/env.sh"
M=${M:-$CACHE/recipes/ladimo-e512/flat-distilled/model}
OUT=${OUT:-$CACHE/topk-grid}
mkdir -p "$OUT"
for rules in ${RULES:-64 384}; do
    wall_time "$OUT/rules-$rules.seconds" "$BIN" profile "$M" --calib "$DOC/library" \
        --calib-tokens 1024 --seq-len 512 --select-tokens 512 --reference "$SMOLLM2" \
        --target-active-params 0.8 --top-k-rules $rules --candidates-out "$OUT/candidates-$rules.json" \
        --json --out "$OUT/policy-$rules.json" > "$OUT/rules-$rules.json"
done
