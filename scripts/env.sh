# Paths and helpers shared by the results scripts (sourced, not run). Every path can be set
# from the environment:
#   MOEKIT_CACHE   cache folder (default ~/.cache/moekit; scripts/fetch-smollm2.sh uses it too)
#   MOEKIT_SMOLLM2 the SmolLM2 GGUF (default: where fetch-smollm2.sh puts it)
#   DOC            python3.11-doc's sources (apt-get install python3.11-doc)
#   BIN            the moekit CLI (default: this clone's `cargo build --release -p moekit-cli`
#                  when built, else `moekit` on the PATH, as `cargo install --path crates/cli`
#                  puts it)
CACHE=${MOEKIT_CACHE:-$HOME/.cache/moekit}
SMOLLM2=${MOEKIT_SMOLLM2:-$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
DOC=${DOC:-/usr/share/doc/python3.11/html/_sources}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${BIN:-}" ]; then
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/moekit
    [ -x "$BIN" ] || BIN=$(command -v moekit || echo "$BIN")
else
    BIN=$(command -v "$BIN" || echo "$BIN")
fi
[ -x "$BIN" ] || {
    echo "error: no moekit CLI at $BIN: run \`cargo install --path crates/cli\` or \`cargo build --release -p moekit-cli\`, or set BIN" >&2
    exit 1
}
[ -d "$DOC/library" ] || {
    echo "error: no python3.11-doc sources in $DOC: run \`apt-get install python3.11-doc\`, or set DOC" >&2
    exit 1
}

# Runs "$@" (after the file) and writes its wall time in seconds to the file $1 (as `/usr/bin/time -f %e -o`,
# without the separate `time` package).
wall_time() {
    local file=$1 start end
    shift
    start=$(date +%s%N)
    "$@"
    end=$(date +%s%N)
    printf '%d.%02d\n' $(((end - start) / 1000000000)) $(((end - start) / 10000000 % 100)) > "$file"
}
