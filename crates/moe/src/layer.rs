//! The sparse Mixture-of-Experts layer: router, expert bank, optional shared expert.

use burn::config::Config;
use burn::module::Module;
use burn::nn::Initializer;
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::activation::Activation;
use crate::dispatch::{DispatchMode, DispatchPlan};
use crate::error::MoeError;
use crate::experts::{ExpertBank, ExpertBankConfig, ExpertWeights, Experts};
use crate::losses::{AuxLossConfig, AuxLosses, aux_losses};
use crate::router::{Router, RouterConfig, RouterNoise, Routing, Scoring, Selection};
use crate::shared::{SharedExpert, SharedExpertConfig};
use crate::stats::RoutingStats;

/// Configuration of a [`MoeLayer`].
#[derive(Config, Debug)]
pub struct MoeLayerConfig {
    /// Model width `H`.
    pub hidden_size: usize,
    /// Intermediate width `I` of each routed expert.
    pub intermediate_size: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Expert non-linearity.
    #[config(default = "Activation::SwiGlu")]
    pub activation: Activation,
    /// Router scoring.
    #[config(default = "Scoring::Softmax")]
    pub scoring: Scoring,
    /// Router selection rule.
    #[config(default = "Selection::TopK { k: 2, renormalize: true }")]
    pub selection: Selection,
    /// Router training noise.
    #[config(default = "RouterNoise::None")]
    pub noise: RouterNoise,
    /// Rank of a factored router gate ([`RouterConfig::rank`]); `None`: a full gate.
    #[config(default = "None")]
    pub router_rank: Option<usize>,
    /// Temperature of the router's combine weights ([`RouterConfig::combine_temperature`]).
    #[config(default = 1.0)]
    pub combine_temperature: f64,
    /// Always-on shared expert.
    #[config(default = "None")]
    pub shared_expert: Option<SharedExpertConfig>,
    /// Expert capacity `⌈factor · T · k / E⌉`; assignments past it are dropped (their token
    /// keeps the other experts' output and the residual). `None`: dropless.
    #[config(default = "None")]
    pub capacity_factor: Option<f64>,
    /// Dispatch implementation.
    #[config(default = "DispatchMode::Auto")]
    pub dispatch: DispatchMode,
    /// Auxiliary loss coefficients.
    #[config(default = "AuxLossConfig::new()")]
    pub aux_loss: AuxLossConfig,
    /// Factor on the routed experts' combined output (e.g. LLaMA-MoE's `E/k`).
    #[config(default = 1.0)]
    pub output_scale: f64,
    /// Initialiser of expert and shared-expert weights.
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / num_traits::Float::sqrt(3.0), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// A sparse MoE feed-forward layer.
#[derive(Module, Debug)]
pub struct MoeLayer {
    /// The router.
    pub router: Router,
    /// Routed experts.
    pub experts: Experts,
    /// Optional shared expert.
    pub shared: Option<SharedExpert>,
    /// What the routed experts read.
    #[module(skip)]
    pub expert_input: ExpertInput,
    /// Factor on the routed experts' combined output; export folds it into their down
    /// projections.
    #[module(skip)]
    pub output_scale: f64,
    /// Expert capacity factor (`None`: dropless).
    #[module(skip)]
    pub capacity_factor: Option<f64>,
    /// Dispatch implementation.
    #[module(skip)]
    pub dispatch: DispatchMode,
    /// Auxiliary loss coefficients.
    #[module(skip)]
    pub aux_loss: AuxLossConfig,
    /// Oracle routing (a diagnostic, [`MoeLayer::with_oracle`]): each token goes to the `k`
    /// experts with the largest outputs instead of those the router picks. `None`: the router
    /// decides.
    #[module(skip)]
    pub oracle: Option<usize>,
}

/// What the routed experts of a [`MoeLayer`] read.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ExpertInput {
    /// The layer input `x` (every standard MoE).
    Hidden,
    /// The shared expert's output `y = S(x)`; the layer computes `y + Σ wᵢ·Eᵢ(y)`, with the
    /// router still reading `x`. This is PESC (Wu et al. 2024): experts are adapters on the
    /// output of one shared, frozen FFN.
    SharedOutput,
}

/// Everything one call of [`MoeLayer::forward`] produces.
///
/// The auxiliary losses and mean router probabilities are computed on demand from the kept
/// routing, so inference pays nothing for them.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// Layer output `[B, S, H]`.
    pub output: Tensor<3>,
    /// The router's decisions for the `B·S` tokens.
    pub routing: Routing,
    /// Routing statistics (host values).
    pub stats: RoutingStats,
    keep: Option<Tensor<1>>,
    coefficients: AuxLossConfig,
}

