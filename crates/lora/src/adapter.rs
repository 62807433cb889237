//! The low-rank update path `s·(dropout(x)·A)·B` of one linear layer.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::Tensor;

use crate::config::lora_scaling;
use crate::error::{LoraError, Result};

/// The trainable part of a LoRA layer (Hu et al. 2021): `A [in, r]`, `B [r, out]` and the scale
/// `s` (`α/r`, or `α/√r` with rsLoRA). Composed around a frozen base layer by
/// [`crate::LoraLinear`] or a model's own layers.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// Down projection `A`, `[in, r]` (PEFT stores its transpose, `lora_A.weight [r, in]`).
    pub a: Param<Tensor<2>>,
    /// Up projection `B`, `[r, out]` (PEFT: `lora_B.weight [out, r]`).
    pub b: Param<Tensor<2>>,
    /// Dropout on the adapter's input.
    pub dropout: Dropout,
    /// Scaling numerator `α`.
    #[module(skip)]
    pub alpha: f64,
    /// Whether the scale is `α/√r` (rsLoRA) rather than `α/r`.
    #[module(skip)]
    pub use_rslora: bool,
}

impl LoraAdapter {
    /// An adapter from its factors (e.g. read from a PEFT file), with no dropout.
    ///
    /// # Shapes
    /// - a: `[in, r]`, b: `[r, out]`
    pub fn from_factors(a: Tensor<2>, b: Tensor<2>, alpha: f64, use_rslora: bool) -> Result<Self> {
        let ([d_in, r], [r2, d_out]) = (a.dims(), b.dims());
        if r != r2 || r == 0 {
            return Err(LoraError::Shape(format!(
                "A is [{d_in}, {r}] and B is [{r2}, {d_out}]: their rank sides must be equal and positive"
            )));
        }
        if !alpha.is_finite() {
            return Err(LoraError::Hyper(format!("alpha = {alpha} is not finite")));
        }
        Ok(Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            dropout: DropoutConfig::new(0.0).init(),
            alpha,
            use_rslora,
        })
    }

    /// The same adapter with dropout probability `p` on its input while training.
    pub fn with_dropout(mut self, p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(LoraError::Hyper(format!("dropout = {p} is outside [0, 1)")));
        }
        self.dropout = DropoutConfig::new(p).init();
        Ok(self)
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.a.dims()[0]
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.b.dims()[1]
    }

    /// The scale `s`.
    pub fn scaling(&self) -> f64 {
        lora_scaling(self.alpha, self.rank(), self.use_rslora)
    }

    /// The update `s·(dropout(x)·A)·B`, computed through the rank-`r` bottleneck: `ΔW` is
    /// never formed.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.dropout
            .forward(x)
            .matmul(self.a.val().unsqueeze())
            .matmul(self.b.val().unsqueeze())
            .mul_scalar(self.scaling())
    }

    /// The dense update `ΔW = s·A·B`, `[in, out]` (for merging).
    pub fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scaling())
    }
}
