//! Selecting a policy among proposals by its effect on the whole model.
//!
//! The knapsack of [`crate::search`] adds per-layer errors measured on the reference model's
//! inputs, a proxy that ignores how errors compound through later layers. So for a budget,
//! [`proposals`] offers several policies: the knapsack's optimum for each exponent in
//! [`ERROR_EXPONENTS`] and the uniform rules (the same rule in every layer, among those measured
//! in every layer) that fit: every top-p threshold (their costs are predictions), and the top-k
//! rules of `k` from the reference's up to the largest that fits (more experts than the model
//! was trained with can score better or worse), or, when even the reference's `k` does not fit,
//! the largest that fits alone: below the reference's `k` a smaller `k` routes every token to a
//! subset of a larger one's experts, further from what the model was trained with, so scoring
//! it would cost a whole-model pass for a rule not better in expectation (on SmolLM2's
//! 512-part split, ~200 passes). The reference's `k` is, per layer, the top-k rule of least
//! measured error (the model's own, at error 0), the least over layers.
//! [`score`] runs each through the whole model on calibration tokens. [`select`] keeps the
//! policy with the least next-token negative log-likelihood (the quality a user sees) among
//! those whose activated fraction, measured on the same tokens, stays within the target (a
//! top-p rule's cost is predicted on the reference model's inputs and can be higher once other
//! layers change); the KL from the reference routing is reported beside it. Because the
//! uniform rules are among the proposals, the selected policy is at least as good on the
//! calibration tokens as every offered uniform rule. Cost: one forward pass of the reference
//! model and one per
//! distinct proposal over the selection tokens.

use burn::tensor::{Device, Tensor};
use moekit_llama::rope::Rope;
use moekit_llama::{
    FfnSlot, HiddenStates, LayerSource, LayeredConfig, RopeCache, UsageCounter, head_scores,
};
use serde::{Deserialize, Serialize};

use crate::calib::windows;
use crate::error::{Result, RouterError};
use crate::params::{ActiveParams, LayerExperts, untied_embedding};
use crate::policy::{RoutingPolicy, Rule, Selected};
use crate::search::{Candidates, LayerCandidates, choose_each};

/// How far over its target a proposal may measure on the selection tokens and still count as
/// within it (relative): the prediction and the measurement read different tokens (all the
/// calibration tokens against the first `--select-tokens`), so a knapsack optimum at the
/// budget measures a little over or under it by sampling alone.
pub const BUDGET_SLACK: f64 = 0.0025;

/// Exponents `γ` of the knapsack objective `Σ_l error_l^γ` that [`proposals`] tries.
pub const ERROR_EXPONENTS: [f64; 4] = [0.5, 1.0, 2.0, 4.0];

/// A policy offered for a budget, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// `knapsack γ=…` or `uniform <rule>`.
    pub name: String,
    /// The policy (with its [`crate::Choice`]).
    pub policy: RoutingPolicy,
}

/// The whole model's quality under a policy on calibration tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyScore {
    /// Mean next-token negative log-likelihood, nats.
    pub nll: f64,
    /// Mean `KL(p_reference ‖ p_policy)` of next-token distributions, nats per token.
    pub kl: f64,
    /// The activated fraction of the all-experts model measured on the same tokens (the
    /// experts each token really used; a top-p rule's cost depends on the text). `None` in
    /// files written before it was measured.
    #[serde(default)]
    pub measured_fraction: Option<f64>,
}

