//! Every expert as one wide FFN, unchosen experts masked out: for many narrow experts.
//!
//! With `E` experts of `I` neurons the bank is one FFN of `E·I` neurons; each token's
//! activations are multiplied by its combine weight for the expert they belong to (0 for the
//! experts it was not routed to) before the output projection. The work is the whole bank's
//! (`E/k` times the routed experts'), but in two large GEMMs: when experts are a few neurons
//! wide (a fine split of a dense FFN) and a large share of them is chosen, that is faster on a
//! CPU than per-expert GEMMs of a few columns (measured in `docs/performance.md`). The result
//! equals the sparse dispatches'.

use burn::tensor::Tensor;

use super::DispatchPlan;
use crate::experts::ExpertWeights;

/// The experts' combined output, computed as one masked FFN.
///
/// # Shapes
/// - x: `[T, H]`
/// - output: `[T, H]`
pub fn expert_ffn(x: Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> Tensor<2> {
    let [e, i, h] = bank.w_out.dims();
    let t = x.dims()[0];
    let act = bank.activations_all(x); // [T, E, I]
    let combine = plan.combine_matrix().unsqueeze_dim::<3>(2); // [T, E, 1]
    (act * combine)
        .reshape([t, e * i])
        .matmul(bank.w_out.clone().reshape([e * i, h]))
}
