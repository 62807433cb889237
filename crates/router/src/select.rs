//! Selecting a policy among proposals by its effect on the whole model.
//!
//! The knapsack of [`crate::search`] adds per-layer errors measured on the reference model's
//! inputs, a proxy that ignores how errors compound through later layers. So for a budget,
//! [`proposals`] offers several policies: the knapsack's optimum for each exponent in
//! [`ERROR_EXPONENTS`] and every uniform rule (the same rule in every layer) that fits; and
//! [`score`] runs each through the whole model on calibration tokens. [`select`] keeps the
//! policy with the least next-token negative log-likelihood (the quality a user sees); the KL
//! from the reference routing is reported beside it. Because the uniform rules are among the
//! proposals, the selected policy is at least as good as every uniform rule within the budget
//! on the calibration tokens. Cost: one forward pass of the reference model and one per
//! distinct proposal over the selection tokens.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use moekit_llama::Llama;
use serde::{Deserialize, Serialize};

use crate::calib::windows;
use crate::error::{Result, RouterError};
use crate::policy::{RoutingPolicy, Rule, Selected};
use crate::search::{Candidates, choose_weighted};

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
}

/// The policies offered for `target` (see the module docs), without duplicates.
pub fn proposals(candidates: &Candidates, target: f64, resolution: usize) -> Result<Vec<Proposal>> {
    let mut out: Vec<Proposal> = Vec::new();
    let mut add = |name: String, policy: RoutingPolicy| {
        if !out.iter().any(|p| p.policy.layers == policy.layers) {
            out.push(Proposal { name, policy });
        }
    };
    for gamma in ERROR_EXPONENTS {
        add(
            format!("knapsack γ={gamma}"),
            choose_weighted(candidates, target, resolution, gamma)?,
        );
    }
    let rules: Vec<Rule> = candidates
        .layers
        .first()
        .map(|l| l.candidates.iter().map(|c| c.rule).collect())
        .unwrap_or_default();
    for rule in rules {
        if let Some(picks) = candidates.picks_of(rule) {
            let policy = candidates.chosen_policy(&picks, target);
            if policy
                .chosen
                .as_ref()
                .is_some_and(|c| c.predicted_fraction <= target + 1e-9)
            {
                add(format!("uniform {rule}"), policy);
            }
        }
    }
    Ok(out)
}

/// Scores `policies` on `model` over `tokens` (windows of `seq_len`): each policy's mean
/// next-token NLL and its KL from `model` as it is. `progress(done, total)` reports tokens.
pub fn score(
    model: &Llama,
    policies: &[&RoutingPolicy],
    tokens: &[u32],
    seq_len: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PolicyScore>> {
    let models = policies
        .iter()
        .map(|p| {
            let mut m = model.clone();
            p.apply(&mut m).map(|_| m)
        })
        .collect::<Result<Vec<_>>>()?;
    let device = model.device();
    let mut sums = vec![(0.0f64, 0.0f64); policies.len()];
    let (mut predicted, mut done) = (0usize, 0usize);
    for w in windows(tokens, seq_len)? {
        let ids = model.tokens(&[w], &device)?;
        let t = w.len() - 1;
        let next: Vec<i64> = w[1..].iter().map(|&i| i as i64).collect();
        let next: Tensor<3, Int> = Tensor::from_data(TensorData::new(next, [1, t, 1]), &device);
        let reference = log_softmax(model.logits(ids.clone())?.narrow(1, 0, t), 2);
        let p = reference.clone().exp();
        for (m, (nll, kl)) in models.iter().zip(sums.iter_mut()) {
            let q = log_softmax(m.logits(ids.clone())?.narrow(1, 0, t), 2);
            *kl += (p.clone() * (reference.clone() - q.clone()))
                .sum()
                .into_scalar::<f32>() as f64;
            *nll -= q.gather(2, next.clone()).sum().into_scalar::<f32>() as f64;
        }
        predicted += t;
        done += w.len();
        progress(done, tokens.len());
    }
    sums.into_iter()
        .map(|(nll, kl)| {
            let s = PolicyScore {
                nll: nll / predicted as f64,
                kl: kl / predicted as f64,
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

/// Scores every proposal and returns the one with the least NLL, its [`Selected`] recorded,
/// together with every proposal's score (in the order given).
pub fn select(
    model: &Llama,
    proposals: Vec<Proposal>,
    tokens: &[u32],
    seq_len: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(RoutingPolicy, Vec<(Proposal, PolicyScore)>)> {
    if proposals.is_empty() {
        return Err(RouterError::Target("no proposal to select from".into()));
    }
    let policies: Vec<&RoutingPolicy> = proposals.iter().map(|p| &p.policy).collect();
    let scores = score(model, &policies, tokens, seq_len, progress)?;
    let scored: Vec<(Proposal, PolicyScore)> = proposals.into_iter().zip(scores).collect();
    let (best, s) = scored
        .iter()
        .min_by(|a, b| a.1.nll.total_cmp(&b.1.nll))
        .expect("not empty");
    let mut policy = best.policy.clone();
    if let Some(c) = policy.chosen.as_mut() {
        c.selection = Some(Selected {
            proposal: best.name.clone(),
            score: *s,
        });
    }
    Ok((policy, scored))
}
