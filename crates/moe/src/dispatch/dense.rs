//! The test oracle: run every expert on every token, then weigh by the dense combine matrix.

use burn::tensor::Tensor;

use super::DispatchPlan;
use crate::experts::ExpertWeights;

/// Same result as the sparse dispatches, computed densely (`E` times the work).
///
/// # Shapes
/// - x: `[T, H]`
/// - output: `[T, H]`
pub fn expert_ffn(x: Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> Tensor<2> {
    let all = bank.forward_all(x); // [E, T, H]
    let combine = plan.combine_matrix().transpose().unsqueeze_dim::<3>(2); // [E, T, 1]
    (all * combine).sum_dim(0).squeeze_dim(0)
}
