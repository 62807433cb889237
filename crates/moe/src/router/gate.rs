//! The router module: `logits = x·W_g (+ b)`, then scoring and selection.

use burn::config::Config;
use burn::module::{Flag, Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::softplus;
use burn::tensor::{Bool, Device, Distribution, Int, Tensor};

use super::selection::{RouterNoise, Scoring, Selection};
use crate::error::MoeError;

/// Configuration of a [`Router`].
#[derive(Config, Debug)]
pub struct RouterConfig {
    /// Model width `H`.
    pub hidden_size: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Logits to scores.
    #[config(default = "Scoring::Softmax")]
    pub scoring: Scoring,
    /// Scores to experts.
    #[config(default = "Selection::TopK { k: 2, renormalize: true }")]
    pub selection: Selection,
    /// Training-time noise.
    #[config(default = "RouterNoise::None")]
    pub noise: RouterNoise,
    /// Learned bias on the logits.
    #[config(default = false)]
    pub bias: bool,
    /// Initialiser of the gate weight.
    #[config(default = "Initializer::Normal { mean: 0.0, std: 0.02 }")]
    pub initializer: Initializer,
}

/// A linear router.
#[derive(Module, Debug)]
pub struct Router {
    /// Gate weight `[H, E]`.
    pub gate: Param<Tensor<2>>,
    /// Optional gate bias `[E]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Noise weight `[H, E]` of noisy top-k gating.
    pub noise_gate: Option<Param<Tensor<2>>>,
    /// Logits to scores.
    #[module(skip)]
    pub scoring: Scoring,
    /// Scores to experts.
    #[module(skip)]
    pub selection: Selection,
    /// Training-time noise.
    #[module(skip)]
    pub noise: RouterNoise,
    /// Noise is applied only while this flag is on and the input is on an autodiff device.
    pub training: Param<Flag>,
}

/// What the router decided for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Gate logits that were routed on `[T, E]` (noisy during noisy top-k training).
    pub logits: Tensor<2>,
    /// Normalised expert probabilities `[T, E]`.
    pub probs: Tensor<2>,
    /// Chosen expert per slot `[T, K]`, in decreasing order of score.
    pub experts: Tensor<2, Int>,
    /// Combine weight per slot `[T, K]`, 0 for inactive slots.
    pub weights: Tensor<2>,
    /// Whether a slot is used `[T, K]` (always true under top-k).
    pub active: Tensor<2, Bool>,
}

impl RouterConfig {
    /// Validates the configuration and builds the router.
    pub fn init(&self, device: &Device) -> crate::Result<Router> {
        let (h, e) = (self.hidden_size, self.num_experts);
        if h == 0 {
            return Err(MoeError::ZeroSize {
                what: "hidden_size",
            });
        }
        self.selection.validate(e)?;
        if let RouterNoise::Jitter { eps } = self.noise
            && !(0.0..1.0).contains(&eps)
        {
            return Err(MoeError::OutOfRange {
                what: "jitter eps",
                value: eps,
                range: "[0, 1)",
            });
        }
        let noise_gate = matches!(self.noise, RouterNoise::NoisyTopK)
            .then(|| Initializer::Zeros.init_with([h, e], Some(h), Some(e), device));
        Ok(Router {
            gate: self.initializer.init_with([h, e], Some(h), Some(e), device),
            bias: self
                .bias
                .then(|| Initializer::Zeros.init_with([e], Some(h), Some(e), device)),
            noise_gate,
            scoring: self.scoring,
            selection: self.selection,
            noise: self.noise,
            training: Param::from_bool(true),
        })
    }
}

impl Router {
    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.gate.dims()[1]
    }

    /// Expert slots per token (`k`, or the top-p bound).
    pub fn slots(&self) -> usize {
        self.selection.slots(self.num_experts())
    }

    /// Replaces the selection rule (e.g. a per-layer policy at inference).
    pub fn with_selection(mut self, selection: Selection) -> crate::Result<Self> {
        selection.validate(self.num_experts())?;
        self.selection = selection;
        Ok(self)
    }

    fn noise_active(&self, x: &Tensor<2>) -> bool {
        self.training.is_enabled() && x.device().is_autodiff()
    }

    /// Gate logits, with training noise when active.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, E]`
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        let noisy = self.noise_active(&x);
        let x = match self.noise {
            RouterNoise::Jitter { eps } if noisy && eps > 0.0 => {
                let factor = x.random_like(Distribution::Uniform(1.0 - eps, 1.0 + eps));
                x * factor
            }
            _ => x,
        };
        let mut logits = x.clone().matmul(self.gate.val());
        if let Some(bias) = &self.bias {
            logits = logits + bias.val().unsqueeze();
        }
        match &self.noise_gate {
            Some(w_noise) if noisy => {
                let std = softplus(x.matmul(w_noise.val()), 1.0);
                logits.clone() + logits.random_like(Distribution::Normal(0.0, 1.0)) * std
            }
            _ => logits,
        }
    }

    /// Routes tokens.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    pub fn forward(&self, x: Tensor<2>) -> Routing {
        let logits = self.logits(x);
        self.route_logits(logits)
    }

    /// Routes tokens to experts chosen by something else (oracle routing,
    /// [`crate::MoeLayer::with_oracle`]), with the weights the selection rule gives them
    /// ([`Selection::weigh`]); every slot is active.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - experts: `[T, K]`
    pub fn route_to(&self, x: Tensor<2>, experts: Tensor<2, Int>) -> Routing {
        self.decide(self.logits(x), |scores, probs| {
            let weights = self.selection.weigh(scores, probs, experts.clone());
            let active = Tensor::<2, Bool>::full(experts.dims(), true, &experts.device());
            (experts, weights, active)
        })
    }

    /// Routes precomputed logits `[T, E]`.
    pub fn route_logits(&self, logits: Tensor<2>) -> Routing {
        self.decide(logits, |scores, probs| self.selection.select(scores, probs))
    }

    /// Scores `logits` and lets `choose(scores, probs)` pick `(experts, weights, active)`.
    fn decide(
        &self,
        logits: Tensor<2>,
        choose: impl FnOnce(Tensor<2>, Tensor<2>) -> (Tensor<2, Int>, Tensor<2>, Tensor<2, Bool>),
    ) -> Routing {
        let (scores, probs) = self.scoring.scores(logits.clone());
        let (experts, weights, active) = choose(scores, probs.clone());
        Routing {
            logits,
            probs,
            experts,
            weights,
            active,
        }
    }
}