impl MoeOutput {
    /// Router logits `[B·S, E]`.
    pub fn router_logits(&self) -> Tensor<2> {
        self.routing.logits.clone()
    }

    /// The individual auxiliary losses (padding excluded).
    pub fn aux_losses(&self) -> AuxLosses {
        aux_losses(
            &self.routing,
            self.keep.clone(),
            &self.stats.routed_per_expert,
        )
    }

    /// `Σ coefficient · loss` with the layer's coefficients, to add to the training loss.
    pub fn aux_loss(&self) -> Tensor<1> {
        self.aux_losses().total(&self.coefficients)
    }

    /// Mean router probability of each expert over real tokens, `[E]`.
    pub fn mean_prob(&self) -> Tensor<1> {
        let probs = self.routing.probs.clone();
        match &self.keep {
            Some(k) => {
                let real = self.stats.tokens.max(1) as f64;
                (probs * k.clone().unsqueeze_dim(1))
                    .sum_dim(0)
                    .squeeze_dim(0)
                    / real
            }
            None => probs.mean_dim(0).squeeze_dim(0),
        }
    }
}

impl MoeLayerConfig {
    /// Validates the configuration and builds the layer.
    pub fn init(&self, device: &Device) -> crate::Result<MoeLayer> {
        if let Some(f) = self.capacity_factor
            && !(f.is_finite() && f > 0.0)
        {
            return Err(MoeError::OutOfRange {
                what: "capacity_factor",
                value: f,
                range: "(0, inf)",
            });
        }
        let router = RouterConfig::new(self.hidden_size, self.num_experts)
            .with_scoring(self.scoring)
            .with_selection(self.selection)
            .with_noise(self.noise)
            .with_rank(self.router_rank)
            .with_combine_temperature(self.combine_temperature)
            .init(device)?;
        let experts =
            ExpertBankConfig::new(self.num_experts, self.hidden_size, self.intermediate_size)
                .with_activation(self.activation)
                .with_initializer(self.initializer.clone())
                .init(device)?;
        let shared = self
            .shared_expert
            .as_ref()
            .map(|s| s.init(self.hidden_size, self.activation, &self.initializer, device))
            .transpose()?;
        MoeLayer::from_parts(router, experts, shared)?
            .with_output_scale(self.output_scale)
            .map(|layer| MoeLayer {
                capacity_factor: self.capacity_factor,
                dispatch: self.dispatch,
                aux_loss: self.aux_loss,
                ..layer
            })
    }
}

impl MoeLayer {
    /// Assembles a layer from parts (conversion methods build their own routers and banks).
    pub fn from_parts(
        router: Router,
        experts: impl Into<Experts>,
        shared: Option<SharedExpert>,
    ) -> crate::Result<Self> {
        let experts = experts.into();
        if router.num_experts() != experts.num_experts() {
            return Err(MoeError::ExpertCountMismatch {
                router: router.num_experts(),
                bank: experts.num_experts(),
            });
        }
        // Every part reads the same hidden states: a width that differs from the bank's would
        // fail inside a matrix product at the first forward pass.
        let h = experts.hidden_size();
        let widths = [
            ("router gate", router.hidden_size(), router.num_experts()),
            (
                "shared expert",
                shared.as_ref().map_or(h, |s| s.ffn.hidden_size()),
                shared.as_ref().map_or(0, |s| s.ffn.intermediate_size()),
            ),
        ];
        for (what, width, other) in widths {
            if width != h {
                return Err(MoeError::WeightShape {
                    what,
                    expected: vec![h, other],
                    got: vec![width, other],
                });
            }
        }
        Ok(Self {
            router,
            experts,
            shared,
            expert_input: ExpertInput::Hidden,
            output_scale: 1.0,
            capacity_factor: None,
            dispatch: DispatchMode::Auto,
            aux_loss: AuxLossConfig::new(),
            oracle: None,
        })
    }

    /// Routes every token to the `k` experts whose outputs are largest
    /// ([`MoeLayer::oracle_experts`]) instead of asking the router, which still gives the
    /// combine weights ([`Router::route_to`]); `None` gives the decision back to the router.
    ///
    /// A diagnostic, not a deployable router (it runs every expert on every token): the
    /// perplexity of a model routed this way bounds what a trained router can reach with the
    /// same experts at the same `k`, and so separates routing error from partition error
    /// (MoEfication, Zhang et al. 2022, trains its routers towards the same choice).
    pub fn with_oracle(mut self, k: Option<usize>) -> crate::Result<Self> {
        self.check_oracle(k)?;
        self.oracle = k;
        Ok(self)
    }

