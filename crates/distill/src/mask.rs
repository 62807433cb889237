//! Which token positions count: the padding mask shared by every loss.

use burn::tensor::{Bool, Int, Tensor};

use crate::error::{DistillError, Result};

/// A `[B, T]` mask of the token positions that count in a loss (`true`: a real token,
/// `false`: padding).
///
/// Every loss of this crate is a *masked mean*: the per-token values at valid positions are
/// summed and divided by the number of valid positions. Padding positions never contribute, and
/// their logits and hidden states are replaced by zeros before any arithmetic, so whatever they
/// hold (even NaN or infinity) changes neither the loss nor any gradient, and their gradient is
/// exactly zero.
///
/// A batch with no valid position at all gives a loss of exactly `0` (with zero gradients)
/// rather than an error or NaN: the mean divides by `max(valid, 1)`. This keeps the losses free
/// of device-to-host reads, and an empty micro-batch in gradient accumulation simply adds nothing.
#[derive(Debug, Clone)]
pub struct TokenMask {
    valid: Tensor<2, Bool>,
}

impl TokenMask {
    /// A mask from booleans, `true` at real tokens.
    ///
    /// # Shapes
    /// - valid: `[B, T]`
    pub fn new(valid: Tensor<2, Bool>) -> Self {
        Self { valid }
    }

    /// A mask from float weights: positions with a weight above `0.5` are valid (so `1.0`
    /// marks a real token and `0.0` padding, as in Hugging Face attention masks).
    ///
    /// # Shapes
    /// - weights: `[B, T]`
    pub fn from_float(weights: Tensor<2>) -> Self {
        Self::new(weights.greater_elem(0.5))
    }

    /// The positions whose label is not `ignore_index` (Hugging Face uses `-100`).
    ///
    /// # Shapes
    /// - labels: `[B, T]`
    pub fn from_labels(labels: Tensor<2, Int>, ignore_index: i64) -> Self {
        Self::new(labels.not_equal_elem(ignore_index))
    }

    /// The boolean mask `[B, T]`, `true` at real tokens.
    pub fn valid(&self) -> Tensor<2, Bool> {
        self.valid.clone()
    }

    /// `[B, T]`.
    pub fn dims(&self) -> [usize; 2] {
        self.valid.dims()
    }

    /// Positions valid in both masks.
    pub fn and(&self, other: &TokenMask) -> TokenMask {
        Self::new(self.valid.clone().bool_and(other.valid.clone()))
    }

    /// The mask as `0.0`/`1.0` floats `[B, T]`.
    pub fn weights(&self) -> Tensor<2> {
        self.valid.clone().float()
    }

    /// Checks that the mask covers a `[B, T]` batch.
    pub(crate) fn check(&self, expected: [usize; 2]) -> Result<()> {
        if self.dims() != expected {
            return Err(DistillError::ShapeMismatch {
                what: "token mask",
                expected: expected.to_vec(),
                got: self.dims().to_vec(),
            });
        }
        Ok(())
    }
}

impl From<Tensor<2, Bool>> for TokenMask {
    fn from(valid: Tensor<2, Bool>) -> Self {
        Self::new(valid)
    }
}

impl From<Tensor<2>> for TokenMask {
    fn from(weights: Tensor<2>) -> Self {
        Self::from_float(weights)
    }
}

/// Replaces the `[B, T, W]` rows at padding positions by zeros, so padding cannot influence a
/// loss or receive a gradient.
pub(crate) fn zero_padding(x: Tensor<3>, mask: Option<&TokenMask>) -> Tensor<3> {
    match mask {
        Some(m) => {
            let [b, t, w] = x.dims();
            let invalid = m.valid().bool_not().unsqueeze_dim::<3>(2).expand([b, t, w]);
            x.mask_fill(invalid, 0.0)
        }
        None => x,
    }
}

/// The masked mean of per-token values `[B, T]`: `Σ_valid x / max(#valid, 1)`, a `[1]` tensor.
///
/// Padding values are replaced by zeros (not multiplied by them), so a non-finite value there
/// cannot leak into the result.
pub(crate) fn masked_mean(per_token: Tensor<2>, mask: Option<&TokenMask>) -> Tensor<1> {
    match mask {
        Some(m) => {
            let count = m.weights().sum().clamp_min(1.0);
            per_token.mask_fill(m.valid().bool_not(), 0.0).sum() / count
        }
        None => per_token.mean(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use moekit_testing::device;

    fn host(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
    }

    #[test]
    fn masked_mean_counts_only_valid_positions_and_is_zero_when_empty() {
        let device = device(0);
        let x = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, f32::NAN, 4.0], [2, 2]),
            &device,
        );
        let m = TokenMask::from_float(Tensor::from_data(
            TensorData::new(vec![1.0f32, 1.0, 0.0, 1.0], [2, 2]),
            &device,
        ));
        assert!((host(masked_mean(x.clone(), Some(&m))) - 7.0 / 3.0).abs() < 1e-6);
        let none = TokenMask::new(Tensor::<2>::zeros([2, 2], &device).greater_elem(0.5));
        assert_eq!(host(masked_mean(x, Some(&none))), 0.0);
    }

    #[test]
    fn labels_mask_drops_the_ignore_index() {
        let device = device(0);
        let labels = Tensor::<2, Int>::from_data(
            TensorData::new(vec![3i64, -100, 0, -100], [2, 2]),
            &device,
        );
        let w: Vec<f32> = TokenMask::from_labels(labels, -100)
            .weights()
            .into_data()
            .iter::<f32>()
            .collect();
        assert_eq!(w, vec![1.0, 0.0, 1.0, 0.0]);
    }
}
