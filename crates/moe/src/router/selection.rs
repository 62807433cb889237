//! How gate logits become scores, and how scores become a choice of experts.

use burn::config::Config;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Bool, Int, Tensor};

use crate::error::MoeError;

/// Turns gate logits into expert scores.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen2-MoE, Switch).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3). Top-p and the load-balancing loss use the
    /// scores divided by their sum.
    Sigmoid,
}

/// Which experts a token is sent to, and with what weights.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum Selection {
    /// The `k` highest-scoring experts.
    ///
    /// With `renormalize` (Mixtral) the weights are the chosen scores divided by their sum, so
    /// they add up to 1; without it (Qwen2-MoE, DeepSeek) they are the raw scores.
    TopK {
        /// Experts per token.
        k: usize,
        /// Divide the chosen scores by their sum.
        renormalize: bool,
    },
    /// Dynamic k (Huang et al. 2024, "Harder Tasks Need More Experts"; LaDiMo's adaptive
    /// router): sort the probabilities in decreasing order and keep experts up to and including
    /// the first one whose cumulative probability reaches `p`, at most `max_k` of them.
    ///
    /// The weights are the kept probabilities, divided by their sum with `renormalize` (as
    /// top-k does): a per-layer policy on a model trained with renormalised top-k keeps its
    /// combine rule.
    TopP {
        /// Probability mass to cover, in (0, 1].
        p: f64,
        /// Upper bound on experts per token (`None`: all `E`).
        max_k: Option<usize>,
        /// Divide the kept probabilities by their sum.
        renormalize: bool,
    },
}

/// Training-time perturbation of the router (never applied in evaluation).
#[derive(Config, Debug, Copy, PartialEq)]
pub enum RouterNoise {
    /// No noise.
    None,
    /// Multiplicative jitter of the router input, `x ⊙ U(1-eps, 1+eps)` (Switch Transformer).
    Jitter {
        /// Half-width of the uniform factor, in [0, 1).
        eps: f64,
    },
    /// Noisy top-k gating (Shazeer et al. 2017): `logits + N(0,1) ⊙ softplus(x·W_noise)` with
    /// a learned, zero-initialised `W_noise`.
    NoisyTopK,
}

impl Selection {
    /// Checks the rule against the number of experts.
    pub fn validate(&self, experts: usize) -> crate::Result<()> {
        if experts == 0 {
            return Err(MoeError::NoExperts);
        }
        match *self {
            Selection::TopK { k, .. } if k == 0 || k > experts => {
                Err(MoeError::InvalidTopK { k, experts })
            }
            Selection::TopP { p, .. } if !(p > 0.0 && p <= 1.0) => Err(MoeError::InvalidTopP(p)),
            Selection::TopP { max_k: Some(k), .. } if k == 0 || k > experts => {
                Err(MoeError::InvalidTopK { k, experts })
            }
            _ => Ok(()),
        }
    }

    /// Expert slots per token: `k`, or `max_k` (default `E`) for top-p.
    pub fn slots(&self, experts: usize) -> usize {
        match *self {
            Selection::TopK { k, .. } => k,
            Selection::TopP { max_k, .. } => max_k.unwrap_or(experts),
        }
    }

    /// Selects experts: top-k ranks and weighs by `scores`, top-p by the normalised `probs`
    /// (the two are the same tensor under softmax scoring).
    ///
    /// Returns `(experts, weights, active)`, each `[T, slots]`: expert ids in decreasing order
    /// of probability, their combine weights (0 where inactive) and whether the slot is used.
    pub fn select(
        &self,
        scores: Tensor<2>,
        probs: Tensor<2>,
    ) -> (Tensor<2, Int>, Tensor<2>, Tensor<2, Bool>) {
        let [t, e] = probs.dims();
        let slots = self.slots(e);
        match *self {
            Selection::TopK { k, renormalize } => {
                let (top, ids) = crate::kernels::top_k(scores, k);
                let active = Tensor::<2, Bool>::full([t, k], true, &ids.device());
                (ids, renormalized(top, renormalize), active)
            }
            Selection::TopP { p, renormalize, .. } => {
                let (sorted, ids) = probs.sort_descending_with_indices(1);
                let mass_before = sorted.clone().cumsum(1) - sorted.clone();
                // The first slot is always used, also where the mass is not a number (a NaN
                // logit): the NaN then reaches the output, as under top-k, instead of the
                // token silently losing its routed experts.
                let first = Tensor::<1, Int>::arange(0..slots as i64, &sorted.device())
                    .equal_elem(0)
                    .reshape([1, slots])
                    .expand([t, slots]);
                let active = mass_before.lower_elem(p).narrow(1, 0, slots).bool_or(first);
                let weights = sorted
                    .narrow(1, 0, slots)
                    .mask_fill(active.clone().bool_not(), 0.0);
                (
                    ids.narrow(1, 0, slots),
                    renormalized(weights, renormalize),
                    active,
                )
            }
        }
    }

    /// The combine weights this rule gives to `experts` (those of its own choice weighed at
    /// another temperature, or chosen by something else: oracle routing,
    /// [`crate::MoeLayer::with_oracle`]): their `scores` (top-k) or normalised `probs`
    /// (top-p), 0 where a slot is not `active`, divided by their sum when the rule
    /// renormalises.
    ///
    /// # Shapes
    /// - scores, probs: `[T, E]`
    /// - experts, active: `[T, K]`
    /// - output: `[T, K]`
    pub fn weigh(
        &self,
        scores: Tensor<2>,
        probs: Tensor<2>,
        experts: Tensor<2, Int>,
        active: Tensor<2, Bool>,
    ) -> Tensor<2> {
        let (source, renormalize) = match *self {
            Selection::TopK { renormalize, .. } => (scores, renormalize),
            Selection::TopP { renormalize, .. } => (probs, renormalize),
        };
        let w = source.gather(1, experts).mask_fill(active.bool_not(), 0.0);
        renormalized(w, renormalize)
    }
}

/// `w / Σw` per row when `renormalize` (the first slot is always used, so the sum is positive).
fn renormalized(w: Tensor<2>, renormalize: bool) -> Tensor<2> {
    if renormalize {
        let sum = w.clone().sum_dim(1);
        w / sum
    } else {
        w
    }
}

impl Scoring {
    /// Scores of each expert and the normalised probabilities used by top-p and the losses.
    ///
    /// # Shapes
    /// - logits: `[T, E]`
    /// - output: (scores `[T, E]`, probabilities `[T, E]`)
    pub fn scores(&self, logits: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
        match self {
            Scoring::Softmax => {
                let p = softmax(logits, 1);
                (p.clone(), p)
            }
            Scoring::Sigmoid => {
                let s = sigmoid(logits);
                let p = s.clone() / s.clone().sum_dim(1);
                (s, p)
            }
        }
    }
}
