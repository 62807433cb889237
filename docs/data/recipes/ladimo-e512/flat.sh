#!/usr/bin/env bash
# The router-only model (router-only.sh: experts = the dense neurons, routers fitted) with its
# gates scaled by 1e-3 (scale_gates.py): the same choices, combined with equal weights. Evaluated
# within the budget (top-198) with its own and oracle routing.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python3 "$(dirname "$0")/scale_gates.py" "$OUT/router-only" "$OUT/router-only-flat" 1e-3
for routing in "--top-k 198" "--oracle 198"; do
    record "router-only, gates x 1e-3 $routing" "$OUT/router-only-flat" $routing --reference "$GGUF"
done
