//! `moekit convert DENSE --method M --experts E --top-k K --out DIR`.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar};
use moekit::llama::{Checkpoint, ExportFormat, FolderLock, SaveDtype};
use moekit::moe::Activation;
use moekit::upcycle::{
    ActivationStore, ConvertConfig, HiddenPath, LayerObserver, LayerReport, LayeredSettings,
    LayerwiseConfig, Method, RouterInit, SplitStrategy, calibration, convert_layered,
};
use serde_json::json;

use crate::error::CliError;
use crate::progress;

/// Conversion methods.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// E copies of each FFN (sparse upcycling).
    Upcycle,
    /// Neurons split at random (same as split-random).
    Split,
    /// Neurons split at random.
    SplitRandom,
    /// Neurons split by balanced k-means of their weights.
    SplitCluster,
    /// Neurons that fire together on calibration text share an expert.
    SplitCoactivation,
    /// Neurons split in order of mean activation on calibration text.
    SplitImportance,
    /// PESC: the frozen FFN plus routed bottleneck adapters on its output.
    Pesc,
    /// MoE-KD: the frozen FFN plus routed low-rank SwiGLU experts.
    LoraExperts,
}

/// Router initialisations.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterInitArg {
    /// N(0, 0.02²).
    Random,
    /// Zeros (every expert equally likely).
    Uniform,
    /// Mean gate weights of each expert's neurons (split only).
    Centroids,
    /// Mean normalised hidden state of the tokens each expert serves (split only).
    HiddenStates,
}

/// PESC adapter non-linearities.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterActivation {
    /// Linear adapters: merge exactly into plain experts for export.
    Identity,
    /// GELU adapters (the PESC paper's form; cannot be exported to Hugging Face).
    Gelu,
    /// ReLU adapters (cannot be exported to Hugging Face).
    Relu,
}

/// Output checkpoint layouts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    /// Qwen3-MoE for Qwen3 models; for others Mixtral when the model fits it (renormalised
    /// top-k, no shared expert), else Qwen2-MoE.
    Auto,
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`.
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM` (Qwen3 models, without shared experts).
    Qwen3Moe,
}

/// Which hidden states feed each next layer.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenPathArg {
    /// The dense model's.
    Dense,
    /// The converted model's (sequential).
    Converted,
}

/// Weight types of the written checkpoint.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// Arguments of `moekit convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The dense model: a Hugging Face directory or a .gguf file.
    dense: PathBuf,
    /// How experts are made.
    #[arg(long, value_enum)]
    method: MethodArg,
    /// Experts per layer (for splits: parts the FFN is cut into, shared ones included).
    #[arg(long)]
    experts: usize,
    /// Experts per token.
    #[arg(long)]
    top_k: usize,
    /// Split only: parts holding the most active neurons that form an always-on shared expert.
    #[arg(long, default_value_t = 0)]
    shared_experts: usize,
    /// Router initialisation.
    #[arg(long, value_enum, default_value = "random")]
    router_init: RouterInitArg,
    /// Factor each router's gate through rank R (`H·R + R·E` parameters instead of `H·E`; the
    /// initialisation is factored by truncated SVD). The export holds the product, which
    /// transformers loads; the factors go to router_factors.safetensors beside it.
    #[arg(long, value_name = "R")]
    router_rank: Option<usize>,
    /// Weigh the chosen experts by softmax(logits / T) instead of softmax(logits); the choice
    /// stays that of the logits. A large T (e.g. 1000) gives the chosen parts of a split equal
    /// weights, which is how they add up to the dense FFN. Written into the gates (W/T).
    #[arg(long, value_name = "T", default_value_t = 1.0)]
    combine_temperature: f64,
    /// Upcycle: Gaussian noise on each copy, relative to the weights' standard deviation.
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    /// PESC: adapter bottleneck width.
    #[arg(long, default_value_t = 64)]
    bottleneck: usize,
    /// PESC: adapter non-linearity.
    #[arg(long, value_enum, default_value = "identity")]
    adapter_activation: AdapterActivation,
    /// LoRA experts: rank of each factored matrix.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA experts: scale α of the experts' sum.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Factor on the routed experts' output (default: the method's, see the docs).
    #[arg(long)]
    output_scale: Option<f64>,
    /// Use the raw top-k probabilities as weights instead of renormalising them.
    #[arg(long)]
    no_renormalize: bool,
    /// Calibration text: files or directories (read recursively, in name order).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    calib: Vec<PathBuf>,
    /// Calibration tokens to record.
    #[arg(long, default_value_t = 100_000)]
    calib_tokens: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Layer-wise construction: training steps per layer (0: convert only; with --router-steps,
    /// fit only the routers to the experts as converted, which --refine-steps then adapts).
    #[arg(long, default_value_t = 0)]
    layerwise_steps: usize,
    /// Layer-wise construction: tokens per step.
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Layer-wise construction: peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Layer-wise construction: weight of router supervision, a cross-entropy that trains each
    /// router to pick the experts with the largest outputs on the token (0: off).
    #[arg(long, default_value_t = 0.0)]
    router_loss: f64,
    /// Layer-wise construction: router-only steps after each block's training, fitting the
    /// router to pick the experts with the largest outputs (0: none).
    #[arg(long, default_value_t = 0)]
    router_steps: usize,
    /// Layer-wise construction: peak learning rate of the router-only steps.
    #[arg(long, default_value_t = 1e-3)]
    router_lr: f64,
    /// Layer-wise construction: steps that train each block's experts again after the
    /// router-only steps, the router frozen, at --lr (0: none).
    #[arg(long, default_value_t = 0)]
    refine_steps: usize,
    /// Which hidden states feed each next layer: the dense model's (each block converted and
    /// constructed in the dense context, as LaDiMo does) or the converted model's (errors of
    /// earlier layers are seen and corrected, GPTQ's sequential mode).
    #[arg(long, value_enum, default_value = "dense")]
    hidden_path: HiddenPathArg,
    /// Finished layers, the hidden states after them and trained blocks (default:
    /// OUT/.moekit-work). The model is converted one layer at a time; rerunning the same
    /// command resumes at the first unfinished layer. What moekit wrote there is removed after
    /// success unless --keep-work (the folder too when nothing else is left).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the work directory after success.
    #[arg(long)]
    keep_work: bool,
    /// Output checkpoint layout.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// Weight type of the written checkpoint.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// Output directory (Hugging Face checkpoint).
    #[arg(long)]
    out: PathBuf,
}

