//! LoRA adapters for burn (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*).
//!
//! - [`LoraAdapter`]: the trainable update `s·((dropout(x)·A)·B)`, `A [in, r]`, `B [r, out]`,
//!   `s = α/r` (or `α/√r`, rsLoRA).
//! - [`LoraLinear`]: a frozen [`burn::nn::Linear`] plus an adapter; exact
//!   [`merge`](LoraLinear::merge) / [`unmerge`](LoraLinear::unmerge).
//! - [`LinearSlot`]: how models hold a projection that is plain or adapted, so adapters attach
//!   by name ([`TargetModules`]) without rewriting the model.
//! - [`peft`]: Hugging Face PEFT's tensor names and `adapter_config.json`, so adapters move
//!   between moekit and PEFT both ways. `moekit-llama` reads and writes adapter directories of
//!   LLaMA models with it.
//!
//! ```no_run
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Device, Tensor};
//! use moekit_lora::{LoraConfig, LoraLinear};
//!
//! let device = Device::default();
//! let base = LinearConfig::new(64, 32).init(&device);
//! let adapter = LoraConfig::new(8).with_alpha(16.0).init(64, 32, &device).unwrap();
//! let mut layer = LoraLinear::new(base, adapter).unwrap();
//! let y = layer.forward(Tensor::<2>::ones([4, 64], &device)); // B = 0: same as the base
//! layer.merge(); // one matmul at inference
//! ```

#![warn(missing_docs)]

mod adapter;
mod config;
mod error;
mod freeze;
mod linear;
mod pattern;
pub mod peft;
mod slot;
mod targets;

pub use adapter::LoraAdapter;
pub use config::{LoraConfig, LoraInit, lora_scaling};
pub use error::{LoraError, Result};
pub use freeze::freeze;
pub use linear::LoraLinear;
pub use pattern::PatternMap;
pub use peft::{AdaptedModule, PeftConfig, PeftTargets};
pub use slot::LinearSlot;
pub use targets::TargetModules;
