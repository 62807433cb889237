//! Fused grouped-GEMM dispatch for burn's Flex (CPU) backend, as a burn backend extension with a
//! hand-written backward pass for autodiff.
//!
//! One call computes `y[t] = Σ_{n: rows[n]=t} weights[n] · FFN_{e(n)}(x[t])` for every kept
//! assignment, without the per-expert op dispatch, copies and scatter of the composed path.

mod autodiff;
mod flex;
pub mod kernel;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, DispatchDevice, backend_extension};
use burn::tensor::{DType, Device, Tensor};

use super::DispatchPlan;
use crate::activation::Activation;
use crate::experts::ExpertBank;

/// Backends with a fused grouped expert FFN.
#[backend_extension(Flex, Autodiff)]
pub trait GroupedFfnBackend: Backend {
    /// `y [T, H]` from `x [T, H]`, banks `w_in [E, H, W]`, `w_out [E, I, H]`, the token of each
    /// assignment `rows [N]`, its weight `weights [N]` and the expert offsets (`E + 1`).
    fn grouped_ffn(
        x: FloatTensor<Self>,
        w_in: FloatTensor<Self>,
        w_out: FloatTensor<Self>,
        rows: IntTensor<Self>,
        weights: FloatTensor<Self>,
        offsets: Vec<usize>,
        activation: Activation,
    ) -> FloatTensor<Self>;
}

/// Whether the fused kernel can run on this device for this dtype.
pub fn supported(device: &Device, dtype: DType) -> bool {
    dtype == DType::F32
        && matches!(
            device.clone().inner().as_dispatch(),
            DispatchDevice::Flex(_)
        )
}

/// Fused dispatch of the expert bank over a plan; see the module docs.
///
/// # Shapes
/// - x: `[T, H]`
/// - output: `[T, H]`
pub fn expert_ffn(x: Tensor<2>, bank: &ExpertBank, plan: &DispatchPlan) -> Tensor<2> {
    let out = <Dispatch as GroupedFfnBackend>::grouped_ffn(
        x.into_dispatch(),
        bank.w_in.val().into_dispatch(),
        bank.w_out.val().into_dispatch(),
        plan.rows.clone().into_dispatch(),
        plan.weights.clone().into_dispatch(),
        plan.offsets.clone(),
        bank.activation,
    );
    Tensor::from_dispatch(out)
}
