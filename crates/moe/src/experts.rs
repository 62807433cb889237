//! Expert weights stored as stacked banks, so that dispatch can batch them and export can slice
//! them.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::error::MoeError;
use crate::ffn::FeedForward;
use crate::low_rank::LowRankBank;

/// Configuration of an [`ExpertBank`].
#[derive(Config, Debug)]
pub struct ExpertBankConfig {
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Model width `H`.
    pub hidden_size: usize,
    /// Intermediate width `I` of each expert.
    pub intermediate_size: usize,
    /// Non-linearity of every expert.
    #[config(default = "Activation::SwiGlu")]
    pub activation: Activation,
    /// Initialiser of the expert weights (fans are those of one expert).
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / num_traits::Float::sqrt(3.0), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// `E` feed-forward experts as two parameter banks.
///
/// Expert `e` computes `act(x·w_in[e])·w_out[e]`, exactly like [`FeedForward`]; for gated
/// activations `w_in[e] = [W_gate | W_up]`.
#[derive(Module, Debug)]
pub struct ExpertBank {
    /// Input projections `[E, H, in_width(I)]`.
    pub w_in: Param<Tensor<3>>,
    /// Output projections `[E, I, H]`.
    pub w_out: Param<Tensor<3>>,
    /// Non-linearity.
    #[module(skip)]
    pub activation: Activation,
}

impl ExpertBankConfig {
    /// Builds the bank with freshly initialised experts.
    pub fn init(&self, device: &Device) -> crate::Result<ExpertBank> {
        let (e, h, i) = (self.num_experts, self.hidden_size, self.intermediate_size);
        if e == 0 {
            return Err(MoeError::NoExperts);
        }
        if h == 0 || i == 0 {
            let what = if h == 0 {
                "hidden_size"
            } else {
                "intermediate_size"
            };
            return Err(MoeError::ZeroSize { what });
        }
        let w = self.activation.in_width(i);
        Ok(ExpertBank {
            w_in: self
                .initializer
                .init_with([e, h, w], Some(h), Some(w), device),
            w_out: self
                .initializer
                .init_with([e, i, h], Some(i), Some(h), device),
            activation: self.activation,
        })
    }
}

impl ExpertBank {
    /// Builds a bank from stacked weights.
    ///
    /// # Shapes
    /// - w_in: `[E, H, in_width(I)]`, w_out: `[E, I, H]`
    pub fn from_weights(
        w_in: Tensor<3>,
        w_out: Tensor<3>,
        activation: Activation,
    ) -> crate::Result<Self> {
        let [e, h, _] = w_in.dims();
        let i = w_out.dims()[1];
        if e == 0 {
            return Err(MoeError::NoExperts);
        }
        let expected = [e, h, activation.in_width(i)];
        if w_in.dims() != expected {
            return Err(MoeError::WeightShape {
                what: "w_in",
                expected: expected.to_vec(),
                got: w_in.dims().to_vec(),
            });
        }
        if w_out.dims() != [e, i, h] {
            return Err(MoeError::WeightShape {
                what: "w_out",
                expected: vec![e, i, h],
                got: w_out.dims().to_vec(),
            });
        }
        Ok(Self {
            w_in: Param::from_tensor(w_in),
            w_out: Param::from_tensor(w_out),
            activation,
        })
    }

    /// `E` copies of a dense FFN (sparse upcycling's starting point).
    pub fn replicate(ffn: &FeedForward, num_experts: usize) -> crate::Result<Self> {
        if num_experts == 0 {
            return Err(MoeError::NoExperts);
        }
        let w_in = ffn
            .w_in
            .val()
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, num_experts);
        let w_out = ffn
            .w_out
            .val()
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, num_experts);
        Self::from_weights(w_in, w_out, ffn.activation)
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.w_in.dims()[0]
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        self.w_in.dims()[1]
    }

    /// Intermediate width `I` of one expert.
    pub fn intermediate_size(&self) -> usize {
        self.w_out.dims()[1]
    }

    /// Parameters of one expert (for activated-parameter counts).
    pub fn params_per_expert(&self) -> usize {
        let [_, h, w] = self.w_in.dims();
        h * w + self.intermediate_size() * h
    }

    /// Expert `e` as a standalone dense FFN (a copy of its weights).
    pub fn expert(&self, e: usize) -> FeedForward {
        let w_in = self.w_in.val().narrow(0, e, 1).squeeze_dim::<2>(0);
        let w_out = self.w_out.val().narrow(0, e, 1).squeeze_dim::<2>(0);
        FeedForward::from_weights(w_in, w_out, self.activation)
            .expect("a bank's slices are consistent by construction")
    }

    /// The bank's weights as tensors, what dispatch evaluates.
    pub fn weights(&self) -> ExpertWeights {
        ExpertWeights {
            w_in: self.w_in.val(),
            w_out: self.w_out.val(),
            activation: self.activation,
        }
    }

    /// Runs every expert on every token: the dense reference that dispatch is tested against.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[E, T, H]`
    pub fn forward_all(&self, x: Tensor<2>) -> Tensor<3> {
        self.weights().forward_all(x)
    }
}

/// Expert weights as (possibly computed) tensors: what dispatch evaluates. A full bank lends
/// its parameters; a [`LowRankBank`] multiplies its factors out (differentiably).
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// Input projections `[E, H, in_width(I)]`.
    pub w_in: Tensor<3>,
    /// Output projections `[E, I, H]`.
    pub w_out: Tensor<3>,
    /// Non-linearity.
    pub activation: Activation,
}

