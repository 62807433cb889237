//! Writing a model as a Hugging Face checkpoint: `model.safetensors`, `config.json` and the
//! tokenizer files, each written atomically.

use std::path::Path;

use burn::module::Module;
use moekit_moe::{Activation, FeedForward, MoeLayer, RouterConfig, Scoring, Selection};
use serde_json::Value;

use super::host::HostTensor;
use super::names::{Scheme, Weight, fused_rows, name};
use super::router_factors;
use super::safetensors::{SaveDtype, write};
use crate::config::{Architecture, LlamaConfig};
use crate::ffn::FfnSlot;
use crate::layer::DecoderLayer;
use crate::lora_ffn::LoraFfn;
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::{LlamaError, Result};

/// The checkpoint layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// Dense LLaMA / Mistral / Qwen2 / Qwen3 / Phi-3, as the model's configuration names it.
    /// Every FFN must be dense.
    Dense,
    /// Mixtral: every FFN a softmax top-k MoE with renormalised weights, no shared expert.
    Mixtral,
    /// Qwen2-MoE: MoE layers (optionally with a shared expert) and dense ones
    /// (`mlp_only_layers`).
    Qwen2Moe,
    /// Qwen3-MoE: Qwen3's attention (query/key head norms), MoE layers without a shared
    /// expert and dense ones (`mlp_only_layers`).
    Qwen3Moe,
}

impl ExportFormat {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
        }
    }

    pub(crate) fn scheme(self) -> Scheme {
        match self {
            Self::Dense => Scheme::Hf,
            Self::Mixtral => Scheme::Mixtral,
            Self::Qwen2Moe | Self::Qwen3Moe => Scheme::Qwen2Moe,
        }
    }

    /// The MoE layouts a model converted from `base` may be written in, in the order of
    /// preference: Qwen3-MoE for the Qwen3 family (no other layout norms query and key
    /// heads); otherwise Mixtral where it fits (renormalised top-k, no shared expert, no dense
    /// layer), else Qwen2-MoE.
    pub fn moe_candidates(base: &LlamaConfig) -> &'static [ExportFormat] {
        if base.architecture().is_ok_and(Architecture::qk_norm) {
            &[Self::Qwen3Moe]
        } else {
            &[Self::Mixtral, Self::Qwen2Moe]
        }
    }

    /// The first of `candidates` for which `fits` succeeds, or the last one's error.
    pub fn first_fitting<T>(
        candidates: &[ExportFormat],
        mut fits: impl FnMut(ExportFormat) -> Result<T>,
    ) -> Result<(ExportFormat, T)> {
        let mut last = None;
        for &format in candidates {
            match fits(format) {
                Ok(t) => return Ok((format, t)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LlamaError::Config("no export format to try".into())))
    }
}

/// The shape every MoE layer of a model shares.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MoeShape {
    experts: usize,
    top_k: usize,
    intermediate: usize,
    renormalize: bool,
    shared: Option<usize>,
    /// The routers' combine temperature, folded into the gates that are written.
    combine_temperature: f64,
}

fn moe_shape(moe: &MoeLayer, format: ExportFormat) -> Result<MoeShape> {
    let fail = |reason: String| LlamaError::Export {
        format: format.label(),
        reason,
    };
    let Selection::TopK { k, renormalize } = moe.router.selection else {
        return Err(fail(
            "top-p routing has no Hugging Face equivalent; set a top-k selection first".into(),
        ));
    };
    if moe.router.scoring != Scoring::Softmax || moe.router.bias.is_some() {
        return Err(fail(
            "only softmax routers without bias can be exported".into(),
        ));
    }
    RouterConfig::check_temperature(moe.router.combine_temperature)
        .map_err(|e| fail(e.to_string()))?;
    let bank = moe.plain_experts().map_err(|e| fail(e.to_string()))?;
    if bank.activation != Activation::SwiGlu {
        return Err(fail(format!(
            "{:?} experts have no Hugging Face equivalent (SwiGLU only)",
            bank.activation
        )));
    }
    Ok(MoeShape {
        experts: bank.num_experts(),
        top_k: k,
        intermediate: bank.intermediate_size(),
        renormalize,
        shared: moe.shared.as_ref().map(|s| s.ffn.intermediate_size()),
        combine_temperature: moe.router.combine_temperature,
    })
}