    /// Whether [`MoeLayer::with_oracle`] accepts `k`: `None`, or `1..=E`.
    pub fn check_oracle(&self, k: Option<usize>) -> crate::Result<()> {
        let e = self.router.num_experts();
        match k {
            Some(k) if !(1..=e).contains(&k) => Err(MoeError::Config(format!(
                "oracle routing to {k} experts: the layer has {e}"
            ))),
            _ => Ok(()),
        }
    }

    /// The `k` routed experts (clamped to `1..=E`) whose outputs `‖Eᵢ(x)‖` are largest on each
    /// token, in decreasing order (ties to the lower index), computed without gradient. For
    /// experts that read the shared expert's output (PESC) they run on that output.
    ///
    /// # Shapes
    /// - x: `[T, H]`
    /// - output: `[T, k]`
    pub fn oracle_experts(&self, x: Tensor<2>, k: usize) -> Tensor<2, Int> {
        let x = x.detach();
        let input = match (self.expert_input, &self.shared) {
            (ExpertInput::SharedOutput, Some(s)) => s.forward(x),
            _ => x,
        };
        self.largest_outputs(input, k)
    }

    /// [`MoeLayer::oracle_experts`] on the experts' input.
    fn largest_outputs(&self, input: Tensor<2>, k: usize) -> Tensor<2, Int> {
        let device = input.device();
        // Detached weights: on an autodiff device nothing here joins the graph.
        let w = self.experts.weights();
        let w = ExpertWeights {
            w_in: w.w_in.detach(),
            w_out: w.w_out.detach(),
            activation: w.activation,
        };
        let norms = w.output_norms(input.detach()); // [T, E]
        // A row-major copy: top-k on the transposed view gave wrong values on WGPU.
        let norms = Tensor::<2>::from_data(norms.into_data(), &device);
        let k = k.clamp(1, norms.dims()[1]);
        crate::kernels::top_k(norms, k).1
    }

    /// Scales the routed experts' output by `scale`.
    pub fn with_output_scale(mut self, scale: f64) -> crate::Result<Self> {
        if !scale.is_finite() {
            return Err(MoeError::OutOfRange {
                what: "output_scale",
                value: scale,
                range: "finite",
            });
        }
        self.output_scale = scale;
        Ok(self)
    }

    /// Feeds the routed experts the shared expert's output (PESC); needs a shared expert of
    /// output width `H`.
    pub fn with_expert_input(mut self, input: ExpertInput) -> crate::Result<Self> {
        if input == ExpertInput::SharedOutput && self.shared.is_none() {
            return Err(MoeError::Config(
                "experts on the shared output need a shared expert".into(),
            ));
        }
        self.expert_input = input;
        Ok(self)
    }

    /// The routed experts as a full bank of experts of the layer input `x`, with the output
    /// scale folded into their output projections: `Σ wᵢ·Pᵢ(x)` equals the layer's routed
    /// term for every input (what export writes).
    ///
    /// LoRA experts are multiplied out. PESC adapters on the shared output must be linear
    /// (`Activation::Identity`): then `Eᵢ(S(x)) = act(x·S_in)·(S_out·Aᵢ_in·Aᵢ_out)` is a plain
    /// expert with the shared FFN's input projection. Non-linear adapters have no such form
    /// and give an error.
    pub fn plain_experts(&self) -> crate::Result<ExpertBank> {
        let w = self.experts.weights();
        let e = w.num_experts();
        let (w_in, w_out, activation) = match (self.expert_input, &self.shared) {
            (ExpertInput::SharedOutput, Some(shared)) => {
                if w.activation != Activation::Identity || shared.gate.is_some() {
                    return Err(MoeError::Config(format!(
                        "{:?} adapters on a{} shared output cannot be merged into plain experts \
                         (only linear adapters on an ungated shared FFN can)",
                        w.activation,
                        if shared.gate.is_some() { " gated" } else { "" }
                    )));
                }
                let s_in = shared.ffn.w_in.val().unsqueeze_dim::<3>(0).repeat_dim(0, e);
                let s_out = shared.ffn.w_out.val().unsqueeze_dim::<3>(0);
                let w_out = s_out.matmul(w.w_in).matmul(w.w_out);
                (s_in, w_out, shared.ffn.activation)
            }
            _ => (w.w_in, w.w_out, w.activation),
        };
        let w_out = if self.output_scale == 1.0 {
            w_out
        } else {
            w_out * self.output_scale
        };
        ExpertBank::from_weights(w_in, w_out, activation)
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        self.experts.hidden_size()
    }

