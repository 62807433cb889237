//! A frozen linear layer with a LoRA update: `x·W + b + s·((dropout(x)·A)·B)`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::Tensor;

use crate::adapter::LoraAdapter;
use crate::error::{LoraError, Result};
use crate::freeze::freeze;

/// A linear layer adapted by LoRA (Hu et al. 2021). The base weight is frozen: no gradient of it
/// is computed or stored, and the dense `W + ΔW` is not formed while training. Only
/// [`LoraLinear::adapter`] trains.
///
/// [`merge`](LoraLinear::merge) folds the update into a weight for inference;
/// [`unmerge`](LoraLinear::unmerge) drops it again and gives back the base weight bit for bit
/// (the base is kept, not recovered by subtraction). [`into_merged`](LoraLinear::into_merged)
/// yields a plain [`Linear`] without the extra copy.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen base layer (`weight [in, out]`, optional bias).
    pub base: Linear,
    /// The trainable low-rank update.
    pub adapter: LoraAdapter,
    /// `W + ΔW` while merged.
    pub merged: Option<Param<Tensor<2>>>,
}

impl LoraLinear {
    /// Wraps `base` with `adapter`, freezing the base.
    pub fn new(base: Linear, adapter: LoraAdapter) -> Result<Self> {
        let [d_in, d_out] = base.weight.dims();
        if adapter.d_in() != d_in || adapter.d_out() != d_out {
            return Err(LoraError::Shape(format!(
                "an adapter for {}→{} cannot wrap a {d_in}→{d_out} linear layer",
                adapter.d_in(),
                adapter.d_out()
            )));
        }
        Ok(Self {
            base: freeze(base),
            adapter,
            merged: None,
        })
    }

    /// Whether the update is folded into the weight.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Forward pass: `x·W + b + s·((dropout(x)·A)·B)`, or `x·(W + ΔW) + b` while merged.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.merged {
            Some(w) => self.with_bias(x.matmul(w.val().unsqueeze())),
            None => self.base.forward(x.clone()) + self.adapter.forward(x),
        }
    }

    fn with_bias<const D: usize>(&self, y: Tensor<D>) -> Tensor<D> {
        match &self.base.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }

    /// The merged weight `W + s·A·B`, `[in, out]`.
    pub fn merged_weight(&self) -> Tensor<2> {
        self.base.weight.val() + self.adapter.delta()
    }

    /// Folds the update into the weight, so the forward pass is one matmul (inference). Holds
    /// the merged copy beside the base weight until [`unmerge`](Self::unmerge). The copy is
    /// detached: while merged, the forward pass sends no gradient to `A` or `B`, and a merged
    /// copy does not follow later updates of them (unmerge, train, merge again).
    pub fn merge(&mut self) {
        let weight = self.merged_weight().detach();
        self.merged = Some(Param::from_tensor(weight).set_require_grad(false));
    }

    /// Undoes [`merge`](Self::merge): the forward pass uses the untouched base weight and the
    /// adapter again.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    /// A plain linear layer computing the same function (`W + ΔW`, same bias). Its weight is a
    /// new leaf, trainable like any linear layer's (on an autodiff device too).
    pub fn into_merged(self) -> Linear {
        let weight = self.merged_weight().detach();
        Linear {
            weight: Param::from_tensor(weight),
            bias: self.base.bias,
        }
    }
}
