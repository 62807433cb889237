//! Activated parameters: what a token's forward pass multiplies with.
//!
//! Counted exactly as follows. Every token uses all attention projections (with biases), all
//! norms, every router, every shared expert, every dense FFN and the output projection; an
//! untied input embedding is a table lookup and does not count, while tied embeddings count
//! once, as the output projection. Of each MoE layer's routed experts a token uses only those it
//! is routed to: a layer with mean `k̄` experts per token counts `k̄ · P_e`, `P_e` being the
//! parameters of one expert (`3·H·I` for a SwiGLU, or its low-rank factors).

use burn::module::Module;
use moekit_llama::{Checkpoint, FfnSpec, Llama, LlamaConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RouterError};
use crate::policy::moe_layers;

/// The routed experts of one MoE layer, and how many a token uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerExperts {
    /// Decoder layer index.
    pub layer: usize,
    /// Routed experts `E`.
    pub num_experts: usize,
    /// Parameters of one routed expert `P_e`.
    pub params_per_expert: usize,
    /// Mean experts per token `k̄`.
    pub experts_per_token: f64,
}

/// Activated parameters per token of a model under given routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveParams {
    /// Parameters every token uses (everything but the routed experts and an untied input
    /// embedding).
    pub always: usize,
    /// The routed experts of every MoE layer.
    pub layers: Vec<LayerExperts>,
}

impl ActiveParams {
    /// The model's counts with `experts_per_token[i]` experts per token in its `i`-th MoE layer
    /// (in layer order); `None` takes each router's own number of slots (`k`, or the top-p
    /// bound).
    pub fn of(model: &Llama, experts_per_token: Option<&[f64]>) -> Result<Self> {
        let moe = moe_layers(model);
        if let Some(k) = experts_per_token
            && k.len() != moe.len()
        {
            return Err(RouterError::Policy(format!(
                "{} expert counts for {} MoE layers",
                k.len(),
                moe.len()
            )));
        }
        let embedding = if model.lm_head.is_some() {
            model.embed_tokens.weight.dims().iter().product()
        } else {
            0
        };
        let layers = moe
            .iter()
            .enumerate()
            .map(|(i, (l, m))| LayerExperts {
                layer: *l,
                num_experts: m.experts.num_experts(),
                params_per_expert: m.experts.params_per_expert(),
                experts_per_token: experts_per_token.map_or(m.router.slots() as f64, |k| k[i]),
            })
            .collect();
        Self::from_parts(model.num_params(), embedding, layers)
    }

    /// The counts of a model of `total` parameters, `untied_embedding` of them in an input
    /// embedding apart from the output projection (0 when tied), whose routed experts are
    /// `layers`; an error when they add up to more than `total` (a model whose configuration
    /// and tensors disagree).
    pub(crate) fn from_parts(
        total: usize,
        untied_embedding: usize,
        layers: Vec<LayerExperts>,
    ) -> Result<Self> {
        let routed: usize = layers
            .iter()
            .map(|l| l.num_experts * l.params_per_expert)
            .sum();
        let always = total
            .checked_sub(routed + untied_embedding)
            .ok_or_else(|| {
                RouterError::Policy(format!(
                    "the model has {total} parameters, fewer than its routed experts ({routed})                      and input embedding ({untied_embedding}) hold"
                ))
            })?;
        Ok(Self { always, layers })
    }