impl ConvertArgs {
    /// The layer-wise construction settings, `steps` steps per layer.
    fn layerwise(&self, steps: usize) -> LayerwiseConfig {
        LayerwiseConfig::new()
            .with_steps(steps)
            .with_batch_tokens(self.batch_tokens)
            .with_lr(self.lr)
            .with_router_loss(self.router_loss)
            .with_router_steps(self.router_steps)
            .with_router_lr(self.router_lr)
            .with_refine_steps(self.refine_steps)
            .with_seed(self.seed)
    }

    fn config(&self) -> ConvertConfig {
        let method = match self.method {
            MethodArg::Upcycle => Method::Upcycle { noise: self.noise },
            MethodArg::Split | MethodArg::SplitRandom => Method::Split {
                strategy: SplitStrategy::Random,
            },
            MethodArg::SplitCluster => Method::Split {
                strategy: SplitStrategy::Cluster,
            },
            MethodArg::SplitCoactivation => Method::Split {
                strategy: SplitStrategy::Coactivation,
            },
            MethodArg::SplitImportance => Method::Split {
                strategy: SplitStrategy::Importance,
            },
            MethodArg::Pesc => Method::Pesc {
                bottleneck: self.bottleneck,
                activation: match self.adapter_activation {
                    AdapterActivation::Identity => Activation::Identity,
                    AdapterActivation::Gelu => Activation::Gelu,
                    AdapterActivation::Relu => Activation::Relu,
                },
            },
            MethodArg::LoraExperts => Method::LoraExperts {
                rank: self.rank,
                intermediate_size: None,
                alpha: self.alpha,
            },
        };
        ConvertConfig::new(method, self.experts, self.top_k)
            .with_shared_experts(self.shared_experts)
            .with_renormalize(self.no_renormalize.then_some(false))
            .with_router_init(match self.router_init {
                RouterInitArg::Random => RouterInit::Random,
                RouterInitArg::Uniform => RouterInit::Uniform,
                RouterInitArg::Centroids => RouterInit::Centroids,
                RouterInitArg::HiddenStates => RouterInit::HiddenStates,
            })
            .with_router_rank(self.router_rank)
            .with_combine_temperature(self.combine_temperature)
            .with_output_scale(self.output_scale)
            .with_seed(self.seed)
    }

    /// The layout asked for (`None`: Mixtral where the converted layers fit it, else
    /// Qwen2-MoE).
    fn format(&self) -> Option<ExportFormat> {
        match self.format {
            FormatArg::Mixtral => Some(ExportFormat::Mixtral),
            FormatArg::Qwen2Moe => Some(ExportFormat::Qwen2Moe),
            FormatArg::Qwen3Moe => Some(ExportFormat::Qwen3Moe),
            FormatArg::Auto => None,
        }
    }
}

