//! One pre-norm decoder layer: `h + attn(norm(h))`, then `h + ffn(norm(h))`.

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Tensor};
use moekit_moe::MoeOutput;

use crate::Result;
use crate::attention::{Attention, KvCache};
use crate::config::LlamaConfig;
use crate::ffn::FfnSlot;
use crate::rope::RopeTables;

/// A callback handed a layer's FFN input and output (see [`DecoderLayer::forward_observed`]).
pub type FfnObserver<'a> = dyn FnMut(&Tensor<3>, &Tensor<3>) -> Result<()> + 'a;

/// A LLaMA decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_norm: RmsNorm,
    /// Self-attention.
    pub attention: Attention,
    /// RMSNorm before the FFN.
    pub post_attention_norm: RmsNorm,
    /// Dense or MoE FFN.
    pub ffn: FfnSlot,
}

impl DecoderLayer {
    /// Layer `layer` of `config`, randomly initialised.
    pub fn init(config: &LlamaConfig, layer: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            input_norm: rms_norm(config, device),
            attention: Attention::init(config, device),
            post_attention_norm: rms_norm(config, device),
            ffn: FfnSlot::init(config.ffn_spec(layer), config.hidden_size, device)?,
        })
    }

    /// # Shapes
    /// - h: `[B, T, H]`
    /// - output: `[B, T, H]`, and the MoE routing if the FFN is sparse.
    pub fn forward(
        &self,
        h: Tensor<3>,
        rope: &RopeTables,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<(Tensor<3>, Option<MoeOutput>)> {
        self.forward_observed(h, rope, cache, None)
    }

    /// [`DecoderLayer::forward`] that also hands the FFN's input and output to `observe`.
    ///
    /// # Shapes
    /// - h: `[B, T, H]`
    /// - observed: FFN input `[B, T, H]` (after the norm) and output `[B, T, H]`
    pub fn forward_observed(
        &self,
        h: Tensor<3>,
        rope: &RopeTables,
        cache: Option<(&mut KvCache, usize)>,
        observe: Option<&mut FfnObserver>,
    ) -> Result<(Tensor<3>, Option<MoeOutput>)> {
        let (h, x) = self.attention_block(h, rope, cache);
        let (y, moe) = self.ffn.forward(x.clone())?;
        if let Some(observe) = observe {
            observe(&x, &y)?;
        }
        Ok((h + y, moe))
    }

    /// The attention half of the layer: the residual stream after attention,
    /// `r = h + attn(norm(h))`, and the FFN's input `norm(r)`. The layer's output is
    /// `r + ffn(norm(r))`; layer-at-a-time conversion calls the halves apart, to build the FFN
    /// that the second half runs from the inputs the first half gives.
    ///
    /// # Shapes
    /// - h: `[B, T, H]`
    /// - output: residual `[B, T, H]` and FFN input `[B, T, H]`
    pub fn attention_block(
        &self,
        h: Tensor<3>,
        rope: &RopeTables,
        cache: Option<(&mut KvCache, usize)>,
    ) -> (Tensor<3>, Tensor<3>) {
        let h = h.clone()
            + self
                .attention
                .forward(self.input_norm.forward(h), rope, cache);
        let x = self.post_attention_norm.forward(h.clone());
        (h, x)
    }
}

/// An RMSNorm of width `hidden_size` with the configuration's epsilon (weights of 1).
pub(crate) fn rms_norm(config: &LlamaConfig, device: &Device) -> RmsNorm {
    RmsNormConfig::new(config.hidden_size)
        .with_epsilon(config.rms_norm_eps)
        .init(device)
}
