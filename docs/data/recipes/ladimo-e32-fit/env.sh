# Paths shared by this folder's scripts (sourced, not run). MOEKIT_RECIPE_OUT moves the outputs
# (ladimo-e64 reuses these scripts that way).
OUT=${MOEKIT_RECIPE_OUT:-$HOME/.cache/moekit/recipes/ladimo-e32-fit}
BIN=$HOME/.cache/moekit/target/release/moekit
DOC=/usr/share/doc/python3.11/html/_sources
GGUF=$HOME/.cache/moekit/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=$HOME/.cache/moekit/recipes/ladimo-shared/tutorial.txt
# Made here when missing (a new machine): tutorial/'s files concatenated in name order.
[ -s "$TEXT" ] || { mkdir -p "$(dirname "$TEXT")" && cat "$DOC"/tutorial/*.rst.txt > "$TEXT"; }
# All of python3.11-doc but the held-out tutorial/ (and the 267-byte includes/): fresh text.
FRESH=$(ls -d "$DOC"/*/ | grep -v -e tutorial -e includes)

# moekit distill with what every stage here shares: the teacher, held-out evaluation on 4,096
# tutorial/ tokens, the KL loss, batches of 4 x 256 tokens, JSON events; the rest from "$@".
distil() {
    "$BIN" distill --teacher "$GGUF" --eval-data "$DOC/tutorial" --eval-tokens 4096 --loss kl:1 \
        --batch-size 4 --seq-len 256 --json "$@"
}

# Evaluates MODEL on the 8,192 tutorial tokens in windows of 1,024 and appends the result, named
# NAME (no double quotes or backslashes), to OUT/results.jsonl. Usage: record NAME MODEL [eval options...]
record() {
    local name model=$2
    name=$(printf '%s' "$1" | sed 's/[\/&]/\\&/g')
    shift 2
    "$BIN" eval "$model" --text "$TEXT" --max-tokens 8192 --window 1024 "$@" --json \
        | sed "s/^{/{\"name\":\"$name\",/" >> "$OUT/results.jsonl"
}