/// Checks that `model` can be written in `format` (every MoE layer of one shape, experts that
/// merge into plain SwiGLUs, the architecture's constraints), without writing anything: what
/// a long conversion calls before it trains, so that it does not fail at the end.
pub fn check_export(model: &Llama, format: ExportFormat) -> Result<()> {
    export_config(model, format, SaveDtype::F32).map(|_| ())
}

/// The `config.json` of the exported model.
fn export_config(model: &Llama, format: ExportFormat, dtype: SaveDtype) -> Result<LlamaConfig> {
    let ffns: Vec<&FfnSlot> = model.layers.iter().map(|l| &l.ffn).collect();
    export_config_of(&model.config, &ffns, format, dtype)
}

/// The `config.json` of a model of configuration `base` whose layers hold `ffns`.
pub(crate) fn export_config_of(
    base: &LlamaConfig,
    ffns: &[&FfnSlot],
    format: ExportFormat,
    dtype: SaveDtype,
) -> Result<LlamaConfig> {
    let fail = |reason: String| LlamaError::Export {
        format: format.label(),
        reason,
    };
    let mut c = base.clone();
    c.num_hidden_layers = ffns.len();
    let mut dense_widths = Vec::new();
    let mut dense_layers = Vec::new();
    let mut shape: Option<MoeShape> = None;
    for (l, ffn) in ffns.iter().enumerate() {
        match ffn {
            FfnSlot::Dense(ffn) | FfnSlot::Lora(LoraFfn { base: ffn, .. }) => {
                dense_widths.push(ffn.intermediate_size());
                dense_layers.push(l);
            }
            FfnSlot::Moe(moe) => {
                let s = moe_shape(moe, format)?;
                if shape.is_some_and(|prev| prev != s) {
                    return Err(fail(format!(
                        "layer {l}'s MoE differs from earlier layers ({s:?} vs {:?})",
                        shape.expect("checked")
                    )));
                }
                shape = Some(s);
            }
        }
    }
    c.combine_temperature = shape.map(|s| s.combine_temperature).filter(|&t| t != 1.0);
    // Gates divided by τ > 1 sink towards f16's subnormal range (below 6e-5), where they keep
    // few bits; f32 and bf16 have f32's exponent range.
    if dtype == SaveDtype::F16 && c.combine_temperature.is_some_and(|t| t > 1.0) {
        return Err(fail(
            "a combine temperature above 1 is folded into the gates (W/τ), which f16 cannot hold \
             precisely; save as f32 or bf16"
                .into(),
        ));
    }
    dense_widths.dedup();
    if dense_widths.len() > 1 {
        return Err(fail(format!("dense FFN widths differ: {dense_widths:?}")));
    }
    // Resolved values are written out: transformers 5 may keep θ and the scaling in
    // `rope_parameters` (removed below), and keys left out take the target class's defaults,
    // which differ (Mixtral: θ = 1e6 and 8 KV heads; Qwen2-MoE: 16 KV heads).
    c.rope_theta = Some(base.rope_base());
    c.rope_scaling = base.rope_scaling()?;
    c.num_key_value_heads = Some(base.kv_heads());
    for key in [
        "rope_parameters",
        "layer_types",
        "qkv_bias",
        "torch_dtype",
        "dtype",
    ] {
        c.extra.remove(key);
    }
    (c.num_local_experts, c.num_experts, c.moe_intermediate_size) = (None, None, None);
    (c.num_experts_per_tok, c.norm_topk_prob) = (None, None);
    (
        c.shared_expert_intermediate_size,
        c.decoder_sparse_step,
        c.mlp_only_layers,
    ) = (None, None, None);
    let original = c.architecture()?;
    let qk_norm = original.qk_norm();
    if qk_norm && matches!(format, ExportFormat::Mixtral | ExportFormat::Qwen2Moe) {
        return Err(fail(format!(
            "{} norms query and key heads, which {} does not; export as qwen3_moe",
            original.model_type(),
            format.label()
        )));
    }
    if qk_norm || format == ExportFormat::Qwen3Moe {
        // Qwen3 defaults it to 128, Qwen3-MoE to hidden / heads: always written.
        c.head_dim = Some(base.head_width());
    }
    let arch = match format {
        ExportFormat::Dense => {
            if shape.is_some() {
                return Err(fail(
                    "the model has MoE layers; export it as mixtral or qwen2_moe".into(),
                ));
            }
            match original {
                Architecture::Mixtral => Architecture::Mistral,
                Architecture::Qwen2Moe => Architecture::Qwen2,
                Architecture::Qwen3Moe => Architecture::Qwen3,
                a => a,
            }
        }
        ExportFormat::Mixtral => {
            let s = shape.ok_or_else(|| fail("the model has no MoE layer".into()))?;
            if !dense_layers.is_empty() {
                return Err(fail(format!(
                    "layers {dense_layers:?} are dense; Mixtral needs every layer sparse (use qwen2_moe)"
                )));
            }
            if !s.renormalize || s.shared.is_some() {
                return Err(fail(
                    "Mixtral renormalises top-k weights and has no shared expert (use qwen2_moe)"
                        .into(),
                ));
            }
            if base.qkv_bias() || base.o_bias() {
                return Err(fail(
                    "Mixtral attention has no biases (use qwen2_moe)".into(),
                ));
            }
            c.intermediate_size = s.intermediate;
            c.num_local_experts = Some(s.experts);
            c.num_experts_per_tok = Some(s.top_k);
            Architecture::Mixtral
        }
        ExportFormat::Qwen2Moe | ExportFormat::Qwen3Moe => {
            let s = shape.ok_or_else(|| fail("the model has no MoE layer".into()))?;
            let qwen3 = format == ExportFormat::Qwen3Moe;
            if qwen3 && !qk_norm {
                return Err(fail(format!(
                    "Qwen3-MoE norms query and key heads, which {} does not (Qwen3 models only)",
                    original.model_type()
                )));
            }
            if qwen3 && s.shared.is_some() {
                return Err(fail(
                    "Qwen3-MoE has no shared expert; convert without shared experts".into(),
                ));
            }
            if !qwen3 && base.o_bias() {
                return Err(fail("Qwen2-MoE's output projection has no bias".into()));
            }
            if let Some(&i) = dense_widths.first() {
                c.intermediate_size = i;
            }
            c.num_experts = Some(s.experts);
            c.num_experts_per_tok = Some(s.top_k);
            c.moe_intermediate_size = Some(s.intermediate);
            c.norm_topk_prob = Some(s.renormalize);
            c.decoder_sparse_step = Some(1);
            c.mlp_only_layers = Some(dense_layers);
            c.extra
                .insert("use_sliding_window".into(), Value::Bool(false));
            if qwen3 {
                Architecture::Qwen3Moe
            } else {
                // transformers always builds Qwen2-MoE's shared expert; a model without one
                // gets a zero one.
                c.shared_expert_intermediate_size = Some(s.shared.unwrap_or(1));
                Architecture::Qwen2Moe
            }
        }
    };
    c.model_type = arch.model_type().into();
    c.architectures = vec![arch.class_name().into()];
    c.attention_bias = matches!(
        arch,
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen3 | Architecture::Qwen3Moe
    )
    .then_some(base.o_bias() || base.qkv_bias())
    .filter(|&b| b);
    c.extra.insert(
        "torch_dtype".into(),
        Value::String(dtype.torch_name().into()),
    );
    c.validate()?;
    Ok(c)
}

