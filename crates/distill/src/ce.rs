//! Cross-entropy of the student on hard labels.

use burn::tensor::{Int, Tensor};

use crate::error::{DistillError, Result};
use crate::mask::{TokenMask, masked_mean, zero_padding};
use crate::probs::log_softmax;

/// The label value Hugging Face uses for positions without a target.
pub const IGNORE_INDEX: i64 = -100;

/// Token-level cross-entropy `−log q_S(y)` of the student on integer labels, the masked mean
/// over positions that are valid in `mask` **and** whose label is not `ignore_index`.
///
/// `labels[b, t]` is the target of `student[b, t]`: shift the labels for next-token prediction
/// before calling. No temperature: this is the supervised term of a distillation loss.
///
/// Checks the labels' range with one device-to-host read of their minimum and maximum.
///
/// # Shapes
/// - student: `[B, T, V]` logits
/// - labels: `[B, T]` token ids in `[0, V)` or `ignore_index`
/// - mask: `[B, T]`
/// - output: `[1]`
///
/// # Errors
/// [`DistillError::ShapeMismatch`] for mismatched shapes, [`DistillError::LabelOutOfRange`]
/// for a label outside `[0, V)` that is not `ignore_index`.
pub fn cross_entropy(
    student: Tensor<3>,
    labels: Tensor<2, Int>,
    mask: Option<&TokenMask>,
    ignore_index: i64,
) -> Result<Tensor<1>> {
    let [b, t, vocab] = student.dims();
    if labels.dims() != [b, t] {
        return Err(DistillError::ShapeMismatch {
            what: "labels",
            expected: vec![b, t],
            got: labels.dims().to_vec(),
        });
    }
    let mut valid = TokenMask::from_labels(labels.clone(), ignore_index);
    if let Some(m) = mask {
        m.check([b, t])?;
        valid = valid.and(m);
    }
    let targets = labels.mask_fill(valid.valid().bool_not(), 0);
    let range: Vec<i64> = Tensor::cat(vec![targets.clone().min(), targets.clone().max()], 0)
        .into_data()
        .iter::<i64>()
        .collect();
    for label in range {
        if label < 0 || label >= vocab as i64 {
            return Err(DistillError::LabelOutOfRange {
                label,
                vocab,
                ignore_index,
            });
        }
    }
    let log_q = log_softmax(zero_padding(student, Some(&valid)));
    let nll = log_q
        .gather(2, targets.unsqueeze_dim(2))
        .squeeze_dim::<2>(2)
        .neg();
    Ok(masked_mean(nll, Some(&valid)))
}
