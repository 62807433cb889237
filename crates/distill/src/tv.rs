//! Total variation distance.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::mask::TokenMask;
use crate::probs::{finish, tempered};

/// Total variation distance `τ²·½ Σᵥ |p_T(v) − q_S(v)|`, the masked mean over tokens (Wen et
/// al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation"), with
/// `p_T`, `q_S` tempered as in [`crate::forward_kl`].
///
/// Bounded: in `[0, 1]` at `τ = 1`. Like every divergence here it is scaled by `τ²`, so that
/// the whole family shares one convention (at the default `τ = 1` the factor is 1).
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
pub fn total_variation(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
) -> Result<Tensor<1>> {
    let t = tempered(teacher, student, mask, temperature)?;
    let per_token = (t.log_p.exp() - t.log_q.exp())
        .abs()
        .sum_dim(2)
        .squeeze_dim(2)
        .mul_scalar(0.5);
    Ok(finish(per_token, mask, temperature))
}
