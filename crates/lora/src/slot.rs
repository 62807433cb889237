//! A model's linear projection that is either plain or LoRA-adapted.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;

use crate::adapter::LoraAdapter;
use crate::error::Result;
use crate::linear::LoraLinear;

/// A linear projection of a model: plain, or wrapped by LoRA. Models hold their projections in
/// this enum so that adapters attach by name without rewriting the model (a module mapper
/// cannot change a field's type; replacing an enum variant can).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum LinearSlot {
    /// An ordinary linear layer.
    Plain(Linear),
    /// A frozen linear layer with a trainable LoRA update.
    Lora(LoraLinear),
}

impl From<Linear> for LinearSlot {
    fn from(linear: Linear) -> Self {
        Self::Plain(linear)
    }
}

impl LinearSlot {
    /// Forward pass of whichever variant this is.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Plain(linear) => linear.forward(x),
            Self::Lora(lora) => lora.forward(x),
        }
    }

    /// The base layer (without the LoRA update).
    pub fn base(&self) -> &Linear {
        match self {
            Self::Plain(linear) => linear,
            Self::Lora(lora) => &lora.base,
        }
    }

    /// `(in, out)` widths.
    pub fn dims(&self) -> (usize, usize) {
        let [i, o] = self.base().weight.dims();
        (i, o)
    }

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        match self {
            Self::Plain(_) => None,
            Self::Lora(lora) => Some(&lora.adapter),
        }
    }

    /// Wraps the base layer with `adapter` (replacing any adapter already there); the base is
    /// frozen.
    pub fn attach(&mut self, adapter: LoraAdapter) -> Result<()> {
        *self = Self::Lora(LoraLinear::new(self.base().clone(), adapter)?);
        Ok(())
    }

    /// A plain layer computing the same function: the update folded into the weight.
    pub fn merged(&self) -> Linear {
        match self {
            Self::Plain(linear) => linear.clone(),
            Self::Lora(lora) => lora.clone().into_merged(),
        }
    }

    /// Replaces an adapted layer by its merged plain equivalent.
    pub fn merge_into_plain(&mut self) {
        if let Self::Lora(_) = self {
            *self = Self::Plain(self.merged());
        }
    }
}
