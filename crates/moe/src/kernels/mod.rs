//! Custom CPU kernels for burn's Flex backend, as a burn backend extension.
//!
//! - `MoeKernels::grouped_ffn`: the fused grouped-GEMM expert FFN with a hand-written
//!   backward pass. One call computes `y[t] = Σ_{n: rows[n]=t} weights[n] · FFN_{e(n)}(x[t])`
//!   for every kept assignment, without the per-expert op dispatch, copies and scatter of the
//!   composed path.
//! - `MoeKernels::top_k_indices`: row-wise top-k by selection, `O(E)` per row instead
//!   of Flex's full sort.

//!
//! Without the `flex` feature only the portable fallbacks remain.

#[cfg(feature = "flex")]
mod autodiff;
#[cfg(feature = "flex")]
mod extension;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "flex")]
pub(crate) mod kernel;
#[cfg(feature = "flex")]
mod scratch;

use burn::tensor::{Int, Tensor};

#[cfg(feature = "flex")]
pub(crate) use extension::expert_ffn;

/// Whether the custom kernels run for tensors like `x` (Flex device, f32).
#[cfg(feature = "flex")]
pub(crate) fn available(x: &Tensor<2>) -> bool {
    extension::supported(&x.device(), x.dtype())
}

/// Whether the custom kernels run for tensors like `x`: never without the `flex` feature.
#[cfg(not(feature = "flex"))]
pub(crate) fn available(_: &Tensor<2>) -> bool {
    false
}

/// Row-wise top-k `(values, indices)` of `scores [T, E]`, values differentiable.
pub(crate) fn top_k(scores: Tensor<2>, k: usize) -> (Tensor<2>, Tensor<2, Int>) {
    #[cfg(feature = "flex")]
    if available(&scores) {
        let ids = extension::top_k_indices(scores.clone(), k);
        return (scores.gather(1, ids.clone()), ids);
    }
    scores.topk_with_indices(k, 1)
}
