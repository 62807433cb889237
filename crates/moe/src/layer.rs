//! The sparse Mixture-of-Experts layer: router, expert bank, optional shared expert.

use burn::config::Config;
use burn::module::Module;
use burn::nn::Initializer;
use burn::tensor::{Bool, Device, Tensor};

use crate::activation::Activation;
use crate::dispatch::{DispatchMode, DispatchPlan};
use crate::error::MoeError;
use crate::experts::{ExpertBank, ExpertBankConfig};
use crate::losses::{AuxLossConfig, AuxLosses, aux_losses};
use crate::router::{Router, RouterConfig, RouterNoise, Scoring, Selection};
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
    pub experts: ExpertBank,
    /// Optional shared expert.
    pub shared: Option<SharedExpert>,
    /// Expert capacity factor (`None`: dropless).
    #[module(skip)]
    pub capacity_factor: Option<f64>,
    /// Dispatch implementation.
    #[module(skip)]
    pub dispatch: DispatchMode,
    /// Auxiliary loss coefficients.
    #[module(skip)]
    pub aux_loss: AuxLossConfig,
}

/// Everything one call of [`MoeLayer::forward`] produces.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// Layer output `[B, S, H]`.
    pub output: Tensor<3>,
    /// Router logits `[B·S, E]`.
    pub router_logits: Tensor<2>,
    /// The individual auxiliary losses.
    pub aux: AuxLosses,
    /// `Σ coefficient · loss`, to add to the training loss.
    pub aux_loss: Tensor<1>,
    /// Routing statistics.
    pub stats: RoutingStats,
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
        Ok(MoeLayer {
            router,
            experts,
            shared,
            capacity_factor: self.capacity_factor,
            dispatch: self.dispatch,
            aux_loss: self.aux_loss,
        })
    }
}

impl MoeLayer {
    /// Assembles a layer from parts (conversion methods build their own routers and banks).
    pub fn from_parts(
        router: Router,
        experts: ExpertBank,
        shared: Option<SharedExpert>,
    ) -> crate::Result<Self> {
        if router.num_experts() != experts.num_experts() {
            return Err(MoeError::InvalidTopK {
                k: router.num_experts(),
                experts: experts.num_experts(),
            });
        }
        Ok(Self {
            router,
            experts,
            shared,
            capacity_factor: None,
            dispatch: DispatchMode::Auto,
            aux_loss: AuxLossConfig::new(),
        })
    }

    /// Model width `H`.
    pub fn hidden_size(&self) -> usize {
        self.experts.hidden_size()
    }

    /// Expert capacity for `tokens` real tokens.
    pub fn capacity(&self, tokens: usize) -> Option<usize> {
        let slots = self.router.slots() as f64;
        let e = self.experts.num_experts() as f64;
        self.capacity_factor
            .map(|f| (f * tokens as f64 * slots / e).ceil() as usize)
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
        let real = match &keep {
            Some(k) => k.clone().int().sum().into_scalar::<i64>() as usize,
            None => t,
        };

        let routing = self.router.forward(x.clone());
        let plan = DispatchPlan::new(&routing, keep.clone(), self.capacity(real))?;
        let mut y = self.dispatch.expert_ffn(x.clone(), &self.experts, &plan);
        if let Some(shared) = &self.shared {
            y = y + shared.forward(x);
        }

        let keep_f = keep.map(|k| k.float());
        let aux = aux_losses(&routing, keep_f.clone(), &plan.routed);
        let mean_prob = match keep_f {
            Some(k) => {
                (routing.probs.clone() * k.unsqueeze_dim(1))
                    .sum_dim(0)
                    .squeeze_dim(0)
                    / real.max(1) as f64
            }
            None => routing.probs.clone().mean_dim(0).squeeze_dim(0),
        };
        let stats = RoutingStats {
            tokens: real,
            routed_per_expert: plan.routed.clone(),
            tokens_per_expert: plan.tokens_per_expert(),
            dropped: plan.dropped,
            mean_prob,
        };
        tracing::trace!(tokens = real, dropped = plan.dropped, "moe layer routed");
        Ok(MoeOutput {
            output: y.reshape([b, s, h]),
            router_logits: routing.logits,
            aux_loss: aux.total(&self.aux_loss),
            aux,
            stats,
        })
    }
}
