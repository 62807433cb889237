//! Commands that hold a whole model in memory (distill, generate) compare what they need with
//! what the machine can give before they load anything, instead of dying in the OOM killer.

use std::path::Path;

use moekit::llama::Checkpoint;

use crate::error::CliError;

/// Memory the system can still give without swapping (`MemAvailable` of `/proc/meminfo`), or
/// `None` where that cannot be read.
fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parameters of the checkpoint at `path` (from its configuration and tensor headers).
pub fn params(path: &Path) -> Result<u64, CliError> {
    Ok(Checkpoint::open(path)?.param_counts()?.total as u64)
}

/// Refuses `what` when it needs `need` bytes and the machine has less available.
pub fn check(what: &str, need: u64) -> Result<(), CliError> {
    match available() {
        Some(have) if need > have => Err(CliError::Memory {
            what: what.into(),
            need,
            have,
        }),
        _ => Ok(()),
    }
}

/// Bytes of one decoder layer of `config` in f32: what layer-at-a-time work holds of the
/// model (the embedding and LM head are read by rows).
pub fn layer_bytes(config: &moekit::llama::LlamaConfig) -> u64 {
    let embeddings = config.vocab_size * config.hidden_size;
    let tables = if config.tie_word_embeddings { 1 } else { 2 } * embeddings;
    let layers = config.num_hidden_layers.max(1);
    4 * (config.param_counts().total.saturating_sub(tables) / layers) as u64
}
