//! `moekit eval MODEL --text FILE`.

use std::path::PathBuf;

use clap::Args;
use moekit::llama::{Llama, perplexity};
use moekit::router::{ActiveParams, RouterError, RoutingPolicy, Rule, route_by_oracle};
use serde_json::json;

use crate::error::CliError;
use crate::progress;

/// Arguments of `moekit eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A directory with config.json (Hugging Face safetensors) or a .gguf file.
    model: PathBuf,
    /// A LoRA adapter directory saved by Hugging Face PEFT or moekit (adapter_config.json +
    /// adapter_model.safetensors) to apply to the model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Text file to evaluate on.
    #[arg(long)]
    text: PathBuf,
    /// Evaluate the first N tokens of the file (default: all of it).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Context window: longer inputs are read in consecutive windows of this many tokens
    /// (default: the model's context length).
    #[arg(long)]
    window: Option<usize>,
    /// A routing policy file (from `moekit profile`): per-layer top-k / top-p rules applied
    /// to the MoE layers.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["top_k", "top_p"])]
    policy: Option<PathBuf>,
    /// Route every MoE layer to its K most probable experts.
    #[arg(long, value_name = "K", conflicts_with = "top_p")]
    top_k: Option<usize>,
    /// Route every MoE layer's tokens to experts until their probability mass reaches P.
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Oracle routing, a diagnostic: every MoE layer sends each token to the K experts with
    /// the largest outputs (every expert runs). Its perplexity bounds what any router can
    /// reach with these experts at K per token.
    #[arg(long, value_name = "K", conflicts_with_all = ["policy", "top_k", "top_p"])]
    oracle: Option<usize>,
    /// Also report the activated parameters as a fraction of this model's (typically the
    /// dense model MODEL was converted from, under its own routing).
    #[arg(long, value_name = "MODEL")]
    reference: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The model with the routing asked for on the command line.
fn routed(mut model: Llama, args: &EvalArgs) -> Result<Llama, CliError> {
    if let Some(k) = args.oracle {
        // Not a policy file's fault: say which flag is wrong.
        route_by_oracle(&mut model, Some(k)).map_err(|e| match e {
            RouterError::Policy(why) => CliError::Usage(format!("--oracle {k}: {why}")),
            e => e.into(),
        })?;
        return Ok(model);
    }
    let policy = match (&args.policy, args.top_k, args.top_p) {
        (Some(path), _, _) => RoutingPolicy::load(path)?,
        (_, Some(k), _) => RoutingPolicy::uniform(&model, Rule::TopK { k })?,
        (_, _, Some(p)) => RoutingPolicy::uniform(&model, Rule::TopP { p, max_k: None })?,
        _ => return Ok(model),
    };
    policy.apply(&mut model)?;
    Ok(model)
}

/// Loads the model, tokenises the file and prints its perplexity and speed.
pub fn run(args: &EvalArgs) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.text).map_err(|source| CliError::Read {
        path: args.text.clone(),
        source,
    })?;
    let reference = super::reference_params(args.reference.as_deref())?;
    let (_, model, tokenizer) = super::load(&args.model, args.adapter.as_deref())?;
    let model = routed(model, args)?;
    let mut ids = tokenizer.encode(&text)?;
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        return Err(CliError::Usage(format!(
            "{}: {} tokens is too little text to evaluate (need at least 2)",
            args.text.display(),
            ids.len()
        )));
    }
    let window = args.window.unwrap_or(model.config.max_position_embeddings);
    let bar = progress::bar("eval", "tokens");
    let result = perplexity(&model, &ids, window, &mut progress::update(&bar))?;
    bar.finish_and_clear();
    let k: Vec<f64> = result
        .experts_per_token
        .iter()
        .map(|u| u.experts_per_token)
        .collect();
    let active = ActiveParams::of(&model, Some(&k))?;
    if args.json {
        let mut out = json!(result);
        out["activated_params"] = json!(active.activated().round());
        out["activated_fraction"] = json!(active.fraction());
        super::json_reference(&mut out, active.activated(), reference);
        println!("{out}");
    } else {
        println!("perplexity: {:.4}", result.perplexity);
        println!(
            "tokens: {} ({} predicted), {:.1} tokens/s",
            result.tokens, result.predictions, result.tokens_per_second
        );
        if !k.is_empty() || reference.is_some() {
            let of_reference = super::text_reference(active.activated(), reference);
            println!(
                "activated parameters per token: {:.0} ({:.1}% of the model with every expert{of_reference})",
                active.activated(),
                100.0 * active.fraction()
            );
        }
        if !k.is_empty() {
            let per_layer: Vec<String> = result
                .experts_per_token
                .iter()
                .map(|u| format!("{}:{:.2}", u.layer, u.experts_per_token))
                .collect();
            println!("experts per token (layer:k): {}", per_layer.join(" "));
        }
    }
    Ok(())
}
