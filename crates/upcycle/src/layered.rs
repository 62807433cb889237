//! Dense-to-MoE conversion of a checkpoint one decoder layer at a time, for models larger than
//! memory (the way GPTQ, SparseGPT and CMoE process 7-70B models).
//!
//! ```text
//! embed rows of the N calibration tokens (read from the mmap)      h₀ [N, H]
//! for each layer l:
//!     read layer l                                     (one layer in memory)
//!     r = h + attn(norm(h)),  x = norm(r),  y = FFN(x)  (FFN input and dense output)
//!     convert the FFN (calibrated on x), construct it against y (LaDiMo, optional)
//!     write the layer into the output's staged parts; save h_{l+1} and the state
//!     h_{l+1} = r + y   (dense path)   or   r + MoE(x)   (converted path)
//! shard the parts, write config.json last
//! ```
//!
//! Memory: one layer (dense and converted), plus `N·H` floats for the hidden states, `N·H`
//! for the FFN inputs and, with layer-wise construction, `N·H` for the dense outputs. Methods
//! that need no calibration run no token at all. After each layer the hidden states and a
//! state file are saved atomically in the run folder: a rerun starts at the first unfinished
//! layer and writes only the rest.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use moekit_llama::rope::Rope;
use moekit_llama::{
    Checkpoint, DecoderLayer, ExportFormat, FfnSlot, HiddenStates, LayeredExport, LlamaConfig,
    ParamCounts, RopeCache, SaveDtype, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::config::ConvertConfig;
use crate::convert::{PROFILE_TOKENS, convert_ffn, layer_seed};
use crate::error::{Result, UpcycleError};
use crate::layerwise::{LayerObserver, LayerReport, LayerwiseConfig, construct_layer};
use crate::record::read_f32;

/// Which hidden states feed layer `l + 1` while converting layer by layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HiddenPath {
    /// The dense model's: every block is converted and constructed in the dense context, as
    /// LaDiMo's layer-wise stage trains it (and as a whole-model recording gives).
    #[default]
    Dense,
    /// The converted model's (GPTQ's sequential mode): each layer sees the errors of the
    /// converted layers before it, and layer-wise construction can correct them.
    Converted,
}

/// What [`convert_layered`] does besides the conversion itself.
#[derive(Debug, Clone)]
pub struct LayeredSettings {
    /// Layer-wise construction of every block (LaDiMo stage 1), or none.
    pub layerwise: Option<LayerwiseConfig>,
    /// Which hidden states feed the next layer.
    pub path: HiddenPath,
    /// Output layout (`None`: Mixtral where the converted layers fit it, else Qwen2-MoE).
    pub format: Option<ExportFormat>,
    /// Weight type of the output.
    pub dtype: SaveDtype,
    /// Calibration tokens per sequence (each a fresh context).
    pub seq_len: usize,
    /// Sequences per forward call.
    pub batch: usize,
    /// Largest output shard, bytes.
    pub max_shard_bytes: u64,
    /// Where trained blocks are kept (see [`construct_layer`]): blocks saved under one
    /// router-only setting serve every other.
    pub blocks_dir: Option<PathBuf>,
}

impl Default for LayeredSettings {
    fn default() -> Self {
        Self {
            layerwise: None,
            path: HiddenPath::Dense,
            format: None,
            dtype: SaveDtype::F32,
            seq_len: 512,
            batch: 4,
            max_shard_bytes: moekit_llama::io::shards::MAX_SHARD_BYTES,
            blocks_dir: None,
        }
    }
}

/// What [`convert_layered`] did.
#[derive(Debug, Clone, Serialize)]
pub struct LayeredReport {
    /// The written configuration.
    pub config: LlamaConfig,
    /// The layout written.
    pub format: ExportFormat,
    /// Calibration tokens run through the model (0 when the method needs none).
    pub calibration_tokens: usize,
    /// Layer-wise construction's report of every layer (empty without it).
    pub layers: Vec<LayerReport>,
    /// Layers done by an earlier, interrupted run and not redone.
    pub resumed_layers: usize,
    /// Parameter counts of the dense model.
    pub dense_params: ParamCounts,
    /// Parameter counts of the written model.
    pub params: ParamCounts,
    /// Wall time of the conversion (calibration passes included), seconds.
    pub seconds: f64,
    /// Of it, layer-wise construction, seconds.
    pub layerwise_seconds: f64,
}

/// What the run folder says of a run: the layers done and what is needed to go on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RunState {
    /// Layers `0..next` are staged.
    next: usize,
    /// The configuration being written.
    config: LlamaConfig,
    format: ExportFormat,
    /// Hidden-state values saved for layer `next` (0 without calibration).
    hidden_values: usize,
    layers: Vec<LayerReport>,
    seconds: f64,
    layerwise_seconds: f64,
}