    /// Applies the layer to every token.
    ///
    /// # Shapes
    /// - x: `[B, S, H]`
    pub fn forward(&self, x: Tensor<3>) -> crate::Result<MoeOutput> {
        self.forward_masked(x, None)
    }

    /// Applies the layer; `mask` `[B, S]` is true for real tokens. Padding tokens are not
    /// dispatched, output zeros (plus the shared expert) and count in no loss or statistic.
    ///
    /// # Shapes
    /// - x: `[B, S, H]`
    /// - mask: `[B, S]`
    pub fn forward_masked(
        &self,
        x: Tensor<3>,
        mask: Option<Tensor<2, Bool>>,
    ) -> crate::Result<MoeOutput> {
        let [b, s, h] = x.dims();
        if h != self.hidden_size() {
            return Err(MoeError::HiddenSizeMismatch {
                expected: self.hidden_size(),
                got: h,
            });
        }
        if let Some(m) = &mask
            && m.dims() != [b, s]
        {
            return Err(MoeError::MaskShapeMismatch {
                expected: [b, s],
                got: m.dims(),
            });
        }
        let t = b * s;
        let x = x.reshape([t, h]);
        let keep = mask.map(|m| m.reshape([t]));

        let shared = self.shared.as_ref().map(|s| s.forward(x.clone()));
        let input = match (self.expert_input, &shared) {
            (ExpertInput::SharedOutput, Some(y)) => y.clone(),
            _ => x.clone(),
        };
        let routing = match self.oracle {
            Some(k) => self
                .router
                .route_to(x, self.largest_outputs(input.clone(), k)),
            None => self.router.forward(x),
        };
        let plan = DispatchPlan::new(&routing, keep.clone(), self.capacity_factor)?;
        let mut y = self
            .dispatch
            .expert_ffn(input, &self.experts.weights(), &plan);
        if self.output_scale != 1.0 {
            y = y * self.output_scale;
        }
        if let Some(s) = shared {
            y = y + s;
        }
        let stats = RoutingStats {
            tokens: plan.real_tokens,
            tokens_per_expert: plan.tokens_per_expert(),
            routed_per_expert: plan.routed,
            dropped: plan.dropped,
        };
        tracing::trace!(
            tokens = stats.tokens,
            dropped = stats.dropped,
            "moe layer routed"
        );
        Ok(MoeOutput {
            output: y.reshape([b, s, h]),
            routing,
            stats,
            keep: keep.map(|k| k.float()),
            coefficients: self.aux_loss,
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use moekit_testing::{assert_close, device, normal, values};

    use super::*;
    use crate::ffn::FeedForwardConfig;

    fn layer(e: usize, shared: Option<SharedExpert>, device: &Device) -> MoeLayer {
        let router = RouterConfig::new(8, e)
            .with_selection(Selection::TopK {
                k: 2,
                renormalize: false,
            })
            .init(device)
            .unwrap();
        let bank = ExpertBankConfig::new(e, 8, 6).init(device).unwrap();
        MoeLayer::from_parts(router, bank, shared).unwrap()
    }

    fn shared(gated: bool, device: &Device) -> SharedExpert {
        SharedExpertConfig::new(12)
            .with_gated(gated)
            .init(8, Activation::SwiGlu, &Initializer::Zeros, device)
            .map(|mut s| {
                s.ffn = FeedForwardConfig::new(8, 12).init(device).unwrap();
                s
            })
            .unwrap()
    }

    #[test]
    fn plain_experts_fold_the_output_scale_into_the_down_projections() {
        let device = device(1);
        let layer = layer(3, None, &device).with_output_scale(2.5).unwrap();
        let plain = layer.plain_experts().unwrap();
        let full = layer.experts.full().unwrap().clone();
        assert_eq!(values(plain.w_in.val()), values(full.w_in.val()));
        assert_close(plain.w_out.val(), full.w_out.val() * 2.5, 0.0, 1e-7);
        // Scale 1: the bank as it is.
        let unscaled = layer
            .with_output_scale(1.0)
            .unwrap()
            .plain_experts()
            .unwrap();
        assert_eq!(values(unscaled.w_out.val()), values(full.w_out.val()));
    }

    #[test]
    fn linear_adapters_on_an_ungated_shared_output_fold_into_plain_experts() {
        let device = device(2);
        let router = RouterConfig::new(8, 3).init(&device).unwrap();
        let down = normal([3, 8, 4], 0.5, &device);
        let up = normal([3, 4, 8], 0.5, &device);
        let adapters = ExpertBank::from_weights(down, up, Activation::Identity).unwrap();
        let pesc = MoeLayer::from_parts(router, adapters, Some(shared(false, &device)))
            .unwrap()
            .with_output_scale(0.7)
            .unwrap()
            .with_expert_input(ExpertInput::SharedOutput)
            .unwrap();
        let x = normal([2, 5, 8], 1.0, &device);
        let want = pesc.forward(x.clone()).unwrap().output;
        let folded = MoeLayer {
            experts: Experts::Full(pesc.plain_experts().unwrap()),
            output_scale: 1.0,
            expert_input: ExpertInput::Hidden,
            ..pesc.clone()
        };
        assert_eq!(folded.experts.intermediate_size(), 12);
        assert_close(folded.forward(x).unwrap().output, want, 1e-4, 1e-5);

        // A gated shared expert, or non-linear adapters, have no plain form.
        let gated = MoeLayer {
            shared: Some(shared(true, &device)),
            ..pesc.clone()
        };
        assert!(gated.plain_experts().is_err());
        let mut gelu = pesc;
        if let Experts::Full(bank) = &mut gelu.experts {
            bank.activation = Activation::Gelu;
        }
        assert!(gelu.plain_experts().is_err());
    }

    #[test]
    fn oracle_routing_sends_each_token_to_its_largest_experts() {
        let device = device(4);
        let (e, k, t, h) = (5, 2, 12, 8);
        let mut l = layer(e, Some(shared(false, &device)), &device);
        l.router.gate = Param::from_tensor(normal([h, e], 1.0, &device));
        l.router.selection = Selection::TopK {
            k,
            renormalize: true,
        };
        let l = l.with_oracle(Some(k)).unwrap();
        let x = normal([t, h], 1.0, &device);
        let out = l.forward(x.clone().reshape([1, t, h])).unwrap();

        // Independently, on the host: every expert's output, ranked by norm per token, weighed
        // by the router's probabilities renormalised over the chosen two, plus the shared FFN.
        let all = values(l.experts.weights().forward_all(x.clone()));
        let probs = values(l.router.forward(x.clone()).probs);
        let mut want = values(l.shared.as_ref().unwrap().forward(x));
        let mut chosen = Vec::new();
        for tok in 0..t {
            let row = |i: usize| &all[(i * t + tok) * h..(i * t + tok + 1) * h];
            let norm = |i: usize| row(i).iter().map(|v| v * v).sum::<f32>();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)));
            let top = &order[..k];
            let mass: f32 = top.iter().map(|&i| probs[tok * e + i]).sum();
            for &i in top {
                let w = probs[tok * e + i] / mass;
                for (o, v) in want[tok * h..(tok + 1) * h].iter_mut().zip(row(i)) {
                    *o += w * v;
                }
            }
            chosen.extend(top.iter().map(|&i| i as i64));
        }
        let got: Vec<i64> = out.routing.experts.into_data().iter::<i64>().collect();
        assert_eq!(got, chosen);
        assert_close(
            out.output.reshape([t, h]),
            Tensor::from_data(burn::tensor::TensorData::new(want, [t, h]), &device),
            1e-4,
            1e-5,
        );
        assert_eq!(out.stats.tokens_per_expert.iter().sum::<usize>(), t * k);

        // `None` gives the choice back to the router; bad `k` is refused.
        let y = normal([t, h], 1.0, &device);
        let l = l.with_oracle(None).unwrap();
        let ids = |r: Routing| r.experts.into_data().iter::<i64>().collect::<Vec<_>>();
        assert_eq!(
            ids(l.forward(y.clone().reshape([1, t, h])).unwrap().routing),
            ids(l.router.forward(y))
        );
        assert!(l.clone().with_oracle(Some(0)).is_err());
        assert!(l.with_oracle(Some(e + 1)).is_err());
    }

    #[test]
    fn invalid_settings_are_errors() {
        let device = device(3);
        let l = layer(2, None, &device);
        assert!(l.with_output_scale(f64::NAN).is_err());
        let l = layer(2, None, &device);
        assert!(l.with_expert_input(ExpertInput::SharedOutput).is_err());
        let mut l = layer(2, Some(shared(false, &device)), &device);
        l.router.gate = Param::from_tensor(normal([8, 3], 1.0, &device));
        assert!(MoeLayer::from_parts(l.router, l.experts, None).is_err());
    }
}
