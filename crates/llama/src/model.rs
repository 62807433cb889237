//! The LLaMA-family decoder: embedding, decoder layers, final norm, output projection.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm};
use burn::tensor::{Device, Int, Tensor, TensorData};
use moekit_moe::MoeOutput;

use crate::attention::KvCache;
use crate::config::{LlamaConfig, ParamCounts};
use crate::ffn::FfnSlot;
use crate::layer::{DecoderLayer, FfnObserver, rms_norm};
use crate::rope::Rope;
use crate::{LlamaError, Result};

/// A decoder-only LLaMA-family transformer (LLaMA, Mistral, Qwen2, SmolLM, Mixtral,
/// Qwen2-MoE): pre-norm layers of grouped-query attention with rotary embeddings, each followed
/// by a dense or MoE FFN slot.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embedding `[V, H]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
    /// Output projection `[H, V]`; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: LlamaConfig,
    /// Rotary frequencies.
    #[module(skip)]
    pub rope: Rope,
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Next-token logits `[B, T, V]`.
    pub logits: Tensor<3>,
    /// The input of every layer and the final hidden state before the last norm
    /// (`num_layers + 1` tensors `[B, T, H]`), when requested.
    pub hidden_states: Vec<Tensor<3>>,
    /// `(layer, routing)` of every MoE layer, for auxiliary losses and statistics.
    pub moe: Vec<(usize, MoeOutput)>,
}

