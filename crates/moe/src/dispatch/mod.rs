//! Dispatch: computing only the selected experts' work.
//!
//! A [`DispatchPlan`] groups the router's assignments by expert (one small host read). Three
//! interchangeable implementations then evaluate the experts:
//! - fused: one grouped-GEMM custom op with a hand-written backward (Flex, f32; see
//!   `crate::kernels`, feature `flex`);
//! - [`composed`]: portable burn ops (gather, per-expert matmuls, scatter-add); every backend;
//! - [`dense`]: every expert on every token, masked: the test oracle.

pub mod composed;
pub mod dense;
mod plan;

use burn::config::Config;
use burn::tensor::Tensor;

pub use plan::DispatchPlan;

use crate::experts::ExpertWeights;

/// Which implementation evaluates the experts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DispatchMode {
    /// The fastest available: fused on Flex (f32), composed elsewhere.
    Auto,
    /// The fused grouped-GEMM kernel; falls back to composed where it is unavailable.
    Fused,
    /// Portable burn ops.
    Composed,
    /// Every expert on every token (`E`x the work): the reference.
    Dense,
}

impl DispatchMode {
    /// The implementation that will actually run for this input.
    pub fn resolve(self, x: &Tensor<2>) -> DispatchMode {
        match self {
            DispatchMode::Auto | DispatchMode::Fused if fused_available(x) => DispatchMode::Fused,
            DispatchMode::Auto | DispatchMode::Fused => DispatchMode::Composed,
            other => other,
        }
    }

    /// Evaluates the experts over the plan.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, H]`
    pub fn expert_ffn(self, x: Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> Tensor<2> {
        match self.resolve(&x) {
            #[cfg(feature = "flex")]
            DispatchMode::Fused => crate::kernels::expert_ffn(x, bank, plan),
            DispatchMode::Dense => dense::expert_ffn(x, bank, plan),
            _ => composed::expert_ffn(x, bank, plan),
        }
    }
}

fn fused_available(x: &Tensor<2>) -> bool {
    crate::kernels::available(x)
}
