//! `moekit convert DENSE --method M --experts E --top-k K --out DIR`.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar};
use moekit::llama::{ExportFormat, Llama, SaveDtype, check_export, save_pretrained};
use moekit::moe::Activation;
use moekit::upcycle::{
    ActivationStore, ConvertConfig, LayerObserver, LayerReport, LayerwiseConfig, Method,
    RecordConfig, RouterInit, SplitStrategy, calibration, construct, convert,
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
    /// Mixtral when the model fits it (renormalised top-k, no shared expert), else Qwen2-MoE.
    Auto,
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`.
    Qwen2Moe,
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
    /// Activations kept in memory up to this many MiB; the rest streams to the work directory.
    #[arg(long, default_value_t = 2048)]
    memory_budget_mb: usize,
    /// Recorded activations and finished layers (default: OUT/.moekit-work). Rerunning the
    /// same command resumes from it; what moekit wrote there is removed after success unless
    /// --keep-work (the folder too when nothing else is left). A recording that would not fit
    /// in its free space is refused before the model runs.
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

    /// The layout to write `model` in, checked before any training so that a long run does
    /// not fail at the end (`auto`: Mixtral where the model fits it, else Qwen2-MoE).
    fn format(&self, model: &Llama) -> Result<ExportFormat, CliError> {
        let format = match self.format {
            FormatArg::Mixtral => ExportFormat::Mixtral,
            FormatArg::Qwen2Moe => ExportFormat::Qwen2Moe,
            FormatArg::Auto => return super::auto_format(model),
        };
        check_export(model, format)?;
        Ok(format)
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

/// What a recording depends on: the dense model (a .gguf file, or every file of a Hugging
/// Face directory, whose own time does not change when a file in it is rewritten), the
/// calibration files and the token counts. Another fingerprint records again and trains
/// other layers.
fn fingerprint(args: &ConvertArgs, files: &[PathBuf]) -> String {
    let settings = format!("tokens={} seq={}", args.calib_tokens, args.seq_len);
    super::inputs_fingerprint(super::stamp_model(&args.dense), settings, files)
}

/// The folder of a configuration's finished layers in the work directory: `layers-` and 16
/// hex digits of a hash of `key`.
fn layers_dir(work: &Path, key: &str) -> PathBuf {
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    work.join(format!("layers-{:016x}", hasher.finish()))
}

/// Whether `name` is one [`layers_dir`] makes.
fn is_layers_dir(name: &str) -> bool {
    name.strip_prefix("layers-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Deletes what conversions wrote into `work` (the recording and every configuration's
/// finished layers), then the folder itself if nothing else is left in it: a `--work-dir`
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
            .is_some_and(|n| is_layers_dir(&n.to_string_lossy()));
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

/// Records calibration activations (or reuses recorded ones from the work directory).
fn calibrate(
    args: &ConvertArgs,
    model: &Llama,
    tokenizer: &moekit::llama::Tokenizer,
    work: &Path,
    (files, fingerprint): &(Vec<PathBuf>, String),
) -> Result<ActivationStore, CliError> {
    let record = RecordConfig {
        seq_len: args.seq_len,
        batch: 4,
        memory_budget: args.memory_budget_mb << 20,
        fingerprint: fingerprint.clone(),
    };
    if let Some(store) = ActivationStore::open(work, fingerprint)? {
        tracing::info!(tokens = store.tokens(), "reusing recorded activations");
        return Ok(store);
    }
    let ids = calibration::tokens(tokenizer, files, args.calib_tokens)?;
    let bar = progress::bar("record", "tokens");
    let store = ActivationStore::record(
        model,
        &ids,
        &record,
        Some(work),
        &mut progress::update(&bar),
    )?;
    bar.finish_and_clear();
    Ok(store)
}

/// Converts, optionally constructs layer-wise, and writes the checkpoint.
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
    args.layerwise(args.layerwise_steps).validate()?;
    // The calibration files and the fingerprint of their recording, found before the model
    // loads so that a missing file fails at once.
    let calib = if needs_calib {
        let files = calibration::files(&args.calib)?;
        let print = fingerprint(args, &files);
        (files, print)
    } else {
        Default::default()
    };
    let (_, dense, tokenizer) = super::load(&args.dense, None)?;
    config.validate(dense.config.hidden_size, dense.config.intermediate_size)?;
    let dense_counts = dense.param_counts();
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.out.join(".moekit-work"));
    let mut record_seconds = 0.0;
    let mut record = |dense: &Llama| {
        let start = Instant::now();
        let store = calibrate(args, dense, &tokenizer, &work, &calib);
        record_seconds += start.elapsed().as_secs_f64();
        store
    };
    // Conversion that needs calibration records first; otherwise the export check runs before
    // the (long) recording, so that an unexportable configuration fails at once.
    let mut store = config
        .needs_calibration()
        .then(|| record(&dense))
        .transpose()?;
    let for_layerwise = (needs_calib && store.is_none()).then(|| dense.clone());

    let t = Instant::now();
    let bar = progress::bar("convert", "layers");
    let model = convert(dense, &config, store.as_ref(), &mut progress::update(&bar))?;
    bar.finish_and_clear();
    let convert_seconds = t.elapsed().as_secs_f64();
    let format = args.format(&model)?;
    if let Some(dense) = for_layerwise {
        store = Some(record(&dense)?);
    }

    let t = Instant::now();
    let (model, reports) = match (&store, args.layerwise_steps) {
        (Some(store), steps) if layerwise => {
            let lw = args.layerwise(steps);
            let mut bars = Bars {
                multi: MultiProgress::new(),
                current: None,
            };
            // Finished layers are kept per configuration and recording, so that one work
            // directory serves several conversions, whatever their router-only steps, and
            // never one trained on another model or text.
            let key = format!("{config:?} {:?} {}", lw.block_settings(), calib.1);
            construct(model, store, &lw, Some(&layers_dir(&work, &key)), &mut bars)?
        }
        _ => (model, Vec::new()),
    };
    let layerwise_seconds = t.elapsed().as_secs_f64();

    let written = save_pretrained(
        &model,
        Some(&tokenizer),
        &args.out,
        format,
        dtype(args.dtype),
    )?;
    if !args.keep_work && work.exists() {
        remove_work(&work)?;
    }
    let counts = model.param_counts();
    let summary = json!({
        "out": args.out,
        "architecture": written.model_type,
        "method": format!("{:?}", config.method),
        "experts": config.num_experts,
        "top_k": config.top_k,
        "shared_experts": config.shared_experts,
        "calibration_tokens": store.as_ref().map(|s| s.tokens()),
        "dense_params": dense_counts,
        "params": counts,
        "active_ratio": counts.active as f64 / dense_counts.active as f64,
        "seconds": {
            "record": record_seconds,
            "convert": convert_seconds,
            "layerwise": layerwise_seconds,
        },
        "layers": reports,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("wrote {} ({})", args.out.display(), written.model_type);
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
                layerwise_seconds
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
