//! Commands compare what they need with what the machine can give before they load anything,
//! instead of dying in the OOM killer: those that hold a whole model (distill, generate) its
//! size, those that run one layer at a time (convert, eval, profile) one layer's.

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

/// Refuses layer-at-a-time `what` on a model of `config` when the machine cannot hold one of
/// its layers (loaded, and its copy being built) and a block of `vocab_block` rows of the LM
/// head with its logits.
pub fn check_layer(
    what: &str,
    config: &moekit::llama::LlamaConfig,
    vocab_block: usize,
) -> Result<(), CliError> {
    let head = 4 * (vocab_block * config.hidden_size) as u64;
    check(what, 2 * layer_bytes(config) + 2 * head)
}