const STATE: &str = "state.json";
const HIDDEN: &str = "hidden.f32";

fn read_state(run: &Path) -> Result<Option<RunState>> {
    let path = run.join(STATE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| UpcycleError::io(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| UpcycleError::WorkDir {
            path: path.clone(),
            reason: format!("unreadable run state ({e}); delete the work directory to start over"),
        })
}

/// Writes `values` as little-endian f32 to `path`, atomically.
fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    values.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
    moekit_llama::io::atomic::write(path, &bytes).map_err(UpcycleError::from)
}

/// Host rows `[n·H]` of a `[b, t, H]` tensor.
fn rows(t: &Tensor<3>) -> Vec<f32> {
    t.clone().into_data().iter::<f32>().collect()
}

/// The layout a model whose every FFN is like `ffn` is written in: `format`, or the first of
/// [`ExportFormat::moe_candidates`] that fits; an export of `base` that cannot be written fails
/// here, at the first layer.
fn start_export(
    out: &Path,
    staging: &Path,
    base: &LlamaConfig,
    ffn: &FfnSlot,
    settings: &LayeredSettings,
) -> Result<(LayeredExport, ExportFormat)> {
    let open = |format| {
        LayeredExport::new(out, staging, base, ffn, format, settings.dtype)
            .map(|e| (e.with_max_shard_bytes(settings.max_shard_bytes), format))
    };
    Ok(match settings.format {
        Some(format) => open(format)?,
        None => ExportFormat::first_fitting(ExportFormat::moe_candidates(base), open)?.1,
    })
}

