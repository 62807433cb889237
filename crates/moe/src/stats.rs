//! Routing statistics of one MoE call, for profiling and logs.

/// What the router did in one call (see also [`crate::MoeOutput::mean_prob`]).
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Real (non-padding) tokens routed.
    pub tokens: usize,
    /// Assignments each expert received from the router (before capacity dropping).
    pub routed_per_expert: Vec<usize>,
    /// Assignments each expert computed (after capacity dropping).
    pub tokens_per_expert: Vec<usize>,
    /// Assignments dropped because their expert was full.
    pub dropped: usize,
}

impl RoutingStats {
    /// Mean number of experts computed per real token.
    pub fn mean_experts_per_token(&self) -> f64 {
        self.tokens_per_expert.iter().sum::<usize>() as f64 / self.tokens.max(1) as f64
    }

    /// Fraction of routed assignments that were dropped.
    pub fn drop_rate(&self) -> f64 {
        self.dropped as f64 / self.routed_per_expert.iter().sum::<usize>().max(1) as f64
    }
}
