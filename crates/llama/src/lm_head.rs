//! Losses of the LM head computed over blocks of the vocabulary, so that `[N, V]` logits never
//! exist (the fused linear cross-entropy and divergences of Liger-Kernel, forward only).
//!
//! The head's rows are read in blocks of `vocab_block` ([`LayerSource::head_rows`]); per row
//! of hidden states a running `(max, Σ exp)` pair is kept ([`RunningLogSumExp`]), rescaled
//! whenever a block raises the maximum, and whatever else a loss needs is kept on the same
//! scale.

use burn::tensor::Tensor;

use crate::layer_source::LayerSource;
use crate::{LlamaError, Result};

/// `log Σ_v exp(z_v)` of every row, accumulated one block of columns `z` at a time.
#[derive(Debug, Clone, Default)]
pub struct RunningLogSumExp {
    /// `[N, 1]`: the largest logit so far, and `Σ exp(z − max)`.
    state: Option<(Tensor<2>, Tensor<2>)>,
}

impl RunningLogSumExp {
    /// Adds a block of logits; returns `exp(old max − new max)` (`[N, 1]`, by which sums kept
    /// on the old scale must be multiplied; `None` for the first block) and the block's
    /// `exp(z − new max)` (`[N, block]`).
    ///
    /// # Shapes
    /// - logits: `[N, block]`
    pub fn add(&mut self, logits: Tensor<2>) -> (Option<Tensor<2>>, Tensor<2>) {
        let block_max = logits.clone().max_dim(1);
        let (max, rescale) = match &self.state {
            Some((old, _)) => {
                let max = old.clone().max_pair(block_max);
                let rescale = (old.clone() - max.clone()).exp();
                (max, Some(rescale))
            }
            None => (block_max, None),
        };
        let weights = (logits - max.clone()).exp();
        let block_sum = weights.clone().sum_dim(1);
        let sum = match (&self.state, &rescale) {
            (Some((_, s)), Some(r)) => s.clone() * r.clone() + block_sum,
            _ => block_sum,
        };
        self.state = Some((max, sum));
        (rescale, weights)
    }

    /// `Σ exp(z − max)` on the current scale, `[N, 1]`.
    fn sum(&self) -> Tensor<2> {
        self.state.as_ref().expect("a block was added").1.clone()
    }

    /// The log-sum-exp of every row, `[N, 1]` (at least one block must have been added).
    pub fn finish(self) -> Tensor<2> {
        let (max, sum) = self.state.expect("a block was added");
        max + sum.log()
    }
}

