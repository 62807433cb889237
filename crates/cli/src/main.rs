//! The `moekit` command line.

mod commands;
mod error;
mod memory;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

/// Turn dense LLaMA-family models into sparse Mixture-of-Experts models, evaluate and run them.
#[derive(Parser, Debug)]
#[command(name = "moekit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Architecture, parameter counts (total and active), layer kinds and experts of a model.
    Info {
        /// A directory with config.json (Hugging Face safetensors) or a .gguf file.
        model: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity over the first N tokens of a text file (no special tokens added).
    Eval(commands::eval::EvalArgs),
    /// Generate text from a prompt, streaming tokens as they come (greedy by default).
    Generate(commands::generate::GenerateArgs),
    /// Convert a dense model into a MoE model (upcycling, neuron splitting, PESC, LoRA
    /// experts), optionally train each MoE block against its dense FFN, and write it as a
    /// Mixtral or Qwen2-MoE checkpoint.
    Convert(Box<commands::convert::ConvertArgs>),
    /// Profile a MoE model's routing on calibration text and choose a per-layer routing
    /// policy (top-k or top-p per layer) for a budget of activated parameters.
    Profile(commands::profile::ProfileArgs),
    /// Distil a student (a converted MoE model, optionally with LoRA adapters) from a teacher
    /// on text: AdamW with warm-up and cosine decay, chosen trainable parameters, held-out
    /// evaluation, checkpoints that a rerun resumes from; writes the trained model.
    Distill(Box<commands::distill::DistillArgs>),
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Info { model, json } => commands::info::run(&model, json),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Generate(args) => commands::generate::run(&args),
        Command::Convert(args) => commands::convert::run(&args),
        Command::Profile(args) => commands::profile::run(&args),
        Command::Distill(args) => commands::distill::run(&args),
    }
}

fn main() -> ExitCode {
    // A closed pipe (`moekit info MODEL | head -1`) ends the process quietly, as it ends other
    // command-line tools, instead of `println!` panicking on the write error: Rust starts
    // programs with SIGPIPE ignored, and std offers no stable way to restore it.
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOEKIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {e}{}",
                e.hint().map(|h| format!(" ({h})")).unwrap_or_default()
            );
            ExitCode::FAILURE
        }
    }
}
