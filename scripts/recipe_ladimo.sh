#!/usr/bin/env bash
# LaDiMo on SmolLM2-135M-Instruct (docs/results.md, "Recipes"): split each FFN into 8 experts of
# co-activated neurons, build every MoE block layer-wise against its dense FFN, profile the
# routing and choose a per-layer policy at 80% activated parameters, then distil the routers
# and experts from the dense model under that policy. Every stage is evaluated on the same
# held-out text as the dense model.
#
#   scripts/recipe_ladimo.sh [OUT_DIR]
#
# Calibration and training text: python3.11-doc's library/ sources; evaluation: the first
# EVAL_TOKENS tokens of tutorial/ (files concatenated in name order), windows of 1024.
# Knobs: METHOD (split-coactivation), EXPERTS (8), SHARED (0, always-on shared parts; needs
# METHOD=split-importance), TOP_K (4, routed experts per token while constructing),
# ROUTER_INIT (random), ROUTER_LOSS (0, router supervision weight in layer-wise construction),
# CALIB_TOKENS (100000), TARGET (0.8), DISTILL_STEPS (40), DISTILL_LR (1e-4), DISTILL_LOSS
# (kl:1), DISTILL_POLICY (profiled, or none: distil under the model's own top-k),
# DISTILL_TOKENS (training tokens read from library/; default all of it), EVAL_EVERY
# (0: held-out evaluation before and after distillation only), SEED (0),
# MOE (an already converted model: skips the conversion).
#
# The shared-expert variant of docs/results.md ("LaDiMo with shared experts"):
#   METHOD=split-importance SHARED=4 TOP_K=1 ROUTER_LOSS=1 DISTILL_POLICY=none \
#       DISTILL_LR=3e-4 DISTILL_STEPS=320 DISTILL_TOKENS=100000 EVAL_EVERY=80 \
#       scripts/recipe_ladimo.sh OUT
# (DISTILL_TOKENS=100000 was `moekit distill`'s old default: the 320 steps pass 3.3 times over
# the same text; drop it to train on fresh text.)
set -euo pipefail
. "$(dirname "$0")/env.sh"
OUT=${1:-$CACHE/recipes/ladimo}
GGUF=$SMOLLM2
CALIB_TOKENS=${CALIB_TOKENS:-100000}
METHOD=${METHOD:-split-coactivation}
EXPERTS=${EXPERTS:-8}
SHARED=${SHARED:-0}
TOP_K=${TOP_K:-4}
ROUTER_INIT=${ROUTER_INIT:-random}
ROUTER_LOSS=${ROUTER_LOSS:-0}
DISTILL_LR=${DISTILL_LR:-1e-4}
DISTILL_LOSS=${DISTILL_LOSS:-kl:1}
EVAL_EVERY=${EVAL_EVERY:-0}
DISTILL_POLICY=${DISTILL_POLICY:-profiled}
DISTILL_TOKENS=${DISTILL_TOKENS:-}
TARGET=${TARGET:-0.8}
DISTILL_STEPS=${DISTILL_STEPS:-40}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
SEED=${SEED:-0}
mkdir -p "$OUT"
cat "$DOC"/tutorial/*.rst.txt > "$OUT/tutorial.txt"
evaluate() { # name model args... -> one JSON line in results.jsonl
    "$BIN" eval "$2" --text "$OUT/tutorial.txt" --max-tokens "$EVAL_TOKENS" --window 1024 \
        --json "${@:3}" | sed "s/^{/{\"stage\":\"$1\",/" | tee -a "$OUT/results.jsonl"
}
timed() { # name command... -> seconds appended to times.txt
    wall_time "$OUT/$1.wall" "${@:2}"
    echo "$1 $(cat "$OUT/$1.wall")" >> "$OUT/times.txt"
}
: > "$OUT/results.jsonl"
: > "$OUT/times.txt"

MOE=${MOE:-$OUT/moe}
if [ ! -e "$MOE/config.json" ]; then
    timed convert "$BIN" convert "$GGUF" --method "$METHOD" --experts "$EXPERTS" \
        --shared-experts "$SHARED" --top-k "$TOP_K" --router-init "$ROUTER_INIT" \
        --router-loss "$ROUTER_LOSS" --calib "$DOC/library" --calib-tokens "$CALIB_TOKENS" \
        --layerwise-steps 100 --lr 3e-3 --seed "$SEED" --json --out "$MOE" > "$OUT/convert.json"
fi
timed profile "$BIN" profile "$MOE" --calib "$DOC/library" --calib-tokens 8192 \
    --target-active-params "$TARGET" --plot "$OUT/routing.svg" --json \
    --out "$OUT/policy.json" > "$OUT/profile.json"
evaluate dense "$GGUF"
evaluate "layer-wise, top-$TOP_K" "$MOE"
evaluate "profiled policy" "$MOE" --policy "$OUT/policy.json"
# Distil under the profiled policy, or (DISTILL_POLICY=none) under the model's own top-k,
# whose activated fraction does not depend on the text (a top-p policy's does).
EXTRA=()
[ "$DISTILL_POLICY" = profiled ] && EXTRA=(--policy "$OUT/policy.json")
[ -n "$DISTILL_TOKENS" ] && EXTRA+=(--max-tokens "$DISTILL_TOKENS")
timed distill "$BIN" distill --teacher "$GGUF" --student "$MOE" "${EXTRA[@]}" \
    --data "$DOC/library" --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss "$DISTILL_LOSS" \
    --trainable "router,experts$([ "$SHARED" -gt 0 ] && echo ,shared)" --steps "$DISTILL_STEPS" \
    --lr "$DISTILL_LR" --batch-size 4 --seq-len 256 --eval-every "$EVAL_EVERY" \
    --seed "$SEED" --json --out "$OUT/distilled" > "$OUT/distill.json"
if [ "$DISTILL_POLICY" = profiled ]; then
    evaluate "profiled policy, distilled" "$OUT/distilled/model" --policy "$OUT/distilled/model/policy.json"
else
    evaluate "distilled, top-$TOP_K" "$OUT/distilled/model"
    evaluate "distilled, profiled policy" "$OUT/distilled/model" --policy "$OUT/policy.json"
fi
cat "$OUT/times.txt"
