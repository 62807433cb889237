#!/usr/bin/env bash
# The two routing probes of docs/results.md ("Can a small router learn the choice?") on layers
# 10 and 25 of router-only.sh's model and run.sh's recording (OUT/work); writes recall.txt and
# selection.txt here. 1,755,000 = the FFN parameters per token and layer that keep the model
# within 80% of the dense one's activated parameters.
set -euo pipefail
. "$(dirname "$0")/../env.sh"
cd "$(dirname "$0")"
probe() { cargo run -q --release --example probe_routing -- "$@"; }
: > recall.txt; : > selection.txt
probe recall "$OUT/router-only" "$OUT/work" 10 198 \
    lin:64:ce:1e-3,lin:64:bce:1e-3,lin:64:lognorm:1e-3,lin:384:ce:1e-3,mlp:64:ce:1e-3,mlp:256:lognorm:1e-3 >> recall.txt
probe recall "$OUT/router-only" "$OUT/work" 25 198 lin:64:ce:1e-3,lin:384:ce:1e-3,mlp:256:lognorm:1e-3 >> recall.txt
for layer in 10 25; do
    probe selection "$GGUF" "$OUT/work" $layer 1755000 64,128 "$OUT/router-only" >> selection.txt
done
