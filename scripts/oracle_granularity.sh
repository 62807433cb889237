#!/usr/bin/env bash
# The oracle-routing bound against expert granularity (docs/results.md, "How much is routing,
# how much is the partition"): SmolLM2-135M-Instruct split by neuron importance at the same
# 62.5% of every FFN's neurons per token (77.8-78.9% of the activated parameters of the model with
# every expert, more as the routers grow with E), no training,
# each evaluated twice on the held-out text:
# - `--oracle K`: every token goes to the K routed parts with the largest outputs;
# - the uniform router it was converted with: every token gets the same K parts (the next most
#   important neurons), i.e. static pruning to the same size.
# A uniform router gives every chosen part weight 1 (renormalised top-k times the output scale
# K), so the oracle sums exactly the chosen neurons of the dense FFN.
#
#   scripts/oracle_granularity.sh [OUT_DIR]
#
# Each line of CONFIGS is "method experts shared top-k"; finished ones are skipped on a rerun.
# Knobs: CALIB_TOKENS (20000, for the neuron importances), EVAL_TOKENS (8192).
set -euo pipefail
. "$(dirname "$0")/env.sh"
OUT=${1:-$CACHE/recipes/oracle-sweep}
MODEL=${MODEL:-$SMOLLM2}
CALIB_TOKENS=${CALIB_TOKENS:-20000}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
CONFIGS=${CONFIGS:-"split-importance 8 4 1
split-importance 16 8 2
split-importance 32 16 4
split-importance 32 8 12
split-cluster 32 0 20
split-importance 64 32 8
split-importance 64 16 24
split-importance 128 32 48
split-importance 256 64 96
split-importance 256 32 128
split-importance 512 128 192"}
mkdir -p "$OUT"
cat "$DOC"/tutorial/*.rst.txt > "$OUT/tutorial.txt"

while read -r method e s k; do
    tag="$method-e$e-s$s-k$k"
    grep -q "\"$tag\"" "$OUT/results.jsonl" 2>/dev/null && continue
    "$BIN" convert "$MODEL" --method "$method" --experts "$e" --shared-experts "$s" --top-k "$k" \
        --router-init uniform --calib "$DOC/library" --calib-tokens "$CALIB_TOKENS" --seed 0 \
        --json --out "$OUT/m" > "$OUT/convert-$tag.json"
    for mode in oracle router; do
        if [ $mode = oracle ]; then extra=(--oracle "$k"); else extra=(); fi
        "$BIN" eval "$OUT/m" --text "$OUT/tutorial.txt" --max-tokens "$EVAL_TOKENS" --window 1024 \
            --json "${extra[@]}" | sed "s/^{/{\"run\":\"$tag\",\"routing\":\"$mode\",/" >> "$OUT/results.jsonl"
    done
    rm -rf "$OUT/m"
done <<< "$CONFIGS"