/// Converts every dense FFN of `checkpoint` into a MoE layer as `convert` says, one decoder
/// layer at a time, and writes the result into `out` as a Hugging Face checkpoint (with
/// `tokenizer` if given). `calibration` tokens (cut into `settings.seq_len` windows) feed
/// the methods that need them and layer-wise construction. `run` is this conversion's own
/// folder: finished layers are staged there with the hidden states that follow them, and a
/// rerun with the same folder resumes at the first unfinished layer (give each set of inputs
/// and settings its own folder). `progress(done, total)` reports layers.
#[allow(clippy::too_many_arguments)]
pub fn convert_layered(
    checkpoint: &Checkpoint,
    tokenizer: Option<&Tokenizer>,
    calibration: &[u32],
    convert: &ConvertConfig,
    settings: &LayeredSettings,
    out: &Path,
    run: &Path,
    device: &Device,
    observer: &mut dyn LayerObserver,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LayeredReport> {
    let base = checkpoint.config();
    let layers = base.num_hidden_layers;
    let hidden_size = base.hidden_size;
    convert.validate_settings()?;
    convert.validate(hidden_size, base.intermediate_size)?;
    if let Some(lw) = &settings.layerwise {
        lw.validate()?;
    }
    let needs_tokens = convert.needs_calibration() || settings.layerwise.is_some();
    let windows: Vec<&[u32]> = if needs_tokens {
        calibration
            .chunks(settings.seq_len.max(2))
            .filter(|w| w.len() >= 2)
            .collect()
    } else {
        Vec::new()
    };
    if needs_tokens && windows.is_empty() {
        return Err(UpcycleError::Calibration(
            "no calibration tokens (at least 2 are needed)".into(),
        ));
    }
    std::fs::create_dir_all(run).map_err(|e| UpcycleError::io(run, e))?;
    let staging = run.join("parts");
    let state = read_state(run)?;
    let resumed_layers = state.as_ref().map_or(0, |s| s.next);
    let mut hidden = if needs_tokens {
        let h = HiddenStates::embed(checkpoint, &windows, settings.batch, device)?;
        Some(match &state {
            Some(s) if s.next > 0 => {
                let values = read_f32(&run.join(HIDDEN), s.hidden_values)?;
                h.with_values(&values)?
            }
            _ => h,
        })
    } else {
        None
    };
    let calibration_tokens = hidden.as_ref().map_or(0, |h| h.tokens());
    let mut export = match &state {
        Some(s) if s.next > 0 => {
            let mut e =
                LayeredExport::resume(out, &staging, base, &s.config, s.format, settings.dtype)?
                    .with_max_shard_bytes(settings.max_shard_bytes);
            for l in 0..s.next {
                e.reuse_layer(l)?;
            }
            Some((e, s.format))
        }
        _ => None,
    };
    let mut rope = RopeCache::new(Rope::new(base)?);
    let start_time = Instant::now();
    let (mut seconds, mut layerwise_seconds) = state
        .as_ref()
        .map_or((0.0, 0.0), |s| (s.seconds, s.layerwise_seconds));
    let mut reports = state.as_ref().map_or_else(Vec::new, |s| s.layers.clone());
    progress(resumed_layers, layers);
    for l in resumed_layers..layers {
        let layer_start = Instant::now();
        let dense = checkpoint.load_layer(l, device)?;
        let ffn = dense
            .ffn
            .dense()
            .ok_or_else(|| UpcycleError::Config(format!("layer {l} is already a MoE layer")))?;
        // The attention half over every batch: the residual r, the FFN input x and the
        // dense output y (needed by the dense path and by construction), each [b, t, H].
        let needs_y = settings.path == HiddenPath::Dense || settings.layerwise.is_some();
        let mut halves = Vec::new();
        if let Some(hidden) = &hidden {
            for (_, h) in &hidden.batches {
                let tables = rope.tables(h.dims()[1], device);
                let (r, x) = dense.attention_block(h.clone(), tables, None);
                let y = needs_y.then(|| ffn.forward(x.clone()));
                halves.push((r, x, y));
            }
        }
        let x_host: Vec<f32> = halves.iter().flat_map(|(_, x, _)| rows(x)).collect();
        let profile_inputs = (!x_host.is_empty()).then(|| {
            let n = (x_host.len() / hidden_size).min(PROFILE_TOKENS);
            Tensor::<2>::from_data(
                TensorData::new(x_host[..n * hidden_size].to_vec(), [n, hidden_size]),
                device,
            )
        });
        let inputs = profile_inputs.filter(|_| convert.needs_calibration());
        let mut moe = convert_ffn(&ffn, convert, inputs, layer_seed(convert.seed, l))?;
        if export.is_none() {
            // Checked before any training, so that an unexportable model fails at once.
            let ffn = FfnSlot::Moe(moe.clone());
            let (mut e, format) = start_export(out, &staging, base, &ffn, settings)?;
            e.put_globals(checkpoint)?;
            export = Some((e, format));
        }
        if let Some(lw) = &settings.layerwise {
            let t = Instant::now();
            let y_host: Vec<f32> = halves
                .iter()
                .flat_map(|(_, _, y)| rows(y.as_ref().expect("computed for construction")))
                .collect();
            let (trained, report) = construct_layer(
                l,
                &moe,
                &x_host,
                &y_host,
                hidden_size,
                device,
                lw,
                settings.blocks_dir.as_deref(),
                observer,
            )?;
            moe = trained;
            reports.push(report);
            layerwise_seconds += t.elapsed().as_secs_f64();
        }
        let converted = DecoderLayer {
            ffn: FfnSlot::Moe(moe),
            ..dense
        };
        let (e, format) = export.as_mut().expect("started above");
        e.put_layer(l, &converted)?;
        // The hidden states that feed the next layer.
        if let Some(hidden) = &mut hidden {
            for ((_, h), (r, x, y)) in hidden.batches.iter_mut().zip(halves) {
                *h = match (settings.path, y) {
                    (HiddenPath::Dense, Some(y)) => r + y,
                    _ => r + converted.ffn.forward(x)?.0,
                };
            }
        }
        seconds += layer_start.elapsed().as_secs_f64();
        let values = hidden.as_ref().map(HiddenStates::to_host);
        if let Some(values) = &values {
            write_f32(&run.join(HIDDEN), values)?;
        }
        let next = RunState {
            next: l + 1,
            config: e.config().clone(),
            format: *format,
            hidden_values: values.map_or(0, |v| v.len()),
            layers: reports.clone(),
            seconds,
            layerwise_seconds,
        };
        let text = serde_json::to_string(&next).expect("the state serialises");
        moekit_llama::io::atomic::write(&run.join(STATE), text.as_bytes())?;
        tracing::info!(layer = l, "layer finished");
        progress(l + 1, layers);
    }
    let Some((export, format)) = export else {
        return Err(UpcycleError::Config("the model has no layers".into()));
    };
    let config = export.finish(tokenizer)?;
    tracing::info!(
        out = %out.display(),
        layers,
        resumed = resumed_layers,
        seconds = start_time.elapsed().as_secs_f64(),
        "converted layer by layer"
    );
    for f in [HIDDEN, STATE] {
        let p = run.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| UpcycleError::io(&p, e))?;
        }
    }
    Ok(LayeredReport {
        dense_params: checkpoint.param_counts()?,
        // Read back: factored routers count as their factors.
        params: Checkpoint::open(out)?.param_counts()?,
        config,
        format,
        calibration_tokens,
        layers: reports,
        resumed_layers,
        seconds,
        layerwise_seconds,
    })
}
