//! Routing profiles (LaDiMo, stage 2): how sharply each MoE layer routes on calibration text.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use moekit_llama::rope::Rope;
use moekit_llama::{HiddenStates, LayerSource, LayeredConfig, RopeCache};
use moekit_moe::MoeOutput;
use serde::{Deserialize, Serialize};

use crate::calib::windows;
use crate::error::{Result, RouterError};
use crate::file::{load_json, save_json};

/// Top-1 probabilities a profile counts tokens above, by default.
pub const TOP1_THRESHOLDS: [f64; 4] = [0.3, 0.5, 0.7, 0.9];

/// The fraction of tokens whose top-1 routing probability exceeds `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// The probability.
    pub threshold: f64,
    /// Fraction of tokens above it.
    pub fraction: f64,
}

/// How one MoE layer routed the calibration tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    /// Decoder layer index.
    pub layer: usize,
    /// Routed experts `E`.
    pub num_experts: usize,
    /// Mean probability of the `r`-th most probable expert, `r = 1..E` (sums to 1): a layer
    /// whose mass sits in the first entries routes sharply and needs few experts.
    pub sorted_mass: Vec<f64>,
    /// Mean entropy of the routing distribution, nats (at most `ln E`).
    pub entropy: f64,
    /// Tokens whose top-1 probability exceeds each of the thresholds given to [`profile`].
    pub top1_above: Vec<Threshold>,
    /// Share of the layer's assignments each expert received under the layer's own routing.
    pub load: Vec<f64>,
    /// Mean router probability of each expert.
    pub mean_prob: Vec<f64>,
    /// Mean experts per token under the layer's own routing.
    pub experts_per_token: f64,
}

/// Routing profile of every MoE layer of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingProfile {
    /// Calibration tokens profiled.
    pub tokens: usize,
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<LayerProfile>,
}

impl RoutingProfile {
    /// Writes the profile as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        save_json(self, path)
    }

    /// Reads a profile written by [`RoutingProfile::save`].
    pub fn load(path: &Path) -> Result<Self> {
        load_json(path)
    }
}

/// Running sums of one layer.
struct Sums {
    layer: usize,
    sorted: Vec<f64>,
    entropy: f64,
    thresholds: Vec<f64>,
    above: Vec<usize>,
    prob: Vec<f64>,
    routed: Vec<usize>,
    computed: usize,
    tokens: usize,
}

impl Sums {
    fn new(layer: usize, experts: usize, thresholds: &[f64]) -> Self {
        Self {
            layer,
            sorted: vec![0.0; experts],
            entropy: 0.0,
            thresholds: thresholds.to_vec(),
            above: vec![0; thresholds.len()],
            prob: vec![0.0; experts],
            routed: vec![0; experts],
            computed: 0,
            tokens: 0,
        }
    }

    fn add(&mut self, out: &MoeOutput) -> Result<()> {
        let [t, e] = out.routing.probs.dims();
        let probs: Vec<f32> = out
            .routing
            .probs
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data");
        let mut row = vec![0f64; e];
        for token in probs.chunks(e) {
            for (r, &p) in row.iter_mut().zip(token) {
                if !p.is_finite() {
                    return Err(RouterError::NonFinite {
                        layer: self.layer,
                        what: "a routing probability",
                    });
                }
                *r = p as f64;
            }
            for (s, p) in self.prob.iter_mut().zip(&row) {
                *s += p;
            }
            self.entropy -= row
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>();
            row.sort_by(|a, b| b.total_cmp(a));
            for (s, p) in self.sorted.iter_mut().zip(&row) {
                *s += p;
            }
            for (count, th) in self.above.iter_mut().zip(&self.thresholds) {
                *count += usize::from(row[0] > *th);
            }
        }
        for (s, r) in self.routed.iter_mut().zip(&out.stats.routed_per_expert) {
            *s += r;
        }
        self.computed += out.stats.tokens_per_expert.iter().sum::<usize>();
        self.tokens += t;
        Ok(())
    }

    fn finish(self) -> LayerProfile {
        let n = self.tokens.max(1) as f64;
        let assignments = self.routed.iter().sum::<usize>().max(1) as f64;
        LayerProfile {
            layer: self.layer,
            num_experts: self.sorted.len(),
            sorted_mass: self.sorted.iter().map(|s| s / n).collect(),
            entropy: self.entropy / n,
            top1_above: self
                .thresholds
                .iter()
                .zip(self.above)
                .map(|(&threshold, c)| Threshold {
                    threshold,
                    fraction: c as f64 / n,
                })
                .collect(),
            load: self
                .routed
                .iter()
                .map(|&r| r as f64 / assignments)
                .collect(),
            mean_prob: self.prob.iter().map(|s| s / n).collect(),
            experts_per_token: self.computed as f64 / n,
        }
    }
}

/// Runs `tokens` through `source` (a checkpoint or a model in memory) in windows of `seq_len`,
/// one decoder layer at a time as in [`moekit_llama::perplexity_layered`] (passes of at most
/// `layered.pass_tokens` tokens), and profiles every MoE layer's routing, counting tokens whose
/// top-1 probability exceeds each of `thresholds` (e.g. [`TOP1_THRESHOLDS`]).
/// `progress(done, total)` reports layers run, over every pass.
pub fn profile(
    source: &dyn LayerSource,
    tokens: &[u32],
    seq_len: usize,
    thresholds: &[f64],
    layered: &LayeredConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RoutingProfile> {
    if let Some(t) = thresholds.iter().find(|t| !(0.0..=1.0).contains(*t)) {
        return Err(RouterError::Calibration(format!(
            "top-1 threshold {t} must be in [0, 1]"
        )));
    }
    let windows = windows(tokens, seq_len)?;
    let passes = layered.passes(&windows);
    let c = source.config();
    let layers = c.num_hidden_layers;
    let mut rope = RopeCache::new(Rope::new(c)?);
    // By layer index, in layer order.
    let mut sums: BTreeMap<usize, Sums> = BTreeMap::new();
    let mut done = 0;
    for pass in &passes {
        let mut hidden = HiddenStates::embed(source, pass, layered.batch, device)?;
        for l in 0..layers {
            let block = source.layer(l, device)?;
            for out in hidden.forward(&block, &mut rope)?.into_iter().flatten() {
                sums.entry(l)
                    .or_insert_with(|| Sums::new(l, out.routing.probs.dims()[1], thresholds))
                    .add(&out)?;
            }
            done += 1;
            progress(done, passes.len() * layers);
        }
        if sums.is_empty() {
            return Err(RouterError::NoMoeLayers);
        }
    }
    let profile = RoutingProfile {
        tokens: windows.iter().map(|w| w.len()).sum(),
        layers: sums.into_values().map(Sums::finish).collect(),
    };
    tracing::info!(
        tokens = profile.tokens,
        layers = profile.layers.len(),
        "profiled routing"
    );
    Ok(profile)
}
