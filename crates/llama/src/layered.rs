//! Whole-model passes one decoder layer at a time, for models larger than memory.
//!
//! GPTQ and SparseGPT process models too large for memory this way: the tokens' hidden states
//! `h [N, H]` flow through the model one decoder layer at a time, and only that layer's weights
//! are in memory. The layer is read from the memory-mapped checkpoint
//! ([`Checkpoint::load_layer`]), run over every token, and dropped; the embedding and the LM
//! head are read by rows ([`Checkpoint::embed_rows`], [`Checkpoint::head_rows`]), the head in
//! blocks of the vocabulary with a running log-sum-exp, so that `[N, V]` logits never exist.
//! Peak memory is one layer plus `O(N·H)` for the hidden states, whatever the model's depth
//! and vocabulary.

use std::collections::HashMap;
use std::time::Instant;

use burn::config::Config;
use burn::tensor::{Device, Tensor};
use moekit_moe::MoeOutput;

use crate::eval::{Perplexity, UsageCounter, check_input};
use crate::io::load::Checkpoint;
use crate::layer::DecoderLayer;
use crate::rope::{Rope, RopeTables};
use crate::{LlamaError, Result};

/// Settings of layer-at-a-time passes.
#[derive(Config, Debug)]
pub struct LayeredConfig {
    /// Tokens whose hidden states one pass over the layers keeps (longer inputs take several
    /// passes, each reading every layer again): bounds the `O(N·H)` part of the memory.
    #[config(default = 16384)]
    pub pass_tokens: usize,
    /// Sequences (windows) per forward call within a pass.
    #[config(default = 4)]
    pub batch: usize,
    /// Vocabulary rows of the LM head multiplied at once (`[tokens, block]` logits).
    #[config(default = 8192)]
    pub vocab_block: usize,
}

/// Sequences and their hidden states, in batches of equal-length sequences `[b, t, H]`.
#[derive(Debug, Clone)]
pub struct HiddenStates {
    /// Each batch: the token ids of its sequences, and their hidden states `[b, t, H]`.
    pub batches: Vec<(Vec<Vec<u32>>, Tensor<3>)>,
}

impl HiddenStates {
    /// The embeddings of `sequences` (each its own context), `batch` sequences of one length
    /// per batch, read row by row from the checkpoint.
    pub fn embed(
        checkpoint: &Checkpoint,
        sequences: &[&[u32]],
        batch: usize,
        device: &Device,
    ) -> Result<Self> {
        let h = checkpoint.config().hidden_size;
        // Consecutive sequences of one length go together, in order.
        let mut by_len: Vec<(usize, Vec<Vec<u32>>)> = Vec::new();
        for s in sequences.iter().filter(|s| !s.is_empty()) {
            match by_len.last_mut() {
                Some((len, b)) if *len == s.len() && b.len() < batch.max(1) => b.push(s.to_vec()),
                _ => by_len.push((s.len(), vec![s.to_vec()])),
            }
        }
        let batches = by_len
            .into_iter()
            .map(|(t, seqs)| {
                let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
                let rows = checkpoint.embed_rows(&ids, device)?;
                Ok((seqs.clone(), rows.reshape([seqs.len(), t, h])))
            })
            .collect::<Result<_>>()?;
        Ok(Self { batches })
    }

    /// Every batch's hidden states, row-major, one batch after the other: what
    /// [`HiddenStates::with_values`] takes back (to save them and resume).
    pub fn to_host(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.tokens() * self.width());
        for (_, h) in &self.batches {
            out.extend(h.clone().into_data().iter::<f32>());
        }
        out
    }

    /// The same sequences with the hidden states `values` (as [`HiddenStates::to_host`] gives
    /// them), or an error when their number does not fit.
    pub fn with_values(mut self, values: &[f32]) -> Result<Self> {
        let need = self.tokens() * self.width();
        if values.len() != need {
            return Err(LlamaError::Input(format!(
                "{} hidden-state values for {} tokens of width {} ({need} values)",
                values.len(),
                self.tokens(),
                self.width()
            )));
        }
        let mut at = 0;
        for (_, h) in &mut self.batches {
            let dims = h.dims();
            let n = dims.iter().product::<usize>();
            *h = Tensor::from_data(
                burn::tensor::TensorData::new(values[at..at + n].to_vec(), dims),
                &h.device(),
            );
            at += n;
        }
        Ok(self)
    }

    fn width(&self) -> usize {
        self.batches.first().map_or(0, |(_, h)| h.dims()[2])
    }

    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.batches
            .iter()
            .map(|(_, h)| h.dims()[0] * h.dims()[1])
            .sum()
    }

    /// Runs `layer` over every batch (`h ← layer(h)`), returning each batch's MoE output if
    /// the layer is sparse.
    pub fn forward(
        &mut self,
        layer: &DecoderLayer,
        rope: &mut RopeCache,
    ) -> Result<Vec<Option<MoeOutput>>> {
        let mut routings = Vec::with_capacity(self.batches.len());
        for (_, h) in &mut self.batches {
            let tables = rope.tables(h.dims()[1], &h.device());
            let (next, moe) = layer.forward(h.clone(), tables, None)?;
            *h = next;
            routings.push(moe);
        }
        Ok(routings)
    }
}