/// The policies offered for `target` (see the module docs), without duplicates.
pub fn proposals(candidates: &Candidates, target: f64, resolution: usize) -> Result<Vec<Proposal>> {
    let mut out: Vec<Proposal> = Vec::new();
    let mut add = |name: String, policy: RoutingPolicy| {
        if !out.iter().any(|p| p.policy.layers == policy.layers) {
            out.push(Proposal { name, policy });
        }
    };
    let optima = choose_each(candidates, target, resolution, &ERROR_EXPONENTS)?;
    for (gamma, policy) in ERROR_EXPONENTS.iter().zip(optima) {
        add(format!("knapsack γ={gamma}"), policy);
    }
    let rules: Vec<Rule> = candidates
        .layers
        .first()
        .map(|l| l.candidates.iter().map(|c| c.rule).collect())
        .unwrap_or_default();
    let fitting = rules.into_iter().filter_map(|rule| {
        let policy = candidates.chosen_policy(&candidates.picks_of(rule)?, target);
        let fits = policy.chosen.as_ref()?.predicted_fraction <= target + 1e-9;
        fits.then_some((rule, policy))
    });
    let (top_k, top_p): (Vec<_>, Vec<_>) =
        fitting.partition(|(rule, _)| matches!(rule, Rule::TopK { .. }));
    let k_of = |rule: &Rule| match rule {
        Rule::TopK { k } => *k,
        Rule::TopP { .. } => 0,
    };
    let largest = top_k.iter().map(|(rule, _)| k_of(rule)).max().unwrap_or(0);
    let from = reference_k(candidates).min(largest);
    let top_k = top_k.into_iter().filter(|(rule, _)| k_of(rule) >= from);
    for (rule, policy) in top_k.chain(top_p) {
        add(format!("uniform {rule}"), policy);
    }
    Ok(out)
}

/// The reference routing's `k` as the candidates show it: in each layer the top-k rule of least
/// measured error (the model's own top-k has error 0), the least over layers (0 without top-k
/// candidates).
fn reference_k(candidates: &Candidates) -> usize {
    let least_error_k = |l: &LayerCandidates| {
        let top_k = l.candidates.iter().filter_map(|c| match c.rule {
            Rule::TopK { k } => Some((k, c.error)),
            Rule::TopP { .. } => None,
        });
        top_k
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0, |(k, _)| k)
    };
    candidates
        .layers
        .iter()
        .map(least_error_k)
        .min()
        .unwrap_or(0)
}

