//! Dispatch: computing only the selected experts' work.
//!
//! A [`DispatchPlan`] groups the router's assignments by expert (one small host read). Four
//! interchangeable implementations then evaluate the experts:
//! - fused: one grouped-GEMM custom op with a hand-written backward (Flex, f32; see
//!   `crate::kernels`, feature `flex`);
//! - [`composed`]: portable burn ops (gather, per-expert matmuls, scatter-add); every backend;
//! - [`masked`]: the bank as one wide FFN with the unchosen experts' activations zeroed (the
//!   whole bank's work in two large GEMMs: for many narrow experts);
//! - [`dense`]: every expert on every token, masked: the test oracle.

pub mod composed;
pub mod dense;
pub mod masked;
mod plan;

use burn::config::Config;
use burn::tensor::Tensor;

pub use plan::DispatchPlan;

use crate::experts::ExpertWeights;

/// Which implementation evaluates the experts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DispatchMode {
    /// The fastest available: on Flex (f32), [`DispatchMode::Masked`] for many narrow experts
    /// of which a large share is chosen ([`masked_pays`]) and the fused kernel otherwise;
    /// composed elsewhere (the masked dispatch runs on every backend when asked for, but was
    /// measured on Flex only).
    Auto,
    /// The fused grouped-GEMM kernel; falls back to composed where it is unavailable.
    Fused,
    /// Portable burn ops.
    Composed,
    /// The bank as one wide FFN, unchosen experts masked (`E/k`x the routed work in large
    /// GEMMs; [`masked`]).
    Masked,
    /// Every expert on every token (`E`x the work): the reference.
    Dense,
}

impl DispatchMode {
    /// The implementation that will actually run for this input, not counting
    /// [`DispatchMode::Auto`]'s choice of [`DispatchMode::Masked`], which depends on the bank and
    /// the plan ([`DispatchMode::choose`]).
    pub fn resolve(self, x: &Tensor<2>) -> DispatchMode {
        match self {
            DispatchMode::Auto | DispatchMode::Fused if fused_available(x) => DispatchMode::Fused,
            DispatchMode::Auto | DispatchMode::Fused => DispatchMode::Composed,
            other => other,
        }
    }

    /// The implementation that runs for this input, bank and plan.
    pub fn choose(self, x: &Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> DispatchMode {
        match self {
            DispatchMode::Auto if fused_available(x) && masked_pays(bank, plan) => {
                DispatchMode::Masked
            }
            other => other.resolve(x),
        }
    }

    /// Evaluates the experts over the plan.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, H]`
    pub fn expert_ffn(self, x: Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> Tensor<2> {
        match self.choose(&x, bank, plan) {
            #[cfg(feature = "flex")]
            DispatchMode::Fused => crate::kernels::expert_ffn(x, bank, plan),
            DispatchMode::Dense => dense::expert_ffn(x, bank, plan),
            DispatchMode::Masked => masked::expert_ffn(x, bank, plan),
            _ => composed::expert_ffn(x, bank, plan),
        }
    }
}

/// Widest expert (neurons) for which [`DispatchMode::Auto`] considers the masked dispatch.
const MASKED_MAX_WIDTH: usize = 8;

/// Whether the masked dispatch is the faster one: experts at most [`MASKED_MAX_WIDTH`] neurons
/// wide, and at least a quarter of the bank's work chosen (assignments ≥ `T·E/4`). Measured on
/// Flex, 2 threads, 2,048 tokens (`docs/performance.md`): 384 experts of 3 neurons, half
/// chosen, forward + backward 424 ms masked against 761 ms fused; 192 of 6: 392 against 476;
/// 48 of 24 (too wide): 310 against 157.
pub fn masked_pays(bank: &ExpertWeights, plan: &DispatchPlan) -> bool {
    let [e, i, _] = bank.w_out.dims();
    i <= MASKED_MAX_WIDTH && plan.assignments() > 0 && 4 * plan.assignments() >= plan.tokens * e
}

fn fused_available(x: &Tensor<2>) -> bool {
    crate::kernels::available(x)
}
