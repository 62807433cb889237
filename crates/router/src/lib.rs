//! Adaptive routing for MoE models (LaDiMo, stage 2): decide, per layer, how many experts each
//! token needs, so that inference is as cheap as asked for at least quality loss.
//!
//! - [`profile()`]: runs calibration text through a MoE model and records, per layer, the mean
//!   sorted routing probabilities, entropy, how often the top-1 probability passes thresholds,
//!   and expert load ([`RoutingProfile`], JSON; drawn by [`plot::profile_svg`]).
//! - [`measure`] then [`choose`]: every layer's candidate rules (top-k for each `k`, or a grid
//!   of `k` for layers of many experts ([`top_k_grid`]), top-p thresholds) are measured against the model's own routing (the reference, e.g. the top-k
//!   it was trained with), and a multiple-choice knapsack
//!   picks one per layer for a budget of activated parameters ([`ActiveParams`] says exactly
//!   what counts). The knapsack adds per-layer errors, a proxy; [`select`] runs its proposals
//!   (several error exponents) and the uniform rules within the budget (top-k from the model's
//!   own `k` up, or the largest below it; every top-p threshold) through the whole
//!   model on calibration tokens and keeps the one of least NLL among those whose activated
//!   fraction, measured there, keeps to the budget, reporting its KL from the reference
//!   routing too.
//! - [`route_by_oracle`]: every layer routed to the experts with the largest outputs, the
//!   bound on what any router can reach with the same experts (a diagnostic).
//! - [`RoutingPolicy`]: a rule per layer, saved as JSON and applied to a model at inference;
//!   dispatch computes only the chosen experts, so fewer experts run faster.
//!
//! Every whole-model pass runs one decoder layer at a time over a [`moekit_llama::LayerSource`]:
//! a checkpoint on disk (memory follows one layer, whatever the model's size) or a model in
//! memory.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use moekit_llama::{Checkpoint, LayeredConfig};
//! use moekit_router::{SearchConfig, measure, proposals, select};
//!
//! /// Chooses per-layer rules within 80% of the activated parameters of the model with every
//! /// expert active, on `calibration` tokens, reading the model one layer at a time.
//! fn adapt(model: &Checkpoint, calibration: &[u32], device: &Device) -> moekit_router::Result<()> {
//!     let layered = LayeredConfig::new();
//!     let search = SearchConfig::default();
//!     let candidates = measure(model, calibration, &search, &layered, device, &mut |_, _| {})?;
//!     let offered = proposals(&candidates, 0.8, 16_384)?;
//!     let (policy, _scores) =
//!         select(model, offered, calibration, 512, &layered, device, &mut |_, _| {})?;
//!     policy.save("policy.json".as_ref())
//! }
//! ```
#![warn(missing_docs)]

pub mod calib;
pub mod error;
pub mod file;
pub mod oracle;
pub mod params;
pub mod plot;
pub mod policy;
pub mod profile;
pub mod search;
pub mod select;

pub use error::{Result, RouterError};
pub use oracle::route_by_oracle;
pub use params::{ActiveParams, LayerExperts};
pub use plot::{Series, profile_svg, tradeoff_svg};
pub use policy::{Choice, LayerPolicy, RoutingPolicy, Rule};
pub use profile::{LayerProfile, RoutingProfile, TOP1_THRESHOLDS, profile};
pub use search::{
    Candidate, Candidates, LayerCandidates, MAX_RESOLUTION, MIN_TOP_K_RULES, SearchConfig, choose,
    choose_weighted, measure, top_k_grid,
};
pub use select::{BUDGET_SLACK, ERROR_EXPONENTS, PolicyScore, Proposal, proposals, score, select};
