//! One module per subcommand.

pub mod convert;
pub mod distill;
pub mod eval;
pub mod generate;
pub mod info;
pub mod profile;

use std::path::{Path, PathBuf};

use moekit::llama::{Checkpoint, ExportFormat, Llama, Tokenizer, check_export, load_adapter};
use moekit::router::ActiveParams;

use crate::error::CliError;
use crate::progress;

/// Opens a checkpoint and loads it on the default device ([`load_model`]), with its tokenizer.
pub fn load(path: &Path, adapter: Option<&Path>) -> Result<(Llama, Tokenizer), CliError> {
    let ckpt = Checkpoint::open(path)?;
    let tokenizer = ckpt.tokenizer()?;
    Ok((load_model(&ckpt, adapter)?, tokenizer))
}

/// Loads an opened checkpoint on the default device, with a progress bar; applies a PEFT LoRA
/// adapter directory if given (merged into the weights: inference runs at base speed).
pub fn load_model(ckpt: &Checkpoint, adapter: Option<&Path>) -> Result<Llama, CliError> {
    let bar = progress::bar("loading", "layers");
    let mut model = ckpt.load(&moekit::default_device(), &mut progress::update(&bar))?;
    bar.finish_and_clear();
    if let Some(dir) = adapter {
        let (adapted, config) = load_adapter(model, dir)?;
        tracing::info!(
            adapters = adapted.adapters().len(),
            r = config.r,
            alpha = config.lora_alpha,
            "applied LoRA adapter {}",
            dir.display()
        );
        model = adapted.merge_lora();
    }
    Ok(model)
}

/// Activated parameters per token of the `--reference` model at `path`, if given, under its own
/// routing (the dense model's are all of its parameters, a tied embedding once): what
/// `--reference` budgets and reports are fractions of.
pub fn reference_params(path: Option<&Path>) -> Result<Option<f64>, CliError> {
    let Some(path) = path else { return Ok(None) };
    let ckpt = Checkpoint::open(path)
        .map_err(|e| CliError::Usage(format!("--reference {}: {e}", path.display())))?;
    Ok(Some(ActiveParams::of_checkpoint(&ckpt, None)?.activated()))
}

/// Adds `reference_params` and `reference_fraction` (of `activated` parameters) to a JSON
/// summary when there is a reference.
pub fn json_reference(out: &mut serde_json::Value, activated: f64, reference: Option<f64>) {
    if let Some(r) = reference {
        out["reference_params"] = serde_json::json!(r);
        out["reference_fraction"] = serde_json::json!(activated / r);
    }
}

/// `", X% of the reference"` for text output, or nothing without a reference.
pub fn text_reference(activated: f64, reference: Option<f64>) -> String {
    reference.map_or(String::new(), |r| {
        format!(", {:.2}% of the reference", 100.0 * activated / r)
    })
}

/// The layout `model` is written in: dense when it has no MoE layer, else the first of
/// [`ExportFormat::moe_candidates`] that fits; checked before any long work so that it cannot
/// fail at the end.
pub fn auto_format(model: &Llama) -> Result<ExportFormat, CliError> {
    let has_moe = model
        .layers
        .iter()
        .any(|l| matches!(l.ffn, moekit::llama::FfnSlot::Moe(_)));
    if !has_moe {
        check_export(model, ExportFormat::Dense)?;
        return Ok(ExportFormat::Dense);
    }
    let candidates = ExportFormat::moe_candidates(&model.config);
    Ok(ExportFormat::first_fitting(candidates, |f| check_export(model, f))?.0)
}

/// Path, size and modification time of `p` (zeros where it cannot be read).
pub fn stamp(p: &Path) -> String {
    let m = std::fs::metadata(p).ok();
    let len = m.as_ref().map_or(0, |m| m.len());
    let mtime = m
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{len}:{mtime}", p.display())
}

/// What a measurement on text depends on: the model's stamp ([`stamp_model`]), `settings`
/// (the options that change it) and the text files' stamps, in order. Equal fingerprints mean
/// the same inputs (as far as file sizes and times tell).
pub fn inputs_fingerprint(model: String, settings: String, files: &[PathBuf]) -> String {
    let mut parts = vec![model, settings];
    parts.extend(files.iter().map(|f| stamp(f)));
    parts.join("\n")
}

/// Stamps of what defines a model, under its canonical path: a .gguf file's, or an HF
/// directory's `config.json`, `*.safetensors` and tokenizer files (`tokenizer*.json`: they
/// turn text into the ids a run works on). Files written beside the model (a policy, a plot,
/// notes) and the path as typed (relative, absolute, a trailing slash) do not change it.
pub fn stamp_model(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    match files_in(&path) {
        Some(files) => files
            .iter()
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                name == "config.json"
                    || (name.starts_with("tokenizer") && name.ends_with(".json"))
                    || p.extension().is_some_and(|e| e == "safetensors")
            })
            .map(|p| stamp(p))
            .collect::<Vec<_>>()
            .join("\n"),
        None => stamp(&path),
    }
}

/// The files directly in `dir`, sorted; `None` when it is not a readable directory.
fn files_in(dir: &Path) -> Option<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Some(files)
}
