//! `moekit profile MODEL --calib FILE... --target-active-params F --out policy.json`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use moekit::llama::Llama;
use moekit::router::file::{load_json, save_json};
use moekit::router::{
    Candidates, RoutingPolicy, Rule, SearchConfig, TOP1_THRESHOLDS, choose, logit_kl, measure,
    profile, profile_svg,
};
use moekit::upcycle::calibration;
use serde_json::json;

use crate::error::CliError;
use crate::progress;

/// Arguments of `moekit profile`.
#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// A MoE model: a Hugging Face directory (Mixtral, Qwen2-MoE) or a .gguf file.
    model: PathBuf,
    /// Calibration text: files or directories (read recursively, in name order).
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    calib: Vec<PathBuf>,
    /// Calibration tokens to profile and measure on.
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Budget: activated parameters per token as a fraction of the model with every routed
    /// expert active (0, 1].
    #[arg(long, default_value_t = 0.8)]
    target_active_params: f64,
    /// Top-p thresholds tried in every layer (besides top-k for every k).
    #[arg(long, value_delimiter = ',', default_values_t = SearchConfig::default().top_p)]
    top_p: Vec<f64>,
    /// Top-1 routing probabilities the profile counts tokens above.
    #[arg(long, value_delimiter = ',', default_values_t = TOP1_THRESHOLDS)]
    top1_thresholds: Vec<f64>,
    /// Budget steps of the knapsack's dynamic programme.
    #[arg(long, default_value_t = 16_384)]
    resolution: usize,
    /// Tokens on which the final-logit KL against the model's own routing is measured (0:
    /// skip).
    #[arg(long, default_value_t = 2048)]
    kl_tokens: usize,
    /// Draw the routing profile (one panel per layer) to this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Write the routing profile as JSON to this file.
    #[arg(long, value_name = "FILE")]
    profile_out: Option<PathBuf>,
    /// Write every layer's measured candidate rules (cost, error) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    candidates_out: Option<PathBuf>,
    /// Reuse candidates measured by an earlier run on this model (--candidates-out) instead of
    /// measuring them again: choosing for another target then takes seconds.
    #[arg(long, value_name = "FILE")]
    candidates_in: Option<PathBuf>,
    /// Print one JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// Where to write the policy (JSON).
    #[arg(long)]
    out: PathBuf,
}

/// The uniform top-k rule that activates the most parameters within the chosen fraction.
fn uniform_within(candidates: &Candidates, fraction: f64) -> Option<(Rule, f64)> {
    let e = candidates.layers.iter().map(|l| l.num_experts).min()?;
    (1..=e)
        .filter_map(|k| {
            let rule = Rule::TopK { k };
            let f = candidates.active(&candidates.picks_of(rule)?).fraction();
            (f <= fraction + 1e-9).then_some((rule, f))
        })
        .last()
}

/// KL of `policy` against the unreduced `model` on the first `n` calibration tokens.
fn kl(
    model: &Llama,
    policy: &RoutingPolicy,
    ids: &[u32],
    args: &ProfileArgs,
) -> Result<f64, CliError> {
    let mut reduced = model.clone();
    policy.apply(&mut reduced)?;
    let ids = &ids[..args.kl_tokens.min(ids.len())];
    let bar = progress::bar("kl", "tokens");
    let kl = logit_kl(
        model,
        &reduced,
        ids,
        args.seq_len,
        &mut progress::update(&bar),
    )?;
    bar.finish_and_clear();
    Ok(kl)
}

/// Profiles the routing, measures every candidate rule, chooses the policy and writes it.
pub fn run(args: &ProfileArgs) -> Result<(), CliError> {
    let start = Instant::now();
    let (_, model, tokenizer) = super::load(&args.model, None)?;
    let files = calibration::files(&args.calib)?;
    let ids = calibration::tokens(&tokenizer, &files, args.calib_tokens)?;

    let routing =
        if args.candidates_in.is_none() || args.plot.is_some() || args.profile_out.is_some() {
            let bar = progress::bar("profile", "tokens");
            let routing = profile(
                &model,
                &ids,
                args.seq_len,
                &args.top1_thresholds,
                &mut progress::update(&bar),
            )?;
            bar.finish_and_clear();
            if let Some(path) = &args.profile_out {
                routing.save(path)?;
            }
            Some(routing)
        } else {
            None
        };

    let candidates: Candidates = match &args.candidates_in {
        Some(path) => {
            let c: Candidates = load_json(path)?;
            c.check(&model)?;
            c
        }
        None => {
            let config = SearchConfig {
                top_p: args.top_p.clone(),
                seq_len: args.seq_len,
            };
            let bar = progress::bar("measure", "layers");
            let c = measure(&model, &ids, &config, &mut progress::update(&bar))?;
            bar.finish_and_clear();
            c
        }
    };
    if let Some(path) = &args.candidates_out {
        save_json(&candidates, path)?;
    }
    let policy = choose(&candidates, args.target_active_params, args.resolution)?;
    let chosen = policy.chosen.clone().expect("choose records its choice");
    let uniform = uniform_within(&candidates, chosen.predicted_fraction);

    policy.save(&args.out)?;
    if let (Some(path), Some(routing)) = (&args.plot, &routing) {
        profile_svg(routing, Some(&policy), path)?;
    }
    let (policy_kl, uniform_kl) = if args.kl_tokens > 0 {
        let p = kl(&model, &policy, &ids, args)?;
        let u = uniform
            .map(|(rule, _)| kl(&model, &RoutingPolicy::uniform(&model, rule)?, &ids, args))
            .transpose()?;
        (Some(p), u)
    } else {
        (None, None)
    };
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(seconds, "profiled and chose a policy");

    if args.json {
        println!(
            "{}",
            json!({
                "policy": args.out,
                "tokens": candidates.tokens,
                "target_fraction": chosen.target_fraction,
                "predicted_fraction": chosen.predicted_fraction,
                "error": chosen.error,
                "kl": policy_kl,
                "uniform": uniform.map(|(rule, f)| json!({
                    "rule": rule.to_string(), "fraction": f, "kl": uniform_kl,
                })),
                "layers": policy.layers.iter().map(|l| json!({
                    "layer": l.layer, "rule": l.rule.to_string(),
                })).collect::<Vec<_>>(),
                "seconds": seconds,
            })
        );
        return Ok(());
    }
    println!(
        "policy: {} ({} layers)",
        args.out.display(),
        policy.layers.len()
    );
    println!(
        "activated parameters: {:.1}% of the model with every expert (target {:.1}%)",
        100.0 * chosen.predicted_fraction,
        100.0 * chosen.target_fraction
    );
    let rules: Vec<String> = policy
        .layers
        .iter()
        .map(|l| format!("{}:{}", l.layer, l.rule))
        .collect();
    println!("rules (layer:rule): {}", rules.join(", "));
    if let Some(kl) = policy_kl {
        println!("final-logit KL against the model's own routing: {kl:.4} nats/token");
    }
    if let Some((rule, f)) = uniform {
        let kl = uniform_kl.map_or(String::new(), |kl| format!(", KL {kl:.4}"));
        println!(
            "uniform {rule} in every layer: {:.1}% activated{kl}",
            100.0 * f
        );
    }
    println!("{} calibration tokens, {seconds:.1} s", candidates.tokens);
    Ok(())
}
