//! `moekit eval MODEL --text FILE`.

use std::path::PathBuf;

use clap::Args;
use moekit::llama::perplexity;
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Loads the model, tokenises the file and prints its perplexity and speed.
pub fn run(args: &EvalArgs) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.text).map_err(|source| CliError::Read {
        path: args.text.clone(),
        source,
    })?;
    let (_, model, tokenizer) = super::load(&args.model, args.adapter.as_deref())?;
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
    if args.json {
        println!("{}", json!(result));
    } else {
        println!("perplexity: {:.4}", result.perplexity);
        println!(
            "tokens: {} ({} predicted), {:.1} tokens/s",
            result.tokens, result.predictions, result.tokens_per_second
        );
    }
    Ok(())
}
