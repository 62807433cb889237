//! Typed errors of conversion and layer-wise construction.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong converting a model or constructing its experts.
#[derive(Debug, Error)]
pub enum UpcycleError {
    /// The conversion settings are inconsistent.
    #[error("invalid conversion settings: {0}")]
    Config(String),
    /// The method needs calibration activations that were not given.
    #[error("{0} needs calibration text (give calibration files)")]
    NeedsCalibration(&'static str),
    /// Calibration produced no usable tokens.
    #[error("calibration: {0}")]
    Calibration(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A work directory holds files this run cannot use.
    #[error("{path}: {reason}")]
    WorkDir {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// Training produced NaN or infinite loss.
    #[error(
        "layer {layer}: the loss became {value} at step {step}; lower the learning rate (--lr)"
    )]
    NonFinite {
        /// Layer being trained.
        layer: usize,
        /// Step.
        step: usize,
        /// The loss value.
        value: f32,
    },
    /// An error of the model crate.
    #[error(transparent)]
    Llama(#[from] moekit_llama::LlamaError),
    /// An error of the MoE crate.
    #[error(transparent)]
    Moe(#[from] moekit_moe::MoeError),
}

impl UpcycleError {
    /// An [`UpcycleError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = UpcycleError> = std::result::Result<T, E>;
