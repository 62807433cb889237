//! The LLaMA model as a teacher or student of `moekit-distill`.

use burn::tensor::{Int, Tensor};
use moekit_distill::{DistillError, DistillModel, DistillOutput};

use crate::model::Llama;

/// Logits and, when asked, the residual stream: `hidden[0]` is the embedding output and
/// `hidden[i]` the output of layer `i` (the input of layer `i + 1`); the last entry is before
/// the final norm. Tokens are moved to the model's device first.
impl DistillModel for Llama {
    fn distill_forward(
        &self,
        tokens: Tensor<2, Int>,
        want_hidden: bool,
    ) -> moekit_distill::Result<DistillOutput> {
        let tokens = tokens.to_device(&self.device());
        let out = self
            .forward(tokens, want_hidden, None)
            .map_err(|e| DistillError::Model(e.to_string()))?;
        Ok(DistillOutput::new(out.logits).with_hidden(out.hidden_states))
    }
}
