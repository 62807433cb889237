//! Choosing per-layer rules for an activated-parameter budget at least quality loss.
//!
//! The reference ("unreduced model") is the model as it is given: every MoE layer routing with
//! the rule it was converted or trained with. A policy trades deviation from it for cost.
//!
//! 1. [`measure`]: the calibration tokens run once through the reference model, one decoder
//!    layer at a time; at each MoE layer, with its input `x_l` and output `y_l`, every
//!    candidate rule `c` is applied to that layer alone on `x_l`, giving its
//!    relative output error `‖MoE_c(x_l) − y_l‖² / ‖y_l‖²` and its measured mean experts per
//!    token `k̄_c`. Cost: one forward pass plus, per layer, one MoE-layer pass per candidate
//!    (top-k for every `k = 1..E`, or [`top_k_grid`]'s values when `E` is above
//!    [`SearchConfig::max_top_k_rules`], and the top-p thresholds); about 3 minutes for
//!    SmolLM2 split into 8 experts on 8,192 tokens, 2 cores. A fine split's hundreds of
//!    experts would cost hundreds of passes per layer without the grid.
//! 2. [`choose`]: a multiple-choice knapsack. Each layer takes exactly one candidate; the sum
//!    of `k̄_c · P_e` must fit the budget `target · full − always` (see [`crate::params`]);
//!    the sum of the layers' errors is minimised. Solved by dynamic programming over the
//!    budget cut into `resolution` steps, each candidate's cost rounded up to whole steps
//!    (the tables run `L` steps past the budget: one of least error, one of least real cost,
//!    and of their entries whose real cost fits the one of least error is taken): the chosen
//!    policy never exceeds the budget, one is found whenever any policy fits, and no policy
//!    whose cost is at least `L` steps within the budget has a smaller error.
//!    `O(L · resolution · candidates)`: milliseconds at the default 16,384 steps for a few
//!    experts, more for fine splits (up to [`SearchConfig::max_top_k_rules`] top-k
//!    candidates per layer, 64 by default, and the top-p thresholds).
//!
//! The errors and the top-p costs are measured on inputs from the reference model, so they
//! ignore how earlier layers' changes move later layers' inputs: a top-p rule's real cost can
//! differ a little from the prediction (`moekit eval --policy` measures it), and
//! [`crate::select`] measures the whole model under the proposed policies.

use burn::tensor::{Device, Tensor};
use moekit_llama::rope::Rope;
use moekit_llama::{FfnSlot, HiddenStates, LayerSource, LayeredConfig, RopeCache};
use moekit_moe::{MoeLayer, Selection};
use serde::{Deserialize, Serialize};

use crate::calib::windows;
use crate::error::{Result, RouterError};
use crate::params::{ActiveParams, LayerExperts, untied_embedding};
use crate::policy::{Choice, LayerPolicy, RoutingPolicy, Rule};

/// Settings of [`measure`].
#[derive(Debug, Clone, PartialEq)]
pub struct SearchConfig {
    /// Top-p thresholds tried in every layer, besides the top-k rules.
    pub top_p: Vec<f64>,
    /// Tokens per calibration sequence.
    pub seq_len: usize,
    /// Most top-k rules tried in a layer (at least [`MIN_TOP_K_RULES`]): a layer of `E` routed
    /// experts tries every `k = 1..E` when `E` is at most this, and [`top_k_grid`]'s values
    /// otherwise.
    pub max_top_k_rules: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            top_p: vec![0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
            seq_len: 512,
            max_top_k_rules: 64,
        }
    }
}

impl SearchConfig {
    /// Whether a layer of `num_experts` routed experts tries fewer top-k rules than it has
    /// experts ([`top_k_grid`]'s values instead of every `k = 1..E`).
    pub fn thins(&self, num_experts: usize) -> bool {
        num_experts > self.max_top_k_rules
    }
}

/// The least [`SearchConfig::max_top_k_rules`]: two values near the model's own `k` and both
/// ends of `1..=E`.
pub const MIN_TOP_K_RULES: usize = 4;

