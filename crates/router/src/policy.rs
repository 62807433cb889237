//! Per-layer routing policies: a fixed `k` or a top-p threshold for each MoE layer, saved as
//! JSON and applied to a model at inference.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use moekit_llama::{FfnSlot, FfnSpec, Llama, LlamaConfig};
use moekit_moe::{MoeLayer, Selection};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RouterError};
use crate::file::{load_json, save_json};

/// How many experts a layer gives each token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Rule {
    /// The `k` most probable experts.
    TopK {
        /// Experts per token.
        k: usize,
    },
    /// Dynamic k (Huang et al. 2024; LaDiMo's adaptive router): experts in decreasing order of
    /// probability up to the first whose cumulative probability reaches `p`, at most `max_k`.
    TopP {
        /// Probability mass to cover, in (0, 1].
        p: f64,
        /// Upper bound on experts per token (`None`: all of them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_k: Option<usize>,
    },
}

impl Rule {
    /// The selection that applies this rule to a layer currently routing with `current`: the
    /// layer's combine rule (renormalised or raw weights) is kept.
    pub fn selection(&self, current: &Selection) -> Selection {
        let renormalize = match *current {
            Selection::TopK { renormalize, .. } | Selection::TopP { renormalize, .. } => {
                renormalize
            }
        };
        match *self {
            Rule::TopK { k } => Selection::TopK { k, renormalize },
            Rule::TopP { p, max_k } => Selection::TopP {
                p,
                max_k,
                renormalize,
            },
        }
    }

    /// The rule of a selection.
    pub fn of(selection: &Selection) -> Self {
        match *selection {
            Selection::TopK { k, .. } => Rule::TopK { k },
            Selection::TopP { p, max_k, .. } => Rule::TopP { p, max_k },
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::TopK { k } => write!(f, "top-{k}"),
            Rule::TopP { p, max_k: None } => write!(f, "top-p {p}"),
            Rule::TopP { p, max_k: Some(k) } => write!(f, "top-p {p} (max {k})"),
        }
    }
}

/// The rule of one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerPolicy {
    /// Decoder layer index.
    pub layer: usize,
    /// Its rule.
    #[serde(flatten)]
    pub rule: Rule,
}

/// What a searched policy was chosen for (informational; written by
/// [`crate::search::choose`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The target fraction of activated parameters (of the model with every expert active).
    pub target_fraction: f64,
    /// The fraction the policy activates on the calibration tokens, predicted layer by layer
    /// on the reference model's inputs (exact for top-k rules).
    pub predicted_fraction: f64,
    /// Sum over layers of the relative output error against the reference routing.
    pub error: f64,
    /// Calibration tokens measured.
    pub tokens: usize,
    /// How the policy won among the proposals for its budget ([`crate::select`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selected>,
}

/// Why a policy was selected: its proposal and its calibration scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selected {
    /// Which proposal it was (e.g. `knapsack γ=2`, `uniform top-3`).
    pub proposal: String,
    /// Its scores on the selection tokens.
    pub score: crate::select::PolicyScore,
}

/// A rule per MoE layer. Layers the policy does not name keep their routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingPolicy {
    /// Rules, one per named layer.
    pub layers: Vec<LayerPolicy>,
    /// How the policy was chosen, if it was searched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<Choice>,
}

/// The MoE layers of a model, with their indices.
pub(crate) fn moe_layers(model: &Llama) -> Vec<(usize, &MoeLayer)> {
    model
        .layers
        .iter()
        .enumerate()
        .filter_map(|(l, layer)| match &layer.ffn {
            FfnSlot::Moe(m) => Some((l, m)),
            _ => None,
        })
        .collect()
}

/// The MoE layers a configuration describes: `(layer, experts, current selection)`.
pub(crate) fn moe_specs(config: &LlamaConfig) -> Vec<(usize, usize, Selection)> {
    (0..config.num_hidden_layers)
        .filter_map(|l| match config.ffn_spec(l) {
            FfnSpec::Moe {
                num_experts,
                top_k,
                renormalize,
                ..
            } => Some((
                l,
                num_experts,
                Selection::TopK {
                    k: top_k,
                    renormalize,
                },
            )),
            FfnSpec::Dense { .. } => None,
        })
        .collect()
}

impl RoutingPolicy {
    /// The same rule in every MoE layer a configuration describes (for layer-at-a-time work,
    /// where no whole model is loaded).
    pub fn uniform_for(config: &LlamaConfig, rule: Rule) -> Result<Self> {
        Self::uniform_over(moe_specs(config).into_iter().map(|(l, _, _)| l), rule)
    }