    /// [`ActiveParams::of`] from a checkpoint's configuration and tensor headers, without
    /// loading its weights (every routed expert of a checkpoint is a SwiGLU, `3·H·I`).
    pub fn of_checkpoint(
        checkpoint: &Checkpoint,
        experts_per_token: Option<&[f64]>,
    ) -> Result<Self> {
        let c = checkpoint.config();
        let h = c.hidden_size;
        let specs: Vec<(usize, usize, usize, usize)> = (0..c.num_hidden_layers)
            .filter_map(|l| match c.ffn_spec(l) {
                FfnSpec::Moe {
                    num_experts,
                    top_k,
                    intermediate_size,
                    ..
                } => Some((l, num_experts, top_k, 3 * h * intermediate_size)),
                FfnSpec::Dense { .. } => None,
            })
            .collect();
        if let Some(k) = experts_per_token
            && k.len() != specs.len()
        {
            return Err(RouterError::Policy(format!(
                "{} expert counts for {} MoE layers",
                k.len(),
                specs.len()
            )));
        }
        let layers = specs
            .iter()
            .enumerate()
            .map(|(i, &(layer, e, k, p))| LayerExperts {
                layer,
                num_experts: e,
                params_per_expert: p,
                experts_per_token: experts_per_token.map_or(k as f64, |x| x[i]),
            })
            .collect();
        let total = checkpoint.param_counts()?.total;
        Self::from_parts(total, untied_embedding(c), layers)
    }

    /// Activated parameters per token: `always + Σ k̄ · P_e`.
    pub fn activated(&self) -> f64 {
        self.always as f64
            + self
                .layers
                .iter()
                .map(|l| l.experts_per_token * l.params_per_expert as f64)
                .sum::<f64>()
    }

    /// Activated parameters with every routed expert active (the unreduced model's upper bound;
    /// for a neuron split, the dense model plus the routers).
    pub fn full(&self) -> usize {
        self.always
            + self
                .layers
                .iter()
                .map(|l| l.num_experts * l.params_per_expert)
                .sum::<usize>()
    }

    /// [`ActiveParams::activated`] as a fraction of [`ActiveParams::full`].
    pub fn fraction(&self) -> f64 {
        self.activated() / self.full() as f64
    }
}

/// Parameters of the input embedding apart from the output projection: `V·H`, 0 when tied.
pub(crate) fn untied_embedding(config: &LlamaConfig) -> usize {
    if config.tie_word_embeddings {
        0
    } else {
        config.vocab_size * config.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use moekit_llama::LlamaConfig;
    use moekit_testing::device;

    use super::*;

    fn mixtral(tied: bool) -> LlamaConfig {
        let mut c = LlamaConfig::llama(50, 16, 24, 2, 4, 2);
        c.model_type = "mixtral".into();
        c.tie_word_embeddings = tied;
        c.num_local_experts = Some(4);
        c.num_experts_per_tok = Some(2);
        c
    }

    #[test]
    fn counts_follow_the_definition() {
        for tied in [true, false] {
            let c = mixtral(tied);
            let model = c.init(&device(1)).unwrap();
            let p = ActiveParams::of(&model, None).unwrap();
            // By hand: per layer 4 projections (16·16 for q/o, 16·8 for k/v), 2 norms, router
            // 16·4, experts 3·16·24 each; final norm; head 16·50 (the embedding when tied).
            let attention = 2 * 16 * 16 + 2 * 16 * 8;
            let per_layer_always = attention + 2 * 16 + 16 * 4;
            let expert = 3 * 16 * 24;
            assert_eq!(p.always, 2 * per_layer_always + 16 + 16 * 50, "tied {tied}");
            assert_eq!(p.full(), p.always + 2 * 4 * expert);
            assert_eq!(p.activated(), (p.always + 2 * 2 * expert) as f64);
            // The configuration's own count agrees, less the untied input embedding.
            let from_config = c.param_counts().active - if tied { 0 } else { 16 * 50 };
            assert_eq!(p.activated(), from_config as f64);
            let half = ActiveParams::of(&model, Some(&[1.0, 0.5])).unwrap();
            assert_eq!(half.activated(), (p.always + expert + expert / 2) as f64);
            assert!(ActiveParams::of(&model, Some(&[1.0])).is_err());
        }
    }

    #[test]
    fn a_dense_model_has_no_routed_experts() {
        let model = LlamaConfig::llama(50, 16, 24, 2, 4, 2)
            .init(&device(2))
            .unwrap();
        let p = ActiveParams::of(&model, None).unwrap();
        assert!(p.layers.is_empty());
        assert_eq!(p.fraction(), 1.0);
    }
}