/// The `k` of the top-k rules [`measure`] tries in a layer of `e` routed experts whose own rule
/// uses `own` experts per token, in increasing order: every `k` when `e ≤ max`; otherwise
/// exactly `max` values (`max` is raised to [`MIN_TOP_K_RULES`]): the `max / 2` consecutive
/// values nearest `own` (budgets near the model's own cost choose among these, so the knapsack
/// keeps a resolution of one expert there) and `max − max / 2` values spread evenly over the
/// other `k` of `1..=e`, both ends of `1..=e` included (coarser, for budgets far from it).
pub fn top_k_grid(e: usize, own: usize, max: usize) -> Vec<usize> {
    let max = max.max(MIN_TOP_K_RULES);
    if e <= max {
        return (1..=e).collect();
    }
    let near = max / 2;
    let start = own.saturating_sub(near / 2).clamp(1, e + 1 - near);
    let window = start..start + near;
    // The others, `e − near ≥ spread` of them: their first is 1 unless the window holds it,
    // their last `e` unless the window holds it.
    let others: Vec<usize> = (1..=e).filter(|k| !window.contains(k)).collect();
    let spread = max - near;
    let last = others.len() - 1;
    let mut ks: Vec<usize> = (0..spread)
        .map(|i| others[(i * last + (spread - 1) / 2) / (spread - 1)])
        .chain(window)
        .collect();
    ks.sort_unstable();
    ks
}

/// One rule of one layer, measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The rule.
    pub rule: Rule,
    /// Mean experts per token it computes on the calibration tokens.
    pub experts_per_token: f64,
    /// Relative output error against the unreduced layer.
    pub error: f64,
}

/// The measured candidates of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCandidates {
    /// Decoder layer index.
    pub layer: usize,
    /// Routed experts `E`.
    pub num_experts: usize,
    /// Parameters of one routed expert.
    pub params_per_expert: usize,
    /// The candidates.
    pub candidates: Vec<Candidate>,
}

/// Every MoE layer's measured candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    /// Calibration tokens measured.
    pub tokens: usize,
    /// Parameters every token uses (see [`ActiveParams::always`]).
    pub always: usize,
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<LayerCandidates>,
    /// What they were measured on, as the caller describes it (`moekit profile`: the model's
    /// and calibration files' stamps and the measurement settings); `None` from [`measure`]
    /// and in older files. Callers that reuse candidates compare it with their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Candidates {
    /// Activated parameters when layer `i` takes its candidate `picks[i]`.
    pub fn active(&self, picks: &[usize]) -> ActiveParams {
        ActiveParams {
            always: self.always,
            layers: self
                .layers
                .iter()
                .zip(picks)
                .map(|(l, &j)| LayerExperts {
                    layer: l.layer,
                    num_experts: l.num_experts,
                    params_per_expert: l.params_per_expert,
                    experts_per_token: l.candidates[j].experts_per_token,
                })
                .collect(),
        }
    }

    /// Checks that these candidates were measured on the model of `active` (same MoE layers,
    /// expert counts and sizes, same always-active parameters; [`ActiveParams::of`] or
    /// [`ActiveParams::of_checkpoint`]) and hold possible values (finite
    /// errors ≥ 0, between 0 and `E` experts per token, top-k with `k ≤ E`): a file edited by
    /// hand or written for another model is refused. Weights are not compared (see
    /// [`Candidates::source`]).
    pub fn check(&self, active: &ActiveParams) -> Result<()> {
        for l in &self.layers {
            for c in &l.candidates {
                let e = l.num_experts as f64;
                let k_ok = match c.rule {
                    Rule::TopK { k } => k >= 1 && k <= l.num_experts,
                    _ => true,
                };
                let cost_ok = c.experts_per_token > 0.0 && c.experts_per_token <= e;
                if !(k_ok && cost_ok && c.error.is_finite() && c.error >= 0.0) {
                    return Err(RouterError::Policy(format!(
                        "layer {}: candidate {} with {} experts per token and error {} is not \
                         possible for {} experts",
                        l.layer, c.rule, c.experts_per_token, c.error, l.num_experts
                    )));
                }
            }
        }
        let ours: Vec<_> = self
            .layers
            .iter()
            .map(|l| (l.layer, l.num_experts, l.params_per_expert))
            .collect();
        let theirs: Vec<_> = active
            .layers
            .iter()
            .map(|l| (l.layer, l.num_experts, l.params_per_expert))
            .collect();
        if ours != theirs || self.always != active.always {
            return Err(RouterError::Policy(
                "the candidates were measured on another model".into(),
            ));
        }
        Ok(())
    }

    /// Index in each layer of the candidate with `rule`, if every layer has it.
    pub fn picks_of(&self, rule: Rule) -> Option<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| l.candidates.iter().position(|c| c.rule == rule))
            .collect()
    }

    /// [`Candidates::policy`] with its [`Choice`] for `target` recorded.
    pub fn chosen_policy(&self, picks: &[usize], target: f64) -> RoutingPolicy {
        let mut policy = self.policy(picks);
        policy.chosen = Some(Choice {
            target_fraction: target,
            predicted_fraction: self.active(picks).fraction(),
            error: self
                .layers
                .iter()
                .zip(picks)
                .map(|(l, &j)| l.candidates[j].error)
                .sum(),
            tokens: self.tokens,
            selection: None,
        });
        policy
    }

    /// The policy taking candidate `picks[i]` in layer `i`.
    pub fn policy(&self, picks: &[usize]) -> RoutingPolicy {
        RoutingPolicy {
            layers: self
                .layers
                .iter()
                .zip(picks)
                .map(|(l, &j)| LayerPolicy {
                    layer: l.layer,
                    rule: l.candidates[j].rule,
                })
                .collect(),
            chosen: None,
        }
    }
}