impl LlamaConfig {
    /// A randomly initialised model of this configuration (see [`crate::load`] for pretrained
    /// weights).
    pub fn init(&self, device: &Device) -> Result<Llama> {
        self.validate()?;
        let layers = (0..self.num_hidden_layers)
            .map(|l| DecoderLayer::init(self, l, device))
            .collect::<Result<_>>()?;
        Ok(Llama {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, self.hidden_size).init(device),
            layers,
            norm: rms_norm(self, device),
            lm_head: (!self.tie_word_embeddings).then(|| {
                LinearConfig::new(self.hidden_size, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            config: self.clone(),
            rope: Rope::new(self)?,
        })
    }
}

impl Llama {
    /// Next-token logits.
    ///
    /// Token ids must be below `vocab_size` (see [`Llama::tokens`] for a checked conversion).
    ///
    /// # Shapes
    /// - tokens: `[B, T]`
    /// - output: `[B, T, V]`
    pub fn logits(&self, tokens: Tensor<2, Int>) -> Result<Tensor<3>> {
        Ok(self.forward(tokens, false, None)?.logits)
    }

    /// The full forward pass. With `hidden_states`, every layer's input and the last layer's
    /// output are returned too. With a `cache`, the tokens continue the cached positions and
    /// their keys and values are appended to it.
    ///
    /// # Shapes
    /// - tokens: `[B, T]`
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        hidden_states: bool,
        cache: Option<&mut KvCache>,
    ) -> Result<ModelOutput> {
        let (h, hidden_states, moe) = self.forward_hidden(tokens, hidden_states, cache)?;
        Ok(ModelOutput {
            logits: self.head(h),
            hidden_states,
            moe,
        })
    }

    /// The decoder without [`Llama::head`]: the last layer's output `[B, T, H]`, the hidden
    /// states if asked for, and each MoE layer's routing.
    ///
    /// # Shapes
    /// - tokens: `[B, T]`
    #[allow(clippy::type_complexity)]
    pub fn forward_hidden(
        &self,
        tokens: Tensor<2, Int>,
        hidden_states: bool,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor<3>, Vec<Tensor<3>>, Vec<(usize, MoeOutput)>)> {
        self.run(tokens, hidden_states, cache, None)
    }

    /// The decoder, handing every layer's FFN input (after its norm) and output to
    /// `observe(layer, input, output)`: what conversion records to calibrate and train MoE
    /// blocks against. Returns the last layer's output `[B, T, H]`.
    ///
    /// # Shapes
    /// - tokens: `[B, T]`
    pub fn forward_ffn_io(
        &self,
        tokens: Tensor<2, Int>,
        observe: &mut dyn FnMut(usize, &Tensor<3>, &Tensor<3>) -> Result<()>,
    ) -> Result<Tensor<3>> {
        Ok(self.run(tokens, false, None, Some(observe))?.0)
    }

    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        tokens: Tensor<2, Int>,
        hidden_states: bool,
        mut cache: Option<&mut KvCache>,
        mut observe: Option<&mut dyn FnMut(usize, &Tensor<3>, &Tensor<3>) -> Result<()>>,
    ) -> Result<(Tensor<3>, Vec<Tensor<3>>, Vec<(usize, MoeOutput)>)> {
        let [_, t] = tokens.dims();
        let device = tokens.device();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let rope = self.rope.tables(start, t, &device);
        let mut h = self.embed_tokens.forward(tokens);
        let mut states = Vec::new();
        let mut moe = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            if hidden_states {
                states.push(h.clone());
            }
            let mut at_layer = observe
                .as_deref_mut()
                .map(|f| move |x: &Tensor<3>, y: &Tensor<3>| f(l, x, y));
            let (next, routing) = layer.forward_observed(
                h,
                &rope,
                cache.as_deref_mut().map(|c| (c, l)),
                at_layer.as_mut().map(|f| f as &mut FfnObserver),
            )?;
            h = next;
            if let Some(r) = routing {
                moe.push((l, r));
            }
        }
        if hidden_states {
            states.push(h.clone());
        }
        Ok((h, states, moe))
    }

    /// Final norm and output projection: the last layer's output to logits.
    ///
    /// # Shapes
    /// - h: `[B, T, H]`
    /// - output: `[B, T, V]`
    pub fn head(&self, h: Tensor<3>) -> Tensor<3> {
        let h = self.norm.forward(h);
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => h.matmul(self.embed_tokens.weight.val().transpose().unsqueeze()),
        }
    }

    /// A `[B, T]` token tensor from rows of ids, checking every id against the vocabulary and
    /// that rows have one length.
    pub fn tokens(&self, rows: &[&[u32]], device: &Device) -> Result<Tensor<2, Int>> {
        let t = rows.first().map_or(0, |r| r.len());
        if t == 0 || rows.iter().any(|r| r.len() != t) {
            return Err(LlamaError::Input(
                "token rows must be non-empty and of one length".into(),
            ));
        }
        let vocab = self.config.vocab_size;
        let mut ids = Vec::with_capacity(rows.len() * t);
        for &id in rows.iter().flat_map(|r| r.iter()) {
            if id as usize >= vocab {
                return Err(LlamaError::Input(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                )));
            }
            ids.push(id as i64);
        }
        Ok(Tensor::from_data(
            TensorData::new(ids, [rows.len(), t]),
            device,
        ))
    }

    /// A cache for incremental decoding with this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Parameter counts of the model as built (which may differ from its original
    /// configuration after conversion).
    pub fn param_counts(&self) -> ParamCounts {
        let mut counts = ParamCounts {
            total: self.num_params(),
            active: self.num_params(),
            routed_experts: 0,
        };
        for layer in &self.layers {
            let (total, active) = layer.ffn.param_counts();
            counts.active -= total - active;
            if let FfnSlot::Moe(moe) = &layer.ffn {
                counts.routed_experts += moe.experts.num_params();
            }
        }
        counts
    }

    /// The model's device.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.val().device()
    }

    /// The model with only the layers `keep` (strictly increasing indices), in that order: the
    /// depth-pruned students of layer-dropping distillation (MoE-KD removes every other layer).
    /// The configuration's layer count follows; per-layer Qwen2-MoE settings are renumbered.
    ///
    /// # Errors
    /// [`LlamaError::Input`] for no layers, an index out of range or indices not increasing.
    pub fn keep_layers(mut self, keep: &[usize]) -> Result<Self> {
        let n = self.layers.len();
        if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&l| l >= n)
        {
            return Err(LlamaError::Input(format!(
                "layers to keep {keep:?}: need strictly increasing indices below {n}"
            )));
        }
        let mut layers: Vec<Option<DecoderLayer>> = self.layers.into_iter().map(Some).collect();
        self.layers = keep
            .iter()
            .map(|&l| layers[l].take().expect("indices are distinct"))
            .collect();
        self.config.num_hidden_layers = keep.len();
        if let Some(dense) = &self.config.mlp_only_layers {
            let renumbered = keep
                .iter()
                .enumerate()
                .filter(|(_, l)| dense.contains(l))
                .map(|(i, _)| i)
                .collect();
            self.config.mlp_only_layers = Some(renumbered);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeping_all_but_the_last_layer_stops_the_residual_stream_there() {
        let device = moekit_testing::device(4);
        let model = LlamaConfig::llama(40, 16, 32, 3, 2, 1)
            .init(&device)
            .unwrap();
        let tokens = model.tokens(&[&[1, 5, 9, 2, 7]], &device).unwrap();
        let full = model.forward(tokens.clone(), true, None).unwrap();
        let pruned = model.clone().keep_layers(&[0, 1]).unwrap();
        assert_eq!(pruned.config.num_hidden_layers, 2);
        // The pruned model's last hidden state is the full model's after layer 1.
        let want = model.head(full.hidden_states[2].clone());
        moekit_testing::assert_close(pruned.logits(tokens).unwrap(), want, 1e-5, 1e-5);
        for bad in [&[][..], &[1, 0], &[0, 0], &[3]] {
            assert!(matches!(
                model.clone().keep_layers(bad),
                Err(LlamaError::Input(_))
            ));
        }
    }
}
