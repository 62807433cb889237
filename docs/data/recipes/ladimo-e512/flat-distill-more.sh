#!/usr/bin/env bash
# Second stage of the equal-weight 512-part model (flat-distill.sh's 700 steps): 400 more steps
# at its own top-198, half the peak learning rate, seed 1 (ladimo-e32-fit/distill-top13-more.sh
# with this OUT, no policy), output in OUT/flat-distilled-more. Evaluated with its own and oracle
# routing. Rerun to resume.
set -euo pipefail
. "$(dirname "$0")/env.sh"
POLICY= STUDENT=$OUT/flat-distilled/model DIST=$OUT/flat-distilled-more \
    "$(dirname "$0")/../ladimo-e32-fit/distill-top13-more.sh"
record "distilled 700 steps, then 400 more --oracle 198" "$OUT/flat-distilled-more/model" \
    --oracle 198 --reference "$GGUF"
