//! Errors of the command line: one line saying what is wrong, and a hint saying what to do.

use std::path::PathBuf;

use moekit::distill::DistillError;
use moekit::llama::LlamaError;
use moekit::router::RouterError;
use moekit::train::TrainError;
use moekit::upcycle::UpcycleError;

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From the model library.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// Reading an input file.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// From conversion.
    #[error(transparent)]
    Upcycle(#[from] UpcycleError),
    /// From routing profiles and policies.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// From distillation losses.
    #[error(transparent)]
    Distill(#[from] DistillError),
    /// From training.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The work needs more memory than the machine has available.
    #[error(
        "{what} needs about {:.1} GiB of memory, but {:.1} GiB are available",
        *need as f64 / GIB,
        *have as f64 / GIB
    )]
    Memory {
        /// What was to be done.
        what: String,
        /// Bytes it needs (the weights and what training keeps per weight).
        need: u64,
        /// Bytes available.
        have: u64,
    },
}

const GIB: f64 = (1u64 << 30) as f64;

impl CliError {
    /// Whether a write failed for want of space (a full disk, a quota, a file-size limit),
    /// anywhere in the chain of causes.
    fn disk_is_full(&self) -> bool {
        use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.kind(), StorageFull | QuotaExceeded | FileTooLarge)
            {
                return true;
            }
            cause = e.source();
        }
        false
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        if self.disk_is_full() {
            return Some(
                "free disk space, or write elsewhere, and run the same command again: it resumes where it stopped",
            );
        }
        match self {
            Self::Llama(LlamaError::Corrupt { .. }) => {
                Some("the file is damaged or not a model checkpoint; download it again")
            }
            Self::Llama(LlamaError::MissingTensor { .. } | LlamaError::TensorShape { .. }) => {
                Some("the weights do not match config.json; check that they belong together")
            }
            Self::Llama(LlamaError::UnsupportedDtype { .. }) => {
                Some("convert the checkpoint to f32/f16/bf16 or a supported GGUF quantisation")
            }
            Self::Llama(LlamaError::Busy { .. })
            | Self::Upcycle(UpcycleError::Llama(LlamaError::Busy { .. })) => Some(
                "wait for that run to end, or write elsewhere (--out, --work-dir); a run killed \
                 outright releases the folder",
            ),
            Self::Llama(LlamaError::NotAModel(_)) | Self::Llama(LlamaError::Io { .. }) => {
                Some("MODEL is a Hugging Face model directory or a .gguf file")
            }
            Self::Llama(LlamaError::Adapter { .. } | LlamaError::Lora(_)) => Some(
                "--adapter takes a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) made for this base model",
            ),
            Self::Upcycle(UpcycleError::NeedsCalibration(_)) => {
                Some("add --calib with text files or directories")
            }
            Self::Router(RouterError::Policy(_) | RouterError::Parse { .. }) => {
                Some("a policy file comes from `moekit profile` run on this same model")
            }
            Self::Router(RouterError::Target(_)) => Some(
                "raise the budget (--target-active-params or --max-active-params), or convert with more experts per token",
            ),
            Self::Router(RouterError::NoMoeLayers) => {
                Some("convert the model first (moekit convert), or give a MoE checkpoint")
            }
            Self::Upcycle(UpcycleError::WorkDir { .. }) => Some(
                "delete the work directory (--work-dir, default OUT/.moekit-work) to start over",
            ),
            Self::Train(TrainError::NonFinite { .. }) => Some(
                "lower --lr or --temperature, or keep --max-grad-norm; rerunning resumes from the last checkpoint",
            ),
            Self::Train(TrainError::Checkpoint { .. }) => {
                Some("use another --out, or delete OUT/checkpoints to start over")
            }
            Self::Memory { .. } => Some(
                "eval, convert and profile read one layer at a time; this command holds the whole model: use a machine with more memory or a smaller model",
            ),
            Self::Train(TrainError::Data(_)) => {
                Some("give more text with --data, or lower --seq-len / --batch-size")
            }
            Self::Train(TrainError::Config(_)) | Self::Distill(_) => {
                Some("see `moekit distill --help` for the accepted values")
            }
            _ => None,
        }
    }
}