    /// `rule` in each of `layers`; none is an error.
    fn uniform_over(layers: impl Iterator<Item = usize>, rule: Rule) -> Result<Self> {
        let layers: Vec<_> = layers.map(|layer| LayerPolicy { layer, rule }).collect();
        if layers.is_empty() {
            return Err(RouterError::NoMoeLayers);
        }
        Ok(Self {
            layers,
            chosen: None,
        })
    }

    /// Checks the policy against a configuration as [`RoutingPolicy::apply`] checks it against
    /// a model (every named layer once, a MoE layer, its rule fits its experts), before any
    /// layer is read; [`RoutingPolicy::apply_layer`] then sets each layer as it is read.
    pub fn check_config(&self, config: &LlamaConfig) -> Result<()> {
        self.check_layers(config.num_hidden_layers)?;
        let specs = moe_specs(config);
        for p in &self.layers {
            let bad = |why: String| RouterError::Policy(format!("layer {}: {why}", p.layer));
            let Some((_, e, current)) = specs.iter().find(|(l, _, _)| *l == p.layer) else {
                return Err(bad("not a MoE layer (a policy for another model?)".into()));
            };
            p.rule
                .selection(current)
                .validate(*e)
                .map_err(|e| bad(format!("{} does not fit: {e}", p.rule)))?;
        }
        Ok(())
    }

    /// Checks that the policy names each layer at most once and only layers below
    /// `num_layers` (what can be checked before the layers are read; a model in memory may be
    /// sparse where its configuration says dense). [`RoutingPolicy::apply_layer`] checks the
    /// rest as each layer is read.
    pub fn check_layers(&self, num_layers: usize) -> Result<()> {
        let mut seen = BTreeSet::new();
        for p in &self.layers {
            if !seen.insert(p.layer) {
                return Err(RouterError::Policy(format!(
                    "layer {}: named twice",
                    p.layer
                )));
            }
            if p.layer >= num_layers {
                return Err(RouterError::Policy(format!(
                    "layer {}: the model has {num_layers} layers (a policy for another model?)",
                    p.layer
                )));
            }
        }
        Ok(())
    }

    /// Sets the routing of layer `l` (its FFN `ffn`) if the policy names it.
    pub fn apply_layer(&self, l: usize, ffn: &mut FfnSlot) -> Result<()> {
        let Some(p) = self.layers.iter().find(|p| p.layer == l) else {
            return Ok(());
        };
        let bad = |why: String| RouterError::Policy(format!("layer {l}: {why}"));
        let FfnSlot::Moe(moe) = ffn else {
            return Err(bad("not a MoE layer (a policy for another model?)".into()));
        };
        let selection = p.rule.selection(&moe.router.selection);
        selection
            .validate(moe.router.num_experts())
            .map_err(|e| bad(format!("{} does not fit: {e}", p.rule)))?;
        moe.router.selection = selection;
        Ok(())
    }

    /// The same rule in every MoE layer of `model`.
    pub fn uniform(model: &Llama, rule: Rule) -> Result<Self> {
        Self::uniform_over(moe_layers(model).into_iter().map(|(l, _)| l), rule)
    }

    /// The rules `model` routes with now.
    pub fn of_model(model: &Llama) -> Self {
        Self {
            layers: moe_layers(model)
                .into_iter()
                .map(|(layer, m)| LayerPolicy {
                    layer,
                    rule: Rule::of(&m.router.selection),
                })
                .collect(),
            chosen: None,
        }
    }

    /// Sets every named layer's routing. Fails, changing nothing, if a layer is named twice,
    /// does not exist, is not a MoE layer, or its rule does not fit its experts.
    pub fn apply(&self, model: &mut Llama) -> Result<()> {
        self.check_layers(model.layers.len())?;
        // Set on copies (they share the weights) so that a failure changes nothing.
        let slots = self
            .layers
            .iter()
            .map(|p| {
                let mut ffn = model.layers[p.layer].ffn.clone();
                self.apply_layer(p.layer, &mut ffn).map(|_| (p.layer, ffn))
            })
            .collect::<Result<Vec<_>>>()?;
        for (l, ffn) in slots {
            model.layers[l].ffn = ffn;
        }
        Ok(())
    }

    /// Writes the policy as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        save_json(self, path)
    }

    /// Reads a policy written by [`RoutingPolicy::save`] (or by hand).
    pub fn load(path: &Path) -> Result<Self> {
        load_json(path)
    }
}
