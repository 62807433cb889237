//! Errors of the LoRA crate.

use thiserror::Error;

/// Everything that can go wrong building, attaching or reading LoRA adapters.
#[derive(Debug, Error)]
pub enum LoraError {
    /// A rank of zero, or larger than both sides of the adapted matrix.
    #[error("LoRA rank {rank} is invalid for a {d_in}x{d_out} weight (use 1..={max})", max = (*d_in).min(*d_out).max(1))]
    Rank {
        /// Requested rank.
        rank: usize,
        /// Input width of the adapted layer.
        d_in: usize,
        /// Output width of the adapted layer.
        d_out: usize,
    },
    /// A dropout probability outside `[0, 1)` or a non-finite α.
    #[error("invalid LoRA hyper-parameter: {0}")]
    Hyper(String),
    /// Adapter factors whose shapes do not fit each other or the base layer.
    #[error("LoRA factor shapes do not fit: {0}")]
    Shape(String),
    /// A target-module pattern that is not a valid regular expression.
    #[error("target module pattern `{pattern}` is not a valid regular expression: {reason}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What the regex parser said.
        reason: String,
    },
    /// An `adapter_config.json` that is not a PEFT LoRA config moekit can apply.
    #[error("adapter config: {0}")]
    Config(String),
}

/// Result with [`LoraError`].
pub type Result<T, E = LoraError> = std::result::Result<T, E>;
