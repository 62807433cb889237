//! What a conversion does: the method, the expert layout and the router initialisation.

use burn::config::Config;
use moekit_moe::{Activation, RouterConfig};

use crate::error::{Result, UpcycleError};

/// How experts are built from a dense FFN.
#[derive(Config, Debug, PartialEq)]
pub enum Method {
    /// Sparse Upcycling (Komatsuzaki et al. 2023): every expert is a copy of the FFN. With
    /// renormalised top-k weights the converted model equals the dense one exactly.
    Upcycle {
        /// Standard deviation of Gaussian noise added to each copy, relative to the standard
        /// deviation of the weight matrix (0: exact copies).
        noise: f64,
    },
    /// Neuron splitting (LLaMA-MoE, MoEfication, LaDiMo's initialisation): the `I`
    /// intermediate neurons are partitioned into experts of `I/E` neurons.
    Split {
        /// How neurons are grouped.
        strategy: SplitStrategy,
    },
    /// PESC (Wu et al. 2024): experts share the frozen dense FFN `S` and differ by bottleneck
    /// adapters on its output, `y + Σ wᵢ·adapterᵢ(y)` with `y = S(x)` and
    /// `adapterᵢ(y) = act(y·Dᵢ)·Uᵢ`, `Uᵢ = 0` at initialisation.
    Pesc {
        /// Adapter bottleneck width.
        bottleneck: usize,
        /// Adapter non-linearity; `Identity` adapters merge exactly into plain experts for
        /// export.
        activation: Activation,
    },
    /// MoE-KD's LoRA experts: the dense FFN stays (frozen) and gains `α·Σ_topk pᵢ·Eᵢ(x)`,
    /// SwiGLU experts whose matrices are each a rank-`r` product `A·B` (`B_out = 0` at
    /// initialisation).
    LoraExperts {
        /// Rank of every factored matrix.
        rank: usize,
        /// Intermediate width of each expert (`None`: the dense FFN's).
        intermediate_size: Option<usize>,
        /// Scale `α` of the experts' sum.
        alpha: f64,
    },
}

/// How [`Method::Split`] groups neurons into experts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum SplitStrategy {
    /// A seeded random partition.
    Random,
    /// Balanced k-means on each neuron's normalised `[gate | up]` weight rows (MoEfication).
    Cluster,
    /// Neurons that fire together on calibration text share an expert (balanced, greedy on
    /// the co-activation matrix). Needs calibration.
    Coactivation,
    /// Neurons ordered by mean activation magnitude on calibration text, cut into experts in
    /// that order. Needs calibration.
    Importance,
}

/// How router weights are initialised.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RouterInit {
    /// `N(0, 0.02²)`, seeded.
    Random,
    /// Zeros: every expert equally likely (ties go to lower indices).
    Uniform,
    /// Each expert's column is the mean gate weight row of its neurons (MoEfication's
    /// cluster centroids). Split only.
    Centroids,
    /// Each expert's column is the mean normalised hidden state of the calibration tokens
    /// that load it most (cf. mergekit's `hidden`). Split only; needs calibration.
    HiddenStates,
}

/// Configuration of a dense-to-MoE conversion.
#[derive(Config, Debug)]
pub struct ConvertConfig {
    /// How experts are built.
    pub method: Method,
    /// Routed experts per layer `E`. For a split with shared experts, `E` counts all the
    /// parts the FFN is cut into (shared and routed).
    pub num_experts: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// Split only: the `S` parts holding the most active neurons (by calibration) form one
    /// always-on shared expert of `S·I/E` neurons; the other `E − S` parts are routed.
    #[config(default = 0)]
    pub shared_experts: usize,
    /// Divide the top-k weights by their sum (`None`: the method's own choice: no for LoRA
    /// experts, whose formula uses the raw probabilities, yes otherwise).
    #[config(default = "None")]
    pub renormalize: Option<bool>,
    /// Router initialisation.
    #[config(default = "RouterInit::Random")]
    pub router_init: RouterInit,
    /// Rank `r` of a factored router gate `[H, r]·[r, E]` ([`moekit_moe::RouterConfig::rank`]):
    /// `r·(H + E)` activated parameters per layer instead of `H·E`. The initialisation above
    /// is computed in full and factored by truncated SVD. `None`: a full gate.
    #[config(default = "None")]
    pub router_rank: Option<usize>,
    /// Temperature of the routers' combine weights
    /// ([`moekit_moe::RouterConfig::combine_temperature`]): the chosen experts are weighted by
    /// the scores of `logits / τ`. A large `τ` (e.g. 1e3) weighs the chosen parts of a split
    /// (all but) equally, as the dense FFN sums its neurons. Export folds it into the gates.
    #[config(default = 1.0)]
    pub combine_temperature: f64,
    /// Factor on the routed output (`None`: for a split, the factor that gives every chosen
    /// expert weight 1 under a uniform router, `k` with renormalised weights and the routed
    /// count `E − S` without, so that routing every expert with a uniform router reproduces
    /// the dense FFN; 1 for upcycling and
    /// PESC; `alpha` for LoRA experts). Export folds it into the experts' down projections.
    #[config(default = "None")]
    pub output_scale: Option<f64>,
    /// Seed of every random choice (partitions, noise, router weights).
    #[config(default = 0)]
    pub seed: u64,
}

