//! Where `scripts/fetch-smollm2.sh` and the recipes keep their files (never inside the repo).

use std::path::PathBuf;

/// The cache folder: `$MOEKIT_CACHE`, else `~/.cache/moekit` (as the fetch script).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MOEKIT_CACHE").map_or_else(
        || {
            std::env::home_dir()
                .unwrap_or_default()
                .join(".cache/moekit")
        },
        PathBuf::from,
    )
}

/// The SmolLM2 GGUF: `$MOEKIT_SMOLLM2`, else where the fetch script puts it in [`cache_dir`].
pub fn smollm2_gguf() -> PathBuf {
    std::env::var_os("MOEKIT_SMOLLM2").map_or_else(
        || cache_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    )
}