fn relative_error(layer: usize, got: Tensor<3>, want: &Tensor<3>) -> Result<f64> {
    let num = (got - want.clone()).square().sum().into_scalar::<f32>() as f64;
    let den = want.clone().square().sum().into_scalar::<f32>() as f64;
    let e = num / den.max(f64::MIN_POSITIVE);
    if !e.is_finite() {
        return Err(RouterError::NonFinite {
            layer,
            what: "the output error",
        });
    }
    Ok(e)
}

/// The rules tried in `moe` (input `x`): top-k for [`top_k_grid`]'s `k`, then the top-p
/// thresholds. A layer routing by top-p whose `E` needs the grid runs once to find its own mean
/// experts per token.
fn candidate_rules(moe: &MoeLayer, x: &Tensor<3>, config: &SearchConfig) -> Result<Vec<Rule>> {
    let e = moe.router.num_experts();
    let ks = if !config.thins(e) {
        (1..=e).collect()
    } else {
        let own = match moe.router.selection {
            Selection::TopK { k, .. } => k,
            Selection::TopP { .. } => {
                let out = moe.forward(x.clone())?;
                out.stats.mean_experts_per_token().round() as usize
            }
        };
        top_k_grid(e, own, config.max_top_k_rules)
    };
    Ok(ks
        .into_iter()
        .map(|k| Rule::TopK { k })
        .chain(config.top_p.iter().map(|&p| Rule::TopP { p, max_k: None }))
        .collect())
}

