//! Distillation training of LLaMA-family and MoE students.
//!
//! - [`DistillStep`]: one optimiser step — teacher and student forward passes, the weighted
//!   [`moekit_distill::Distiller`] loss plus the student's MoE auxiliary losses, gradients
//!   accumulated over micro-batches, clipped by their global norm ([`clip_grad_norm`]), and an
//!   AdamW update. Custom training loops call it with their own batches and learning rates.
//! - [`Trainer`]: a whole run around it — seeded data order over [`TokenWindows`]
//!   ([`DataOrder`]), linear warm-up and cosine decay, a [`TrainableSet`] (router, experts,
//!   shared, adapters, attention, norms, embeddings, all) with everything else frozen,
//!   periodic held-out [`evaluate`] (perplexity and KL to the teacher), atomic
//!   [`checkpoint`]s and an exact [`Trainer::resume`]. A NaN or infinite loss stops the run
//!   with [`TrainError::NonFinite`] naming the step and the loss part.
//!
//! ```no_run
//! use moekit_distill::DistillConfig;
//! use moekit_train::{LogObserver, TokenWindows, TrainConfig, Trainer};
//! # fn run(teacher: moekit_llama::Llama, student: moekit_llama::Llama, ids: Vec<u32>)
//! #     -> moekit_train::Result<()> {
//! let config = TrainConfig::new(200).with_lr(1e-4).with_checkpoint_every(50);
//! let distiller = DistillConfig::new("kl:1,ce:0.1".parse()?)
//!     .with_temperature(2.0)
//!     .init(&student.device())?;
//! let data = TokenWindows::new(ids, config.seq_len)?;
//! let mut trainer = Trainer::new(
//!     teacher,
//!     student,
//!     distiller,
//!     "router,adapters".parse()?,
//!     config,
//!     data,
//!     None,
//! )?
//! .with_checkpoints("out/checkpoints");
//! trainer.resume()?; // continues a killed run, if any
//! let summary = trainer.run(&mut LogObserver)?;
//! let trained = trainer.student();
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data;
pub mod digest;
pub mod error;
pub mod eval;
pub mod step;
pub mod trainable;
pub mod trainer;

pub use clip::{clip_grad_norm, grad_norm};
pub use config::TrainConfig;
pub use data::{Batch, DataOrder, TokenWindows};
pub use error::{Result, TrainError};
pub use eval::{EvalReport, evaluate};
pub use step::{DistillStep, StepReport};
pub use trainable::{Trainable, TrainableSet};
pub use trainer::{LogObserver, TrainObserver, TrainSummary, Trainer};