/// Rotary tables by sequence length, so that batches of one length share them.
#[derive(Debug)]
pub struct RopeCache {
    rope: Rope,
    tables: HashMap<usize, RopeTables>,
}

impl RopeCache {
    /// Tables of `rope` for positions from 0.
    pub fn new(rope: Rope) -> Self {
        Self {
            rope,
            tables: HashMap::new(),
        }
    }

    /// The tables of positions `0..len`.
    pub fn tables(&mut self, len: usize, device: &Device) -> &RopeTables {
        self.tables
            .entry(len)
            .or_insert_with(|| self.rope.tables(0, len, device))
    }
}

/// The summed negative log-likelihood `Σᵢ −log softmax(hᵢ·Wᵀ)[tᵢ]` of the targets under the
/// LM head, with `h` already through the final norm: the head's rows are read in blocks of
/// `vocab_block`, and each row's log-sum-exp is kept as a running `(max, Σ exp)` pair, so that
/// only `[N, vocab_block]` logits exist at a time (the fused linear cross-entropy of
/// Liger-Kernel, forward only).
///
/// # Shapes
/// - h: `[N, H]`
pub fn head_nll(
    checkpoint: &Checkpoint,
    h: Tensor<2>,
    targets: &[u32],
    vocab_block: usize,
) -> Result<f64> {
    let [n, _] = h.dims();
    if targets.len() != n {
        return Err(LlamaError::Input(format!(
            "{} targets for {n} hidden states",
            targets.len()
        )));
    }
    let device = h.device();
    let vocab = checkpoint.config().vocab_size;
    let mut max: Option<Tensor<2>> = None;
    let mut sum: Option<Tensor<2>> = None;
    for start in (0..vocab).step_by(vocab_block.max(1)) {
        let rows: Vec<usize> = (start..(start + vocab_block.max(1)).min(vocab)).collect();
        let w = checkpoint.head_rows(&rows, &device)?;
        let logits = h.clone().matmul(w.transpose()); // [N, block]
        let block_max = logits.clone().max_dim(1);
        let m = match &max {
            Some(m) => m.clone().max_pair(block_max),
            None => block_max,
        };
        let block_sum = (logits - m.clone()).exp().sum_dim(1);
        sum = Some(match (sum, &max) {
            (Some(s), Some(old)) => s * (old.clone() - m.clone()).exp() + block_sum,
            _ => block_sum,
        });
        max = Some(m);
    }
    let (max, sum) = (max.expect("vocab > 0"), sum.expect("vocab > 0"));
    let rows: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
    let target_rows = checkpoint.head_rows(&rows, &device)?;
    let target_logits = (h * target_rows).sum_dim(1);
    let nll = (max + sum.log() - target_logits).sum();
    Ok(nll.into_scalar::<f32>() as f64)
}

/// [`crate::perplexity`] of a checkpoint read one layer at a time: the same windows (each a
/// fresh context), the same result within float rounding, with memory that follows one layer
/// and `config.pass_tokens` hidden states instead of the model. `adapt(layer, block)` may
/// change each block after it is read (apply a routing policy, say) and before it runs.
/// `progress(done, total)` reports layers run, over every pass.
pub fn perplexity_layered(
    checkpoint: &Checkpoint,
    ids: &[u32],
    window: usize,
    config: &LayeredConfig,
    device: &Device,
    adapt: &mut dyn FnMut(usize, DecoderLayer) -> Result<DecoderLayer>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    check_input(ids, window)?;
    let c = checkpoint.config();
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
        return Err(LlamaError::Input(format!(
            "token id {bad} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    let windows: Vec<&[u32]> = ids.chunks(window).filter(|w| w.len() >= 2).collect();
    // Passes of whole windows, at most `pass_tokens` tokens each (one window at the least).
    let mut passes: Vec<Vec<&[u32]>> = vec![Vec::new()];
    let mut held = 0;
    for w in windows {
        let last = passes.last_mut().expect("one pass");
        if !last.is_empty() && held + w.len() > config.pass_tokens {
            passes.push(vec![w]);
            held = w.len();
        } else {
            last.push(w);
            held += w.len();
        }
    }
    let layers = c.num_hidden_layers;
    let total = passes.len() * (layers + 1);
    let mut rope = RopeCache::new(Rope::new(c)?);
    let norm = checkpoint.final_norm(device)?;
    let (mut nll, mut predictions, mut done) = (0.0f64, 0usize, 0);
    let mut usage = UsageCounter::default();
    let start = Instant::now();
    for pass in passes {
        let mut hidden = HiddenStates::embed(checkpoint, &pass, config.batch, device)?;
        for l in 0..layers {
            let block = adapt(l, checkpoint.load_layer(l, device)?)?;
            for moe in hidden.forward(&block, &mut rope)?.into_iter().flatten() {
                usage.add_layer(l, &moe);
            }
            done += 1;
            progress(done, total);
        }
        for (seqs, h) in hidden.batches {
            let [b, t, width] = h.dims();
            // Every position but each sequence's last predicts the next token.
            let h = norm
                .forward(h)
                .narrow(1, 0, t - 1)
                .reshape([b * (t - 1), width]);
            let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
            nll += head_nll(checkpoint, h, &targets, config.vocab_block)?;
            predictions += b * (t - 1);
        }
        done += 1;
        progress(done, total);
    }
    Perplexity::new(ids.len(), predictions, nll, start, &usage)
}