/// Progress of layer-wise construction.
struct Bars {
    multi: MultiProgress,
    current: Option<ProgressBar>,
}

impl Bars {
    /// Finishes the current bar and starts one of `steps` steps.
    fn start_bar(&mut self, label: &str, steps: usize) {
        if let Some(bar) = self.current.take() {
            bar.finish();
        }
        let bar = self.multi.add(progress::bar(label, "steps"));
        bar.set_length(steps as u64);
        self.current = Some(bar);
    }

    fn show(&self, step: usize, message: String) {
        if let Some(bar) = &self.current {
            bar.set_position(step as u64);
            bar.set_message(message);
        }
    }
}

/// One bar per layer during layer-wise construction, and one for each router fit.
impl LayerObserver for Bars {
    fn start(&mut self, layer: usize, steps: usize) {
        self.start_bar(&format!("layer {layer}"), steps);
    }

    fn step(&mut self, _: usize, step: usize, mse: f32) {
        self.show(step, format!("mse {mse:.3e}"));
    }

    fn start_router(&mut self, layer: usize, steps: usize) {
        self.start_bar(&format!("layer {layer} router"), steps);
    }

    fn router_step(&mut self, _: usize, step: usize, ce: f32) {
        self.show(step, format!("ce {ce:.3}"));
    }

    fn finish(&mut self, r: &LayerReport) {
        if let Some(bar) = self.current.take() {
            bar.finish();
        }
        tracing::info!(
            layer = r.layer,
            before = r.error_before,
            after = r.error_after,
            seconds = r.seconds,
            resumed = r.resumed,
            recall = ?r.oracle_recall,
            "layer constructed"
        );
    }
}

/// What a conversion's calibration depends on: the dense model (a .gguf file, or every file
/// of a Hugging Face directory, whose own time does not change when a file in it is
/// rewritten), the calibration files and the token counts.
fn fingerprint(args: &ConvertArgs, files: &[PathBuf]) -> String {
    let settings = format!("tokens={} seq={}", args.calib_tokens, args.seq_len);
    super::inputs_fingerprint(super::stamp_model(&args.dense), settings, files)
}

/// A folder of the work directory for `key`: `prefix-` and 16 hex digits of a hash of it.
fn keyed_dir(work: &Path, prefix: &str, key: &str) -> PathBuf {
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    work.join(format!("{prefix}-{:016x}", hasher.finish()))
}

/// Whether `name` is a folder [`keyed_dir`] makes (or an earlier moekit's `layers-`).
fn is_keyed_dir(name: &str) -> bool {
    ["layers-", "blocks-", "run-"].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

/// Deletes what conversions wrote into `work` (runs, trained blocks, and an earlier
/// moekit's recording), then the folder itself if nothing else is left in it: a `--work-dir`
/// that holds other files keeps them.
fn remove_work(work: &Path) -> Result<(), CliError> {
    let read = |source| CliError::Read {
        path: work.to_path_buf(),
        source,
    };
    ActivationStore::remove(work)?;
    for entry in std::fs::read_dir(work).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let ours = path
            .file_name()
            .is_some_and(|n| is_keyed_dir(&n.to_string_lossy()));
        if ours && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(read)?;
        }
    }
    if std::fs::read_dir(work).map_err(read)?.next().is_none() {
        std::fs::remove_dir(work).map_err(read)?;
    } else {
        tracing::warn!(work = %work.display(), "work directory kept: it holds files moekit did not write");
    }
    Ok(())
}

