#!/usr/bin/env bash
# Kills `moekit convert --layerwise-steps` and `moekit distill` with SIGKILL at random moments,
# reruns the same command after each kill, and checks that the final model equals the one an
# uninterrupted run writes (every file, byte for byte) and that no finished layer or
# checkpointed step was computed twice.
#
#   scripts/kill_test.sh [KILLS]        # default 20 kills of each command
#
# The model is a random-weight checkpoint of SmolLM2-135M's shape cut to 2 layers
# (scripts/make_random_llama.py, cached in $MOEKIT_CACHE/kill); calibration and training text
# is python3.11-doc's library/. Needs the transformers venv of ../shared/anchors for numpy and
# the tokenizer export (TORCH_PY, as scripts/scale_bench.sh). Prints one line per command and
# exits non-zero on the first difference.
set -euo pipefail
source "$(dirname "$0")/env.sh"
PY=${TORCH_PY:-$CACHE/torch-venv/bin/python}
KILLS=${1:-20}
WORK=$CACHE/kill
mkdir -p "$WORK"
MODEL=$WORK/model
if [ ! -f "$MODEL/config.json" ]; then
    TOK=$CACHE/scale/tokenizer
    [ -f "$TOK/tokenizer.json" ] || { echo "error: run scripts/scale_bench.sh smollm2-135m once first (it exports the tokenizer)" >&2; exit 1; }
    "$PY" "$ROOT/scripts/make_random_llama.py" smollm2-135m "$MODEL" --tokenizer "$TOK" --layers 2 >/dev/null
fi

# run_killed NAME OUT REF COMMAND...: KILLS times, the command (output folder OUT) killed at a
# moment drawn uniformly within the uninterrupted run's wall time (so kills land in start-up,
# in mid-layer or mid-step, between them and while the output is written) and rerun; a run that
# ends before its kill is checked against REF and started afresh. Then the last one runs to the
# end. Log lines (MOEKIT_LOG=info) go to $WORK/NAME.log.
run_killed() {
    local name=$1 out=$2 ref=$3
    shift 3
    local log=$WORK/$name.log
    : >"$log"
    rm -rf "$out"
    local k=0 ms
    ms=$(cat "$WORK/$name.ms")
    while [ "$k" -lt "$KILLS" ]; do
        MOEKIT_LOG=info "$@" >/dev/null 2>>"$log" &
        local pid=$!
        local delay=$(((RANDOM * 32768 + RANDOM) % ms))
        sleep "$((delay / 1000)).$(printf '%03d' $((delay % 1000)))"
        if kill -9 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || true
            k=$((k + 1))
            echo "killed after ${delay} ms" >>"$log"
        else
            wait "$pid" || { echo "error: $name failed; see $log" >&2; exit 1; }
            same_files "$ref" "$out$SUB" || exit 1
            rm -rf "$out"
            echo "finished; started afresh" >>"$log"
        fi
    done
    MOEKIT_LOG=info "$@" >/dev/null 2>>"$log"
    echo "$k" >"$WORK/$name.kills"
}

# timed NAME COMMAND...: runs the command and keeps its wall time in ms in $WORK/NAME.ms.
timed() {
    local name=$1
    shift
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000)) >"$WORK/$name.ms"
}

same_files() { # A B: every file of the model folder A equals B's (work and lock files aside)
    (cd "$1" && find . -type f ! -path './.moekit*' | sort) >"$WORK/a.list"
    (cd "$2" && find . -type f ! -path './.moekit*' | sort) >"$WORK/b.list"
    diff "$WORK/a.list" "$WORK/b.list" >&2 || { echo "error: $1 and $2 hold other files" >&2; return 1; }
    while read -r f; do
        cmp -s "$1/$f" "$2/$f" || { echo "error: $f differs between $1 and $2" >&2; return 1; }
    done <"$WORK/a.list"
}

CONVERT=("$BIN" convert "$MODEL" --method split-importance --experts 4 --top-k 2 --calib "$DOC/library"
    --calib-tokens 512 --seq-len 128 --layerwise-steps 30)
SUB=
rm -rf "$WORK/convert-ref"
timed convert "${CONVERT[@]}" --out "$WORK/convert-ref"
run_killed convert "$WORK/convert-killed" "$WORK/convert-ref" "${CONVERT[@]}" --out "$WORK/convert-killed"
kills=$(cat "$WORK/convert.kills")
same_files "$WORK/convert-ref" "$WORK/convert-killed"
# Each layer is finished once per run, however often the run was killed.
python3 - "$WORK/convert.log" <<'PY'
import sys
runs = open(sys.argv[1]).read().split("finished; started afresh")
counts = [r.count("layer finished") for r in runs]
if any(c != 2 for c in counts):
    sys.exit(f"error: layers finished per run {counts} for 2 layers: a finished layer was computed again")
PY
echo "convert --layerwise-steps: $kills kills, the same model as an uninterrupted run, each layer finished once"

DISTILL=("$BIN" distill --teacher "$MODEL" --student "$WORK/convert-ref" --data "$DOC/library"
    --max-tokens 4096 --eval-tokens 128 --steps 12 --batch-size 2 --seq-len 64 --checkpoint-every 1)
SUB=/model
rm -rf "$WORK/distill-ref"
timed distill "${DISTILL[@]}" --out "$WORK/distill-ref"
run_killed distill "$WORK/distill-killed" "$WORK/distill-ref/model" "${DISTILL[@]}" --out "$WORK/distill-killed"
kills=$(cat "$WORK/distill.kills")
same_files "$WORK/distill-ref/model" "$WORK/distill-killed/model"
# No step at or before a saved checkpoint is trained again (within each run).
python3 - "$WORK/distill.log" <<'PY'
import re, sys
again = []
for run in open(sys.argv[1]).read().split("finished; started afresh"):
    saved = 0
    for line in run.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = re.search(r"checkpoint saved step=(\d+)", line)
        if m:
            saved = max(saved, int(m.group(1)))
        m = re.search(r": step step=(\d+)", line)
        if m and int(m.group(1)) <= saved:
            again.append(int(m.group(1)))
if again:
    sys.exit(f"error: checkpointed steps trained again: {again}")
PY
echo "distill --checkpoint-every 1: $kills kills, the same model as an uninterrupted run, no checkpointed step trained again"
