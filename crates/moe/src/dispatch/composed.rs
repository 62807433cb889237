//! Dispatch composed of portable burn ops: gather, one matmul pair per non-empty expert, and a
//! scatter-add. Differentiable through burn's autodiff; runs on every backend.

use burn::tensor::{IndexingUpdateOp, Tensor};

use super::DispatchPlan;
use crate::experts::ExpertWeights;

/// `y[t] = Σ_{n: rows[n]=t} weights[n] · FFN_{e(n)}(x[t])`.
///
/// # Shapes
/// - x: `[T, H]`
/// - output: `[T, H]`
pub fn expert_ffn(x: Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> Tensor<2> {
    let [t, h] = x.dims();
    let device = x.device();
    if plan.assignments() == 0 {
        return Tensor::zeros([t, h], &device);
    }
    let xs = x.select(0, plan.rows.clone());
    let (w_in, w_out) = (bank.w_in.clone(), bank.w_out.clone());
    let outputs: Vec<Tensor<2>> = plan
        .offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(e, w)| {
            let xe = xs.clone().narrow(0, w[0], w[1] - w[0]);
            let w_in_e = w_in.clone().narrow(0, e, 1).squeeze_dim::<2>(0);
            let w_out_e = w_out.clone().narrow(0, e, 1).squeeze_dim::<2>(0);
            bank.activation.apply(xe.matmul(w_in_e)).matmul(w_out_e)
        })
        .collect();
    let ys = Tensor::cat(outputs, 0) * plan.weights.clone().unsqueeze_dim(1);
    Tensor::zeros([t, h], &device).select_assign(0, plan.rows.clone(), ys, IndexingUpdateOp::Add)
}
