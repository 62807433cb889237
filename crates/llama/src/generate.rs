//! Autoregressive generation with a KV cache: greedy or nucleus (top-p) sampling.

use burn::tensor::TensorData;

use crate::model::Llama;
use crate::{LlamaError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Nucleus sampling (Holtzman et al. 2020): softmax at `temperature`, keep the smallest
    /// set of most likely tokens whose mass reaches `top_p`, draw from it.
    TopP {
        /// Softmax temperature, > 0.
        temperature: f64,
        /// Mass to keep, in (0, 1].
        top_p: f64,
        /// Seed of the random draws.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation stops after any of these ids (usually the tokenizer's end-of-sequence ids).
    pub stop: Vec<u32>,
}

/// SplitMix64 (Steele et al. 2014): a small, well-mixed generator for sampling.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one row of logits.
fn choose(logits: &[f32], sampling: Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    match sampling {
        Sampling::Greedy => argmax(),
        Sampling::TopP {
            temperature, top_p, ..
        } => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut probs: Vec<(u32, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u32, ((v as f64 - max) / temperature).exp()))
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let mut kept = 0.0;
            let mut n = 0;
            while n < probs.len() && (n == 0 || kept < top_p * total) {
                kept += probs[n].1;
                n += 1;
            }
            let mut draw = rng.next_f64() * kept;
            for &(id, p) in &probs[..n] {
                draw -= p;
                if draw <= 0.0 {
                    return id;
                }
            }
            probs[n - 1].0
        }
    }
}

/// Generates up to `config.max_new_tokens` tokens after `prompt`, calling `on_token` with each
/// one as soon as it is chosen (for streaming). Returns the generated ids (a stop token, if
/// reached, included).
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    config: &GenerateConfig,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if let Sampling::TopP {
        temperature, top_p, ..
    } = config.sampling
        && !(temperature > 0.0 && top_p > 0.0 && top_p <= 1.0)
    {
        return Err(LlamaError::Input(format!(
            "temperature {temperature} must be > 0 and top-p {top_p} in (0, 1]"
        )));
    }
    let limit = model.config.max_position_embeddings;
    if prompt.len() >= limit {
        return Err(LlamaError::Input(format!(
            "the prompt has {} tokens; the model's context is {limit}",
            prompt.len()
        )));
    }
    let device = model.device();
    let mut rng = SplitMix64(match config.sampling {
        Sampling::TopP { seed, .. } => seed,
        Sampling::Greedy => 0,
    });
    let mut cache = model.new_cache();
    let mut input = model.tokens(&[prompt], &device)?;
    let mut out = Vec::new();
    while out.len() < config.max_new_tokens && cache.len() + input.dims()[1] <= limit {
        let logits = model.forward(input, false, Some(&mut cache))?.logits;
        let [_, t, v] = logits.dims();
        let last: TensorData = logits.narrow(1, t - 1, 1).reshape([v]).into_data();
        let last = last.convert::<f32>();
        let row = last.as_slice::<f32>().expect("f32 after convert");
        let next = choose(row, config.sampling, &mut rng);
        out.push(next);
        on_token(next)?;
        if config.stop.contains(&next) {
            break;
        }
        input = model.tokens(&[&[next]], &device)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus_and_greedy_takes_the_max() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = SplitMix64(7);
        assert_eq!(choose(&logits, Sampling::Greedy, &mut rng), 1);
        let mut seen = [0usize; 4];
        let sampling = Sampling::TopP {
            temperature: 1.0,
            top_p: 0.9,
            seed: 0,
        };
        for _ in 0..2000 {
            seen[choose(&logits, sampling, &mut rng) as usize] += 1;
        }
        // Tokens 1 and 2 hold ~99.6% of the mass and are both needed to reach 0.9.
        assert_eq!(seen[0] + seen[3], 0);
        assert!(seen[1] > 800 && seen[2] > 800, "{seen:?}");
    }
}
