//! `moekit profile MODEL --calib FILE... [--target-active-params F [--reference DENSE] |
//! --max-active-params N] --out policy.json`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use moekit::llama::{Checkpoint, LayeredConfig};
use moekit::router::file::{load_json, save_json};
use moekit::router::{
    ActiveParams, Candidates, MAX_RESOLUTION, MIN_TOP_K_RULES, RouterError, RoutingPolicy,
    SearchConfig, TOP1_THRESHOLDS, measure, profile, profile_svg, proposals, select,
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
    /// expert active (0, 1], or of `--reference`'s when given (then a budget above the
    /// all-experts model's allows every expert).
    #[arg(long, default_value_t = 0.8)]
    target_active_params: f64,
    /// The model `--target-active-params` is a fraction of, typically the dense model MODEL
    /// was converted from: `--reference DENSE --target-active-params 0.8` keeps at most 80% of
    /// DENSE's parameters per token (a neuron split's all-experts model is the dense one plus
    /// its routers, so its own fraction would allow slightly more).
    #[arg(long, value_name = "MODEL")]
    reference: Option<PathBuf>,
    /// Budget as a count: at most N activated parameters per token.
    #[arg(long, value_name = "N", conflicts_with_all = ["target_active_params", "reference"])]
    max_active_params: Option<f64>,
    /// Top-p thresholds tried in every layer (besides the top-k rules).
    #[arg(long, value_delimiter = ',', default_values_t = SearchConfig::default().top_p)]
    top_p: Vec<f64>,
    /// Most top-k rules measured per layer: every k when a layer has at most N routed experts;
    /// otherwise the N/2 values of k nearest the model's own and the rest spread over 1..E (a
    /// split into hundreds of experts would otherwise cost one MoE pass per k).
    #[arg(long, value_name = "N", default_value_t = SearchConfig::default().max_top_k_rules)]
    top_k_rules: usize,
    /// Top-1 routing probabilities the profile counts tokens above.
    #[arg(long, value_delimiter = ',', default_values_t = TOP1_THRESHOLDS)]
    top1_thresholds: Vec<f64>,
    /// Budget steps of the knapsack's dynamic programme.
    #[arg(long, default_value_t = 16_384)]
    resolution: usize,
    /// Calibration tokens on which every proposed policy runs through the whole model
    /// (negative log-likelihood, KL from the model's own routing) to select one.
    #[arg(long, default_value_t = 2048)]
    select_tokens: usize,
    /// Draw the routing profile (one panel per layer) to this SVG file (`.svg`).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Write the routing profile as JSON to this file.
    #[arg(long, value_name = "FILE")]
    profile_out: Option<PathBuf>,
    /// Write every layer's measured candidate rules (cost, error) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    candidates_out: Option<PathBuf>,
    /// Reuse candidates measured by an earlier run (--candidates-out) instead of measuring them
    /// again: choosing for another target then takes seconds. They must have been measured on
    /// the same weights with the same --calib text and tokens, --seq-len, --top-p and
    /// --top-k-rules.
    #[arg(long, value_name = "FILE")]
    candidates_in: Option<PathBuf>,
    /// Print one JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// Where to write the policy (JSON).
    #[arg(long)]
    out: PathBuf,
}

