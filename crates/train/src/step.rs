//! One optimiser step of distillation: what custom training loops call.

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use moekit_distill::{DistillOutput, Distiller};
use moekit_llama::Llama;
use serde::{Deserialize, Serialize};

use crate::clip::{grad_norm, scale_grads};
use crate::config::TrainConfig;
use crate::data::Batch;
use crate::error::{Result, TrainError};

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step (1-based).
    pub step: usize,
    /// Its learning rate.
    pub lr: f64,
    /// The distillation loss (weighted total, mean over micro-batches).
    pub loss: f32,
    /// `(name, unweighted value)` of each loss term, mean over micro-batches.
    pub parts: Vec<(String, f32)>,
    /// The MoE auxiliary loss (before `aux_weight`), mean over micro-batches; 0 for a dense
    /// student.
    pub aux: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens trained on.
    pub tokens: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// One distillation step: forward the teacher and the student on each micro-batch, the
/// weighted loss plus the student's MoE auxiliary losses, gradients accumulated over the
/// micro-batches, clipped by their global norm, and an AdamW update of the trainable
/// parameters (those that require gradients) of the student and the distiller's projection.
///
/// The student and the distiller live on an autodiff device; the teacher on a plain one (its
/// outputs are constants). A run of custom loops calls [`DistillStep::step`] with its own
/// batches and learning rates; [`crate::Trainer`] adds data order, schedule, evaluation and
/// checkpoints around it.
pub struct DistillStep {
    /// The teacher.
    pub teacher: Llama,
    /// The losses (and their trainable projection, if any).
    pub distiller: Distiller,
    optim: ModuleOptimizer,
    aux_weight: f64,
    max_grad_norm: Option<f64>,
}

impl DistillStep {
    /// A step with AdamW configured from `config` (its betas, weight decay, clip and
    /// auxiliary-loss weight).
    pub fn new(teacher: Llama, distiller: Distiller, config: &TrainConfig) -> Self {
        let optim = AdamWConfig::new()
            .with_beta_1(config.beta_1)
            .with_beta_2(config.beta_2)
            .with_weight_decay(config.weight_decay as f32)
            .init();
        Self {
            teacher,
            distiller,
            optim,
            aux_weight: config.aux_weight,
            max_grad_norm: config.max_grad_norm,
        }
    }

    /// The optimiser (for checkpoints: `optimizer().to_record()`).
    pub fn optimizer(&self) -> &ModuleOptimizer {
        &self.optim
    }

    /// Replaces the optimiser state (from a checkpoint).
    pub fn load_optimizer(&mut self, record: burn::optim::OptimizerRecord) {
        self.optim = self.optim.clone().load_record(record);
    }

    /// Runs step number `step` (1-based, for reports and errors) over `micro_batches` at
    /// learning rate `lr`, returning the updated student.
    ///
    /// # Errors
    /// [`TrainError::NonFinite`] naming the step and the part (a loss term, `aux`, `total` or
    /// `gradient-norm`) when a value is NaN or infinite: nothing is updated then. Model and
    /// loss errors otherwise.
    pub fn step(
        &mut self,
        student: Llama,
        micro_batches: &[Batch],
        lr: f64,
        step: usize,
    ) -> Result<(Llama, StepReport)> {
        if micro_batches.is_empty() {
            return Err(TrainError::Data("a step needs at least one batch".into()));
        }
        let start = Instant::now();
        let n = micro_batches.len() as f64;
        let want_hidden = self.distiller.wants_hidden();
        let trains_projection = self.distiller.projection.is_some();
        let mut student_acc = GradientsAccumulator::<Llama>::new();
        let mut distiller_acc = GradientsAccumulator::<Distiller>::new();
        let (mut loss, mut aux_sum, mut tokens) = (0f32, 0f32, 0usize);
        let mut parts: Vec<(String, f32)> = Vec::new();
        for batch in micro_batches {
            let out = student.forward(batch.tokens.clone(), want_hidden, None)?;
            let aux = out
                .moe
                .iter()
                .map(|(_, m)| m.aux_loss())
                .reduce(|a, b| a + b);
            let s_out = DistillOutput::new(out.logits).with_hidden(out.hidden_states);
            let t_out =
                self.distiller
                    .teacher_forward(&self.teacher, batch.tokens.clone(), &s_out)?;
            let l = self
                .distiller
                .loss(t_out, s_out, Some(batch.labels.clone()), None)
                .map_err(|e| TrainError::at_step(step, e))?;
            let mut total = l.total.clone();
            if let Some(aux) = aux {
                let value = aux.clone().into_scalar::<f32>();
                if !value.is_finite() {
                    return Err(TrainError::NonFinite {
                        step,
                        part: "aux".into(),
                        value,
                    });
                }
                aux_sum += value;
                total = total + aux.mul_scalar(self.aux_weight);
            }
            let mut grads = total.div_scalar(n).backward();
            if trains_projection {
                let g = GradientsParams::from_module(&mut grads, &self.distiller);
                distiller_acc.accumulate(&self.distiller, g);
            }
            student_acc.accumulate(&student, GradientsParams::from_grads(grads, &student));
            loss += l.value;
            for (name, value) in l.parts {
                match parts.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, acc)) => *acc += value,
                    None => parts.push((name, value)),
                }
            }
            tokens += batch.len();
        }
        let mut student_grads = student_acc.grads();
        let mut distiller_grads = distiller_acc.grads();
        // The global norm over the student's and the projection's gradients together.
        let grad_norm =
            grad_norm(&student, &student_grads).hypot(grad_norm(&self.distiller, &distiller_grads));
        if let Some(max) = self.max_grad_norm
            && grad_norm.is_finite()
            && grad_norm > max
        {
            let factor = max / (grad_norm + 1e-6);
            scale_grads(&student, &mut student_grads, factor);
            scale_grads(&self.distiller, &mut distiller_grads, factor);
        }
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                part: "gradient-norm".into(),
                value: grad_norm as f32,
            });
        }
        let student = self.optim.step(lr, student, student_grads);
        if trains_projection {
            self.distiller = self.optim.step(lr, self.distiller.clone(), distiller_grads);
        }
        let mean = |v: f32| (v as f64 / n) as f32;
        let report = StepReport {
            step,
            lr,
            loss: mean(loss),
            parts: parts.into_iter().map(|(k, v)| (k, mean(v))).collect(),
            aux: mean(aux_sum),
            grad_norm,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        };
        tracing::debug!(?report, "step");
        Ok((student, report))
    }
}
