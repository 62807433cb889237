//! Shared experts: a dense FFN every token passes through, optionally gated (Qwen2-MoE).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;

use crate::ffn::{FeedForward, FeedForwardConfig};

/// Configuration of a [`SharedExpert`].
#[derive(Config, Debug)]
pub struct SharedExpertConfig {
    /// Intermediate width of the shared FFN (all shared experts together, as in Qwen2-MoE's
    /// `shared_expert_intermediate_size`).
    pub intermediate_size: usize,
    /// Scale the shared output by `sigmoid(x·w_gate)` (Qwen2-MoE's `shared_expert_gate`).
    #[config(default = false)]
    pub gated: bool,
}

/// Always-on experts.
#[derive(Module, Debug)]
pub struct SharedExpert {
    /// The shared FFN.
    pub ffn: FeedForward,
    /// Optional scalar gate `[H, 1]`.
    pub gate: Option<Param<Tensor<2>>>,
}

impl SharedExpertConfig {
    /// Builds the shared expert for a model of width `hidden_size`.
    pub fn init(
        &self,
        hidden_size: usize,
        activation: Activation,
        initializer: &Initializer,
        device: &Device,
    ) -> crate::Result<SharedExpert> {
        let ffn = FeedForwardConfig::new(hidden_size, self.intermediate_size)
            .with_activation(activation)
            .with_initializer(initializer.clone())
            .init(device)?;
        let gate = self
            .gated
            .then(|| initializer.init_with([hidden_size, 1], Some(hidden_size), Some(1), device));
        Ok(SharedExpert { ffn, gate })
    }
}

impl SharedExpert {
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, H]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = self.ffn.forward(x.clone());
        match &self.gate {
            Some(g) => y * sigmoid(x.matmul(g.val())),
            None => y,
        }
    }
}
