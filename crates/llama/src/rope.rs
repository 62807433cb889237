//! Rotary position embeddings in Hugging Face's rotate-half convention.
//!
//! RoFormer (Su et al. 2021): a query or key `x` at position `m` becomes
//! `x·cos(mθ) + rotate_half(x)·sin(mθ)` with `θ_i = base^(-2i/d)` and
//! `rotate_half([x₁, x₂]) = [-x₂, x₁]` (the halves, not interleaved pairs). Llama-3 scaling
//! (Meta 2024) divides the low frequencies by `factor` and blends the middle band.

use burn::tensor::{Device, Tensor, TensorData};

use crate::Result;
use crate::config::{LlamaConfig, RopeScaling};

/// Inverse frequencies of the rotary embedding (no learned state).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

/// `cos` and `sin` tables for a run of positions, each `[T, D]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    /// The rotary embedding a configuration describes.
    pub fn new(config: &LlamaConfig) -> Result<Self> {
        let d = config.head_width();
        let base = config.rope_base();
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(scaling) = config.rope_scaling()? {
            scale_frequencies(&mut inv_freq, &scaling);
        }
        Ok(Self { inv_freq })
    }

    /// Tables for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> RopeTables {
        let half = self.inv_freq.len();
        let d = 2 * half;
        let mut cos = Vec::with_capacity(len * d);
        let mut sin = Vec::with_capacity(len * d);
        for pos in start..start + len {
            // The two halves share frequencies: emb = cat(freqs, freqs).
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, [len, d]), device),
            sin: Tensor::from_data(TensorData::new(sin, [len, d]), device),
        }
    }
}

impl RopeTables {
    /// Rotates queries or keys.
    ///
    /// # Shapes
    /// - x: `[B, heads, T, D]`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = self.cos.clone().reshape([1, 1, t, d]);
        let sin = self.sin.clone().reshape([1, 1, t, d]);
        x * cos + rotated * sin
    }
}

/// Applies `linear` or `llama3` frequency scaling (transformers' `_compute_llama3_parameters`).
fn scale_frequencies(inv_freq: &mut [f64], s: &RopeScaling) {
    let factor = s.factor.unwrap_or(1.0);
    match s.rope_type.as_str() {
        "linear" => inv_freq.iter_mut().for_each(|f| *f /= factor),
        "llama3" => {
            let low = s.low_freq_factor.unwrap_or(1.0);
            let high = s.high_freq_factor.unwrap_or(4.0);
            let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_the_reference_bands() {
        let mut c = LlamaConfig::llama(10, 64, 8, 1, 1, 1);
        c.rope_theta = Some(500_000.0);
        c.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
        });
        let plain = {
            let mut p = c.clone();
            p.rope_scaling = None;
            Rope::new(&p).unwrap().inv_freq
        };
        let scaled = Rope::new(&c).unwrap().inv_freq;
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f64::consts::PI / p;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(p, s, "high frequencies are kept");
            } else if wavelen > 8192.0 {
                assert!((p / 8.0 - s).abs() < 1e-15, "low frequencies are divided");
            } else {
                assert!(*s < *p && *s > p / 8.0, "the middle band is blended");
            }
        }
    }
}
