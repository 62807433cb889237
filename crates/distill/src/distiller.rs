//! The distillation objective for custom training loops.

use core::fmt;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

use crate::ce::cross_entropy;
use crate::error::DistillError;
use crate::hidden::{hidden_cosine, hidden_mse};
use crate::jsd::generalized_jsd;
use crate::kl::{forward_kl, reverse_kl};
use crate::loss::{DistillLoss, LossKind};
use crate::mask::TokenMask;
use crate::model::{DistillModel, DistillOutput};
use crate::probs::{check_temperature, check_unit};
use crate::projection::{HiddenProjection, HiddenProjectionConfig};
use crate::skew::{skew_forward_kl, skew_reverse_kl};
use crate::topk::top_k_kl;
use crate::tv::total_variation;

/// Configuration of a [`Distiller`]: the weighted losses and their hyper-parameters.
#[derive(Config, Debug)]
pub struct DistillConfig {
    /// The weighted loss terms, e.g. `"kl:1,hidden-mse:0.5,ce:0.1".parse()?`.
    pub loss: DistillLoss,
    /// Softmax temperature `τ > 0` of every logit divergence (not of `ce`), whose values are
    /// scaled by `τ²` (Hinton et al. 2015).
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Skew `α ∈ [0, 1]` of `skew-kl` and `skew-rkl` (DistiLLM and MoE-KD use 0.1).
    #[config(default = 0.1)]
    pub alpha: f64,
    /// `β ∈ [0, 1]` of `jsd` (GKD; 0.5 is the symmetric JSD, 0 forward KL, 1 reverse KL).
    #[config(default = 0.5)]
    pub beta: f64,
    /// Teacher tokens kept per position by `topk-kl`, `1 <= k <= V`.
    #[config(default = 64)]
    pub top_k: usize,
    /// Label marking positions without a target for `ce` (Hugging Face's `-100`).
    #[config(default = -100)]
    pub ignore_index: i64,
    /// Layer map of the hidden-state losses: `(student index, teacher index)` pairs into
    /// [`DistillOutput::hidden`]. The hidden losses are averaged over the pairs.
    #[config(default = "Vec::new()")]
    pub layers: Vec<(usize, usize)>,
    /// Learned student → teacher width maps for the hidden losses (needed when the widths
    /// differ); `pairs` must equal the number of layer pairs unless `shared`.
    pub projection: Option<HiddenProjectionConfig>,
}

/// Computes a [`DistillConfig`]'s weighted losses between a teacher and a student.
///
/// A module: it holds the optional trainable [`HiddenProjection`], so give it to the optimiser
/// with the student (`GradientsParams::from_module(&mut grads, &distiller)`).
#[derive(Module, Debug)]
pub struct Distiller {
    /// Student → teacher width maps of the hidden-state losses.
    pub projection: Option<HiddenProjection>,
    /// The losses and their hyper-parameters.
    #[module(skip)]
    pub config: DistillConfig,
}

/// The loss of one batch: the differentiable total and its parts on the host, for logging.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `Σ weightᵢ · partᵢ`, `[1]`: call `backward()` on it.
    pub total: Tensor<1>,
    /// The total on the host.
    pub value: f32,
    /// `(canonical name, unweighted value)` of each term of weight > 0, in the configured
    /// order.
    pub parts: Vec<(String, f32)>,
}

impl LossParts {
    /// The unweighted value of the part `name` (canonical name, see [`LossKind::name`]).
    pub fn get(&self, name: &str) -> Option<f32> {
        self.parts.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

impl fmt::Display for LossParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loss {:.5}", self.value)?;
        for (name, value) in &self.parts {
            write!(f, "  {name} {value:.5}")?;
        }
        Ok(())
    }
}

