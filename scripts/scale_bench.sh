#!/usr/bin/env bash
# Time and peak memory of moekit's layer-at-a-time pipelines at the sizes people convert.
#
#   scripts/scale_bench.sh [SHAPE...]     # default: all four shapes, then the 8B width at 8/16 layers
#   CASES="eval convert profile" scripts/scale_bench.sh ...   # only these cases (default: all;
#       eval-converted and profile read convert's output, so they need convert; convert-layerwise
#       trains 10 steps of 2,048 rows per layer, ~2 minutes a layer at 8B; transformers-eval-converted
#       loads the export in f32, so it is for shapes up to 3B)
#
# For each shape (smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, and qwen3-0.6b, not in
# the default list, which converts without shared experts into Qwen3-MoE; `NAME:LAYERS` cuts a
# shape to LAYERS layers) a random-weight bf16 checkpoint is made once by
# scripts/make_random_llama.py and cached in $MOEKIT_CACHE/scale/. Then, each through
# scripts/peak_rss.py (wall time and the kernel's peak resident set):
#   info; eval --max-tokens 512; convert --method split-importance --experts 16
#   --shared-experts 2 --top-k 4 on 2,048 calibration tokens; the same with
#   --layerwise-steps 10; eval of the converted model (the export, as transformers would load
#   it); profile for a 75% budget on 512 tokens; and transformers' eval of the same 512 tokens
#   in bf16 (its f32 weights of the larger shapes do not fit in memory).
# One JSON line per case goes to $MOEKIT_CACHE/scale/results.jsonl (appended) and to stdout.
# Needs the transformers venv of ../shared/anchors (TORCH_PY, default
# $MOEKIT_CACHE/torch-venv/bin/python) for numpy, the tokenizer export and the comparison.
set -euo pipefail
source "$(dirname "$0")/env.sh"
PY=${TORCH_PY:-$CACHE/torch-venv/bin/python}
[ -x "$PY" ] || { echo "error: no python with numpy/transformers at $PY: see ../shared/anchors/README.md, or set TORCH_PY" >&2; exit 1; }
SCALE=$CACHE/scale
mkdir -p "$SCALE"
RESULTS=$SCALE/results.jsonl
EVAL_TEXT=$DOC/tutorial/introduction.rst.txt
CALIB=$DOC/library
SHAPES=("$@")
[ ${#SHAPES[@]} -gt 0 ] || SHAPES=(smollm2-135m llama-3.2-1b llama-3.2-3b llama-3.1-8b llama-3.1-8b:8 llama-3.1-8b:16)

# The tokenizer: SmolLM2's (49,152 ids, below every shape's vocabulary), exported by transformers.
TOK=$SCALE/tokenizer
if [ ! -f "$TOK/tokenizer.json" ]; then
    "$PY" - "$SMOLLM2" "$TOK" <<'PY'
import os, sys
from transformers import AutoTokenizer
d, f = os.path.split(os.path.abspath(sys.argv[1]))
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(sys.argv[2])
PY
fi

ALL="info eval convert eval-converted profile convert-layerwise transformers-eval transformers-eval-converted"
GIVEN=${CASES:-}
CASES=${CASES:-$ALL}
for c in $CASES; do
    [[ " $ALL " == *" $c "* ]] || { echo "error: unknown case $c (cases: $ALL)" >&2; exit 1; }
done
if [[ " $CASES " =~ " "(eval-converted|profile|transformers-eval-converted)" " ]] && [[ " $CASES " != *" convert "* ]]; then
    echo "error: eval-converted, profile and transformers-eval-converted read convert's output: add convert to CASES" >&2
    exit 1
fi

measure() { # LABEL COMMAND...: one JSON line, with the shape (only the cases in CASES)
    local label=$1
    shift
    [[ " $CASES " == *" $label "* ]] || return 0
    # By default, the export is loaded in f32 only where its f32 weights fit.
    [[ -z $GIVEN && $label == transformers-eval-converted && $SHAPE =~ 3b|8b ]] && return 0
    python3 "$ROOT/scripts/peak_rss.py" "$label" "$@" 2>>"$SCALE/log.txt" |
        sed "s/^{/{\"shape\": \"$NAME\", /" | tee -a "$RESULTS" || true
}

for SPEC in "${SHAPES[@]}"; do
    SHAPE=${SPEC%%:*}
    LAYERS=${SPEC#*:}
    [ "$LAYERS" = "$SPEC" ] && LAYERS=
    NAME=$SHAPE${LAYERS:+-${LAYERS}l}
    MODEL=$SCALE/$NAME
    echo "== $NAME" >&2
    "$PY" "$ROOT/scripts/make_random_llama.py" "$SHAPE" "$MODEL" --tokenizer "$TOK" ${LAYERS:+--layers $LAYERS} >/dev/null
    OUT=$SCALE/out-$NAME
    # Qwen3 converts into Qwen3-MoE, which has no shared expert.
    SHARED=2
    [[ $SHAPE == qwen3* ]] && SHARED=0
    rm -rf "$OUT" "$OUT-lw"
    measure info "$BIN" info "$MODEL"
    measure eval "$BIN" eval "$MODEL" --text "$EVAL_TEXT" --max-tokens 512 --json
    measure convert "$BIN" convert "$MODEL" --method split-importance --experts 16 --shared-experts $SHARED \
        --top-k 4 --calib "$CALIB" --calib-tokens 2048 --dtype bf16 --json --out "$OUT"
    measure eval-converted "$BIN" eval "$OUT" --text "$EVAL_TEXT" --max-tokens 512 --json
    measure profile "$BIN" profile "$OUT" --calib "$CALIB" --calib-tokens 512 --select-tokens 512 --target-active-params 0.75 \
        --reference "$MODEL" --out "$SCALE/policy-$NAME.json"
    measure convert-layerwise "$BIN" convert "$MODEL" --method split-importance --experts 16 --shared-experts $SHARED \
        --top-k 4 --calib "$CALIB" --calib-tokens 2048 --layerwise-steps 10 --dtype bf16 --json --out "$OUT-lw"
    measure transformers-eval "$PY" "$ROOT/scripts/hf_reference.py" "$MODEL" --text "$EVAL_TEXT" \
        --max-tokens 512 --dtype bfloat16
    # The export as transformers loads it, in f32 as moekit computes (its perplexity beside
    # eval-converted's in log.txt; not in the default CASES for the 3B and 8B shapes, whose f32
    # weights do not fit).
    measure transformers-eval-converted "$PY" "$ROOT/scripts/hf_reference.py" "$OUT" --text "$EVAL_TEXT" \
        --max-tokens 512
    rm -rf "$OUT" "$OUT-lw"
done

# The table of docs/performance.md: the last result of each shape and case.
python3 - "$RESULTS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["shape"], r["case"])] = r
shapes = list(dict.fromkeys(s for s, _ in rows))
cases = list(dict.fromkeys(c for _, c in rows))
print("| case | " + " | ".join(shapes) + " |")
print("|---|" + "---:|" * len(shapes))
for c in cases:
    cells = []
    for s in shapes:
        r = rows.get((s, c))
        if r is None:
            cells.append("")
        elif r["rc"] != 0:
            cells.append(f"refused ({r['seconds']:.1f} s)")
        else:
            cells.append(f"{r['seconds']:.1f} s, {r['peak_rss_mib'] / 1024:.2f} GiB")
    print(f"| {c} | " + " | ".join(cells) + " |")
PY
