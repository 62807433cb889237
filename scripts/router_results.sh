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
# order), in windows of 1024. The budgets given to `moekit profile --target-active-params` are
# the uniform top-k models' activated fractions (k < E) and the midpoints between them.
# Environment knobs: EXPERTS (8),
# CALIB_TOKENS (8192), EVAL_TOKENS (8192), REUSE_UNIFORM (0), MAX_K (E − 1: budgets up to
# uniform top-MAX_K).
set -euo pipefail
. "$(dirname "$0")/env.sh"
MODEL=$1
OUT=${2:-$CACHE/router-results}
EXPERTS=${EXPERTS:-8}
CALIB_TOKENS=${CALIB_TOKENS:-8192}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
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
# Budgets: each uniform top-k's activated fraction (k < E), and the midpoint between
# consecutive ones (where no uniform top-k exists: uniform top-k must round down).
budgets() {
    python3 - "$OUT" "$EXPERTS" "${MAX_K:-$((EXPERTS - 1))}" <<'PY'
import json, sys
out, e, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = [json.loads(open(f"{out}/top-{k}.json").readline())["activated_fraction"] for k in range(1, e + 1)]
for k in range(1, min(top, e - 1) + 1):
    print(f"{k} {f[k - 1]}")
    print(f"{k}.5 {(f[k - 1] + f[k]) / 2}")
PY
}
# The first run profiles, draws and measures every layer's candidates; later runs reuse them.
first=1
budgets | while read -r label target; do
    if [ "$first" = 1 ]; then
        extra=(--plot "$OUT/routing.svg" --profile-out "$OUT/profile.json"
               --candidates-out "$OUT/candidates.json")
        first=0
    else
        extra=(--candidates-in "$OUT/candidates.json")
    fi
    wall_time "$OUT/profile-$label.wall" "$BIN" profile "$MODEL" \
        --calib "$DOC/library" --calib-tokens "$CALIB_TOKENS" --target-active-params "$target" \
        --out "$OUT/policy-$label.json" "${extra[@]}" --json > "$OUT/profile-$label.json" < /dev/null
    evaluate "profiled-$label" --policy "$OUT/policy-$label.json" >> "$OUT/profiled.jsonl" < /dev/null
done