/// Converts one layer at a time (optionally constructing each block), and writes the
/// checkpoint as it goes.
pub fn run(args: &ConvertArgs) -> Result<(), CliError> {
    let config = args.config();
    // Router-only steps without block training fit routers to the converted experts (for a
    // split, exactly the dense neurons; MoEfication's recipe); refinement steps then adapt the
    // experts to them.
    let layerwise = args.layerwise_steps > 0 || args.router_steps > 0 || args.refine_steps > 0;
    let needs_calib = config.needs_calibration() || layerwise;
    // A bad combination of settings is named before the missing calibration text it implies.
    config.validate_settings()?;
    if needs_calib && args.calib.is_empty() {
        return Err(CliError::Usage(
            "this conversion needs calibration text: add --calib FILE_OR_DIR...".into(),
        ));
    }
    let lw = args.layerwise(args.layerwise_steps);
    lw.validate()?;
    // The calibration files, found before the model opens so that a missing file fails at
    // once.
    let (files, print) = if needs_calib {
        let files = calibration::files(&args.calib)?;
        let print = fingerprint(args, &files);
        (files, print)
    } else {
        (Vec::new(), super::stamp_model(&args.dense))
    };
    let ckpt = Checkpoint::open(&args.dense)?;
    // One layer dense and converted, its tensors on the host for writing, and the calibration
    // tokens' hidden states, FFN inputs and (for construction) outputs.
    let per_token = 4 * ckpt.config().hidden_size as u64 * if layerwise { 4 } else { 2 };
    let tokens = if needs_calib {
        args.calib_tokens as u64
    } else {
        0
    };
    crate::memory::check(
        "converting one layer at a time",
        3 * crate::memory::layer_bytes(ckpt.config()) + tokens * per_token,
    )?;
    let tokenizer = ckpt.tokenizer()?;
    config.validate(ckpt.config().hidden_size, ckpt.config().intermediate_size)?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.out.join(".moekit-work"));
    // One run per output and work folder at a time (the default work folder is inside the
    // output folder, and its lock covers it).
    let out_lock = FolderLock::acquire(&args.out)?;
    let work_lock = (!work.starts_with(&args.out))
        .then(|| FolderLock::acquire(&work))
        .transpose()?;
    let ids = if needs_calib {
        calibration::tokens(&tokenizer, &files, args.calib_tokens)?
    } else {
        Vec::new()
    };
    // Trained blocks are kept per configuration and calibration, so that one work directory
    // serves several conversions, whatever their router-only steps, and never one trained on
    // another model or text; a run (its finished layers and hidden states) is kept per every
    // setting that changes the output.
    let blocks_key = format!("{config:?} {:?} {print}", lw.block_settings());
    let run_key = format!(
        "{blocks_key} {lw:?} {:?} {:?} {:?}",
        args.format, args.dtype, args.hidden_path
    );
    let settings = LayeredSettings {
        layerwise: layerwise.then_some(lw),
        path: match args.hidden_path {
            HiddenPathArg::Dense => HiddenPath::Dense,
            HiddenPathArg::Converted => HiddenPath::Converted,
        },
        format: args.format(),
        dtype: dtype(args.dtype),
        seq_len: args.seq_len,
        blocks_dir: Some(keyed_dir(&work, "blocks", &blocks_key)),
        ..LayeredSettings::default()
    };
    let mut bars = Bars {
        multi: MultiProgress::new(),
        current: None,
    };
    let layer_bar = bars.multi.add(progress::bar("convert", "layers"));
    let report = convert_layered(
        &ckpt,
        Some(&tokenizer),
        &ids,
        &config,
        &settings,
        &args.out,
        &keyed_dir(&work, "run", &run_key),
        &moekit::default_device(),
        &mut bars,
        &mut progress::update(&layer_bar),
    )?;
    layer_bar.finish_and_clear();
    if let Some(lock) = work_lock {
        lock.release()?;
    }
    if !args.keep_work && work.exists() {
        remove_work(&work)?;
    }
    out_lock.release()?;
    let (counts, dense_counts) = (report.params, report.dense_params);
    let reports = &report.layers;
    let summary = json!({
        "out": args.out,
        "architecture": report.config.model_type,
        "method": format!("{:?}", config.method),
        "experts": config.num_experts,
        "top_k": config.top_k,
        "shared_experts": config.shared_experts,
        "calibration_tokens": needs_calib.then_some(report.calibration_tokens),
        "dense_params": dense_counts,
        "params": counts,
        "active_ratio": counts.active as f64 / dense_counts.active as f64,
        "resumed_layers": report.resumed_layers,
        "seconds": {
            "convert": report.seconds - report.layerwise_seconds,
            "layerwise": report.layerwise_seconds,
        },
        "layers": reports,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "wrote {} ({})",
            args.out.display(),
            report.config.model_type
        );
        println!(
            "parameters: {} total, {} active per token ({:.1}% of the dense model's {})",
            counts.total,
            counts.active,
            100.0 * counts.active as f64 / dense_counts.active as f64,
            dense_counts.active
        );
        if !reports.is_empty() {
            let mean = |f: fn(&LayerReport) -> f64| {
                reports.iter().map(f).sum::<f64>() / reports.len() as f64
            };
            println!(
                "layer-wise: relative FFN error {:.4} -> {:.4} (mean over {} layers, {:.0} s)",
                mean(|r| r.error_before),
                mean(|r| r.error_after),
                reports.len(),
                report.layerwise_seconds
            );
        }
    }
    Ok(())
}

fn dtype(d: DtypeArg) -> SaveDtype {
    match d {
        DtypeArg::F32 => SaveDtype::F32,
        DtypeArg::Bf16 => SaveDtype::BF16,
        DtypeArg::F16 => SaveDtype::F16,
    }
}
