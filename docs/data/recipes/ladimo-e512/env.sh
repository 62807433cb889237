# Paths shared by this folder's scripts (sourced, not run): those of ladimo-e32-fit, another OUT.
export MOEKIT_RECIPE_OUT=${MOEKIT_RECIPE_OUT:-$HOME/.cache/moekit/recipes/ladimo-e512}
. "$(dirname "${BASH_SOURCE[0]}")/../ladimo-e32-fit/env.sh"
