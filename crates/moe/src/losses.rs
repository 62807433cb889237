//! Auxiliary router losses.
//!
//! All losses are means over real tokens only: a padding mask removes padded positions.

use burn::config::Config;
use burn::tensor::{IndexingUpdateOp, Tensor, TensorData};

use crate::router::Routing;

/// Coefficients of the auxiliary losses in [`AuxLosses::total`].
#[derive(Config, Debug, Copy, PartialEq)]
pub struct AuxLossConfig {
    /// Switch load-balancing loss (Fedus et al. 2021 use 0.01).
    #[config(default = 0.01)]
    pub load_balancing: f64,
    /// Router z-loss (Zoph et al. 2022, ST-MoE, use 0.001).
    #[config(default = 0.0)]
    pub router_z: f64,
    /// Importance CV² loss (Shazeer et al. 2017).
    #[config(default = 0.0)]
    pub importance: f64,
}

/// The auxiliary losses of one MoE call, each a scalar tensor `[1]`.
#[derive(Debug, Clone)]
pub struct AuxLosses {
    /// `E · Σᵢ fᵢ · Pᵢ`: `fᵢ` the fraction of routed assignments that chose expert `i`, `Pᵢ` the
    /// mean router probability of expert `i`. Equals 1 under perfectly uniform routing and
    /// grows to `E` as routing collapses onto one expert. Differentiable through `Pᵢ`.
    pub load_balancing: Tensor<1>,
    /// `mean_t (log Σⱼ exp(logitsₜⱼ))²`: keeps router logits small.
    pub router_z: Tensor<1>,
    /// `CV²(importance)`, importanceᵢ = Σₜ combine weightₜᵢ (differentiable).
    pub importance_cv2: Tensor<1>,
    /// `CV²(load)`, loadᵢ = assignments routed to `i` (a measurement: no gradient).
    pub load_cv2: Tensor<1>,
}

impl AuxLosses {
    /// `Σ coefficient · loss` over the differentiable losses.
    pub fn total(&self, c: &AuxLossConfig) -> Tensor<1> {
        self.load_balancing.clone() * c.load_balancing
            + self.router_z.clone() * c.router_z
            + self.importance_cv2.clone() * c.importance
    }
}

/// `var(x) / mean(x)²` with the population variance; 0 for a constant vector.
pub fn cv_squared(x: Tensor<1>) -> Tensor<1> {
    let mean = x.clone().mean();
    let var = (x - mean.clone()).square().mean();
    var / (mean.square() + 1e-10)
}

/// Row-wise `log Σⱼ exp(xᵢⱼ)`, stable for large logits.
///
/// # Shapes
/// - x: `[T, E]`
/// - output: `[T]`
pub fn logsumexp(x: Tensor<2>) -> Tensor<1> {
    let max = x.clone().max_dim(1).detach();
    ((x - max.clone()).exp().sum_dim(1).log() + max).squeeze_dim(1)
}

/// Computes every auxiliary loss.
///
/// `keep` `[T]` (1 for real tokens, 0 for padding) and `routed[i]` (assignments routed to expert
/// `i` before capacity dropping, padding excluded) come from the layer's dispatch plan.
pub fn aux_losses(routing: &Routing, keep: Option<Tensor<1>>, routed: &[usize]) -> AuxLosses {
    let [t, e] = routing.probs.dims();
    let device = routing.probs.device();
    let (keep, real) = match keep {
        Some(k) => {
            let real = k.clone().sum();
            (k, real)
        }
        None => (
            Tensor::ones([t], &device),
            Tensor::from_data([t as f32], &device),
        ),
    };
    let real = real.clamp_min(1.0);
    let keep_col = keep.clone().unsqueeze_dim::<2>(1);

    let total: usize = routed.iter().sum();
    let fractions: Vec<f32> = routed
        .iter()
        .map(|&c| c as f32 / total.max(1) as f32)
        .collect();
    let f = Tensor::<1>::from_data(TensorData::new(fractions, [e]), &device);
    let mean_prob = (routing.probs.clone() * keep_col.clone())
        .sum_dim(0)
        .squeeze_dim(0)
        / real.clone();
    let load_balancing = (f * mean_prob).sum() * e as f64;

    let router_z = (logsumexp(routing.logits.clone()).square() * keep.clone()).sum() / real;

    let [_, k] = routing.experts.dims();
    let gates = Tensor::<2>::zeros([t, e], &device).scatter(
        1,
        routing.experts.clone(),
        routing.weights.clone() * keep_col.expand([t, k]),
        IndexingUpdateOp::Add,
    );
    let importance_cv2 = cv_squared(gates.sum_dim(0).squeeze_dim(0));
    let load: Vec<f32> = routed.iter().map(|&c| c as f32).collect();
    let load_cv2 = cv_squared(Tensor::from_data(TensorData::new(load, [e]), &device));
    AuxLosses {
        load_balancing,
        router_z,
        importance_cv2,
        load_cv2,
    }
}
