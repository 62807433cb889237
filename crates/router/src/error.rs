//! Typed errors of routing profiles and policies.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong profiling routers or choosing and applying a policy.
#[derive(Debug, Error)]
pub enum RouterError {
    /// The model has no MoE layer.
    #[error("the model has no MoE layers (profile a converted or MoE checkpoint)")]
    NoMoeLayers,
    /// The calibration tokens cannot be used.
    #[error("calibration: {0}")]
    Calibration(String),
    /// A policy does not fit the model, or a rule is invalid.
    #[error("policy: {0}")]
    Policy(String),
    /// No policy meets the target.
    #[error("target: {0}")]
    Target(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A policy or profile file is not valid JSON of the expected form.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Drawing a plot failed.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The model produced non-finite outputs.
    #[error("layer {layer}: {what} is not finite")]
    NonFinite {
        /// The layer (or `usize::MAX` for the logits).
        layer: usize,
        /// What was measured.
        what: &'static str,
    },
    /// An error of the model crate.
    #[error(transparent)]
    Llama(#[from] moekit_llama::LlamaError),
    /// An error of the MoE crate.
    #[error(transparent)]
    Moe(#[from] moekit_moe::MoeError),
}

impl RouterError {
    /// A [`RouterError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = RouterError> = std::result::Result<T, E>;
