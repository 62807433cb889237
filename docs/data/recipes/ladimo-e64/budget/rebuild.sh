#!/usr/bin/env bash
# Every stage of the within-budget 64-part model in order, each skipped once its output exists
# and resumed from its checkpoints or work directory when it was interrupted, so that one
# command, rerun in every session, carries the chain forward on a machine that is kept and
# starts it again on a new one (whose ~/.cache holds none of it): the layer-wise conversion
# (../run.sh, ~50 min), the first distillation under top-25 (./run.sh STAGE=distill: 700
# steps, lr 3e-4 cosine), then the long constant-rate run (./distill-long.sh, resumed from its
# newest checkpoint). The policy is the committed policy.json (uniform top-25, which
# `./run.sh STAGE=profile` chose) instead of profiling again. NICE (default 10) lowers the
# chain's priority so that builds and tests sharing the cores go first. A model folder counts
# as done when its config.json exists: `save_pretrained` writes it last, after the weights.
set -euo pipefail
here=$(dirname "$0")
. "$here/../env.sh"
B=$OUT/budget
mkdir -p "$B"
run() { nice -n "${NICE:-10}" "$@"; }
[ -s "$OUT/layerwise/config.json" ] || run "$here/../run.sh"
[ -s "$B/policy.json" ] || cp "$here/policy.json" "$B/policy.json"
[ -s "$B/distilled/model/config.json" ] || STAGE=distill run "$here/run.sh"
run "$here/distill-long.sh"
