#!/usr/bin/env bash
# Per-layer top-k policy (no top-p: its activated fraction depends on the text) for the
# 700-step distilled model at the 80% budget, then the 8,192-token eval under it.
set -euo pipefail
OUT=$HOME/.cache/moekit/recipes/ladimo-shared/topk-policy
M=$HOME/.cache/moekit/recipes/ladimo-shared/distilled-long/model
BIN=$HOME/.cache/moekit/target/release/moekit
DOC=/usr/share/doc/python3.11/html/_sources
TEXT=$HOME/.cache/moekit/recipes/ladimo-shared/tutorial.txt
while pgrep -f "run.sh 1000" > /dev/null; do sleep 20; done
start=$(date +%s)
"$BIN" profile "$M" --calib "$DOC/library" --calib-tokens 8192 --target-active-params 0.8 \
    --top-p 1.0 --json --profile-out "$OUT/profile.json" --out "$OUT/policy.json" > "$OUT/profile-summary.json"
echo "profile $(( $(date +%s) - start )) s" >> "$OUT/times.txt"
"$BIN" eval "$M" --text "$TEXT" --max-tokens 8192 --window 1024 --policy "$OUT/policy.json" --json > "$OUT/eval.json"
echo "eval done" >> "$OUT/times.txt"
