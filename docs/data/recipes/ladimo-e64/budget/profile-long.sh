#!/usr/bin/env bash
# Profiles the long run's current model (distill-long.sh's OUT/budget/distilled-long/model, as
# the last `STEPS=N distill-long.sh` wrote it; trained under uniform top-25, 79.38% of dense)
# for 80% of the DENSE model, as run.sh profiled the layer-wise model: the budget leaves
# 837,158 parameters per token unused at top-25, room for a 26th part in up to 20 layers, and
# the knapsack proposes where; selection on 2,048 library/ tokens. Then evaluates the chosen
# policy on the 8,192 tutorial tokens. NAME names the result (default: "… profiled").
set -euo pipefail
. "$(dirname "$0")/../env.sh"
B=$OUT/budget
M=$B/distilled-long/model
"$BIN" profile "$M" --calib "$DOC/library" --calib-tokens 4096 --reference "$GGUF" \
    --target-active-params 0.8 --candidates-out "$B/long-candidates.json" --json \
    --out "$B/long-policy.json" > "$B/profile-long.out.json"
OUT=$B record "${NAME:-distilled-long, profiled policy (80% of dense)}" "$M" --policy "$B/long-policy.json" \
    --reference "$GGUF"
