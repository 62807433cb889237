//! One module per subcommand.

pub mod eval;
pub mod generate;
pub mod info;

use std::path::Path;

use moekit::llama::{Checkpoint, Llama, Tokenizer};

use crate::error::CliError;
use crate::progress;

/// Opens a checkpoint and loads it on the default device, with a progress bar.
pub fn load(path: &Path) -> Result<(Checkpoint, Llama, Tokenizer), CliError> {
    let ckpt = Checkpoint::open(path)?;
    let tokenizer = ckpt.tokenizer()?;
    let bar = progress::bar("loading", "layers");
    let model = ckpt.load(&moekit::default_device(), &mut progress::update(&bar))?;
    bar.finish_and_clear();
    Ok((ckpt, model, tokenizer))
}
