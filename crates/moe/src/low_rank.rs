//! Expert banks whose every matrix is a low-rank product `A·B` (MoE-KD's LoRA experts).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::error::MoeError;
use crate::experts::ExpertWeights;

/// Configuration of a [`LowRankBank`].
#[derive(Config, Debug)]
pub struct LowRankBankConfig {
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Model width `H`.
    pub hidden_size: usize,
    /// Intermediate width `I` of each expert.
    pub intermediate_size: usize,
    /// Rank `r` of every factored matrix.
    pub rank: usize,
    /// Non-linearity of every expert.
    #[config(default = "Activation::SwiGlu")]
    pub activation: Activation,
}

/// `E` experts `act(x·A_in·B_in)·A_out·B_out`, each matrix factored through rank `r`.
///
/// Initialised like LoRA (Hu et al. 2021): `A_in`, `B_in`, `A_out` Kaiming-uniform and
/// `B_out = 0`, so every expert starts as the zero function and a model that adds the
/// experts to a frozen dense FFN starts exactly as the dense model.
#[derive(Module, Debug)]
pub struct LowRankBank {
    /// `[E, H, r]`.
    pub in_a: Param<Tensor<3>>,
    /// `[E, r, in_width(I)]`.
    pub in_b: Param<Tensor<3>>,
    /// `[E, I, r]`.
    pub out_a: Param<Tensor<3>>,
    /// `[E, r, H]`.
    pub out_b: Param<Tensor<3>>,
    /// Non-linearity.
    #[module(skip)]
    pub activation: Activation,
}

impl LowRankBankConfig {
    /// Builds the bank (every expert the zero function).
    pub fn init(&self, device: &Device) -> crate::Result<LowRankBank> {
        let (e, h, i, r) = (
            self.num_experts,
            self.hidden_size,
            self.intermediate_size,
            self.rank,
        );
        if e == 0 {
            return Err(MoeError::NoExperts);
        }
        for (what, v) in [("hidden_size", h), ("intermediate_size", i), ("rank", r)] {
            if v == 0 {
                return Err(MoeError::ZeroSize { what });
            }
        }
        let w = self.activation.in_width(i);
        let kaiming = Initializer::KaimingUniform {
            gain: 1.0 / 3f64.sqrt(),
            fan_out_only: false,
        };
        Ok(LowRankBank {
            in_a: kaiming.init_with([e, h, r], Some(h), Some(r), device),
            in_b: kaiming.init_with([e, r, w], Some(r), Some(w), device),
            out_a: kaiming.init_with([e, i, r], Some(i), Some(r), device),
            out_b: Initializer::Zeros.init_with([e, r, h], Some(r), Some(h), device),
            activation: self.activation,
        })
    }
}

impl LowRankBank {
    /// The full weights `A·B` (differentiable in the factors).
    pub fn weights(&self) -> ExpertWeights {
        ExpertWeights {
            w_in: self.in_a.val().matmul(self.in_b.val()),
            w_out: self.out_a.val().matmul(self.out_b.val()),
            activation: self.activation,
        }
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.in_a.dims()[0]
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        self.in_a.dims()[1]
    }

    /// Intermediate width `I` of one expert.
    pub fn intermediate_size(&self) -> usize {
        self.out_a.dims()[1]
    }

    /// Rank `r` of the factors.
    pub fn rank(&self) -> usize {
        self.in_a.dims()[2]
    }
}
