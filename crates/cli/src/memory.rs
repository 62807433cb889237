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
