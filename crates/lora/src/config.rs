//! LoRA hyper-parameters: rank, α, dropout, scaling rule, initialisation and targets.

use burn::config::Config;
use burn::module::Param;
use burn::nn::{DropoutConfig, Initializer};
use burn::tensor::{Device, Tensor};

use crate::adapter::LoraAdapter;
use crate::error::{LoraError, Result};

/// How the `A` factor is initialised (`B` always starts at zero, so an attached adapter does not
/// change the model until it trains).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum LoraInit {
    /// Kaiming-uniform `A`, bound `1/√in`: PyTorch's `nn.Linear` default and PEFT's
    /// `init_lora_weights=True`.
    KaimingUniform,
    /// `A ~ N(0, 1/r)`: PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// Configuration of LoRA adapters (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language
/// Models*): `ΔW = s·A·B` with `A [in, r]`, `B [r, out]` and `s = α/r`, or `s = α/√r` with
/// rsLoRA (Kalajdzievski 2023).
#[derive(Config, Debug)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub rank: usize,
    /// Scaling numerator `α`.
    #[config(default = 16.0)]
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Scale by `α/√r` (rank-stabilised LoRA) instead of `α/r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Initialisation of `A`.
    #[config(default = "LoraInit::KaimingUniform")]
    pub init: LoraInit,
    /// Which modules to adapt: regular expressions, each of which must match a module path
    /// whole or a dotted suffix of it (see [`crate::TargetModules`]); e.g. `q_proj|v_proj`,
    /// `mlp.*`, `model.layers.0.self_attn.q_proj`.
    #[config(default = "vec![\"q_proj\".to_string(), \"v_proj\".to_string()]")]
    pub target_modules: Vec<String>,
}

/// The adapter scale `α/r`, or `α/√r` with rsLoRA.
pub fn lora_scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

impl LoraConfig {
    /// The adapter scale of this configuration.
    pub fn scaling(&self) -> f64 {
        lora_scaling(self.alpha, self.rank, self.use_rslora)
    }

    /// Checks the hyper-parameters that do not depend on a layer.
    pub fn validate(&self) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(LoraError::Hyper(format!(
                "alpha = {} is not finite",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Hyper(format!(
                "dropout = {} is outside [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }

    /// A fresh adapter for a `d_in → d_out` linear layer: `A` as [`LoraConfig::init`] says,
    /// `B = 0`.
    pub fn init(&self, d_in: usize, d_out: usize, device: &Device) -> Result<LoraAdapter> {
        self.validate()?;
        let r = self.rank;
        if r == 0 || r > d_in.min(d_out) {
            return Err(LoraError::Rank {
                rank: r,
                d_in,
                d_out,
            });
        }
        let a = match self.init {
            LoraInit::KaimingUniform => Initializer::KaimingUniform {
                gain: 1.0 / 3f64.sqrt(),
                fan_out_only: false,
            },
            LoraInit::Gaussian => Initializer::Normal {
                mean: 0.0,
                std: 1.0 / r as f64,
            },
        }
        .init_with([d_in, r], Some(d_in), Some(r), device);
        Ok(LoraAdapter {
            a,
            b: Param::from_tensor(Tensor::zeros([r, d_out], device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            alpha: self.alpha,
            use_rslora: self.use_rslora,
        })
    }
}
