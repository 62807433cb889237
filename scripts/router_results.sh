#!/usr/bin/env bash
# Adaptive routing results (docs/results.md): held-out perplexity and speed against activated
# parameters, uniform top-k in every layer against the per-layer policy that `moekit profile`
# chooses for the same budget.
#
#   scripts/router_results.sh MOE_MODEL [OUT_DIR]
#
# MOE_MODEL is a converted model (e.g. `moekit convert ... --method split-coactivation
# --experts 8 --top-k 4 --layerwise-steps 100`). Calibration: python3.11-doc's library/
# sources; evaluation: the first EVAL_TOKENS tokens of tutorial/ (files concatenated in name
# order), in windows of 1024. For each k < E the uniform top-k model's activated fraction is
# the budget given to `moekit profile --target-active-params`. Environment knobs: EXPERTS (8),
# CALIB_TOKENS (8192), EVAL_TOKENS (8192), REUSE_UNIFORM (0).
set -euo pipefail
MODEL=$1
OUT=${2:-$HOME/.cache/moekit/router-results}
DOC=/usr/share/doc/python3.11/html/_sources
EXPERTS=${EXPERTS:-8}
CALIB_TOKENS=${CALIB_TOKENS:-8192}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/moekit}
mkdir -p "$OUT"
cat "$DOC"/tutorial/*.rst.txt > "$OUT/tutorial.txt"
: > "$OUT/profiled.jsonl"

evaluate() { # name args... -> one JSON line
    "$BIN" eval "$MODEL" --text "$OUT/tutorial.txt" --max-tokens "$EVAL_TOKENS" --window 1024 \
        --json "${@:2}" | sed "s/^{/{\"name\":\"$1\",/"
}
fraction() { python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["activated_fraction"])'; }

# REUSE_UNIFORM=1 keeps the uniform top-k results of an earlier run.
if [ "${REUSE_UNIFORM:-0}" != 1 ]; then
    : > "$OUT/uniform.jsonl"
    for k in $(seq 1 "$EXPERTS"); do
        evaluate "top-$k" --top-k "$k" | tee -a "$OUT/uniform.jsonl" > "$OUT/top-$k.json"
    done
fi
# The first run profiles, draws and measures every layer's candidates; later runs reuse them.
for k in $(seq 1 $((EXPERTS - 1))); do
    target=$(fraction < "$OUT/top-$k.json")
    if [ "$k" = 1 ]; then
        extra=(--plot "$OUT/routing.svg" --profile-out "$OUT/profile.json"
               --candidates-out "$OUT/candidates.json")
    else
        extra=(--candidates-in "$OUT/candidates.json")
    fi
    /usr/bin/time -f "%e" -o "$OUT/profile-$k.wall" "$BIN" profile "$MODEL" --calib "$DOC/library" \
        --calib-tokens "$CALIB_TOKENS" --target-active-params "$target" \
        --out "$OUT/policy-$k.json" "${extra[@]}" --json > "$OUT/profile-$k.json"
    evaluate "profiled-$k" --policy "$OUT/policy-$k.json" >> "$OUT/profiled.jsonl"
done
