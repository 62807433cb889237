//! `moekit generate MODEL --prompt TEXT`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use moekit::llama::{GenerateConfig, Message, Sampling, generate};

use crate::error::CliError;

/// Arguments of `moekit generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A directory with config.json (Hugging Face safetensors) or a .gguf file.
    model: PathBuf,
    /// A LoRA adapter directory saved by Hugging Face PEFT or moekit (adapter_config.json +
    /// adapter_model.safetensors) to apply to the model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the ChatML template (instruct models).
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sample at this temperature instead of greedy decoding.
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling mass (with --temperature; default 1.0).
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Streams the continuation of the prompt to stdout.
pub fn run(args: &GenerateArgs) -> Result<(), CliError> {
    let sampling = match (args.temperature, args.top_p) {
        (None, None) => Sampling::Greedy,
        (temperature, top_p) => Sampling::TopP {
            temperature: temperature.unwrap_or(1.0),
            top_p: top_p.unwrap_or(1.0),
            seed: args.seed,
        },
    };
    // f32 weights (the KV cache of one sequence is small beside them).
    crate::memory::check("generation", 4 * crate::memory::params(&args.model)?)?;
    let (model, tokenizer) = super::load(&args.model, args.adapter.as_deref())?;
    let prompt = if args.chat {
        tokenizer.chat_prompt(&[Message::new("user", &args.prompt)])
    } else {
        args.prompt.clone()
    };
    let ids = tokenizer.encode(&prompt)?;
    if ids.is_empty() {
        return Err(CliError::Usage("the prompt is empty".into()));
    }
    let mut stop = tokenizer.eos_ids().to_vec();
    stop.extend(model.config.eos_ids());
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop,
    };
    let mut stream = tokenizer.stream();
    let mut stdout = std::io::stdout();
    let start = Instant::now();
    let out = generate(&model, &ids, &config, &mut |id| {
        if let Some(text) = stream.push(id)? {
            // A closed stdout (e.g. `| head`) ends generation quietly.
            let _ = write!(stdout, "{text}").and_then(|_| stdout.flush());
        }
        Ok(())
    })?;
    println!();
    tracing::info!(
        tokens = out.len(),
        tokens_per_s = out.len() as f64 / start.elapsed().as_secs_f64(),
        "generated"
    );
    Ok(())
}