/// Collects `(name, tensor)` pairs in PyTorch layouts.
pub(crate) struct Collector {
    scheme: Scheme,
    tensors: Vec<(String, HostTensor)>,
    /// For an architecture that stores projections fused (Phi-3), the widths
    /// [`fused_rows`] takes, and the fused weight being assembled from its parts.
    fused: Option<[usize; 4]>,
    pending: Option<(Weight, usize, HostTensor)>,
}

impl Collector {
    /// An empty collection named in `scheme`.
    pub(crate) fn new(scheme: Scheme) -> Self {
        Self {
            scheme,
            tensors: Vec::new(),
            fused: None,
            pending: None,
        }
    }

    /// The collected pairs.
    pub(crate) fn into_tensors(self) -> Vec<(String, HostTensor)> {
        self.tensors
    }

    fn push(&mut self, w: Weight, t: HostTensor) {
        // A part of a fused weight waits for the others; the rows are stored in order.
        if let Some((whole, total, rows)) = self.fused.and_then(|dims| fused_rows(w, dims)) {
            let mut acc = match self.pending.take() {
                Some((pending, _, acc)) if pending == whole => acc,
                _ => HostTensor::new(vec![0, t.shape[1]], Vec::new()),
            };
            debug_assert_eq!(acc.shape[0], rows.start, "fused parts come in order");
            acc.shape[0] += t.shape[0];
            acc.data.extend(t.data);
            if acc.shape[0] == total {
                self.push(whole, acc);
            } else {
                self.pending = Some((whole, total, acc));
            }
            return;
        }
        let n = name(w, self.scheme).expect("the export table names every weight it writes");
        self.tensors.push((n, t));
    }

