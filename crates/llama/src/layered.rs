//! Whole-model passes one decoder layer at a time, for models larger than memory.
//!
//! GPTQ and SparseGPT process models too large for memory this way: the tokens' hidden states
//! `h [N, H]` flow through the model one decoder layer at a time, and only that layer's weights
//! are in memory. The layer is read from the checkpoint ([`LayerSource::layer`]; a model in
//! memory is a source too), run over every token, and dropped; the embedding and the LM head
//! are read by rows ([`LayerSource::embed_rows`], [`LayerSource::head_rows`]), the head in
//! blocks of the vocabulary ([`crate::lm_head`]), so that `[N, V]` logits never exist.
//! Peak memory is one layer plus `O(N·H)` for the hidden states, whatever the model's depth
//! and vocabulary.

use std::collections::HashMap;
use std::time::Instant;

use burn::config::Config;
use burn::nn::RmsNorm;
use burn::tensor::{Device, Tensor};
use moekit_moe::MoeOutput;

use crate::eval::{Perplexity, UsageCounter, check_input};
use crate::layer::DecoderLayer;
use crate::layer_source::LayerSource;
use crate::lm_head::head_nll;
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

impl LayeredConfig {
    /// `windows` in passes of whole windows, in order, each of at most
    /// [`LayeredConfig::pass_tokens`] tokens (one window at the least).
    pub fn passes<'a>(&self, windows: &[&'a [u32]]) -> Vec<Vec<&'a [u32]>> {
        let mut passes: Vec<Vec<&[u32]>> = Vec::new();
        let mut held = 0;
        for &w in windows {
            match passes.last_mut() {
                Some(last) if held + w.len() <= self.pass_tokens => {
                    last.push(w);
                    held += w.len();
                }
                _ => {
                    passes.push(vec![w]);
                    held = w.len();
                }
            }
        }
        passes
    }
}

/// Sequences and their hidden states, in batches of equal-length sequences `[b, t, H]`.
#[derive(Debug, Clone)]
pub struct HiddenStates {
    /// Each batch: the token ids of its sequences, and their hidden states `[b, t, H]`.
    pub batches: Vec<(Vec<Vec<u32>>, Tensor<3>)>,
}

impl HiddenStates {
    /// The embeddings of `sequences` (each its own context), `batch` sequences of one length
    /// per batch, read row by row from the source.
    pub fn embed(
        source: &dyn LayerSource,
        sequences: &[&[u32]],
        batch: usize,
        device: &Device,
    ) -> Result<Self> {
        let h = source.config().hidden_size;
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
                let rows = source.embed_rows(&ids, device)?;
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

    /// Every batch's hidden states at the positions that predict a next token (all but each
    /// sequence's last), through the final `norm`, `[b·(t−1), H]`, with the tokens they
    /// predict: what the LM head's losses take.
    pub fn predicting(&self, norm: &RmsNorm) -> Vec<(Tensor<2>, Vec<u32>)> {
        self.batches
            .iter()
            .map(|(seqs, h)| {
                let [b, t, width] = h.dims();
                let h = norm
                    .forward(h.clone())
                    .narrow(1, 0, t - 1)
                    .reshape([b * (t - 1), width]);
                let targets = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
                (h, targets)
            })
            .collect()
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

/// [`crate::perplexity`] of a model read one layer at a time: the same windows (each a
/// fresh context), the same result within float rounding, with memory that follows one layer
/// and `config.pass_tokens` hidden states instead of the model. `adapt(layer, block)` may
/// change each block after it is read (apply a routing policy, say) and before it runs.
/// `progress(done, total)` reports layers run, over every pass.
pub fn perplexity_layered(
    source: &dyn LayerSource,
    ids: &[u32],
    window: usize,
    config: &LayeredConfig,
    device: &Device,
    adapt: &mut dyn FnMut(usize, DecoderLayer) -> Result<DecoderLayer>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    check_input(ids, window)?;
    let c = source.config();
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
        return Err(LlamaError::Input(format!(
            "token id {bad} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    let windows: Vec<&[u32]> = ids.chunks(window).filter(|w| w.len() >= 2).collect();
    let passes = config.passes(&windows);
    let layers = c.num_hidden_layers;
    let total = passes.len() * (layers + 1);
    let mut rope = RopeCache::new(Rope::new(c)?);
    let norm = source.final_norm(device)?;
    let (mut nll, mut predictions, mut done) = (0.0f64, 0usize, 0);
    let mut usage = UsageCounter::default();
    let start = Instant::now();
    for pass in passes {
        let mut hidden = HiddenStates::embed(source, &pass, config.batch, device)?;
        for l in 0..layers {
            let block = adapt(l, source.layer(l, device)?)?;
            for moe in hidden.forward(&block, &mut rope)?.into_iter().flatten() {
                usage.add_layer(l, &moe);
            }
            done += 1;
            progress(done, total);
        }
        for (h, targets) in hidden.predicting(&norm) {
            predictions += targets.len();
            nll += head_nll(source, h, &targets, config.vocab_block)?;
        }
        done += 1;
        progress(done, total);
    }
    Perplexity::new(ids.len(), predictions, nll, start, &usage)
}
