//! Typed errors of the distillation losses.

use thiserror::Error;

/// Everything that can be wrong with a distillation configuration, its inputs or its result.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DistillError {
    /// Two tensors that must agree in shape do not.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// A hyper-parameter is out of its range.
    #[error("{what} = {value} is outside {range}")]
    OutOfRange {
        /// Parameter name.
        what: &'static str,
        /// Given value.
        value: f64,
        /// Allowed range, for the message.
        range: &'static str,
    },
    /// Top-k distillation needs `1 <= k <= V`.
    #[error("top_k = {k} is invalid for a vocabulary of {vocab}: choose 1 <= k <= {vocab}")]
    InvalidTopK {
        /// Requested k.
        k: usize,
        /// Vocabulary size `V`.
        vocab: usize,
    },
    /// A label is neither the ignore index nor a token id below the vocabulary size.
    #[error("label {label} is outside [0, {vocab}) and is not the ignore index {ignore_index}")]
    LabelOutOfRange {
        /// The offending label.
        label: i64,
        /// Vocabulary size `V`.
        vocab: usize,
        /// The ignore index.
        ignore_index: i64,
    },
    /// The cross-entropy term needs labels, and none were given.
    #[error("the loss has a `ce` term but no labels were given")]
    MissingLabels,
    /// A layer mapping names a hidden state that the model did not return.
    #[error(
        "layer map names {side} hidden state {index}, but the {side} returned {available} \
         (does its DistillModel return hidden states when asked?)"
    )]
    HiddenIndex {
        /// `"student"` or `"teacher"`.
        side: &'static str,
        /// The requested index.
        index: usize,
        /// Number of hidden states returned.
        available: usize,
    },
    /// A hidden-state loss needs the layer map to name at least one pair.
    #[error("the loss has a hidden-state term ({term}) but the layer map is empty")]
    NoLayerPairs {
        /// The hidden-state term.
        term: &'static str,
    },
    /// The projection module does not match the layer map.
    #[error("the hidden projection has {got} per-pair maps, the layer map has {expected} pairs")]
    ProjectionPairs {
        /// Pairs in the layer map.
        expected: usize,
        /// Per-pair maps of the projection.
        got: usize,
    },
    /// The loss string could not be parsed.
    #[error("invalid loss specification {spec:?}: {reason}")]
    InvalidSpec {
        /// The whole specification.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A loss name is unknown.
    #[error("unknown loss {name:?}; known losses: {known}")]
    UnknownLoss {
        /// The name given.
        name: String,
        /// The accepted names, for the message.
        known: String,
    },
    /// A loss weight is not a finite non-negative number.
    #[error("weight {weight:?} of loss {name:?} is not a finite number >= 0")]
    InvalidWeight {
        /// The loss the weight belongs to.
        name: String,
        /// The weight as written.
        weight: String,
    },
    /// A loss is listed twice.
    #[error("loss {name:?} is listed twice")]
    DuplicateLoss {
        /// The repeated loss.
        name: String,
    },
    /// A loss evaluated to NaN or infinity.
    #[error("the {part} loss is not finite ({value})")]
    NonFinite {
        /// Name of the part (or `"total"`).
        part: String,
        /// The value.
        value: f32,
    },
    /// The teacher or student forward pass failed.
    #[error("model forward failed: {0}")]
    Model(String),
}

/// Result alias for this crate.
pub type Result<T> = core::result::Result<T, DistillError>;
