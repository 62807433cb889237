//! Feed-forward activations used by dense FFNs and expert banks.

use burn::config::Config;
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, relu, silu};

/// The non-linearity of a feed-forward network.
///
/// Gated variants project the input to `2·I` features, `[gate | up]`, and compute
/// `act(gate) ⊙ up` (Shazeer 2020, "GLU Variants Improve Transformer"); plain ones project to `I`
/// features and apply the activation.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(x·W_gate) ⊙ (x·W_up)`: LLaMA, Mistral, Mixtral, Qwen2.
    SwiGlu,
    /// `gelu(x·W_up)` (exact erf form).
    Gelu,
    /// `relu(x·W_up)`.
    Relu,
    /// No non-linearity, `x·W_up`: a linear bottleneck (mergeable PESC adapters).
    Identity,
}

impl Activation {
    /// Whether the input projection holds a gate and an up half (`2·I` columns).
    pub fn is_gated(self) -> bool {
        matches!(self, Activation::SwiGlu)
    }

    /// Columns of the input projection for `intermediate` hidden units.
    pub fn in_width(self, intermediate: usize) -> usize {
        if self.is_gated() {
            2 * intermediate
        } else {
            intermediate
        }
    }

    /// Applies the activation to the input projection `h`.
    ///
    /// # Shapes
    /// - h: `[..., in_width(I)]`
    /// - output: `[..., I]`
    pub fn apply<const D: usize>(self, h: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::SwiGlu => {
                let width = h.dims()[D - 1] / 2;
                let mut halves = h.split(width, D - 1).into_iter();
                let (gate, up) = (halves.next().unwrap(), halves.next().unwrap());
                silu(gate) * up
            }
            Activation::Gelu => gelu(h),
            Activation::Relu => relu(h),
            Activation::Identity => h,
        }
    }
}