impl ExpertWeights {
    /// Runs every expert on every token.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[E, T, H]`
    pub fn forward_all(&self, x: Tensor<2>) -> Tensor<3> {
        let h = x.unsqueeze_dim::<3>(0).matmul(self.w_in.clone());
        self.activation.apply(h).matmul(self.w_out.clone())
    }

    /// Every expert's activations on every token, from one GEMM with the bank laid out as a
    /// single FFN of `E·I` neurons (no `[E, T, H]` intermediate).
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, E, I]`
    pub fn activations_all(&self, x: Tensor<2>) -> Tensor<3> {
        let [e, h, w] = self.w_in.dims();
        let t = x.dims()[0];
        // [E, H, W] → [H, E·W]: column block e is expert e's `[gate | up]`.
        let w_in = self.w_in.clone().swap_dims(0, 1).reshape([h, e * w]);
        self.activation.apply(x.matmul(w_in).reshape([t, e, w]))
    }

    /// Squared norm of every expert's output on every token, `‖Eₑ(x)‖²`, computed as
    /// `aₑᵀ·(W_outₑ·W_outₑᵀ)·aₑ` from the activations `aₑ` ([`ExpertWeights::activations_all`])
    /// when experts are narrower than the model (`I < H`), which needs `T·E·I` memory instead of
    /// the `T·E·H` of running every expert to its output (what it does otherwise).
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, E]`
    pub fn output_norms(&self, x: Tensor<2>) -> Tensor<2> {
        let [_, h, _] = self.w_in.dims();
        let i = self.w_out.dims()[1];
        if i >= h {
            return self
                .forward_all(x)
                .square()
                .sum_dim(2)
                .squeeze_dim::<2>(2)
                .transpose();
        }
        let act = self.activations_all(x).swap_dims(0, 1); // [E, T, I]
        let gram = self
            .w_out
            .clone()
            .matmul(self.w_out.clone().swap_dims(1, 2)); // [E, I, I]
        (act.clone().matmul(gram) * act)
            .sum_dim(2)
            .squeeze_dim::<2>(2)
            .transpose()
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.w_in.dims()[0]
    }
}

/// The routed experts of a [`crate::MoeLayer`]: full weight banks, or banks whose every
/// matrix is a trainable low-rank product (MoE-KD's LoRA experts).
// One per layer: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Experts {
    /// Full `[E, H, W]` / `[E, I, H]` banks.
    Full(ExpertBank),
    /// Factored banks, `W = A·B` per matrix.
    LowRank(LowRankBank),
}

impl From<ExpertBank> for Experts {
    fn from(bank: ExpertBank) -> Self {
        Self::Full(bank)
    }
}

impl From<LowRankBank> for Experts {
    fn from(bank: LowRankBank) -> Self {
        Self::LowRank(bank)
    }
}

impl Experts {
    /// The weights dispatch evaluates (low-rank factors multiplied out).
    pub fn weights(&self) -> ExpertWeights {
        match self {
            Self::Full(b) => b.weights(),
            Self::LowRank(b) => b.weights(),
        }
    }

    /// The full bank, `None` for low-rank experts.
    pub fn full(&self) -> Option<&ExpertBank> {
        match self {
            Self::Full(b) => Some(b),
            Self::LowRank(_) => None,
        }
    }

    /// A full bank with the same function (a copy; low-rank factors multiplied out).
    pub fn to_bank(&self) -> ExpertBank {
        match self {
            Self::Full(b) => b.clone(),
            Self::LowRank(b) => {
                let w = b.weights();
                ExpertBank::from_weights(w.w_in, w.w_out, w.activation)
                    .expect("factored shapes are consistent by construction")
            }
        }
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        match self {
            Self::Full(b) => b.num_experts(),
            Self::LowRank(b) => b.num_experts(),
        }
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Full(b) => b.hidden_size(),
            Self::LowRank(b) => b.hidden_size(),
        }
    }

    /// Intermediate width `I` of one expert.
    pub fn intermediate_size(&self) -> usize {
        match self {
            Self::Full(b) => b.intermediate_size(),
            Self::LowRank(b) => b.intermediate_size(),
        }
    }

    /// Trainable parameters of one expert (for activated-parameter counts).
    pub fn params_per_expert(&self) -> usize {
        self.num_params() / self.num_experts()
    }

    /// Non-linearity of every expert.
    pub fn activation(&self) -> Activation {
        match self {
            Self::Full(b) => b.activation,
            Self::LowRank(b) => b.activation,
        }
    }
}

#[cfg(test)]
mod tests {
    use moekit_testing::{device, normal, values};

    use super::*;

    #[test]
    fn output_norms_equal_the_norms_of_every_experts_output() {
        let device = device(7);
        // Narrow experts (I < H: through the Gram matrices) and wide ones (I >= H: directly).
        for (e, h, i, act) in [
            (6, 10, 3, Activation::SwiGlu),
            (5, 8, 2, Activation::Gelu),
            (3, 4, 6, Activation::SwiGlu),
        ] {
            let bank = ExpertWeights {
                w_in: normal([e, h, act.in_width(i)], 0.5, &device),
                w_out: normal([e, i, h], 0.5, &device),
                activation: act,
            };
            let x = normal([7, h], 1.0, &device);
            let all = values(bank.forward_all(x.clone())); // [E, T, H]
            let got = values(bank.output_norms(x)); // [T, E]
            for t in 0..7 {
                for k in 0..e {
                    let want: f32 = (0..h).map(|c| all[(k * 7 + t) * h + c].powi(2)).sum();
                    let g = got[t * e + k];
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want),
                        "{e}x{i}: {g} vs {want}"
                    );
                }
            }
        }
    }
}
