#!/usr/bin/env bash
# Fresh-text distillation of the 512-part model (run.sh) with the first stage's settings of the
# 32- and 64-part models (ladimo-e32-fit/distill.sh: 700 steps, lr 3e-4, router + experts +
# shared, library/), to compare with their evaluations step for step. Rerun to resume from
# OUT/distilled/checkpoints.
set -euo pipefail
. "$(dirname "$0")/env.sh"
STUDENT=$OUT/layerwise exec "$(dirname "$0")/../ladimo-e32-fit/distill.sh"
