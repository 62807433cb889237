//! Generalised Jensen–Shannon divergence (GKD).

use burn::tensor::Tensor;

use crate::error::Result;
use crate::mask::TokenMask;
use crate::probs::{check_unit, finish, kl_rows, log_mix, tempered};

/// Generalised JSD `τ²·JSD_β(p_T ‖ q_S)` (GKD, Agarwal et al. 2024, "On-Policy Distillation of
/// Language Models"), the masked mean over tokens of
///
/// `JSD_β(p ‖ q) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`, `m = β·p + (1 − β)·q`,
///
/// with `p = p_T` the teacher and `q = q_S` the student (tempered as in [`crate::forward_kl`]),
/// the convention of GKD and of TRL's `GKDTrainer`.
///
/// - `β = 0.5` is the standard, symmetric Jensen–Shannon divergence, bounded by `ln 2`.
/// - The formula is identically 0 at `β = 0` and `β = 1`, but `JSD_β / β → KL(p_T ‖ q_S)` as
///   `β → 0` and `JSD_β / (1 − β) → KL(q_S ‖ p_T)` as `β → 1`. Like GKD, the ends are defined
///   as those limits: **`β = 0` is the forward KL [`crate::forward_kl`] and `β = 1` the
///   reverse KL [`crate::reverse_kl`]** (so the value jumps at the ends).
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
///
/// # Errors
/// [`crate::DistillError::OutOfRange`] unless `0 <= β <= 1` and `τ > 0`.
pub fn generalized_jsd(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
    beta: f64,
) -> Result<Tensor<1>> {
    check_unit("beta", beta)?;
    let t = tempered(teacher, student, mask, temperature)?;
    let per_token = if beta == 0.0 {
        kl_rows(t.log_p, t.log_q)
    } else if beta == 1.0 {
        kl_rows(t.log_q, t.log_p)
    } else {
        let log_m = log_mix(t.log_p.clone(), t.log_q.clone(), beta);
        kl_rows(t.log_p, log_m.clone()).mul_scalar(beta)
            + kl_rows(t.log_q, log_m).mul_scalar(1.0 - beta)
    };
    Ok(finish(per_token, mask, temperature))
}