/// Profiles the routing, measures every candidate rule, chooses the policy and writes it.
pub fn run(args: &ProfileArgs) -> Result<(), CliError> {
    let start = Instant::now();
    if let Some(plot) = &args.plot
        && plot
            .extension()
            .is_none_or(|e| !e.eq_ignore_ascii_case("svg"))
    {
        return Err(CliError::Usage(format!(
            "--plot {}: plots are written as SVG; name the file .svg",
            plot.display()
        )));
    }
    if !(1..=MAX_RESOLUTION).contains(&args.resolution) {
        return Err(CliError::Usage(format!(
            "--resolution {}: the knapsack takes 1 to {MAX_RESOLUTION} budget steps",
            args.resolution
        )));
    }
    if let Some(p) = args.top_p.iter().find(|p| !(**p > 0.0 && **p <= 1.0)) {
        return Err(CliError::Usage(format!(
            "--top-p {p}: thresholds are in (0, 1]"
        )));
    }
    if args.top_k_rules < MIN_TOP_K_RULES {
        return Err(CliError::Usage(format!(
            "--top-k-rules {}: at least {MIN_TOP_K_RULES} (two near the model's own k and both \
             ends)",
            args.top_k_rules
        )));
    }
    if args.select_tokens < 2 {
        return Err(CliError::Usage("--select-tokens must be at least 2".into()));
    }
    let (flag, budget) = match args.max_active_params {
        Some(n) => ("--max-active-params", n),
        None => ("--target-active-params", args.target_active_params),
    };
    if !(budget.is_finite() && budget > 0.0) {
        return Err(CliError::Usage(format!(
            "{flag}: the budget must be a positive number"
        )));
    }
    if args.max_active_params.is_none() && args.reference.is_none() && budget > 1.0 {
        return Err(CliError::Usage(format!(
            "{flag} {budget}: a fraction of the model with every expert is at most 1 \
             (--reference DENSE budgets against another model)"
        )));
    }
    let reference = super::reference_params(args.reference.as_deref())?;
    // The budget as the user gave it, for errors (--max-active-params excludes --reference).
    let given = match &args.reference {
        Some(r) => format!("{flag} {budget} of {}", r.display()),
        None => format!("{flag} {budget}"),
    };
    let ckpt = Checkpoint::open(&args.model)?;
    let layered = LayeredConfig::new();
    crate::memory::check_layer(
        "profiling one layer at a time",
        ckpt.config(),
        layered.vocab_block,
    )?;
    let tokenizer = ckpt.tokenizer()?;
    let active = ActiveParams::of_checkpoint(&ckpt, None)?;
    if active.layers.is_empty() {
        return Err(RouterError::NoMoeLayers.into());
    }
    let device = moekit::default_device();
    let full = active.full() as f64;
    // As a fraction of the all-experts model. A count, or a fraction of another model, may
    // allow more than the all-experts model has: then every expert fits.
    let target = match (args.max_active_params, reference) {
        (Some(n), _) => (n / full).min(1.0),
        (None, Some(r)) => (budget * r / full).min(1.0),
        (None, None) => budget,
    };
    let files = calibration::files(&args.calib)?;
    let ids = calibration::tokens(&tokenizer, &files, args.calib_tokens)?;

    // What the candidates depend on: the weights (not files written beside them, nor the path
    // as typed), the calibration files, the tokens read and the measurement's settings. The
    // top-k limit only when it thins some layer's rules (so files measured before it existed
    // stay reusable on models whose layers it does not thin).
    let config = SearchConfig {
        top_p: args.top_p.clone(),
        seq_len: args.seq_len,
        max_top_k_rules: args.top_k_rules,
    };
    let mut settings = format!(
        "tokens={} seq-len={} top-p={:?}",
        ids.len(),
        args.seq_len,
        args.top_p
    );
    if active.layers.iter().any(|l| config.thins(l.num_experts)) {
        settings += &format!(" top-k-rules={}", args.top_k_rules);
    }
    let canonical: Vec<PathBuf> = files
        .iter()
        .map(|f| f.canonicalize().unwrap_or_else(|_| f.clone()))
        .collect();
    let source = super::inputs_fingerprint(super::stamp_model(&args.model), settings, &canonical);
    let candidates: Candidates = match &args.candidates_in {
        Some(path) => {
            let c: Candidates = load_json(path)?;
            c.check(&active)?;
            match &c.source {
                Some(theirs) if *theirs != source => {
                    return Err(CliError::Usage(format!(
                        "--candidates-in {}: measured on other inputs ({}); measure again \
                         without --candidates-in, or give the model, --calib, --calib-tokens, \
                         --seq-len, --top-p and --top-k-rules they were measured with",
                        path.display(),
                        first_difference(theirs, &source)
                    )));
                }
                Some(_) => {}
                None => tracing::warn!(
                    path = %path.display(),
                    "the candidates file does not say what it was measured on (an older file); \
                     it is used as it is"
                ),
            }
            c
        }
        None => {
            let bar = progress::bar("measure", "layers");
            let c = measure(
                &ckpt,
                &ids,
                &config,
                &layered,
                &device,
                &mut progress::update(&bar),
            )?;
            bar.finish_and_clear();
            Candidates {
                source: Some(source),
                ..c
            }
        }
    };
    // The profile itself is only drawn or saved; the policy search does not need it.
    let routing = if args.plot.is_some() || args.profile_out.is_some() {
        let bar = progress::bar("profile", "layers");
        let routing = profile(
            &ckpt,
            &ids,
            args.seq_len,
            &args.top1_thresholds,
            &layered,
            &device,
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

    if let Some(path) = &args.candidates_out {
        save_json(&candidates, path)?;
    }
    let offered = proposals(&candidates, target, args.resolution).map_err(|e| match e {
        RouterError::Target(why) => RouterError::Target(format!("{given}: {why}")),
        e => e,
    })?;
    let bar = progress::bar("select", "layers");
    let (policy, scored) = select(
        &ckpt,
        offered,
        &ids[..args.select_tokens.min(ids.len())],
        args.seq_len,
        &layered,
        &device,
        &mut progress::update(&bar),
    )?;
    bar.finish_and_clear();
    let chosen = policy.chosen.clone().expect("choose records its choice");
    let selected = chosen.selection.clone().expect("select records its choice");
    policy.save(&args.out)?;
    if let (Some(path), Some(routing)) = (&args.plot, &routing) {
        profile_svg(routing, Some(&policy), path)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(seconds, "profiled and chose a policy");

    let fraction = |p: &RoutingPolicy| p.chosen.as_ref().map_or(f64::NAN, |c| c.predicted_fraction);
    if args.json {
        let mut out = json!({
                "policy": args.out,
                "tokens": candidates.tokens,
                "target_fraction": chosen.target_fraction,
                "predicted_fraction": chosen.predicted_fraction,
                "target_params": (chosen.target_fraction * full).round(),
                "predicted_params": (chosen.predicted_fraction * full).round(),
                "error": chosen.error,
                "selected": selected.proposal,
                "nll": selected.score.nll,
                "kl": selected.score.kl,
                "measured_fraction": selected.score.measured_fraction,
                "proposals": scored.iter().map(|(p, s)| json!({
                    "name": p.name, "fraction": fraction(&p.policy),
                    "measured_fraction": s.measured_fraction, "nll": s.nll, "kl": s.kl,
                })).collect::<Vec<_>>(),
                "layers": policy.layers.iter().map(|l| json!({
                    "layer": l.layer, "rule": l.rule.to_string(),
                })).collect::<Vec<_>>(),
                "seconds": seconds,
        });
        super::json_reference(&mut out, chosen.predicted_fraction * full, reference);
        println!("{out}");
        return Ok(());
    }
    println!(
        "policy: {} ({} layers), selected: {}",
        args.out.display(),
        policy.layers.len(),
        selected.proposal
    );
    let of_reference = super::text_reference(chosen.predicted_fraction * full, reference);
    println!(
        "activated parameters: {:.0} per token ({:.2}% of the model with every expert{of_reference}; at most {:.0})",
        chosen.predicted_fraction * full,
        100.0 * chosen.predicted_fraction,
        chosen.target_fraction * full
    );
    let rules: Vec<String> = policy
        .layers
        .iter()
        .map(|l| format!("{}:{}", l.layer, l.rule))
        .collect();
    println!("rules (layer:rule): {}", rules.join(", "));
    println!(
        "proposals on {} tokens (activated: predicted / measured there):",
        args.select_tokens.min(ids.len())
    );
    for (p, s) in &scored {
        println!(
            "  {:<20} {:5.1}% / {:5.1}% activated, perplexity {:9.3}, KL {:.4}",
            p.name,
            100.0 * fraction(&p.policy),
            100.0 * s.measured_fraction.unwrap_or(f64::NAN),
            s.nll.exp(),
            s.kl
        );
    }
    println!("{} calibration tokens, {seconds:.1} s", candidates.tokens);
    Ok(())
}

/// The first line in which two fingerprints differ, as `was X, now Y`.
fn first_difference(theirs: &str, ours: &str) -> String {
    let mut a = theirs.lines();
    let mut b = ours.lines();
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => continue,
            (x, y) => {
                return format!(
                    "was `{}`, now `{}`",
                    x.unwrap_or("(nothing)"),
                    y.unwrap_or("(nothing)")
                );
            }
        }
    }
}