    /// Pushes a SwiGLU's gate/up `[I, H]` and down `[H, I]`, from moekit's `w_in [H, 2I]` and
    /// `w_out [I, H]`.
    fn swiglu(&mut self, [gate, up, down]: [Weight; 3], w_in: &HostTensor, w_out: &HostTensor) {
        let i = w_out.shape[0];
        self.push(gate, w_in.cols(0, i).transpose());
        self.push(up, w_in.cols(i, i).transpose());
        self.push(down, w_out.transpose());
    }

    fn ffn(&mut self, names: [Weight; 3], ffn: &FeedForward, scale_down: f32) {
        let w_in = HostTensor::from_tensor(ffn.w_in.val());
        let mut w_out = HostTensor::from_tensor(ffn.w_out.val());
        w_out.data.iter_mut().for_each(|v| *v *= scale_down);
        self.swiglu(names, &w_in, &w_out);
    }
}

fn collect(model: &Llama, config: &LlamaConfig, scheme: Scheme) -> Vec<(String, HostTensor)> {
    let mut out = Collector::new(scheme);
    out.push(
        Weight::Embed,
        HostTensor::from_tensor(model.embed_tokens.weight.val()),
    );
    for (l, layer) in model.layers.iter().enumerate() {
        out.layer(l, layer, config);
    }
    out.push(
        Weight::FinalNorm,
        HostTensor::from_tensor(model.norm.gamma.val()),
    );
    if let Some(head) = &model.lm_head {
        out.push(
            Weight::LmHead,
            HostTensor::from_tensor(head.weight.val()).transpose(),
        );
    }
    out.tensors
}

