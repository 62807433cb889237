#!/usr/bin/env bash
# 256 parts of 6 neurons (64 shared + top-96 of 192: 62.5% of each FFN), built like the 64-part
# model by ../ladimo-e64/run.sh: router supervision, 100 layer-wise steps, 1,000 router-only
# steps; then evaluated with its own and oracle routing. The question: how close does a
# learned linear router get to the oracle when parts are this fine (untrained oracle 14.49,
# docs/data/oracle-granularity)? The linear routers (576 x 192 per layer) put the model at
# 80.30% of the dense one, just over the budget; a low-rank router would bring it under.
# Rerun to resume: `moekit convert` continues at the layer it stopped in (OUT/work is kept).
set -euo pipefail
. "$(dirname "$0")/env.sh"
PARTS=256 SHARED=64 TOP_K=96 KEEP_WORK=1 exec "$(dirname "$0")/../ladimo-e64/run.sh"
