//! `moekit eval MODEL --text FILE`.

use std::path::PathBuf;

use clap::Args;
use moekit::llama::{
    Checkpoint, DecoderLayer, FfnSlot, FfnSpec, LayerSource, LayeredConfig, LlamaConfig,
    LlamaError, Perplexity, Tokenizer, perplexity_layered,
};
use moekit::router::{ActiveParams, RouterError, RoutingPolicy, Rule};
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

/// The routing asked for on the command line, checked against the configuration before any
/// layer is read.
enum Routing {
    /// Each layer's own router.
    Own,
    /// A rule per layer.
    Policy(RoutingPolicy),
    /// Oracle routing to `k` experts.
    Oracle(usize),
}

impl Routing {
    fn of(args: &EvalArgs, config: &LlamaConfig) -> Result<Self, CliError> {
        if let Some(k) = args.oracle {
            let specs: Vec<usize> = (0..config.num_hidden_layers)
                .filter_map(|l| match config.ffn_spec(l) {
                    FfnSpec::Moe { num_experts, .. } => Some(num_experts),
                    FfnSpec::Dense { .. } => None,
                })
                .collect();
            if specs.is_empty() {
                return Err(RouterError::NoMoeLayers.into());
            }
            if let Some(e) = specs.iter().find(|&&e| !(1..=e).contains(&k)) {
                // Not a policy file's fault: say which flag is wrong.
                return Err(CliError::Usage(format!(
                    "--oracle {k}: oracle routing to {k} experts: a layer has {e}"
                )));
            }
            return Ok(Self::Oracle(k));
        }
        let policy = match (&args.policy, args.top_k, args.top_p) {
            (Some(path), _, _) => RoutingPolicy::load(path)?,
            (_, Some(k), _) => RoutingPolicy::uniform_for(config, Rule::TopK { k })?,
            (_, _, Some(p)) => RoutingPolicy::uniform_for(config, Rule::TopP { p, max_k: None })?,
            _ => return Ok(Self::Own),
        };
        policy.check_config(config)?;
        Ok(Self::Policy(policy))
    }

    /// Layer `l` routed as asked (checked by [`Routing::of`]).
    fn apply(&self, l: usize, mut layer: DecoderLayer) -> moekit::llama::Result<DecoderLayer> {
        match self {
            Self::Own => {}
            Self::Policy(policy) => policy
                .apply_layer(l, &mut layer.ffn)
                .map_err(|e| moekit::llama::LlamaError::Config(e.to_string()))?,
            Self::Oracle(k) => {
                if let FfnSlot::Moe(moe) = &mut layer.ffn {
                    moe.check_oracle(Some(*k))?;
                    moe.oracle = Some(*k);
                }
            }
        }
        Ok(layer)
    }
}

/// Tokens of the file, at most `--max-tokens`; at least 2.
fn token_ids(args: &EvalArgs, tokenizer: &Tokenizer) -> Result<Vec<u32>, CliError> {
    let ids = tokenizer
        .encode_file(&args.text, args.max_tokens)
        .map_err(|e| match e {
            LlamaError::Io { path, source } => CliError::Read { path, source },
            e => e.into(),
        })?;
    if ids.len() < 2 {
        return Err(CliError::Usage(format!(
            "{}: {} tokens is too little text to evaluate (need at least 2)",
            args.text.display(),
            ids.len()
        )));
    }
    Ok(ids)
}

/// Reads the model one layer at a time (after loading it whole and merging an adapter, if
/// given), tokenises the file and prints its perplexity and speed.
pub fn run(args: &EvalArgs) -> Result<(), CliError> {
    let reference = super::reference_params(args.reference.as_deref())?;
    let ckpt = Checkpoint::open(&args.model)?;
    let settings = LayeredConfig::new();
    let routing = Routing::of(args, ckpt.config())?;
    let ids = token_ids(args, &ckpt.tokenizer()?)?;
    let window = args.window.unwrap_or(ckpt.config().max_position_embeddings);
    let run = |source: &dyn LayerSource| -> Result<Perplexity, CliError> {
        let bar = progress::bar("eval", "layers");
        let result = perplexity_layered(
            source,
            &ids,
            window,
            &settings,
            &moekit::default_device(),
            &mut |l, layer| routing.apply(l, layer),
            &mut progress::update(&bar),
        )?;
        bar.finish_and_clear();
        Ok(result)
    };
    let (result, active) = match &args.adapter {
        Some(adapter) => {
            // The adapter is merged into the whole model, loaded in f32.
            crate::memory::check(
                "evaluating with an adapter",
                4 * ckpt.param_counts()?.total as u64,
            )?;
            let model = super::load_model(&ckpt, Some(adapter))?;
            let result = run(&model)?;
            let active = ActiveParams::of(&model, Some(&per_layer(&result)))?;
            (result, active)
        }
        None => {
            crate::memory::check_layer(
                "evaluating one layer at a time",
                ckpt.config(),
                settings.vocab_block,
            )?;
            let result = run(&ckpt)?;
            let active = ActiveParams::of_checkpoint(&ckpt, Some(&per_layer(&result)))?;
            (result, active)
        }
    };
    let k = per_layer(&result);
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

/// Mean experts per token of every MoE layer, in layer order.
fn per_layer(result: &Perplexity) -> Vec<f64> {
    result
        .experts_per_token
        .iter()
        .map(|u| u.experts_per_token)
        .collect()
}
