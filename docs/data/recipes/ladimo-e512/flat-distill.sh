#!/usr/bin/env bash
# Fresh-text distillation of flat-refine.sh's model (512 parts, top-198, equal combine weights:
# combine temperature 1000) with the first stage's settings of the 32-, 64- and 512-part runs
# (ladimo-e32-fit/distill.sh: 700 steps, lr 3e-4, router + experts + shared, library/), to
# compare with their evaluations step for step. At τ = 1000 the task loss reaches the router
# only through weights that differ from 1/k by ~1e-3, so it trains the experts under the
# router's choice. Rerun to resume from OUT/flat-distilled/checkpoints.
set -euo pipefail
. "$(dirname "$0")/env.sh"
STUDENT=$OUT/flat-refine DIST=$OUT/flat-distilled exec "$(dirname "$0")/../ladimo-e32-fit/distill.sh"
