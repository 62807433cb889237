//! What a model must provide to be distilled from or into.

use burn::tensor::{Int, Tensor};

use crate::error::Result;

/// The outputs of one forward pass that distillation uses.
#[derive(Debug, Clone)]
pub struct DistillOutput {
    /// Next-token logits `[B, T, V]`.
    pub logits: Tensor<3>,
    /// Hidden states `[B, T, H]`, indexed as the model chooses (e.g. Hugging Face's
    /// convention: `0` the embeddings, `i` the output of layer `i`); the layer map of
    /// [`crate::DistillConfig`] indexes this list. Empty when not asked for.
    pub hidden: Vec<Tensor<3>>,
}

impl DistillOutput {
    /// An output with logits only.
    pub fn new(logits: Tensor<3>) -> Self {
        Self {
            logits,
            hidden: Vec::new(),
        }
    }

    /// Adds hidden states.
    pub fn with_hidden(mut self, hidden: Vec<Tensor<3>>) -> Self {
        self.hidden = hidden;
        self
    }
}

/// A model that can act as teacher or student: maps token ids to logits (and hidden states).
///
/// Implementations must:
/// - accept `tokens` on any device, moving them to the model's own device first
///   (`tokens.to_device(&device)`): the student usually runs on an autodiff device and the
///   teacher on the plain one;
/// - return hidden states when `want_hidden` is true (hidden-state losses index them), and may
///   skip computing them otherwise;
/// - report failures as [`crate::DistillError::Model`].
///
/// ```
/// use burn::tensor::{Int, Tensor};
/// use moekit_distill::{DistillModel, DistillOutput, Result};
///
/// /// A bigram "model": the logits of each token are a row of a table.
/// struct Bigram(Tensor<2>);
///
/// impl DistillModel for Bigram {
///     fn distill_forward(&self, tokens: Tensor<2, Int>, _want_hidden: bool) -> Result<DistillOutput> {
///         let [b, t] = tokens.dims();
///         let tokens = tokens.to_device(&self.0.device()).reshape([b * t]);
///         let v = self.0.dims()[1];
///         Ok(DistillOutput::new(self.0.clone().select(0, tokens).reshape([b, t, v])))
///     }
/// }
/// # let device = moekit_testing::device(0);
/// # let m = Bigram(Tensor::zeros([4, 4], &device));
/// # let out = m.distill_forward(Tensor::zeros([2, 3], &device), false).unwrap();
/// # assert_eq!(out.logits.dims(), [2, 3, 4]);
/// ```
pub trait DistillModel {
    /// Runs the model on `tokens`.
    ///
    /// # Shapes
    /// - tokens: `[B, T]`
    /// - output logits: `[B, T, V]`; hidden states: `[B, T, H]` each
    fn distill_forward(&self, tokens: Tensor<2, Int>, want_hidden: bool) -> Result<DistillOutput>;
}
