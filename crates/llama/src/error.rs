//! Typed errors of model construction, checkpoint files and tokenisation.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong reading, building, running or writing a model.
///
/// File errors name the file; every message says what is wrong, and where it helps, what to do.
#[derive(Debug, Error)]
pub enum LlamaError {
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another process is writing the folder (it holds its [`crate::io::lock::FolderLock`]).
    #[error("{path}: another moekit run is writing this folder")]
    Busy {
        /// The folder.
        path: PathBuf,
    },
    /// A checkpoint file is malformed: truncated, corrupt header, offsets past the end, ...
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// Its name in the checkpoint's naming scheme.
        name: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {got:?}, the configuration needs {expected:?}")]
    TensorShape {
        /// Tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// A storage type this reader does not handle.
    #[error("{path}: tensor `{name}` has unsupported type {dtype}")]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// The type, as the file names it.
        dtype: String,
    },
    /// The configuration names an architecture this crate does not implement.
    #[error(
        "unsupported architecture `{0}`: supported are {supported}",
        supported = crate::config::SUPPORTED_MODEL_TYPES
    )]
    UnknownArchitecture(String),
    /// The configuration is inconsistent or out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A directory given as a model has no `config.json`, or a file is neither.
    #[error("{0}: not a model (expected a directory with config.json, or a .gguf file)")]
    NotAModel(PathBuf),
    /// The tokenizer could not be built or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model has no tokenizer (needed for text input or output).
    #[error("{0}: no tokenizer found (expected tokenizer.json beside config.json)")]
    NoTokenizer(PathBuf),
    /// Input ids or shapes do not fit the model.
    #[error("invalid input: {0}")]
    Input(String),
    /// The model cannot be written in the requested format.
    #[error("cannot export as {format}: {reason}")]
    Export {
        /// Target format.
        format: &'static str,
        /// Why.
        reason: String,
    },
    /// An error from the MoE layer.
    #[error(transparent)]
    Moe(#[from] moekit_moe::MoeError),
    /// An error from the LoRA crate (bad rank, pattern or adapter config).
    #[error(transparent)]
    Lora(#[from] moekit_lora::LoraError),
    /// An adapter directory does not fit the model or is malformed.
    #[error("{path}: {reason}")]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl LlamaError {
    /// A [`LlamaError::Corrupt`] for `path`.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A [`LlamaError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;
