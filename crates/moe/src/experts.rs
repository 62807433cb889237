//! Expert weights stored as stacked banks, so that dispatch can batch them and export can slice
//! them.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::error::MoeError;
use crate::ffn::FeedForward;

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

    /// Runs every expert on every token: the dense reference that dispatch is tested against.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[E, T, H]`
    pub fn forward_all(&self, x: Tensor<2>) -> Tensor<3> {
        let h = x.unsqueeze_dim::<3>(0).matmul(self.w_in.val());
        self.activation.apply(h).matmul(self.w_out.val())
    }
}