/// Measures every candidate rule of every MoE layer on `tokens` (see the module docs), one
/// decoder layer at a time: the calibration hidden states flow through `source` (a checkpoint,
/// or a model in memory) as in [`moekit_llama::perplexity_layered`], and each MoE layer's
/// candidates run on its inputs while it is loaded. Memory: one layer, and the hidden states,
/// FFN inputs and outputs of every calibration token (`3·N·H` floats; all tokens are held,
/// as every candidate's error is over all of them). `layered.batch` sequences run per call.
/// `progress(done, total)` reports layers.
pub fn measure(
    source: &dyn LayerSource,
    tokens: &[u32],
    config: &SearchConfig,
    layered: &LayeredConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Candidates> {
    if let Some(p) = config.top_p.iter().find(|p| !(**p > 0.0 && **p <= 1.0)) {
        return Err(RouterError::Policy(format!("top-p {p} must be in (0, 1]")));
    }
    if config.max_top_k_rules < MIN_TOP_K_RULES {
        return Err(RouterError::Policy(format!(
            "at most {} top-k rules per layer: at least {MIN_TOP_K_RULES} are needed",
            config.max_top_k_rules
        )));
    }
    let windows = windows(tokens, config.seq_len)?;
    let c = source.config();
    let mut hidden = HiddenStates::embed(source, &windows, layered.batch, device)?;
    let mut rope = RopeCache::new(Rope::new(c)?);
    let counted = hidden.tokens();
    let mut layers = Vec::new();
    let mut experts = Vec::new();
    for l in 0..c.num_hidden_layers {
        let block = source.layer(l, device)?;
        match &block.ffn {
            FfnSlot::Moe(moe) => {
                // Every batch's FFN input and output, as one sequence of all tokens.
                let (mut xs, mut ys) = (Vec::new(), Vec::new());
                for (_, h) in &mut hidden.batches {
                    let [b, t, width] = h.dims();
                    let (r, x) = block.attention_block(h.clone(), rope.tables(t, device), None);
                    let y = moe.forward(x.clone())?.output;
                    *h = r + y.clone();
                    xs.push(x.reshape([1, b * t, width]));
                    ys.push(y.reshape([1, b * t, width]));
                }
                let (x, y) = (Tensor::cat(xs, 1), Tensor::cat(ys, 1));
                layers.push(measure_layer(l, moe, &x, &y, config)?);
                experts.push(LayerExperts {
                    layer: l,
                    num_experts: moe.experts.num_experts(),
                    params_per_expert: moe.experts.params_per_expert(),
                    experts_per_token: moe.router.slots() as f64,
                });
            }
            _ => {
                hidden.forward(&block, &mut rope)?;
            }
        }
        progress(l + 1, c.num_hidden_layers);
    }
    if layers.is_empty() {
        return Err(RouterError::NoMoeLayers);
    }
    let total = source.param_counts()?.total;
    let active = ActiveParams::from_parts(total, untied_embedding(c), experts)?;
    Ok(Candidates {
        tokens: counted,
        always: active.always,
        layers,
        source: None,
    })
}

/// Every candidate rule of MoE layer `l` run on its input `x`, against its own output `y`.
fn measure_layer(
    l: usize,
    moe: &MoeLayer,
    x: &Tensor<3>,
    y: &Tensor<3>,
    config: &SearchConfig,
) -> Result<LayerCandidates> {
    let mut candidates = Vec::new();
    for rule in candidate_rules(moe, x, config)? {
        let mut reduced = moe.clone();
        reduced.router.selection = rule.selection(&moe.router.selection);
        let out = reduced.forward(x.clone())?;
        candidates.push(Candidate {
            rule,
            experts_per_token: out.stats.mean_experts_per_token(),
            error: relative_error(l, out.output, y)?,
        });
    }
    Ok(LayerCandidates {
        layer: l,
        num_experts: moe.router.num_experts(),
        params_per_expert: moe.experts.params_per_expert(),
        candidates,
    })
}

/// The policy that activates at most `target` of the parameters of the model with every
/// expert active (a fraction in (0, 1]) and has the least total output error (see the module
/// docs). `resolution` is the number of budget steps of the dynamic programme.
pub fn choose(candidates: &Candidates, target: f64, resolution: usize) -> Result<RoutingPolicy> {
    choose_weighted(candidates, target, resolution, 1.0)
}

/// [`choose`] minimising `Σ_l error_l^γ` with `γ = exponent`: `γ > 1` penalises one large
/// error more than several small ones (errors compound through the layers after them), `γ < 1`
/// the opposite. The recorded [`Choice::error`] is the plain sum `Σ_l error_l`.
pub fn choose_weighted(
    candidates: &Candidates,
    target: f64,
    resolution: usize,
    exponent: f64,
) -> Result<RoutingPolicy> {
    choose_each(candidates, target, resolution, &[exponent]).map(|mut p| p.remove(0))
}

/// [`choose_weighted`] for each of `exponents`, sharing what does not depend on the exponent
/// (the checks, the costs in budget steps, the least-cost table).
pub(crate) fn choose_each(
    candidates: &Candidates,
    target: f64,
    resolution: usize,
    exponents: &[f64],
) -> Result<Vec<RoutingPolicy>> {
    if let Some(exponent) = exponents.iter().find(|e| !(e.is_finite() && **e > 0.0)) {
        return Err(RouterError::Target(format!(
            "the error exponent {exponent} must be positive"
        )));
    }
    let search = BudgetSearch::new(candidates, target, resolution)?;
    exponents.iter().map(|&e| search.best(e)).collect()
}

/// One budget's knapsack inputs: each candidate's real cost and its cost in budget steps, and
/// the table of least real cost (see the module docs).
struct BudgetSearch<'a> {
    candidates: &'a Candidates,
    target: f64,
    /// Parameters the routed experts may activate: `target · full − always`.
    budget: f64,
    /// Real costs that exceed `budget` by at most this still fit (rounding).
    tolerance: f64,
    resolution: usize,
    /// `resolution + L`: rounding costs at most one step per layer.
    capacity: usize,
    /// `costs[i][j]`: layer `i`'s candidate `j`'s activated parameters per token.
    costs: Vec<Vec<f64>>,
    /// The same in budget steps, rounded up.
    units: Vec<Vec<usize>>,
    least_cost: Knapsack,
}

