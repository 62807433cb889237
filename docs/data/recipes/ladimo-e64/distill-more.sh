#!/usr/bin/env bash
# Second stage of the 64-part model: 400 more steps at its own top-26 (already the whole budget),
# half the peak learning rate, seed 1; ladimo-e32-fit/distill-top13-more.sh with this OUT and no
# policy. Output in OUT/distilled-top13-more. Rerun to resume.
set -euo pipefail
. "$(dirname "$0")/env.sh"
POLICY= exec "$(dirname "$0")/../ladimo-e32-fit/distill-top13-more.sh"
