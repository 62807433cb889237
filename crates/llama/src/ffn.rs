//! The FFN slot of a decoder layer: a dense SwiGLU or a MoE layer.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use moekit_moe::{
    Activation, FeedForward, FeedForwardConfig, MoeLayer, MoeLayerConfig, MoeOutput, Selection,
    SharedExpertConfig,
};

use crate::Result;
use crate::config::FfnSpec;
use crate::lora_ffn::LoraFfn;

/// What a decoder layer runs after attention. Conversion replaces the variant; the decoder's
/// forward code does not change.
// One slot per layer, so the size of the larger variant does not matter; burn's `Module`
// derive has no impl for `Box<MoeLayer>`.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FfnSlot {
    /// `SwiGLU(x·W_gate, x·W_up)·W_down` (weights in moekit-moe's fused `[gate | up]` layout).
    Dense(FeedForward),
    /// A sparse MoE layer.
    Moe(MoeLayer),
    /// A frozen dense SwiGLU with LoRA updates (what LoRA surgery turns `Dense` into).
    Lora(LoraFfn),
}

impl FfnSlot {
    /// A randomly initialised slot of the given kind and width `hidden`.
    pub fn init(spec: FfnSpec, hidden: usize, device: &Device) -> Result<Self> {
        Ok(match spec {
            FfnSpec::Dense { intermediate_size } => Self::Dense(
                FeedForwardConfig::new(hidden, intermediate_size)
                    .with_activation(Activation::SwiGlu)
                    .init(device)?,
            ),
            FfnSpec::Moe {
                num_experts,
                top_k,
                intermediate_size,
                renormalize,
                shared_intermediate_size,
                combine_temperature,
            } => Self::Moe(
                MoeLayerConfig::new(hidden, intermediate_size, num_experts)
                    .with_combine_temperature(combine_temperature)
                    .with_selection(Selection::TopK {
                        k: top_k,
                        renormalize,
                    })
                    .with_shared_expert(
                        shared_intermediate_size
                            .map(|i| SharedExpertConfig::new(i).with_gated(true)),
                    )
                    .init(device)?,
            ),
        })
    }

    /// Applies the FFN; MoE layers also return their routing.
    ///
    /// # Shapes
    /// - x: `[B, T, H]`
    pub fn forward(&self, x: Tensor<3>) -> Result<(Tensor<3>, Option<MoeOutput>)> {
        Ok(match self {
            Self::Dense(ffn) => (ffn.forward(x), None),
            Self::Lora(ffn) => (ffn.forward(x), None),
            Self::Moe(moe) => {
                let out = moe.forward(x)?;
                (out.output.clone(), Some(out))
            }
        })
    }

    /// The dense FFN of a `Dense` slot, or of a `Lora` slot with its updates folded in;
    /// `None` for MoE.
    pub fn dense(&self) -> Option<FeedForward> {
        match self {
            Self::Dense(ffn) => Some(ffn.clone()),
            Self::Lora(ffn) => Some(ffn.merged()),
            Self::Moe(_) => None,
        }
    }

    /// Parameters of the slot: `(total, active per token)`.
    pub fn param_counts(&self) -> (usize, usize) {
        match self {
            Self::Dense(ffn) => (ffn.num_params(), ffn.num_params()),
            Self::Lora(ffn) => (ffn.num_params(), ffn.num_params()),
            Self::Moe(moe) => {
                let total = moe.num_params();
                let per_expert = moe.experts.params_per_expert();
                let idle = moe.experts.num_experts() - moe.router.slots();
                (total, total - idle * per_expert)
            }
        }
    }
}