/// Scores `policies` on `source` (a checkpoint or a model in memory) over `tokens` (windows of
/// `seq_len`): each policy's mean next-token NLL, its KL from the model as it is, and the
/// activated fraction it really used there. One decoder layer at a time, as in
/// [`moekit_llama::perplexity_layered`]: each layer is read once and run on the reference's
/// hidden states and on each policy's, and the LM head scores them all blockwise
/// ([`head_scores`]); `layered.pass_tokens` bounds the hidden states of all `P + 1` streams
/// together. `progress(done, total)` reports layers run, over every pass.
pub fn score(
    source: &dyn LayerSource,
    policies: &[&RoutingPolicy],
    tokens: &[u32],
    seq_len: usize,
    layered: &LayeredConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PolicyScore>> {
    let c = source.config();
    let layers = c.num_hidden_layers;
    for p in policies {
        p.check_layers(layers)?;
    }
    let windows = windows(tokens, seq_len)?;
    let streams = LayeredConfig {
        pass_tokens: (layered.pass_tokens / (policies.len() + 1)).max(1),
        ..layered.clone()
    };
    let passes = streams.passes(&windows);
    let total = passes.len() * (layers + 1);
    let mut rope = RopeCache::new(Rope::new(c)?);
    let norm = source.final_norm(device)?;
    let mut sums = vec![(0.0f64, 0.0f64); policies.len()];
    let mut usage = vec![UsageCounter::default(); policies.len()];
    let mut experts = Vec::new();
    let (mut predicted, mut done) = (0usize, 0usize);
    for (pass, windows) in passes.iter().enumerate() {
        let mut reference = HiddenStates::embed(source, windows, layered.batch, device)?;
        let mut hidden = vec![reference.clone(); policies.len()];
        for l in 0..layers {
            let block = source.layer(l, device)?;
            if let (0, FfnSlot::Moe(moe)) = (pass, &block.ffn) {
                experts.push(LayerExperts {
                    layer: l,
                    num_experts: moe.experts.num_experts(),
                    params_per_expert: moe.experts.params_per_expert(),
                    experts_per_token: 0.0,
                });
            }
            for ((p, h), used) in policies.iter().zip(&mut hidden).zip(&mut usage) {
                let mut b = block.clone();
                p.apply_layer(l, &mut b.ffn)?;
                for moe in h.forward(&b, &mut rope)?.into_iter().flatten() {
                    used.add_layer(l, &moe);
                }
            }
            reference.forward(&block, &mut rope)?;
            done += 1;
            progress(done, total);
        }
        let others: Vec<_> = hidden.iter().map(|h| h.predicting(&norm)).collect();
        for (i, (h, targets)) in reference.predicting(&norm).into_iter().enumerate() {
            let hs: Vec<Tensor<2>> = others.iter().map(|o| o[i].0.clone()).collect();
            let scores = head_scores(source, h, &hs, &targets, layered.vocab_block)?;
            for (sum, s) in sums.iter_mut().zip(scores) {
                sum.0 += s.nll;
                sum.1 += s.kl;
            }
            predicted += targets.len();
        }
        done += 1;
        progress(done, total);
    }
    let params = source.param_counts()?.total;
    sums.into_iter()
        .zip(usage)
        .map(|((nll, kl), used)| {
            let mut layers = experts.clone();
            for (l, u) in layers.iter_mut().zip(used.usage()) {
                l.experts_per_token = u.experts_per_token;
            }
            let active = ActiveParams::from_parts(params, untied_embedding(c), layers)?;
            let s = PolicyScore {
                nll: nll / predicted as f64,
                kl: kl / predicted as f64,
                measured_fraction: Some(active.fraction()),
            };
            if s.nll.is_finite() && s.kl.is_finite() {
                Ok(s)
            } else {
                Err(RouterError::NonFinite {
                    layer: usize::MAX,
                    what: "a policy's calibration loss",
                })
            }
        })
        .collect()
}

/// Scores every proposal and returns the one with the least NLL among those whose measured
/// activated fraction on `tokens` stays within their target ([`BUDGET_SLACK`] allowed for
/// sampling; top-p rules can cost more on
/// real text than predicted on the reference model's inputs), its [`Selected`] recorded,
/// together with every proposal's score (in the order given). When every proposal measures
/// over its target, the one that measures least is returned (and a warning logged).
pub fn select(
    source: &dyn LayerSource,
    proposals: Vec<Proposal>,
    tokens: &[u32],
    seq_len: usize,
    layered: &LayeredConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(RoutingPolicy, Vec<(Proposal, PolicyScore)>)> {
    if proposals.is_empty() {
        return Err(RouterError::Target("no proposal to select from".into()));
    }
    let policies: Vec<&RoutingPolicy> = proposals.iter().map(|p| &p.policy).collect();
    let scores = score(
        source, &policies, tokens, seq_len, layered, device, progress,
    )?;
    let scored: Vec<(Proposal, PolicyScore)> = proposals.into_iter().zip(scores).collect();
    let measured = |s: &PolicyScore| s.measured_fraction.unwrap_or(f64::INFINITY);
    let within = |(p, s): &&(Proposal, PolicyScore)| {
        p.policy
            .chosen
            .as_ref()
            .is_none_or(|c| measured(s) <= c.target_fraction * (1.0 + BUDGET_SLACK))
    };
    let (best, s) = match scored
        .iter()
        .filter(within)
        .min_by(|a, b| a.1.nll.total_cmp(&b.1.nll))
    {
        Some(best) => best,
        None => {
            let least = scored
                .iter()
                .min_by(|a, b| measured(&a.1).total_cmp(&measured(&b.1)))
                .expect("not empty");
            tracing::warn!(
                proposal = least.0.name,
                measured = measured(&least.1),
                "every proposal activates more than its target on the selection tokens; \
                 keeping the one that activates least"
            );
            least
        }
    };
    let mut policy = best.policy.clone();
    if let Some(c) = policy.chosen.as_mut() {
        c.selection = Some(Selected {
            proposal: best.name.clone(),
            score: *s,
        });
    }
    Ok((policy, scored))
}