impl<'a> BudgetSearch<'a> {
    fn new(candidates: &'a Candidates, target: f64, resolution: usize) -> Result<Self> {
        if !(target > 0.0 && target <= 1.0) {
            return Err(RouterError::Target(format!(
                "the activated-parameter fraction {target} must be in (0, 1]"
            )));
        }
        if candidates.layers.iter().any(|l| l.candidates.is_empty())
            || candidates
                .layers
                .iter()
                .any(|l| l.candidates.len() > u32::MAX as usize)
            || resolution == 0
        {
            return Err(RouterError::Target("nothing to choose from".into()));
        }
        if resolution > MAX_RESOLUTION {
            return Err(RouterError::Target(format!(
                "a resolution of {resolution} budget steps is more than the {MAX_RESOLUTION} the search allows"
            )));
        }
        let full = candidates.active(&vec![0; candidates.layers.len()]).full() as f64;
        let budget = target * full - candidates.always as f64;
        let costs: Vec<Vec<f64>> = candidates
            .layers
            .iter()
            .map(|l| {
                l.candidates
                    .iter()
                    .map(|c| c.experts_per_token * l.params_per_expert as f64)
                    .collect()
            })
            .collect();
        let least: f64 = costs
            .iter()
            .map(|c| c.iter().copied().fold(f64::INFINITY, f64::min))
            .sum();
        if budget + 1e-9 * full < least {
            return Err(RouterError::Target(format!(
                "{:.1}% of the all-experts model's activated parameters is below the least any policy activates here ({:.1}%)",
                100.0 * target,
                100.0 * (candidates.always as f64 + least) / full
            )));
        }
        // Each candidate's cost in budget steps, rounded up. The tables run to `resolution +
        // L` steps: rounding costs at most one step per layer, so a policy whose real cost is
        // the budget exactly (e.g. uniform top-1 when the target is its fraction) is still
        // found.
        let step = budget / resolution as f64;
        let capacity = resolution + candidates.layers.len();
        let units: Vec<Vec<usize>> = costs
            .iter()
            .map(|c| c.iter().map(|&c| (c / step).ceil() as usize).collect())
            .collect();
        let least_cost = knapsack(&costs, &units, capacity);
        Ok(Self {
            candidates,
            target,
            budget,
            tolerance: 1e-9 * full,
            resolution,
            capacity,
            costs,
            units,
            least_cost,
        })
    }

