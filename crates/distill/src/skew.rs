//! Skew forward and skew reverse KL (DistiLLM).

use burn::tensor::Tensor;

use crate::error::Result;
use crate::mask::TokenMask;
use crate::probs::{check_unit, finish, kl_rows, log_mix, tempered};

/// Skew forward KL `τ²·KL(p_T ‖ α·p_T + (1 − α)·q_S)` (DistiLLM, Ko et al. 2024), the masked
/// mean over tokens, with `p_T`, `q_S` the tempered softmaxes of [`crate::forward_kl`].
///
/// Mixing a share `α` of the teacher into the student's side bounds the divergence by
/// `−log α` and keeps its gradient bounded where the student assigns vanishing probability.
/// `α = 0` is the plain forward KL; `α = 1` gives 0. DistiLLM uses `α = 0.1`. The mixture's
/// log is computed in log space ([`crate::probs::log_mix`]).
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
///
/// # Errors
/// [`crate::DistillError::OutOfRange`] unless `0 <= α <= 1` and `τ > 0`.
pub fn skew_forward_kl(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor<1>> {
    check_unit("alpha", alpha)?;
    let t = tempered(teacher, student, mask, temperature)?;
    let log_m = log_mix(t.log_p.clone(), t.log_q, alpha);
    Ok(finish(kl_rows(t.log_p, log_m), mask, temperature))
}

/// Skew reverse KL `τ²·KL(q_S ‖ α·q_S + (1 − α)·p_T)` (DistiLLM, Ko et al. 2024; MoE-KD
/// distils MoE students with it at `α = 0.1`), the masked mean over tokens.
///
/// `α = 0` is the plain reverse KL; `α = 1` gives 0.
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
///
/// # Errors
/// [`crate::DistillError::OutOfRange`] unless `0 <= α <= 1` and `τ > 0`.
pub fn skew_reverse_kl(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor<1>> {
    check_unit("alpha", alpha)?;
    let t = tempered(teacher, student, mask, temperature)?;
    let log_m = log_mix(t.log_q.clone(), t.log_p, alpha);
    Ok(finish(kl_rows(t.log_q, log_m), mask, temperature))
}
