//! Hyper-parameters of a training run.

use burn::config::Config;

use crate::error::TrainError;

/// Configuration of a [`crate::Trainer`] run (and of the [`crate::DistillStep`] inside it).
#[derive(Config, Debug)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate of AdamW.
    #[config(default = 1e-4)]
    pub lr: f64,
    /// Linear warm-up steps (at least 1).
    #[config(default = 10)]
    pub warmup_steps: usize,
    /// Final learning rate of the cosine decay, as a fraction of the peak.
    #[config(default = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// AdamW `β₁`.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// AdamW `β₂`.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Sequences per micro-batch.
    #[config(default = 4)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[config(default = 256)]
    pub seq_len: usize,
    /// Micro-batches whose gradients are summed (losses averaged) per optimiser step.
    #[config(default = 1)]
    pub grad_accum: usize,
    /// Global gradient-norm clip (`None`: no clipping).
    #[config(default = "Some(1.0)")]
    pub max_grad_norm: Option<f64>,
    /// Weight of the MoE layers' auxiliary losses (load balancing and router z-loss, each with
    /// the layer's own coefficients), summed over layers.
    #[config(default = 1.0)]
    pub aux_weight: f64,
    /// Evaluate on the held-out windows every this many steps (0: only at the end).
    #[config(default = 0)]
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    #[config(default = 0)]
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    #[config(default = 2)]
    pub keep_checkpoints: usize,
    /// Seed of the data order.
    #[config(default = 0)]
    pub seed: u64,
}

impl TrainConfig {
    /// Checks every value.
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the first value out of range.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str, value: String, want: &str| {
            Err(TrainError::Config(format!(
                "{what} = {value}: must be {want}"
            )))
        };
        if self.steps == 0 {
            return bad("steps", "0".into(), "at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "finite and > 0");
        }
        if self.warmup_steps == 0 {
            return bad("warmup_steps", "0".into(), "at least 1");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", self.min_lr_ratio.to_string(), "in [0, 1]");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay.to_string(), ">= 0");
        }
        for (name, b) in [("beta_1", self.beta_1), ("beta_2", self.beta_2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(name, b.to_string(), "in [0, 1)");
            }
        }
        if self.batch_size == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad(
                "batch_size, seq_len and grad_accum",
                format!("{}, {}, {}", self.batch_size, self.seq_len, self.grad_accum),
                "at least 1",
            );
        }
        if let Some(c) = self.max_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad("max_grad_norm", c.to_string(), "finite and > 0");
        }
        if !(self.aux_weight.is_finite() && self.aux_weight >= 0.0) {
            return bad("aux_weight", self.aux_weight.to_string(), ">= 0");
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints", "0".into(), "at least 1");
        }
        Ok(())
    }

    /// Training tokens per optimiser step.
    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.seq_len * self.grad_accum
    }
}