    /// The fitting policy of least `Σ error^exponent`. Two tables over "at most u steps": the
    /// least weighted error and the least real cost, each with its picks. Above `resolution`
    /// steps the least-error policy may not really fit (rounding up can tie a candidate just
    /// over the budget with one exactly at it); the least-cost one fits whenever anything
    /// does, so together they always find a policy when one exists.
    fn best(&self, exponent: f64) -> Result<RoutingPolicy> {
        let weighted: Vec<Vec<f64>> = self
            .candidates
            .layers
            .iter()
            .map(|l| {
                l.candidates
                    .iter()
                    .map(|c| c.error.powf(exponent))
                    .collect()
            })
            .collect();
        let least_error = knapsack(&weighted, &self.units, self.capacity);
        let total = |table: &[Vec<f64>], picks: &[usize]| -> f64 {
            table.iter().zip(picks).map(|(t, &j)| t[j]).sum()
        };
        // Entries up to `resolution` steps always fit, and the least-error one at
        // `resolution` is the best of them: only the rounding margin above it needs both
        // tables.
        let picks = (self.resolution..=self.capacity)
            .flat_map(|u| {
                [
                    least_error.picks(u, &self.units),
                    self.least_cost.picks(u, &self.units),
                ]
            })
            .flatten()
            .filter(|picks| total(&self.costs, picks) <= self.budget + self.tolerance)
            .min_by(|a, b| total(&weighted, a).total_cmp(&total(&weighted, b)))
            .ok_or_else(|| {
                RouterError::Target(format!(
                    "no policy fits {:.1}% of the all-experts model at this resolution; raise the target or the resolution",
                    100.0 * self.target
                ))
            })?;
        Ok(self.candidates.chosen_policy(&picks, self.target))
    }
}

/// The largest `resolution` [`choose`] accepts: its tables hold `resolution + layers` entries
/// per layer.
pub const MAX_RESOLUTION: usize = 1 << 20;

/// A multiple-choice knapsack table: for each layer and each number of budget steps `u`, the
/// candidate in the policy of least summed `value` over the layers so far using at most `u`
/// steps.
struct Knapsack {
    /// The least total value at each `u` after the last layer (`inf`: nothing fits).
    best: Vec<f64>,
    /// `pick[i][u]`: layer `i`'s candidate in the optimum of layers `0..=i` at `u` steps.
    pick: Vec<Vec<u32>>,
}

/// Fills the table for `values[i][j]` / `units[i][j]` (layer `i`, candidate `j`) up to
/// `capacity` steps.
fn knapsack(values: &[Vec<f64>], units: &[Vec<usize>], capacity: usize) -> Knapsack {
    let mut best = vec![0.0f64; capacity + 1];
    let mut pick = Vec::with_capacity(values.len());
    for (values, units) in values.iter().zip(units) {
        let mut next = vec![f64::INFINITY; capacity + 1];
        let mut choice = vec![u32::MAX; capacity + 1];
        for u in 0..=capacity {
            for (j, (&v, &w)) in values.iter().zip(units).enumerate() {
                if w <= u && best[u - w] + v < next[u] {
                    next[u] = best[u - w] + v;
                    choice[u] = j as u32;
                }
            }
        }
        best = next;
        pick.push(choice);
    }
    Knapsack { best, pick }
}

impl Knapsack {
    /// The picks of the optimum at `u` steps, if any policy fits in `u` steps.
    fn picks(&self, mut u: usize, units: &[Vec<usize>]) -> Option<Vec<usize>> {
        if !self.best[u].is_finite() {
            return None;
        }
        let mut picks = vec![0usize; self.pick.len()];
        for i in (0..self.pick.len()).rev() {
            let j = self.pick[i][u] as usize;
            picks[i] = j;
            u -= units[i][j];
        }
        Some(picks)
    }
}