impl ConvertConfig {
    /// Whether the method needs calibration activations.
    pub fn needs_calibration(&self) -> bool {
        matches!(
            self.method,
            Method::Split {
                strategy: SplitStrategy::Coactivation | SplitStrategy::Importance
            }
        ) || self.shared_experts > 0
            || self.router_init == RouterInit::HiddenStates
    }

    /// Routed experts per layer (`E − S`).
    pub fn routed_experts(&self) -> usize {
        self.num_experts.saturating_sub(self.shared_experts)
    }

    /// Whether top-k weights are renormalised.
    pub fn renormalized(&self) -> bool {
        self.renormalize
            .unwrap_or(!matches!(self.method, Method::LoraExperts { .. }))
    }

    /// Checks the settings against an FFN of width `hidden` and intermediate width
    /// `intermediate` ([`ConvertConfig::validate_settings`], then what depends on the sizes).
    pub fn validate(&self, hidden: usize, intermediate: usize) -> Result<()> {
        self.validate_settings()?;
        let e = self.num_experts;
        if matches!(self.method, Method::Split { .. }) && !intermediate.is_multiple_of(e) {
            return Err(UpcycleError::Config(format!(
                "{intermediate} neurons do not split into {e} equal experts"
            )));
        }
        if let Some(r) = self.router_rank {
            RouterConfig::check_rank(r, hidden, self.routed_experts())?;
        }
        Ok(())
    }

    /// Checks what does not depend on the model's sizes (counts, method parameters, router
    /// settings), so that a bad combination is reported before any model loads.
    pub fn validate_settings(&self) -> Result<()> {
        let bad = |m: String| Err(UpcycleError::Config(m));
        let (e, s, k) = (self.num_experts, self.shared_experts, self.top_k);
        if e == 0 {
            return bad("the number of experts must be at least 1".into());
        }
        if s > 0 && !matches!(self.method, Method::Split { .. }) {
            return bad("shared experts are built by splitting (use the split method)".into());
        }
        if s >= e {
            return bad(format!(
                "{s} shared experts leave none of the {e} parts to route"
            ));
        }
        if k == 0 || k > e - s {
            return bad(format!(
                "top-k {k} must be between 1 and the {} routed experts",
                e - s
            ));
        }
        match &self.method {
            Method::Upcycle { noise } if !(noise.is_finite() && *noise >= 0.0) => {
                return bad(format!("noise {noise} must be finite and >= 0"));
            }
            Method::Pesc { bottleneck: 0, .. } => {
                return bad("the PESC bottleneck must be at least 1".into());
            }
            Method::LoraExperts {
                rank,
                alpha,
                intermediate_size,
            } if *rank == 0 || !alpha.is_finite() || *intermediate_size == Some(0) => {
                return bad(format!(
                    "LoRA experts need rank >= 1, a finite alpha and a non-zero width \
                     (got rank {rank}, alpha {alpha}, width {intermediate_size:?})"
                ));
            }
            _ => {}
        }
        let split = matches!(self.method, Method::Split { .. });
        if !split
            && matches!(
                self.router_init,
                RouterInit::Centroids | RouterInit::HiddenStates
            )
        {
            return bad(format!(
                "router init {:?} needs experts made of distinct neurons (use the split method)",
                self.router_init
            ));
        }
        if let Some(f) = self.output_scale
            && !f.is_finite()
        {
            return bad(format!("output scale {f} must be finite"));
        }
        RouterConfig::check_temperature(self.combine_temperature)?;
        Ok(())
    }
}
