//! Hidden-state losses between mapped student and teacher layers.

use burn::tensor::Tensor;

use crate::error::{DistillError, Result};
use crate::mask::{TokenMask, masked_mean, zero_padding};

fn check(student: &Tensor<3>, teacher: &Tensor<3>, mask: Option<&TokenMask>) -> Result<()> {
    if student.dims() != teacher.dims() {
        return Err(DistillError::ShapeMismatch {
            what: "student hidden state (after projection)",
            expected: teacher.dims().to_vec(),
            got: student.dims().to_vec(),
        });
    }
    if let Some(m) = mask {
        let [b, t, _] = student.dims();
        m.check([b, t])?;
    }
    Ok(())
}

/// Hidden-state MSE (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020): the mean of
/// `(h_S − h_T)²` over the width `H` and the valid tokens, i.e. the masked mean over tokens of
/// `‖h_S − h_T‖² / H`.
///
/// Project the student first when its width differs ([`crate::HiddenProjection`]). The teacher
/// is a constant target.
///
/// # Shapes
/// - student, teacher: `[B, T, H]`
/// - mask: `[B, T]`
/// - output: `[1]`
pub fn hidden_mse(
    student: Tensor<3>,
    teacher: Tensor<3>,
    mask: Option<&TokenMask>,
) -> Result<Tensor<1>> {
    check(&student, &teacher, mask)?;
    let width = student.dims()[2] as f64;
    let teacher = zero_padding(teacher.without_autodiff(), mask);
    let student = zero_padding(student, mask);
    let per_token = (student - teacher)
        .square()
        .sum_dim(2)
        .squeeze_dim(2)
        .div_scalar(width);
    Ok(masked_mean(per_token, mask))
}

/// Hidden-state cosine distance (DistilBERT, Sanh et al. 2019): the masked mean over tokens of
/// `1 − cos(h_S, h_T)`, with `cos(a, b) = a·b / sqrt(max(‖a‖²·‖b‖², ε²))`, `ε = 1e-8`.
///
/// In `[0, 2]`; scale-invariant, so it aligns directions only. The clamp keeps the value and
/// its gradient finite for zero vectors (a zero vector has cosine 0).
///
/// # Shapes
/// - student, teacher: `[B, T, H]`
/// - mask: `[B, T]`
/// - output: `[1]`
pub fn hidden_cosine(
    student: Tensor<3>,
    teacher: Tensor<3>,
    mask: Option<&TokenMask>,
) -> Result<Tensor<1>> {
    check(&student, &teacher, mask)?;
    let teacher = zero_padding(teacher.without_autodiff(), mask);
    let student = zero_padding(student, mask);
    let dot = (student.clone() * teacher.clone()).sum_dim(2);
    let norms = student.square().sum_dim(2) * teacher.square().sum_dim(2);
    let cos = dot / norms.clamp_min(1e-16).sqrt();
    Ok(masked_mean(
        cos.squeeze_dim::<2>(2).neg().add_scalar(1.0),
        mask,
    ))
}
