//! Held-out evaluation of a student against its teacher.

use std::time::Instant;

use burn::tensor::Tensor;
use moekit_distill::{IGNORE_INDEX, cross_entropy, forward_kl};
use moekit_llama::Llama;
use serde::{Deserialize, Serialize};

use crate::data::TokenWindows;
use crate::error::Result;

/// Held-out quality of a student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Optimiser steps done when it was measured.
    pub step: usize,
    /// Predicted tokens.
    pub tokens: usize,
    /// The student's mean next-token negative log-likelihood (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Mean forward KL from the teacher's next-token distribution to the student's
    /// (`KL(p_T ‖ p_S)`, nats, temperature 1).
    pub kl: f64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Evaluates `student` on every window of `data`, `batch_size` windows at a time, against
/// `teacher`. Both run without autodiff (`valid()` models): nothing is recorded for
/// gradients.
pub fn evaluate(
    teacher: &Llama,
    student: &Llama,
    data: &TokenWindows,
    batch_size: usize,
    step: usize,
) -> Result<EvalReport> {
    let start = Instant::now();
    let device = student.device();
    let (mut nll, mut kl, mut tokens) = (0f64, 0f64, 0usize);
    for ids in data.sequential(batch_size) {
        let batch = data.batch(&ids, &device);
        let n = batch.len();
        let s = student.logits(batch.tokens.clone())?;
        let t = teacher.logits(batch.tokens.to_device(&teacher.device()))?;
        let t = t.to_device(&device);
        let ce = cross_entropy(s.clone(), batch.labels, None, IGNORE_INDEX)?;
        let k = forward_kl(t, s, None, 1.0)?;
        let both: Vec<f32> = Tensor::cat(vec![ce, k], 0)
            .into_data()
            .iter::<f32>()
            .collect();
        nll += both[0] as f64 * n as f64;
        kl += both[1] as f64 * n as f64;
        tokens += n;
    }
    let nll = nll / tokens.max(1) as f64;
    Ok(EvalReport {
        step,
        tokens,
        nll,
        perplexity: nll.exp(),
        kl: kl / tokens.max(1) as f64,
        seconds: start.elapsed().as_secs_f64(),
    })
}