/// Checks `targets` against `n` rows and the vocabulary.
fn check_targets(source: &dyn LayerSource, n: usize, targets: &[u32]) -> Result<()> {
    if targets.len() != n {
        return Err(LlamaError::Input(format!(
            "{} targets for {n} hidden states",
            targets.len()
        )));
    }
    let vocab = source.config().vocab_size;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(LlamaError::Input(format!(
            "target {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// The vocabulary in blocks of `vocab_block` rows (0 is taken as 1).
fn blocks(vocab: usize, vocab_block: usize) -> impl Iterator<Item = Vec<usize>> {
    let step = vocab_block.max(1);
    (0..vocab)
        .step_by(step)
        .map(move |start| (start..(start + step).min(vocab)).collect())
}

/// `Σᵢ hᵢ · w_{tᵢ}`: every row's logit of its target.
fn target_logits(source: &dyn LayerSource, h: Tensor<2>, targets: &[u32]) -> Result<Tensor<2>> {
    let rows: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
    let w = source.head_rows(&rows, &h.device())?;
    Ok((h * w).sum_dim(1))
}

/// The summed negative log-likelihood `Σᵢ −log softmax(hᵢ·Wᵀ)[tᵢ]` of the targets under the
/// LM head, with `h` already through the final norm.
///
/// # Shapes
/// - h: `[N, H]`
pub fn head_nll(
    source: &dyn LayerSource,
    h: Tensor<2>,
    targets: &[u32],
    vocab_block: usize,
) -> Result<f64> {
    check_targets(source, h.dims()[0], targets)?;
    let device = h.device();
    let mut lse = RunningLogSumExp::default();
    for rows in blocks(source.config().vocab_size, vocab_block) {
        let w = source.head_rows(&rows, &device)?;
        lse.add(h.clone().matmul(w.transpose()));
    }
    let nll = (lse.finish() - target_logits(source, h, targets)?).sum();
    Ok(nll.into_scalar::<f32>() as f64)
}

/// Next-token losses of several models against a reference, through one LM head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadScore {
    /// `Σᵢ −log q(tᵢ)`, nats.
    pub nll: f64,
    /// `Σᵢ KL(p_ref,i ‖ q_i)`, nats.
    pub kl: f64,
}

/// For each of `others` (hidden states of other models on the same tokens, through the final
/// norm), its summed NLL of `targets` and its summed `KL(p ‖ q)` from the distribution `p` of
/// `reference` under the same head. Each head block is read once for all of them.
///
/// With `zᵖ`, `z^q` the logits of a row, `KL(p ‖ q) = Σ_v p_v (zᵖ_v − z^q_v) − lse(zᵖ) +
/// lse(z^q)`; the first sum is kept beside `lse(zᵖ)`'s running sum, on its scale.
///
/// # Shapes
/// - reference, others: `[N, H]`
pub fn head_scores(
    source: &dyn LayerSource,
    reference: Tensor<2>,
    others: &[Tensor<2>],
    targets: &[u32],
    vocab_block: usize,
) -> Result<Vec<HeadScore>> {
    let n = reference.dims()[0];
    check_targets(source, n, targets)?;
    if let Some(o) = others.iter().find(|o| o.dims() != reference.dims()) {
        return Err(LlamaError::Input(format!(
            "hidden states {:?} scored against a reference of {:?}",
            o.dims(),
            reference.dims()
        )));
    }
    let device = reference.device();
    let mut p_lse = RunningLogSumExp::default();
    let mut q_lse = vec![RunningLogSumExp::default(); others.len()];
    // Σ_v exp(zᵖ_v − maxᵖ)(zᵖ_v − z^q_v), on p_lse's scale.
    let mut cross: Vec<Option<Tensor<2>>> = vec![None; others.len()];
    for rows in blocks(source.config().vocab_size, vocab_block) {
        let w = source.head_rows(&rows, &device)?.transpose();
        let zp = reference.clone().matmul(w.clone());
        let (rescale, p_weights) = p_lse.add(zp.clone());
        for ((h, lse), cross) in others.iter().zip(&mut q_lse).zip(&mut cross) {
            let zq = h.clone().matmul(w.clone());
            let block = (p_weights.clone() * (zp.clone() - zq.clone())).sum_dim(1);
            *cross = Some(match (cross.take(), &rescale) {
                (Some(c), Some(r)) => c * r.clone() + block,
                _ => block,
            });
            lse.add(zq);
        }
    }
    let p_sum = p_lse.sum();
    let p_lse = p_lse.finish();
    others
        .iter()
        .zip(q_lse)
        .zip(cross)
        .map(|((h, lse), cross)| {
            let lse = lse.finish();
            let nll = (lse.clone() - target_logits(source, h.clone(), targets)?).sum();
            let kl = (cross.expect("a block") / p_sum.clone() - p_lse.clone() + lse).sum();
            Ok(HeadScore {
                nll: nll.into_scalar::<f32>() as f64,
                kl: kl.into_scalar::<f32>() as f64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, TensorData};

    use super::*;
    use crate::config::LlamaConfig;

    #[test]
    fn blockwise_losses_match_the_whole_softmax() {
        let device = moekit_testing::device(7);
        for tied in [true, false] {
            let mut c = LlamaConfig::llama(37, 8, 16, 1, 2, 1);
            c.tie_word_embeddings = tied;
            let model = c.init(&device).unwrap();
            let n = 5;
            let p = moekit_testing::normal([n, 8], 1.0, &device);
            let q = moekit_testing::normal([n, 8], 1.0, &device);
            let targets = [3u32, 0, 36, 17, 3];
            // The whole logits `[N, V]`, the independent computation.
            let w = match &model.lm_head {
                Some(head) => head.weight.val().transpose(),
                None => model.embed_tokens.weight.val(),
            };
            let lp = log_softmax(p.clone().matmul(w.clone().transpose()), 1);
            let lq = log_softmax(q.clone().matmul(w.transpose()), 1);
            let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
            let idx: Tensor<2, Int> = Tensor::from_data(TensorData::new(idx, [n, 1]), &device);
            let want_nll = -lq.clone().gather(1, idx).sum().into_scalar::<f32>() as f64;
            let want_kl = (lp.clone().exp() * (lp - lq)).sum().into_scalar::<f32>() as f64;
            for block in [1, 4, 36, 37, 100] {
                let s = head_scores(&model, p.clone(), &[q.clone(), p.clone()], &targets, block)
                    .unwrap();
                assert!(
                    (s[0].nll - want_nll).abs() < 1e-4 * want_nll,
                    "{block}: {s:?}"
                );
                assert!(
                    (s[0].kl - want_kl).abs() < 1e-4 * want_kl.max(1.0),
                    "{block}: {s:?}"
                );
                assert!(s[1].kl.abs() < 1e-5, "KL(p ‖ p) = {}", s[1].kl);
                let nll = head_nll(&model, q.clone(), &targets, block).unwrap();
                assert!((nll - want_nll).abs() < 1e-4 * want_nll, "{block}: {nll}");
            }
            assert!(head_nll(&model, q.clone(), &targets[..4], 8).is_err());
            assert!(head_nll(&model, q.clone(), &[0, 1, 2, 3, 37], 8).is_err());
            assert!(
                head_scores(&model, p.clone(), &[q.clone().narrow(0, 0, 4)], &targets, 8).is_err()
            );
        }
    }
}
