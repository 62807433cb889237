#!/usr/bin/env bash
# Long, open-ended distillation of the within-budget 64-part model (top-25, 79.38% of the dense
# model; run.sh's STAGE=distill, 700 steps) at a constant peak rate of 1.5e-4 (50 warm-up steps,
# --min-lr-ratio 1: the schedule does not depend on --steps, so the run can stop anywhere and be
# resumed with any --steps), on all of python3.11-doc but tutorial/, seed 3, held-out evaluation
# every 200 steps. It measures how the held-out KL goes on falling (extrapolate.py's two fits)
# within the budget; ~12 s a step on 2 cores, so it runs over sessions: rerun to resume from
# OUT/budget/distilled-long/checkpoints (every 20 steps). STEPS overrides the 6,000 steps.
set -euo pipefail
. "$(dirname "$0")/../env.sh"
B=$OUT/budget
distil --student "$B/distilled/model" --policy "$B/distilled/model/policy.json" --data $FRESH \
    --trainable router,experts,shared --steps "${STEPS:-6000}" --lr 1.5e-4 --warmup-steps 50 \
    --min-lr-ratio 1 --eval-every 200 --checkpoint-every 20 --seed 3 --out "$B/distilled-long" \
    > "$B/distill-long-${STEPS:-6000}.json"
OUT=$B record "distilled 700 steps, then ${STEPS:-6000} at constant lr" "$B/distilled-long/model" \
    --policy "$B/distilled-long/model/policy.json"
