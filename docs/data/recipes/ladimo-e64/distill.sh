#!/usr/bin/env bash
# Fresh-text distillation of the 64-part model (run.sh): ladimo-e32-fit/distill.sh, the 32-part
# model's first stage, with this model and OUT. Rerun to resume from OUT/distilled/checkpoints.
set -euo pipefail
. "$(dirname "$0")/env.sh"
STUDENT=$OUT/layerwise exec "$(dirname "$0")/../ladimo-e32-fit/distill.sh"
