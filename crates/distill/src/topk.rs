//! Sparse distillation on the teacher's top-k tokens.

use burn::tensor::Tensor;

use crate::error::{DistillError, Result};
use crate::mask::{TokenMask, zero_padding};
use crate::probs::{check_logits, check_temperature, finish, kl_rows, log_softmax, temper};

/// Top-k forward KL: the forward KL restricted to the teacher's `k` most likely tokens of each
/// position, as when only the teacher's top-k logits are cached (sparse KD; Anshumann et al.
/// 2025, "Sparse Logit Sampling", analyse its bias). The masked mean over tokens of
///
/// `τ² · Σ_{v ∈ K} p̃_T(v) · (log p̃_T(v) − log q_S(v))`
///
/// where `K` is the teacher's top-k set, `p̃_T = softmax(teacher_K / τ)` is the teacher
/// **renormalised over its top k**, and `log q_S = log_softmax(student / τ)` is the student's
/// log-probability over the **full vocabulary**, gathered at `K` (the student is *not*
/// renormalised over `K`: the common choice, which also rewards the student for moving mass
/// into `K`, and keeps the loss non-negative since `Σ_K q_S ≤ 1`). With `k = V` this is exactly
/// [`crate::forward_kl`].
///
/// # Shapes
/// - teacher, student: `[B, T, V]` logits
/// - mask: `[B, T]`
/// - output: `[1]`
///
/// # Errors
/// [`DistillError::InvalidTopK`] unless `1 <= k <= V`.
pub fn top_k_kl(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
    k: usize,
) -> Result<Tensor<1>> {
    check_logits(&teacher, &student, mask)?;
    check_temperature(temperature)?;
    let vocab = student.dims()[2];
    if k == 0 || k > vocab {
        return Err(DistillError::InvalidTopK { k, vocab });
    }
    let teacher = temper(zero_padding(teacher.without_autodiff(), mask), temperature);
    let (top, indices) = teacher.topk_with_indices(k, 2);
    let log_p = log_softmax(top);
    let log_q = log_softmax(temper(zero_padding(student, mask), temperature)).gather(2, indices);
    Ok(finish(kl_rows(log_p, log_q), mask, temperature))
}
