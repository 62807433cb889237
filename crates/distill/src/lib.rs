//! Knowledge distillation for burn: a student learns from a teacher's next-token distributions
//! and hidden states.
//!
//! - Logit divergences on `[B, T, V]` logits, all from stable log-softmaxes (in the logits'
//!   float type: f32 for moekit's models) with a temperature `τ` (values scaled by `τ²`): [`forward_kl`] (Hinton et al. 2015),
//!   [`reverse_kl`] (MiniLLM), [`skew_forward_kl`] and [`skew_reverse_kl`] (DistiLLM, MoE-KD),
//!   [`generalized_jsd`] (GKD), [`total_variation`], [`top_k_kl`] (sparse, the teacher's top-k
//!   tokens only).
//! - [`cross_entropy`] on hard labels (with Hugging Face's `-100` ignore index).
//! - Hidden-state losses [`hidden_mse`] and [`hidden_cosine`] between mapped layers, with an
//!   optional learned [`HiddenProjection`] when the widths differ.
//! - [`DistillLoss`]: a weighted combination parsed from `kl:1,hidden-mse:0.5,ce:0.1`, and the
//!   [`Distiller`] that evaluates it for any teacher and student implementing
//!   [`DistillModel`], returning the differentiable total and named parts ([`LossParts`]).
//!
//! Conventions shared by every loss:
//! - the teacher (first argument) is a constant target: no gradient reaches it;
//! - an optional [`TokenMask`] `[B, T]` (booleans, or floats where `> 0.5` is real) removes
//!   padding: each loss is the mean over valid tokens, padding never influences the value and
//!   receives zero gradient, and an all-padding batch gives exactly `0` (not NaN, not an error);
//! - results are `[1]` tensors; NaN or infinite totals are reported by [`Distiller::loss`] as
//!   [`DistillError::NonFinite`] naming the offending part.
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use moekit_distill::{DistillConfig, DistillOutput, TokenMask};
//!
//! # fn main() -> moekit_distill::Result<()> {
//! # let device = moekit_testing::device(0);
//! // `device`: any burn device, e.g. `moekit::default_device()`.
//! let distiller = DistillConfig::new("kl:1,ce:0.1".parse()?)
//!     .with_temperature(2.0)
//!     .init(&device)?;
//!
//! let train = device.clone().autodiff();
//! let teacher = Tensor::<3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
//! let student = Tensor::<3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &train)
//!     .require_grad();
//! let labels = Tensor::<3>::random([2, 5, 1], Distribution::Uniform(0.0, 16.0), &train)
//!     .int()
//!     .reshape([2, 5]);
//! // The second sequence has two padding positions at its end.
//! let mask = TokenMask::from_float(Tensor::from_floats(
//!     [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]],
//!     &train,
//! ));
//!
//! let loss = distiller.loss(
//!     DistillOutput::new(teacher),
//!     DistillOutput::new(student.clone()),
//!     Some(labels),
//!     Some(&mask),
//! )?;
//! println!("{loss}"); // loss 1.23456  kl 0.98765  ce 2.46912
//! let grads = loss.total.backward();
//! assert_eq!(student.grad(&grads).unwrap().dims(), [2, 5, 16]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod ce;
pub mod distiller;
pub mod error;
pub mod hidden;
pub mod jsd;
pub mod kl;
pub mod loss;
pub mod mask;
pub mod model;
pub mod probs;
pub mod projection;
pub mod skew;
pub mod topk;
pub mod tv;

pub use ce::{IGNORE_INDEX, cross_entropy};
pub use distiller::{DistillConfig, Distiller, LossParts};
pub use error::{DistillError, Result};
pub use hidden::{hidden_cosine, hidden_mse};
pub use jsd::generalized_jsd;
pub use kl::{forward_kl, reverse_kl};
pub use loss::{DistillLoss, LossKind, LossTerm};
pub use mask::TokenMask;
pub use model::{DistillModel, DistillOutput};
pub use projection::{HiddenProjection, HiddenProjectionConfig};
pub use skew::{skew_forward_kl, skew_reverse_kl};
pub use topk::top_k_kl;
pub use tv::total_variation;
