//! Whole-model deviation of a routing policy: the KL divergence of next-token distributions.

use burn::tensor::activation::log_softmax;
use moekit_llama::Llama;

use crate::calib::windows;
use crate::error::{Result, RouterError};

/// Mean `KL(p_reference ‖ p_model)` of the next-token distributions over `tokens` (read in
/// windows of `seq_len`), nats per token. `reference` is typically the unreduced model and
/// `model` the same weights under a policy. `progress(done, total)` reports tokens.
pub fn logit_kl(
    reference: &Llama,
    model: &Llama,
    tokens: &[u32],
    seq_len: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<f64> {
    let device = model.device();
    let (mut sum, mut n, mut done) = (0.0f64, 0usize, 0usize);
    for w in windows(tokens, seq_len)? {
        let ids = model.tokens(&[w], &device)?;
        let p = log_softmax(reference.logits(ids.clone())?, 2);
        let q = log_softmax(model.logits(ids)?, 2);
        let kl = (p.clone().exp() * (p - q)).sum().into_scalar::<f32>() as f64;
        sum += kl;
        n += w.len();
        done += w.len();
        progress(done, tokens.len());
    }
    let kl = sum / n as f64;
    if !kl.is_finite() {
        return Err(RouterError::NonFinite {
            layer: usize::MAX,
            what: "the logit KL",
        });
    }
    Ok(kl)
}
