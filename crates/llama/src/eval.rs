//! Perplexity of a model on a token sequence.

use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use moekit_moe::MoeOutput;
use serde::Serialize;

use crate::model::Llama;
use crate::{LlamaError, Result};

/// Positions whose logits are materialised at once (`[HEAD_ROWS, V]`), so that long windows
/// do not hold a `[T, V]` logits tensor.
const HEAD_ROWS: usize = 512;

/// How many experts a MoE layer computed per token during [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExpertUsage {
    /// Decoder layer index.
    pub layer: usize,
    /// Mean routed experts computed per token.
    pub experts_per_token: f64,
}

/// Per MoE layer, the routed experts computed and the tokens routed over any number of
/// forward passes: the mean experts per token each layer really used (what a top-p rule's
/// activated parameters depend on).
#[derive(Debug, Clone, Default)]
pub struct UsageCounter {
    /// `(layer, experts computed, tokens routed)`, in layer order.
    layers: Vec<(usize, usize, usize)>,
}

impl UsageCounter {
    /// Adds one forward pass's MoE outputs (`(layer, output)`, as the model returns them).
    pub fn add(&mut self, moe: &[(usize, MoeOutput)]) {
        if self.layers.is_empty() {
            self.layers = moe.iter().map(|(l, _)| (*l, 0, 0)).collect();
        }
        for ((_, computed, routed), (_, out)) in self.layers.iter_mut().zip(moe) {
            *computed += out.stats.tokens_per_expert.iter().sum::<usize>();
            *routed += out.stats.tokens;
        }
    }

    /// Adds one MoE layer's output of one forward pass (layer-at-a-time passes count layer by
    /// layer; layers are kept in the order first seen).
    pub fn add_layer(&mut self, layer: usize, out: &MoeOutput) {
        let at = match self.layers.iter().position(|(l, _, _)| *l == layer) {
            Some(at) => at,
            None => {
                self.layers.push((layer, 0, 0));
                self.layers.len() - 1
            }
        };
        self.layers[at].1 += out.stats.tokens_per_expert.iter().sum::<usize>();
        self.layers[at].2 += out.stats.tokens;
    }

    /// Mean experts per token of every MoE layer counted, in layer order.
    pub fn usage(&self) -> Vec<ExpertUsage> {
        self.layers
            .iter()
            .map(|&(layer, computed, routed)| ExpertUsage {
                layer,
                experts_per_token: computed as f64 / routed.max(1) as f64,
            })
            .collect()
    }
}

/// The result of [`perplexity`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Perplexity {
    /// Tokens read.
    pub tokens: usize,
    /// Tokens predicted (each window's first token has no prediction).
    pub predictions: usize,
    /// Mean negative log-likelihood in nats.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Wall time of the forward passes, seconds.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_second: f64,
    /// Mean experts per token of every MoE layer, in layer order (empty for a dense model).
    pub experts_per_token: Vec<ExpertUsage>,
}

/// Perplexity `exp(−(1/N)·Σ log p(xₜ | x<t))` of `ids`, read in consecutive windows of
/// `window` tokens (each window starts a fresh context; a window of one token predicts
/// nothing). `progress(done, total)` reports tokens.
pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    window: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    check_input(ids, window)?;
    let device = model.device();
    let (mut nll, mut predictions) = (0.0f64, 0usize);
    let start = Instant::now();
    let mut done = 0;
    let mut usage = UsageCounter::default();
    for chunk in ids.chunks(window) {
        if chunk.len() >= 2 {
            let t = chunk.len();
            let (last, _, moe) =
                model.forward_hidden(model.tokens(&[chunk], &device)?, false, None)?;
            usage.add(&moe);
            // Logits for a few positions at a time: [HEAD_ROWS, V] instead of [T, V].
            for start in (0..t - 1).step_by(HEAD_ROWS) {
                let rows = HEAD_ROWS.min(t - 1 - start);
                let logp = log_softmax(model.head(last.clone().narrow(1, start, rows)), 2);
                let targets: Vec<i64> = chunk[start + 1..start + 1 + rows]
                    .iter()
                    .map(|&i| i as i64)
                    .collect();
                let targets: Tensor<3, Int> =
                    Tensor::from_data(TensorData::new(targets, [1, rows, 1]), &device);
                nll -= logp.gather(2, targets).sum().into_scalar::<f32>() as f64;
            }
            predictions += t - 1;
        }
        done += chunk.len();
        progress(done, ids.len());
    }
    Perplexity::new(ids.len(), predictions, nll, start, &usage)
}

/// Refuses fewer than 2 tokens or a window below 2.
pub(crate) fn check_input(ids: &[u32], window: usize) -> Result<()> {
    if ids.len() < 2 {
        return Err(LlamaError::Input(format!(
            "perplexity needs at least 2 tokens, got {}",
            ids.len()
        )));
    }
    if window < 2 {
        return Err(LlamaError::Input(format!(
            "window {window} must be at least 2"
        )));
    }
    Ok(())
}

impl Perplexity {
    /// The result of `predictions` predictions of total negative log-likelihood `nll` over
    /// `tokens` tokens, timed from `start`; a non-finite mean, or one whose perplexity
    /// overflows, is an error.
    pub(crate) fn new(
        tokens: usize,
        predictions: usize,
        nll: f64,
        start: Instant,
        usage: &UsageCounter,
    ) -> Result<Self> {
        let seconds = start.elapsed().as_secs_f64();
        let mean = nll / predictions as f64;
        if !mean.is_finite() {
            return Err(LlamaError::Input(format!(
                "the negative log-likelihood is {mean}: the model produced non-finite logits"
            )));
        }
        // exp overflows past ~709 nats: no perplexity to report, only that the model is broken.
        if !mean.exp().is_finite() {
            return Err(LlamaError::Input(format!(
                "the mean negative log-likelihood is {mean:.1} nats, a perplexity beyond f64: \
                 the model predicts nothing (damaged or mismatched weights?)"
            )));
        }
        Ok(Perplexity {
            tokens,
            predictions,
            nll: mean,
            perplexity: mean.exp(),
            seconds,
            tokens_per_second: tokens as f64 / seconds,
            experts_per_token: usage.usage(),
        })
    }
}
