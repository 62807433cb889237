//! Dense feed-forward network: the FFN a MoE layer replaces, and the body of shared experts.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::error::MoeError;

/// Configuration of a [`FeedForward`] network.
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    /// Model width `H`.
    pub hidden_size: usize,
    /// Intermediate width `I`.
    pub intermediate_size: usize,
    /// Non-linearity.
    #[config(default = "Activation::SwiGlu")]
    pub activation: Activation,
    /// Initialiser of both projections.
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / num_traits::Float::sqrt(3.0), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// A dense FFN `act(x·W_in)·W_out`, with `W_in = [W_gate | W_up]` for gated activations.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// Input projection `[H, in_width(I)]`; gated: gate columns first, then up columns.
    pub w_in: Param<Tensor<2>>,
    /// Output projection `[I, H]`.
    pub w_out: Param<Tensor<2>>,
    /// Non-linearity.
    #[module(skip)]
    pub activation: Activation,
}

impl FeedForwardConfig {
    /// Builds the network, checking that every width is positive.
    pub fn init(&self, device: &Device) -> crate::Result<FeedForward> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        if h == 0 {
            return Err(MoeError::ZeroSize {
                what: "hidden_size",
            });
        }
        if i == 0 {
            return Err(MoeError::ZeroSize {
                what: "intermediate_size",
            });
        }
        let w = self.activation.in_width(i);
        Ok(FeedForward {
            w_in: self.initializer.init_with([h, w], Some(h), Some(w), device),
            w_out: self.initializer.init_with([i, h], Some(i), Some(h), device),
            activation: self.activation,
        })
    }
}

impl FeedForward {
    /// Builds a network from its weights (e.g. loaded from a checkpoint).
    ///
    /// # Shapes
    /// - w_in: `[H, in_width(I)]`, w_out: `[I, H]`
    pub fn from_weights(
        w_in: Tensor<2>,
        w_out: Tensor<2>,
        activation: Activation,
    ) -> crate::Result<Self> {
        let [h, _] = w_in.dims();
        let i = w_out.dims()[0];
        let expected = [h, activation.in_width(i)];
        if w_in.dims() != expected {
            return Err(MoeError::WeightShape {
                what: "w_in",
                expected: expected.to_vec(),
                got: w_in.dims().to_vec(),
            });
        }
        if w_out.dims() != [i, h] {
            return Err(MoeError::WeightShape {
                what: "w_out",
                expected: vec![i, h],
                got: w_out.dims().to_vec(),
            });
        }
        Ok(Self {
            w_in: Param::from_tensor(w_in),
            w_out: Param::from_tensor(w_out),
            activation,
        })
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        self.w_in.dims()[0]
    }

    /// Intermediate width `I`.
    pub fn intermediate_size(&self) -> usize {
        self.w_out.dims()[0]
    }

    /// Applies the network.
    ///
    /// # Shapes
    /// - x: `[..., H]`
    /// - output: `[..., H]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let h = x.matmul(self.w_in.val().unsqueeze());
        self.activation
            .apply(h)
            .matmul(self.w_out.val().unsqueeze())
    }
}
