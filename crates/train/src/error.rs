//! Errors of training.

use std::path::{Path, PathBuf};

use moekit_distill::DistillError;
use moekit_llama::LlamaError;

/// A training failure.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A loss, its configuration or a model forward pass failed.
    #[error(transparent)]
    Distill(DistillError),
    /// From the model library.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// A NaN or infinite value: the run stops, and the last checkpoint (if any) is the last
    /// good state.
    #[error(
        "step {step}: the {part} loss is {value}; training stopped (the last checkpoint is kept)"
    )]
    NonFinite {
        /// The optimiser step (1-based) that produced it.
        step: usize,
        /// Which part: a loss term's canonical name, `aux`, `total` or `gradient-norm`.
        part: String,
        /// The value.
        value: f32,
    },
    /// A configuration value out of range or inconsistent.
    #[error("{0}")]
    Config(String),
    /// Too little data for the configuration.
    #[error("{0}")]
    Data(String),
    /// A checkpoint that cannot be read or written, or that belongs to another run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A checkpoint error on `path`.
    pub fn checkpoint(path: &Path, reason: impl ToString) -> Self {
        Self::Checkpoint {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// A distillation error at optimiser step `step`: a non-finite loss part becomes
    /// [`TrainError::NonFinite`] naming the step.
    pub fn at_step(step: usize, e: DistillError) -> Self {
        match e {
            DistillError::NonFinite { part, value } => Self::NonFinite { step, part, value },
            e => Self::Distill(e),
        }
    }
}

impl From<DistillError> for TrainError {
    fn from(e: DistillError) -> Self {
        Self::Distill(e)
    }
}

/// Result of training operations.
pub type Result<T> = std::result::Result<T, TrainError>;
