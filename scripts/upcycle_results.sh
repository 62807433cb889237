#!/usr/bin/env bash
# Converts SmolLM2-135M-Instruct with every method and measures held-out perplexity before and
# after layer-wise construction (docs/results.md).
#
#   scripts/upcycle_results.sh [OUT_DIR]
#
# Calibration: python3.11-doc's library/ sources; evaluation: the first EVAL_TOKENS tokens of
# tutorial/ (all files concatenated in name order), read in windows of 1024. The activations
# are recorded once into OUT_DIR/work and reused by every conversion. Environment knobs:
# CALIB_TOKENS (100000), STEPS (layer-wise steps, 100), LR (3e-3), EVAL_TOKENS (8192),
# METHODS (space-separated, default all).
set -euo pipefail
. "$(dirname "$0")/env.sh"
OUT=${1:-$CACHE/results}
MODEL=${MODEL:-$SMOLLM2}
CALIB_TOKENS=${CALIB_TOKENS:-100000}
STEPS=${STEPS:-100}
LR=${LR:-3e-3}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
METHODS=${METHODS:-"upcycle split-random split-cluster split-coactivation split-importance pesc lora-experts"}
mkdir -p "$OUT"
cat "$DOC"/tutorial/*.rst.txt > "$OUT/tutorial.txt"

evaluate() { # name model
    "$BIN" eval "$2" --text "$OUT/tutorial.txt" --max-tokens "$EVAL_TOKENS" --window 1024 --json \
        | sed "s/^{/{\"name\":\"$1\",/" >> "$OUT/eval.jsonl"
}
convert() { # name steps args...
    local name=$1 steps=$2; shift 2
    wall_time "$OUT/$name.wall" "$BIN" convert "$MODEL" "$@" \
        --calib "$DOC/library" --calib-tokens "$CALIB_TOKENS" --layerwise-steps "$steps" --lr "$LR" \
        --work-dir "$OUT/work" --keep-work --json --out "$OUT/$name" > "$OUT/$name.json"
    evaluate "$name" "$OUT/$name"
}

[ -s "$OUT/eval.jsonl" ] || evaluate dense "$MODEL"
for m in $METHODS; do
    case $m in
        upcycle) convert upcycle 0 --method upcycle --experts 8 --top-k 2 ;;
        split-*)
            convert "$m-k8" 0 --method "$m" --experts 8 --top-k 8 --router-init uniform
            convert "$m" 0 --method "$m" --experts 8 --top-k 2
            convert "$m-lw" "$STEPS" --method "$m" --experts 8 --top-k 2 ;;
        pesc) convert pesc-lw "$STEPS" --method pesc --experts 8 --top-k 2 --bottleneck 64 ;;
        lora-experts) convert lora-experts-lw "$STEPS" --method lora-experts --experts 8 --top-k 2 --rank 16 ;;
    esac
    rm -rf "$OUT"/"$m"*/model.safetensors
done
