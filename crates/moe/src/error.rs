//! Typed errors of the MoE layer.

use thiserror::Error;

/// Everything that can be wrong with a MoE configuration or its inputs.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MoeError {
    /// A layer needs at least one routed expert.
    #[error("num_experts is 0: a MoE layer needs at least one expert")]
    NoExperts,
    /// Expert and hidden widths must be positive.
    #[error("{what} is 0: it must be at least 1")]
    ZeroSize {
        /// Which size was zero.
        what: &'static str,
    },
    /// Top-k must pick at least one and at most all experts.
    #[error("top_k = {k} is invalid for {experts} experts: choose 1 <= k <= {experts}")]
    InvalidTopK {
        /// Requested k.
        k: usize,
        /// Number of experts.
        experts: usize,
    },
    /// A factored router gate needs `rank ≥ 1` and factors smaller than the full gate.
    #[error(
        "router rank {rank} is invalid for hidden size {hidden} and {experts} experts: choose \
         1 <= rank <= {max} (above it the factors hold more than the full {hidden}x{experts} gate)",
        max = (hidden * experts).saturating_sub(1) / (hidden + experts).max(1)
    )]
    InvalidRank {
        /// Requested rank.
        rank: usize,
        /// Model width `H`.
        hidden: usize,
        /// Number of experts `E`.
        experts: usize,
    },
    /// A weight holds NaN or infinite values.
    #[error("{0} holds NaN or infinite values")]
    NonFinite(&'static str),
    /// Top-p mass must lie in (0, 1].
    #[error("top-p threshold {0} is outside (0, 1]")]
    InvalidTopP(f64),
    /// A probability-like hyper-parameter is out of its range.
    #[error("{what} = {value} is outside {range}")]
    OutOfRange {
        /// Parameter name.
        what: &'static str,
        /// Given value.
        value: f64,
        /// Allowed range, for the message.
        range: &'static str,
    },
    /// The input's last dimension does not match the layer.
    #[error("input has hidden size {got}, the layer expects {expected}")]
    HiddenSizeMismatch {
        /// Expected hidden size.
        expected: usize,
        /// Hidden size of the input.
        got: usize,
    },
    /// A weight tensor has the wrong shape.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    WeightShape {
        /// Which weight.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// A router and an expert bank disagree on the number of experts.
    #[error("the router scores {router} experts but the bank holds {bank}")]
    ExpertCountMismatch {
        /// Experts the router scores.
        router: usize,
        /// Experts in the bank.
        bank: usize,
    },
    /// The padding mask does not match the input.
    #[error("padding mask has shape {got:?}, the input needs {expected:?}")]
    MaskShapeMismatch {
        /// `[batch, seq]` of the input.
        expected: [usize; 2],
        /// Shape of the mask.
        got: [usize; 2],
    },
    /// Parts of a layer do not fit together.
    #[error("{0}")]
    Config(String),
    /// The sort keys of the dispatch would overflow the backend's integer type.
    #[error(
        "{assignments} token-expert assignments are too many for one dispatch: split the batch"
    )]
    TooManyAssignments {
        /// Number of assignments (tokens x k).
        assignments: usize,
    },
}

/// Result alias for this crate.
pub type Result<T> = core::result::Result<T, MoeError>;
