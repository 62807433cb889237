//! The backend extension trait and its tensor-level wrappers.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, DispatchDevice, backend_extension};
use burn::tensor::{DType, Device, Int, Tensor};

use crate::activation::Activation;
use crate::dispatch::DispatchPlan;
use crate::experts::ExpertWeights;

/// Backends with the MoE kernels (Flex, and autodiff over Flex).
#[backend_extension(Flex, Autodiff)]
pub trait MoeKernels: Backend {
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

    /// Indices `[T, k]` of the `k` largest values of each row of `scores [T, E]`, in decreasing
    /// order of value (ties: lower index first). Not differentiable (indices only).
    fn top_k_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self>;
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
pub(crate) fn expert_ffn(x: Tensor<2>, bank: &ExpertWeights, plan: &DispatchPlan) -> Tensor<2> {
    let out = <Dispatch as MoeKernels>::grouped_ffn(
        x.into_dispatch(),
        bank.w_in.clone().into_dispatch(),
        bank.w_out.clone().into_dispatch(),
        plan.rows.clone().into_dispatch(),
        plan.weights.clone().into_dispatch(),
        plan.offsets.clone(),
        bank.activation,
    );
    Tensor::from_dispatch(out)
}

/// Row-wise top-k indices through [`MoeKernels::top_k_indices`].
///
/// # Shapes
/// - scores: `[T, E]`
/// - output: `[T, k]`
pub(crate) fn top_k_indices(scores: Tensor<2>, k: usize) -> Tensor<2, Int> {
    Tensor::from_dispatch(<Dispatch as MoeKernels>::top_k_indices(
        scores.into_dispatch(),
        k,
    ))
}
