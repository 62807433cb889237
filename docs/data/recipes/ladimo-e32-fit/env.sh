# Paths shared by this folder's scripts (sourced, not run). MOEKIT_RECIPE_OUT moves the outputs
# (ladimo-e64 reuses these scripts that way).
OUT=${MOEKIT_RECIPE_OUT:-$HOME/.cache/moekit/recipes/ladimo-e32-fit}
BIN=$HOME/.cache/moekit/target/release/moekit
DOC=/usr/share/doc/python3.11/html/_sources
GGUF=$HOME/.cache/moekit/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=$HOME/.cache/moekit/recipes/ladimo-shared/tutorial.txt
