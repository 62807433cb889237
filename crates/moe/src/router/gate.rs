//! The router module: `logits = x·W_g (+ b)`, then scoring and selection. `W_g` is one
//! `[H, E]` matrix or a low-rank product `W_down·W_up` ([`RouterConfig::rank`]).

use burn::config::Config;
use burn::module::{Flag, Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::softplus;
use burn::tensor::{Bool, Device, Distribution, Int, Tensor};

use super::factor::{finite, low_rank_factors};
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
    /// Initialiser of the gate weight (of `W_down` when the gate is factored).
    #[config(default = "Initializer::Normal { mean: 0.0, std: 0.02 }")]
    pub initializer: Initializer,
    /// Rank `r` of a factored gate `W_g = W_down·W_up` (`[H, r]·[r, E]`): `r·(H + E)`
    /// parameters per layer instead of `H·E`, which matters when experts are many and small
    /// (hundreds of few-neuron parts of a split FFN). Must give factors smaller than the full
    /// gate ([`RouterConfig::check_rank`]). A noisy top-k router's noise gate stays a full
    /// `[H, E]` (training only). `None`: one full `[H, E]` gate.
    #[config(default = "None")]
    pub rank: Option<usize>,
    /// Temperature `τ` of the combine weights: the chosen experts are weighted by the scores
    /// of `logits / τ` (renormalised or not, as the selection says), while the choice itself,
    /// the probabilities and every loss use the logits as they are. `τ = 1`: the usual
    /// weights. A large `τ` (e.g. 1e3) makes renormalised top-k weights all but equal
    /// (`1/k`), which is what the chosen parts of a neuron split need to add up to the dense
    /// FFN (docs/results.md, "512 parts with factored routers"). Because top-k depends only on
    /// the order of the logits, a top-k router without bias with gate `W_g` and temperature `τ`
    /// routes as one with gate `W_g / τ` and temperature 1 (up to float rounding): that is how
    /// a Mixtral / Qwen2-MoE export writes it. Finite and positive.
    #[config(default = 1.0)]
    pub combine_temperature: f64,
}

/// A linear router.
#[derive(Module, Debug)]
pub struct Router {
    /// Gate weight `W_g` `[H, E]`; for a factored gate its first factor `W_down` `[H, r]`.
    pub gate: Param<Tensor<2>>,
    /// Second factor `W_up` `[r, E]` of a factored gate (`W_g = gate·gate_up`).
    pub gate_up: Option<Param<Tensor<2>>>,
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
    /// Temperature of the combine weights ([`RouterConfig::combine_temperature`]).
    #[module(skip)]
    pub combine_temperature: f64,
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
    /// Whether a factored gate of rank `rank` makes sense for width `hidden` and `experts`
    /// experts: `rank ≥ 1` and factors smaller than the full gate, `rank·(H + E) < H·E`.
    pub fn check_rank(rank: usize, hidden: usize, experts: usize) -> crate::Result<()> {
        if rank == 0 || rank * (hidden + experts) >= hidden * experts {
            return Err(MoeError::InvalidRank {
                rank,
                hidden,
                experts,
            });
        }
        Ok(())
    }

    /// Whether `temperature` can be a combine temperature: finite and positive.
    pub fn check_temperature(temperature: f64) -> crate::Result<()> {
        if temperature.is_finite() && temperature > 0.0 {
            Ok(())
        } else {
            Err(MoeError::OutOfRange {
                what: "combine temperature",
                value: temperature,
                range: "(0, ∞)",
            })
        }
    }

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
        Self::check_temperature(self.combine_temperature)?;
        let noise_gate = matches!(self.noise, RouterNoise::NoisyTopK)
            .then(|| Initializer::Zeros.init_with([h, e], Some(h), Some(e), device));
        let (gate, gate_up) = match self.rank {
            None => (
                self.initializer.init_with([h, e], Some(h), Some(e), device),
                None,
            ),
            Some(r) => {
                Self::check_rank(r, h, e)?;
                // `W_up ~ N(0, 1/r)` keeps the entries of `W_down·W_up` at the scale of
                // `W_down`'s, i.e. of a full gate drawn from the same initialiser.
                let up = Initializer::Normal {
                    mean: 0.0,
                    std: 1.0 / (r as f64).sqrt(),
                };
                (
                    self.initializer.init_with([h, r], Some(h), Some(r), device),
                    Some(up.init_with([r, e], Some(r), Some(e), device)),
                )
            }
        };
        Ok(Router {
            gate,
            gate_up,
            bias: self
                .bias
                .then(|| Initializer::Zeros.init_with([e], Some(h), Some(e), device)),
            noise_gate,
            scoring: self.scoring,
            selection: self.selection,
            noise: self.noise,
            combine_temperature: self.combine_temperature,
            training: Param::from_bool(true),
        })
    }
}