impl DistillConfig {
    /// Checks every hyper-parameter and builds the distiller (and its projection, if any).
    ///
    /// # Errors
    /// [`DistillError::OutOfRange`] for `τ`, `α`, `β` or `top_k` out of range,
    /// [`DistillError::NoLayerPairs`] for a hidden-state term without a layer map,
    /// [`DistillError::ProjectionPairs`] for a projection that does not match the layer map.
    pub fn init(&self, device: &Device) -> crate::Result<Distiller> {
        check_temperature(self.temperature)?;
        check_unit("alpha", self.alpha)?;
        check_unit("beta", self.beta)?;
        if self.top_k == 0 {
            return Err(DistillError::OutOfRange {
                what: "top_k",
                value: 0.0,
                range: "[1, V]",
            });
        }
        if let Some(term) = self.loss.active_terms().find(|t| t.kind.is_hidden())
            && self.layers.is_empty()
        {
            return Err(DistillError::NoLayerPairs {
                term: term.kind.name(),
            });
        }
        let projection = match &self.projection {
            Some(p) => {
                if !p.shared && p.pairs != self.layers.len() {
                    return Err(DistillError::ProjectionPairs {
                        expected: self.layers.len(),
                        got: p.pairs,
                    });
                }
                Some(p.init(device)?)
            }
            None => None,
        };
        Ok(Distiller {
            projection,
            config: self.clone(),
        })
    }
}

/// The teacher's tensor as a constant on the student's device: no autodiff graph, no gradient.
fn constant(t: Tensor<3>, device: &Device) -> Tensor<3> {
    let t = t.without_autodiff();
    let device = device.clone().without_autodiff();
    if t.device() == device {
        t
    } else {
        t.to_device(&device)
    }
}

impl Distiller {
    /// Whether the losses need hidden states from the models.
    pub fn wants_hidden(&self) -> bool {
        self.config.loss.wants_hidden()
    }

    /// The weighted loss between a teacher's and a student's outputs on the same batch.
    ///
    /// The teacher's outputs are detached (moved off autodiff, and onto the student's device
    /// if needed): gradients reach only the student and the projection. `labels` are needed by
    /// a `ce` term (the target of each position, already shifted; `ignore_index` masks);
    /// `mask` marks the real tokens of every term ([`TokenMask`]). Terms of weight 0 are
    /// skipped (not computed, not in the parts). All parts are read to the host together (a
    /// `ce` term reads its label range check before).
    ///
    /// # Shapes
    /// - teacher.logits, student.logits: `[B, T, V]`; hidden states `[B, T, H_T]` and
    ///   `[B, T, H_S]`
    /// - labels, mask: `[B, T]`
    ///
    /// # Errors
    /// Any loss's error, [`DistillError::MissingLabels`], [`DistillError::HiddenIndex`], and
    /// [`DistillError::NonFinite`] naming the first part (or the total) that is NaN or
    /// infinite.
    pub fn loss(
        &self,
        teacher: DistillOutput,
        student: DistillOutput,
        labels: Option<Tensor<2, Int>>,
        mask: Option<&TokenMask>,
    ) -> crate::Result<LossParts> {
        let c = &self.config;
        let device = student.logits.device();
        let t_logits = constant(teacher.logits, &device);
        let s_logits = student.logits;
        let tau = c.temperature;
        let mut parts = Vec::with_capacity(c.loss.terms().len());
        for term in c.loss.active_terms() {
            let (t, s) = (t_logits.clone(), s_logits.clone());
            let value = match term.kind {
                LossKind::ForwardKl => forward_kl(t, s, mask, tau)?,
                LossKind::ReverseKl => reverse_kl(t, s, mask, tau)?,
                LossKind::SkewForwardKl => skew_forward_kl(t, s, mask, tau, c.alpha)?,
                LossKind::SkewReverseKl => skew_reverse_kl(t, s, mask, tau, c.alpha)?,
                LossKind::Jsd => generalized_jsd(t, s, mask, tau, c.beta)?,
                LossKind::TotalVariation => total_variation(t, s, mask, tau)?,
                LossKind::TopKKl => top_k_kl(t, s, mask, tau, c.top_k)?,
                LossKind::CrossEntropy => {
                    let labels = labels.clone().ok_or(DistillError::MissingLabels)?;
                    cross_entropy(s, labels, mask, c.ignore_index)?
                }
                LossKind::HiddenMse | LossKind::HiddenCosine => {
                    self.hidden_loss(term.kind, &teacher.hidden, &student.hidden, mask, &device)?
                }
            };
            parts.push((term.kind.name(), term.weight, value));
        }
        let total = parts
            .iter()
            .map(|(_, w, v)| v.clone().mul_scalar(*w))
            .reduce(|a, b| a + b)
            .expect("a DistillLoss has a term of weight > 0");
        let mut all: Vec<Tensor<1>> = parts.iter().map(|(_, _, v)| v.clone()).collect();
        all.push(total.clone());
        let host: Vec<f32> = Tensor::cat(all, 0).into_data().iter::<f32>().collect();
        let names = parts.iter().map(|(n, _, _)| *n).chain(["total"]);
        if let Some((name, &value)) = names.zip(&host).find(|(_, v)| !v.is_finite()) {
            return Err(DistillError::NonFinite {
                part: name.to_string(),
                value,
            });
        }
        let value = host[parts.len()];
        let parts = parts
            .iter()
            .zip(&host)
            .map(|((n, _, _), v)| (n.to_string(), *v))
            .collect();
        tracing::trace!(value, ?parts, "distillation loss");
        Ok(LossParts {
            total,
            value,
            parts,
        })
    }

