//! Forward and reverse Kullback–Leibler divergence between teacher and student.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::mask::TokenMask;
use crate::probs::{finish, kl_rows, tempered};

/// Forward KL `τ²·KL(p_T ‖ q_S)` (Hinton et al. 2015, "Distilling the Knowledge in a Neural
/// Network"), the masked mean over tokens of
///
/// `τ² · Σᵥ p_T(v) · (log p_T(v) − log q_S(v))`, `p_T = softmax(teacher / τ)`,
/// `q_S = softmax(student / τ)`.
///
/// The `τ²` factor keeps gradient magnitudes comparable across temperatures. Mode-covering: the
/// student is pushed to put mass wherever the teacher does.
///
/// The teacher is a constant target: no gradient flows into `teacher` (here and in every other
/// loss of this crate). See [`TokenMask`] for the masking and all-padding conventions.
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
pub fn forward_kl(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
) -> Result<Tensor<1>> {
    let t = tempered(teacher, student, mask, temperature)?;
    Ok(finish(kl_rows(t.log_p, t.log_q), mask, temperature))
}

/// Reverse KL `τ²·KL(q_S ‖ p_T)` (MiniLLM, Gu et al. 2023), the masked mean over tokens of
///
/// `τ² · Σᵥ q_S(v) · (log q_S(v) − log p_T(v))`, with `p_T`, `q_S` as in [`forward_kl`].
///
/// Mode-seeking: the student concentrates on the teacher's high-probability tokens.
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
pub fn reverse_kl(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
) -> Result<Tensor<1>> {
    let t = tempered(teacher, student, mask, temperature)?;
    Ok(finish(kl_rows(t.log_q, t.log_p), mask, temperature))
}
