# Paths shared by this folder's scripts (sourced, not run): those of ladimo-e32-fit, another OUT.
. "$(dirname "${BASH_SOURCE[0]}")/../ladimo-e32-fit/env.sh"
OUT=$HOME/.cache/moekit/recipes/ladimo-e64