impl Router {
    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        match &self.gate_up {
            Some(up) => up.dims()[1],
            None => self.gate.dims()[1],
        }
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        self.gate.dims()[0]
    }

    /// Rank `r` of a factored gate; `None` for a full one.
    pub fn rank(&self) -> Option<usize> {
        self.gate_up.as_ref().map(|up| up.dims()[0])
    }

    /// The gate `W_g` `[H, E]` (for a factored gate, the product of its factors).
    pub fn weight(&self) -> Tensor<2> {
        match &self.gate_up {
            Some(up) => self.gate.val().matmul(up.val()),
            None => self.gate.val(),
        }
    }

    /// Sets the gate to `w` `[H, E]`; a factored router keeps its rank `r` and takes the best
    /// rank-`r` approximation of `w` ([`low_rank_factors`]), so any full-gate initialisation
    /// (centroids, hidden states) also initialises a factored router.
    pub fn with_weight(mut self, w: Tensor<2>) -> crate::Result<Self> {
        let expected = [self.hidden_size(), self.num_experts()];
        if w.dims() != expected {
            return Err(MoeError::WeightShape {
                what: "router gate",
                expected: expected.to_vec(),
                got: w.dims().to_vec(),
            });
        }
        match self.rank() {
            None => self.gate = Param::from_tensor(finite(w, "router gate")?),
            Some(r) => {
                let (down, up) = low_rank_factors(w, r)?;
                self.gate = Param::from_tensor(down);
                self.gate_up = Some(Param::from_tensor(up));
            }
        }
        Ok(self)
    }

    /// Makes the gate the product `down·up` (`[H, r]`, `[r, E]`) of the given factors, with
    /// `E` and `H` unchanged (e.g. factors read back from a file).
    pub fn with_factors(mut self, down: Tensor<2>, up: Tensor<2>) -> crate::Result<Self> {
        let (h, e) = (self.hidden_size(), self.num_experts());
        let r = down.dims()[1];
        RouterConfig::check_rank(r, h, e)?;
        for (what, expected, got) in [
            ("router gate factor W_down", [h, r], down.dims()),
            ("router gate factor W_up", [r, e], up.dims()),
        ] {
            if got != expected {
                return Err(MoeError::WeightShape {
                    what,
                    expected: expected.to_vec(),
                    got: got.to_vec(),
                });
            }
        }
        self.gate = Param::from_tensor(finite(down, "router gate factor W_down")?);
        self.gate_up = Some(Param::from_tensor(finite(up, "router gate factor W_up")?));
        Ok(self)
    }

    /// Sets the temperature of the combine weights ([`RouterConfig::combine_temperature`]).
    pub fn with_combine_temperature(mut self, temperature: f64) -> crate::Result<Self> {
        RouterConfig::check_temperature(temperature)?;
        self.combine_temperature = temperature;
        Ok(self)
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
        if let Some(up) = &self.gate_up {
            logits = logits.matmul(up.val());
        }
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
            let active = Tensor::<2, Bool>::full(experts.dims(), true, &experts.device());
            let weights = self
                .selection
                .weigh(scores, probs, experts.clone(), active.clone());
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
        let weights = if self.combine_temperature == 1.0 {
            weights
        } else {
            let (scores, probs) = self
                .scoring
                .scores(logits.clone() / self.combine_temperature);
            self.selection
                .weigh(scores, probs, experts.clone(), active.clone())
        };
        Routing {
            logits,
            probs,
            experts,
            weights,
            active,
        }
    }
}
