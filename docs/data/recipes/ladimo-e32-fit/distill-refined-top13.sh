#!/usr/bin/env bash
# Next: distil the refined 32-part model (rs1000-lr1e-3-refine50) under top-13 in every layer
# (79.7% activated), the settings of distill.sh otherwise. Rerun to resume.
set -euo pipefail
OUT=$HOME/.cache/moekit/recipes/ladimo-e32-fit
BIN=$HOME/.cache/moekit/target/release/moekit
DOC=/usr/share/doc/python3.11/html/_sources
GGUF=$HOME/.cache/moekit/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=$HOME/.cache/moekit/recipes/ladimo-shared/tutorial.txt
"$BIN" distill --teacher "$GGUF" --student "$OUT/rs1000-lr1e-3-refine50" --policy "$OUT/top13.json" \
    --data "$DOC/library" --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss kl:1 \
    --trainable router,experts,shared --steps 700 --lr 3e-4 --batch-size 4 --seq-len 256 \
    --eval-every 80 --checkpoint-every 20 --seed 0 --json --out "$OUT/distilled-refined-top13" > "$OUT/distill-refined-top13.json"
"$BIN" eval "$OUT/distilled-refined-top13/model" --text "$TEXT" --max-tokens 8192 --window 1024 \
    --policy "$OUT/distilled-refined-top13/model/policy.json" --json \
    | sed 's/^{/{"name":"refined, distilled 700 steps under top-13",/' >> "$OUT/results.jsonl"
