//! One module per subcommand.

pub mod convert;
pub mod eval;
pub mod generate;
pub mod info;
pub mod profile;

use std::path::Path;

use moekit::llama::{Checkpoint, Llama, Tokenizer, load_adapter};

use crate::error::CliError;
use crate::progress;

/// Opens a checkpoint and loads it on the default device, with a progress bar; applies a PEFT
/// LoRA adapter directory if given (merged into the weights: inference runs at base speed).
pub fn load(
    path: &Path,
    adapter: Option<&Path>,
) -> Result<(Checkpoint, Llama, Tokenizer), CliError> {
    let ckpt = Checkpoint::open(path)?;
    let tokenizer = ckpt.tokenizer()?;
    let bar = progress::bar("loading", "layers");
    let mut model = ckpt.load(&moekit::default_device(), &mut progress::update(&bar))?;
    bar.finish_and_clear();
    if let Some(dir) = adapter {
        let (adapted, config) = load_adapter(model, dir)?;
        tracing::info!(
            adapters = adapted.adapters().len(),
            r = config.r,
            alpha = config.lora_alpha,
            "applied LoRA adapter {}",
            dir.display()
        );
        model = adapted.merge_lora();
    }
    Ok((ckpt, model, tokenizer))
}