    /// A hidden-state loss averaged over the layer map's pairs.
    fn hidden_loss(
        &self,
        kind: LossKind,
        teacher: &[Tensor<3>],
        student: &[Tensor<3>],
        mask: Option<&TokenMask>,
        device: &Device,
    ) -> crate::Result<Tensor<1>> {
        let layers = &self.config.layers;
        if layers.is_empty() {
            return Err(DistillError::NoLayerPairs { term: kind.name() });
        }
        let mut sum: Option<Tensor<1>> = None;
        for (pair, &(si, ti)) in layers.iter().enumerate() {
            let s = student.get(si).cloned().ok_or(DistillError::HiddenIndex {
                side: "student",
                index: si,
                available: student.len(),
            })?;
            let t = teacher.get(ti).cloned().ok_or(DistillError::HiddenIndex {
                side: "teacher",
                index: ti,
                available: teacher.len(),
            })?;
            let s = match &self.projection {
                Some(p) => p.forward(pair, s)?,
                None => s,
            };
            let t = constant(t, device);
            let l = match kind {
                LossKind::HiddenMse => hidden_mse(s, t, mask)?,
                _ => hidden_cosine(s, t, mask)?,
            };
            sum = Some(match sum {
                Some(acc) => acc + l,
                None => l,
            });
        }
        Ok(sum
            .expect("the layer map is not empty")
            .div_scalar(layers.len() as f64))
    }

    /// Runs both models on `tokens` and returns [`Distiller::loss`] of their outputs: one
    /// distillation step short of `backward()` and the optimiser (which stay with the caller).
    ///
    /// The teacher's outputs are detached; put the teacher on a device without autodiff
    /// (`device.clone().without_autodiff()`, or `teacher.valid()`) so it records no graph.
    /// Hidden states are requested from both models when a hidden-state term is configured.
    ///
    /// # Shapes
    /// - tokens, labels, mask: `[B, T]`
    pub fn step<T, S>(
        &self,
        teacher: &T,
        student: &S,
        tokens: Tensor<2, Int>,
        labels: Option<Tensor<2, Int>>,
        mask: Option<&TokenMask>,
    ) -> crate::Result<LossParts>
    where
        T: DistillModel + ?Sized,
        S: DistillModel + ?Sized,
    {
        let s_out = student.distill_forward(tokens.clone(), self.wants_hidden())?;
        let t_out = self.teacher_forward(teacher, tokens, &s_out)?;
        self.loss(t_out, s_out, labels, mask)
    }

    /// The teacher's outputs on `tokens` for [`loss`](Self::loss), with hidden states when a
    /// term wants them. When no term needs the teacher (`ce` only) it is not run: the result
    /// holds the student's logits instead, which `loss` never reads.
    pub fn teacher_forward<T: DistillModel + ?Sized>(
        &self,
        teacher: &T,
        tokens: Tensor<2, Int>,
        student: &DistillOutput,
    ) -> crate::Result<DistillOutput> {
        if self.config.loss.needs_teacher() {
            teacher.distill_forward(tokens, self.wants_hidden())
        } else {
            Ok(DistillOutput::new(student.logits.clone()))
        }
    }
}