impl Collector {
    /// Pushes decoder layer `l`'s tensors, in PyTorch layouts, as `config` (the exported
    /// configuration) names them.
    pub(crate) fn layer(&mut self, l: usize, layer: &DecoderLayer, config: &LlamaConfig) {
        let out = self;
        let h = config.hidden_size;
        out.fused = config.fused_dims();
        out.push(
            Weight::AttnNorm(l),
            HostTensor::from_tensor(layer.input_norm.gamma.val()),
        );
        out.push(
            Weight::FfnNorm(l),
            HostTensor::from_tensor(layer.post_attention_norm.gamma.val()),
        );
        let a = &layer.attention;
        for (w, norm) in [(Weight::QNorm(l), &a.q_norm), (Weight::KNorm(l), &a.k_norm)] {
            if let Some(norm) = norm {
                out.push(w, HostTensor::from_tensor(norm.gamma.val()));
            }
        }
        for (w, b, proj) in [
            (Weight::Q(l), Weight::QBias(l), &a.q_proj),
            (Weight::K(l), Weight::KBias(l), &a.k_proj),
            (Weight::V(l), Weight::VBias(l), &a.v_proj),
            (Weight::O(l), Weight::OBias(l), &a.o_proj),
        ] {
            let proj = proj.merged();
            let weight = HostTensor::from_tensor(proj.weight.val()).transpose();
            let rows = weight.shape[0];
            out.push(w, weight);
            let wants_bias = match w {
                Weight::O(_) => config.o_bias(),
                _ => config.qkv_bias(),
            };
            if wants_bias {
                let bias = proj.bias.as_ref().map_or_else(
                    || HostTensor::zeros(vec![rows]),
                    |b| HostTensor::from_tensor(b.val()),
                );
                out.push(b, bias);
            }
        }
        match &layer.ffn {
            FfnSlot::Dense(_) | FfnSlot::Lora(_) => {
                let ffn = layer.ffn.dense().expect("a dense slot");
                out.ffn([Weight::Gate(l), Weight::Up(l), Weight::Down(l)], &ffn, 1.0)
            }
            FfnSlot::Moe(moe) => {
                // `W_g / τ`: the file's softmax weighs as moekit's combine temperature does.
                let gate = moe.router.weight() / moe.router.combine_temperature;
                out.push(Weight::Router(l), HostTensor::from_tensor(gate).transpose());
                let bank = moe
                    .plain_experts()
                    .expect("export_config checked that the experts merge");
                let w_in = HostTensor::from_tensor(bank.w_in.val());
                let w_out = HostTensor::from_tensor(bank.w_out.val());
                for e in 0..bank.num_experts() {
                    let names = [
                        Weight::ExpertGate(l, e),
                        Weight::ExpertUp(l, e),
                        Weight::ExpertDown(l, e),
                    ];
                    out.swiglu(names, &w_in.index(e), &w_out.index(e));
                }
                if matches!(config.architecture(), Ok(Architecture::Qwen2Moe)) {
                    let names = [
                        Weight::SharedGate(l),
                        Weight::SharedUp(l),
                        Weight::SharedDown(l),
                    ];
                    match &moe.shared {
                        Some(shared) => match &shared.gate {
                            Some(g) => {
                                out.ffn(names, &shared.ffn, 1.0);
                                out.push(
                                    Weight::SharedScale(l),
                                    HostTensor::from_tensor(g.val()).transpose(),
                                );
                            }
                            // An ungated shared expert: gate weights of 0 give sigmoid(0) = ½,
                            // so the down projection is doubled (exact in floating point).
                            None => {
                                out.ffn(names, &shared.ffn, 2.0);
                                out.push(Weight::SharedScale(l), HostTensor::zeros(vec![1, h]));
                            }
                        },
                        None => {
                            out.push(names[0], HostTensor::zeros(vec![1, h]));
                            out.push(names[1], HostTensor::zeros(vec![1, h]));
                            out.push(names[2], HostTensor::zeros(vec![h, 1]));
                            out.push(Weight::SharedScale(l), HostTensor::zeros(vec![1, h]));
                        }
                    }
                }
            }
        }
    }
}

/// Writes `model` into `dir` (created if needed) as a Hugging Face checkpoint in `format`,
/// with the tokenizer files when a tokenizer is given. Returns the written configuration.
/// LoRA adapters are folded into the weights they update (see [`Llama::merge_lora`]); to keep
/// them apart, write them with [`crate::io::adapter::save_adapter`] instead. Factored routers
/// are written as their product, their factors beside it ([`router_factors`]).
pub fn save_pretrained(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
    format: ExportFormat,
    dtype: SaveDtype,
) -> Result<LlamaConfig> {
    let config = export_config(model, format, dtype)?;
    std::fs::create_dir_all(dir).map_err(|e| LlamaError::io(dir, e))?;
    // The folder is a finished model once config.json is in it: an earlier one goes first and
    // the new one comes last, so a crash in between never leaves new weights beside an old
    // configuration.
    let config_path = dir.join("config.json");
    if config_path.exists() {
        std::fs::remove_file(&config_path).map_err(|e| LlamaError::io(&config_path, e))?;
        super::atomic::sync_dir(dir)?;
    }
    let tensors = collect(model, &config, format.scheme());
    tracing::info!(dir = %dir.display(), tensors = tensors.len(), params = model.num_params(), "writing checkpoint");
    write(&dir.join("model.safetensors"), &tensors, dtype)?;
    // A stale shard index from an earlier save would shadow the new file; it goes once the
    // new file is in place, so that a failed write leaves the earlier checkpoint whole.
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        std::fs::remove_file(&index).map_err(|e| LlamaError::io(&index, e))?;
    }
    router_factors::save(model, dir, format.scheme(), dtype)?;
    if let Some(t) = tokenizer {
        t.save(dir)?;
    }
    config.save(dir)?;
    Ok(config)
}
