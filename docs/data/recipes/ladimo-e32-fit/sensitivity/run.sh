#!/usr/bin/env bash
# Per-layer sensitivity of the best model (30 layers, 24 routed parts): one layer at top-K,
# the others at top-13.
set -euo pipefail
. "$(dirname "$0")/../env.sh"
M=$OUT/distilled-top13-more/model
S=$OUT/sens
mkdir -p "$S"
pol() { # $1 layer (-1: none), $2 k there, $3 default k
  python3 -c "import json,sys; l,k,d=map(int,sys.argv[1:]); print(json.dumps({'layers':[{'layer':i,'rule':'top-k','k':(k if i==l else d)} for i in range(30)]}))" "$@"
}
ev() { # name policy-file
  "$BIN" eval "$M" --text "$TEXT" --max-tokens 4096 --window 1024 --policy "$2" --json \
   | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'name':sys.argv[1],'nll':r['nll'],'ppl':r['perplexity'],'act':r['activated_fraction']}))" "$1" >> $S/results.jsonl
}
for spec in "base -1 13 13" "all24 -1 13 24" "all12 -1 13 12"; do
  set -- $spec; pol $2 $3 $4 > $S/p.json; ev $1 $S/p.json
done
for l in $(seq 0 29); do pol $l 24 13 > $S/p.json; ev "L$l-k24" $S/p.json; done
for l in $(seq 0 29); do pol $l 8 13 > $S/p.json; ev "L$l-k8" $S/p.json; done
