//! Tempered log-probabilities and their mixtures, computed stably in log space.
//!
//! Every divergence of this crate starts from `log_softmax(logits / τ)` of the teacher and the
//! student and never leaves log space until a final `exp`, so logits of `±1e4` in the same row
//! give finite values and finite gradients.

use burn::tensor::Tensor;

use crate::error::{DistillError, Result};
use crate::mask::{TokenMask, masked_mean, zero_padding};

/// Row-wise `log softmax` over the last dimension: `x − m − log Σⱼ exp(xⱼ − m)` with the row
/// maximum `m` detached (a numerical shift that does not change the function).
///
/// # Shapes
/// - x: `[B, T, V]`
/// - output: `[B, T, V]`
pub fn log_softmax(x: Tensor<3>) -> Tensor<3> {
    let shifted = x.clone() - x.detach().max_dim(2);
    let lse = shifted.clone().exp().sum_dim(2).log();
    shifted - lse
}

/// Elementwise `log(w·exp(a) + (1 − w)·exp(b))` for a weight `w ∈ [0, 1]`: the log of a
/// mixture of two distributions given by their log-probabilities.
///
/// Computed as a two-term log-sum-exp of `a + ln w` and `b + ln(1 − w)` around their detached
/// maximum; `w = 0` and `w = 1` return `b` and `a` exactly (no `ln 0`), and where both are
/// `−∞` (a token neither distribution allows) the result is `−∞`, not NaN. (Its gradient
/// there is NaN; the divergences never meet that case, since the student's log-probabilities
/// are finite.)
///
/// # Shapes
/// - a, b, output: `[B, T, V]`
pub fn log_mix(a: Tensor<3>, b: Tensor<3>, w: f64) -> Tensor<3> {
    if w <= 0.0 {
        return b;
    }
    if w >= 1.0 {
        return a;
    }
    let a = a.add_scalar(w.ln());
    let b = b.add_scalar((1.0 - w).ln());
    let m = a.clone().detach().max_pair(b.clone().detach());
    let m = m.clone().mask_fill(m.equal_elem(f64::NEG_INFINITY), 0.0);
    ((a - m.clone()).exp() + (b - m.clone()).exp()).log() + m
}

/// Row-wise `KL(a ‖ b) = Σⱼ exp(aⱼ)·(aⱼ − bⱼ)` from log-probabilities, with `0·log 0 = 0`:
/// entries where `aⱼ = −∞` (e.g. vocabulary a teacher masks with `−∞` logits) add nothing
/// and send no gradient, instead of `0·∞ = NaN`.
///
/// # Shapes
/// - log_a, log_b: `[B, T, V]`
/// - output: `[B, T]`
pub fn kl_rows(log_a: Tensor<3>, log_b: Tensor<3>) -> Tensor<2> {
    let impossible = log_a.clone().equal_elem(f64::NEG_INFINITY);
    let diff = (log_a.clone() - log_b).mask_fill(impossible, 0.0);
    (log_a.exp() * diff).sum_dim(2).squeeze_dim(2)
}

/// The teacher's and the student's tempered log-probabilities.
pub(crate) struct Tempered {
    /// `log p_T = log_softmax(teacher / τ)`, without autodiff (a constant target).
    pub log_p: Tensor<3>,
    /// `log q_S = log_softmax(student / τ)`.
    pub log_q: Tensor<3>,
}

/// Checks a temperature: finite and positive.
pub(crate) fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(DistillError::OutOfRange {
            what: "temperature",
            value: temperature,
            range: "(0, inf)",
        });
    }
    Ok(())
}

/// Checks a probability-like parameter: in `[0, 1]`.
pub(crate) fn check_unit(what: &'static str, value: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&value) {
        return Err(DistillError::OutOfRange {
            what,
            value,
            range: "[0, 1]",
        });
    }
    Ok(())
}

/// Checks that teacher and student logits (and the mask) describe the same `[B, T, V]` batch.
pub(crate) fn check_logits(
    teacher: &Tensor<3>,
    student: &Tensor<3>,
    mask: Option<&TokenMask>,
) -> Result<()> {
    if teacher.dims() != student.dims() {
        return Err(DistillError::ShapeMismatch {
            what: "teacher logits",
            expected: student.dims().to_vec(),
            got: teacher.dims().to_vec(),
        });
    }
    if let Some(m) = mask {
        let [b, t, _] = student.dims();
        m.check([b, t])?;
    }
    Ok(())
}

/// Divides by the temperature (a no-op at `τ = 1`).
pub(crate) fn temper(logits: Tensor<3>, temperature: f64) -> Tensor<3> {
    if temperature == 1.0 {
        logits
    } else {
        logits.div_scalar(temperature)
    }
}

/// Validates the pair and computes both tempered log-probabilities, padding zeroed and the
/// teacher detached from any autodiff graph.
pub(crate) fn tempered(
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    temperature: f64,
) -> Result<Tempered> {
    check_logits(&teacher, &student, mask)?;
    check_temperature(temperature)?;
    let teacher = zero_padding(teacher.without_autodiff(), mask);
    let student = zero_padding(student, mask);
    Ok(Tempered {
        log_p: log_softmax(temper(teacher, temperature)),
        log_q: log_softmax(temper(student, temperature)),
    })
}

/// `τ² ·` the masked mean of per-token values.
pub(crate) fn finish(
    per_token: Tensor<2>,
    mask: Option<&TokenMask>,
    temperature: f64,
) -> Tensor<1> {
    let mean = masked_mean(per_token, mask);
    if temperature == 1.0 {
        mean
    } else {
        mean.mul_scalar(temperature * temperature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use moekit_testing::device;

    fn host(t: Tensor<3>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    #[test]
    fn log_softmax_is_finite_and_exact_for_extreme_rows() {
        let device = device(0);
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1e4f32, -1e4, 0.0, 1e4], [1, 1, 4]),
            &device,
        );
        let v = host(log_softmax(x));
        let ln2 = 2f32.ln();
        let want = [-ln2, -2e4 - ln2, -1e4 - ln2, -ln2];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "{v:?}");
        }
    }

    #[test]
    fn log_mix_matches_the_mixture_and_its_ends() {
        let device = device(0);
        let a = Tensor::<3>::from_data(TensorData::new(vec![-0.1f32, -3.0], [1, 1, 2]), &device);
        let b = Tensor::<3>::from_data(TensorData::new(vec![-2.0f32, -0.5], [1, 1, 2]), &device);
        let got = host(log_mix(a.clone(), b.clone(), 0.3));
        for (i, (x, y)) in [(-0.1f64, -2.0f64), (-3.0, -0.5)].into_iter().enumerate() {
            let want = (0.3 * x.exp() + 0.7 * y.exp()).ln() as f32;
            assert!((got[i] - want).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(host(log_mix(a.clone(), b.clone(), 0.0)), host(b));
        assert_eq!(host(log_mix(a.clone(), a.clone() * 5.0, 1.0)), host(a));
    }
}
