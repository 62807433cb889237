//! The model configuration, mirroring Hugging Face `config.json`.
//!
//! One struct reads and writes the `config.json` of LLaMA, Mistral, Qwen2, SmolLM (which is
//! LLaMA), Mixtral and Qwen2-MoE. Fields that moekit does not interpret are kept in
//! [`LlamaConfig::extra`] and written back unchanged.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{LlamaError, Result};

/// Architectures the decoder implements (Hugging Face `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llama` (also SmolLM, Llama-2/3).
    Llama,
    /// `mistral` (sliding window not applied: sequences must fit in the window).
    Mistral,
    /// `qwen2`: biases on the Q, K and V projections.
    Qwen2,
    /// `mixtral`: every FFN is a softmax top-k MoE with renormalised weights.
    Mixtral,
    /// `qwen2_moe`: sparse layers with a sigmoid-gated shared expert; Q/K/V biases.
    Qwen2Moe,
    /// `qwen3`: an RMSNorm over each query and key head before the rotation (`q_norm`,
    /// `k_norm`), and a `head_dim` of its own (128 when the file names none).
    Qwen3,
    /// `qwen3_moe`: Qwen3's attention; sparse layers of softmax top-k experts without a shared
    /// expert (`norm_topk_prob` renormalises the top-k weights).
    Qwen3Moe,
    /// `phi3`: LLaMA with fused projections (`qkv_proj` rows `[Q; K; V]`, `gate_up_proj` rows
    /// `[gate; up]`), split on load.
    Phi3,
}

/// The `model_type`s [`Architecture::from_model_type`] reads, for messages.
pub const SUPPORTED_MODEL_TYPES: &str =
    "llama, mistral, qwen2, qwen3, phi3, mixtral, qwen2_moe, qwen3_moe";

impl Architecture {
    /// Parses a Hugging Face `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        Ok(match model_type {
            "llama" | "smollm" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "mixtral" => Self::Mixtral,
            "qwen2_moe" => Self::Qwen2Moe,
            "qwen3" => Self::Qwen3,
            "qwen3_moe" => Self::Qwen3Moe,
            "phi3" => Self::Phi3,
            other => return Err(LlamaError::UnknownArchitecture(other.to_string())),
        })
    }

    /// The Hugging Face `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Phi3 => "phi3",
        }
    }

    /// The Hugging Face class name written to `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Mixtral => "MixtralForCausalLM",
            Self::Qwen2Moe => "Qwen2MoeForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Qwen3Moe => "Qwen3MoeForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Whether query and key heads are RMS-normed before the rotation (Qwen3).
    pub fn qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Qwen3Moe)
    }

    /// Whether Q/K/V and gate/up are stored fused (Phi-3).
    pub fn fused_projections(self) -> bool {
        self == Self::Phi3
    }
}

/// One token id or several (`eos_token_id` may be a list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// Rotary-embedding frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRopeScaling")]
pub struct RopeScaling {
    /// `default`, `linear` or `llama3` (read from `rope_type` or the older `type`;
    /// transformers writes both, which must then agree).
    pub rope_type: String,
    /// Scale factor (`linear`, `llama3`).
    #[serde(default)]
    pub factor: Option<f64>,
    /// Llama-3: wavelengths longer than `original / low_freq_factor` are scaled by `factor`.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Llama-3: wavelengths shorter than `original / high_freq_factor` are kept.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// Llama-3: the context length the model was pre-trained with.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// `rope_scaling` as written: the kind under `rope_type`, `type` or both.
#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(default)]
    rope_type: Option<String>,
    #[serde(default, rename = "type")]
    legacy_type: Option<String>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default)]
    low_freq_factor: Option<f64>,
    #[serde(default)]
    high_freq_factor: Option<f64>,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
}

impl TryFrom<RawRopeScaling> for RopeScaling {
    type Error = String;

    fn try_from(raw: RawRopeScaling) -> std::result::Result<Self, String> {
        let rope_type = match (raw.rope_type, raw.legacy_type) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!("rope_type {a:?} and type {b:?} disagree"));
            }
            (Some(kind), _) | (None, Some(kind)) => kind,
            (None, None) => return Err("neither rope_type nor type is given".into()),
        };
        Ok(Self {
            rope_type,
            factor: raw.factor,
            low_freq_factor: raw.low_freq_factor,
            high_freq_factor: raw.high_freq_factor,
            original_max_position_embeddings: raw.original_max_position_embeddings,
        })
    }
}

/// What a layer's FFN slot holds, as the configuration describes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FfnSpec {
    /// A dense SwiGLU of the given intermediate width.
    Dense {
        /// Intermediate width.
        intermediate_size: usize,
    },
    /// A softmax top-k MoE layer.
    Moe {
        /// Routed experts.
        num_experts: usize,
        /// Experts per token.
        top_k: usize,
        /// Intermediate width of each expert.
        intermediate_size: usize,
        /// Renormalise the top-k weights (Mixtral: yes; Qwen2-MoE: `norm_topk_prob`).
        renormalize: bool,
        /// Intermediate width of the sigmoid-gated shared expert, if any.
        shared_intermediate_size: Option<usize>,
        /// Temperature of the combine weights (`moekit_combine_temperature`; 1 when absent).
        combine_temperature: f64,
    },
}

/// Parameter counts of a model (see [`LlamaConfig::param_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Every parameter.
    pub total: usize,
    /// Parameters used per token: everything but the routed experts a token does not visit
    /// (top-k experts of each MoE layer are counted, the other `E - k` are not).
    pub active: usize,
    /// Parameters inside routed experts.
    pub routed_experts: usize,
}

/// Limits that keep a hostile or corrupt configuration from asking for absurd allocations.
const MAX_WIDTH: usize = 1 << 17;
const MAX_LAYERS: usize = 1 << 10;
const MAX_VOCAB: usize = 1 << 22;
const MAX_EXPERTS: usize = 1 << 12;

/// A LLaMA-family model configuration, field for field as in Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Hugging Face class names, e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `llama`, `mistral`, `qwen2`, `mixtral` or `qwen2_moe`.
    pub model_type: String,
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Model width `H`.
    pub hidden_size: usize,
    /// Dense FFN intermediate width (also Mixtral's expert width).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base θ (transformers 5 may put it in `rope_parameters` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Rotary frequency scaling (legacy key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the Q/K/V/O projections (LLaMA's `attention_bias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// FFN activation; only `silu` (SwiGLU) is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Mixtral: routed experts per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    /// Mixtral / Qwen2-MoE: experts per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    /// Qwen2-MoE: routed experts per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    /// Qwen2-MoE: intermediate width of each routed expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    /// Qwen2-MoE: intermediate width of the shared expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    /// Qwen2-MoE: renormalise the top-k weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// Qwen2-MoE: every `decoder_sparse_step`-th layer is sparse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<usize>,
    /// Qwen2-MoE: layers that stay dense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// moekit: temperature `τ` of the routers' combine weights
    /// (`moekit_moe::RouterConfig::combine_temperature`). The file's gates hold `W_g / τ`, so
    /// that transformers, which does not know the key, routes and weighs exactly as moekit
    /// does; moekit multiplies them back by `τ` when it loads them, so that training sees the
    /// logits at their usual scale. Absent: 1.
    #[serde(
        rename = "moekit_combine_temperature",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub combine_temperature: Option<f64>,
    /// Every other field, kept for writing back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| LlamaError::corrupt(path, format!("not a valid config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// A dense LLaMA configuration (tests, examples, custom models).
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        Self {
            architectures: vec![Architecture::Llama.class_name().into()],
            model_type: "llama".into(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: Some(10_000.0),
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            attention_bias: None,
            hidden_act: default_act(),
            bos_token_id: None,
            eos_token_id: None,
            num_local_experts: None,
            num_experts_per_tok: None,
            num_experts: None,
            moe_intermediate_size: None,
            shared_expert_intermediate_size: None,
            norm_topk_prob: None,
            decoder_sparse_step: None,
            mlp_only_layers: None,
            combine_temperature: None,
            extra: Map::new(),
        }
    }

    /// The architecture named by `model_type`.
    pub fn architecture(&self) -> Result<Architecture> {
        Architecture::from_model_type(&self.model_type)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width: `head_dim`, or when the file names none what transformers takes (128 for
    /// Qwen3, whose configuration class defaults to it; `hidden_size / num_attention_heads`
    /// otherwise).
    pub fn head_width(&self) -> usize {
        match (self.head_dim, self.architecture()) {
            (Some(d), _) => d,
            (None, Ok(Architecture::Qwen3)) => 128,
            (None, _) => self.hidden_size / self.num_attention_heads.max(1),
        }
    }

    /// Routed experts per layer as the file names them: `num_experts` (Qwen2-MoE, Qwen3-MoE on
    /// the hub) or `num_local_experts` (Mixtral, and Qwen3-MoE as transformers 5 saves it).
    fn routed_experts(&self) -> Option<usize> {
        self.num_experts.or(self.num_local_experts)
    }

    /// Rotary base θ, from `rope_theta` or transformers 5's `rope_parameters`.
    pub fn rope_base(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.extra
                    .get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0)
    }

    /// Rotary scaling, from `rope_scaling` or transformers 5's `rope_parameters`.
    pub fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let scaling = match (&self.rope_scaling, self.extra.get("rope_parameters")) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(p)) => Some(
                serde_json::from_value(p.clone())
                    .map_err(|e| LlamaError::Config(format!("rope_parameters: {e}")))?,
            ),
            (None, None) => None,
        };
        Ok(scaling.filter(|s| s.rope_type != "default"))
    }

    /// For an architecture that stores its projections fused (Phi-3), the widths
    /// [`crate::io::names::fused_rows`] locates Q/K/V and gate/up by: `[heads, kv heads, head
    /// width, FFN width]`; `None` for the others.
    pub fn fused_dims(&self) -> Option<[usize; 4]> {
        self.architecture()
            .is_ok_and(Architecture::fused_projections)
            .then(|| {
                [
                    self.num_attention_heads,
                    self.kv_heads(),
                    self.head_width(),
                    self.intermediate_size,
                ]
            })
    }

    /// The share of each head's width that is rotated (`partial_rotary_factor`, at the top
    /// level or in transformers 5's `rope_parameters`), if the file names one.
    pub fn partial_rotary_factor(&self) -> Option<f64> {
        let key = "partial_rotary_factor";
        self.extra
            .get(key)
            .or_else(|| self.extra.get("rope_parameters").and_then(|p| p.get(key)))
            .and_then(Value::as_f64)
    }

    /// Whether the Q/K/V projections carry biases.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type.as_str() {
            // transformers 5 lets Qwen2-MoE turn them off with `qkv_bias`.
            "qwen2" | "qwen2_moe" => self
                .extra
                .get("qkv_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether the output projection carries a bias (LLaMA's `attention_bias`).
    pub fn o_bias(&self) -> bool {
        self.attention_bias.unwrap_or(false)
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Temperature of the routers' combine weights (1 when the configuration names none).
    pub fn combine_temperature(&self) -> f64 {
        self.combine_temperature.unwrap_or(1.0)
    }

    /// What layer `layer`'s FFN slot holds.
    pub fn ffn_spec(&self, layer: usize) -> FfnSpec {
        let dense = FfnSpec::Dense {
            intermediate_size: self.intermediate_size,
        };
        match self.architecture() {
            Ok(Architecture::Mixtral) => FfnSpec::Moe {
                num_experts: self.num_local_experts.unwrap_or(8),
                top_k: self.num_experts_per_tok.unwrap_or(2),
                intermediate_size: self.intermediate_size,
                renormalize: true,
                shared_intermediate_size: None,
                combine_temperature: self.combine_temperature(),
            },
            Ok(arch @ (Architecture::Qwen2Moe | Architecture::Qwen3Moe)) => {
                let qwen3 = arch == Architecture::Qwen3Moe;
                let step = self.decoder_sparse_step.unwrap_or(1).max(1);
                let dense_only = self
                    .mlp_only_layers
                    .as_ref()
                    .is_some_and(|l| l.contains(&layer));
                if dense_only || !(layer + 1).is_multiple_of(step) {
                    return dense;
                }
                // transformers' defaults when the file names none.
                let (experts, top_k, width) = if qwen3 { (128, 8, 768) } else { (60, 4, 1408) };
                FfnSpec::Moe {
                    num_experts: self.routed_experts().unwrap_or(experts),
                    top_k: self.num_experts_per_tok.unwrap_or(top_k),
                    intermediate_size: self.moe_intermediate_size.unwrap_or(width),
                    renormalize: self.norm_topk_prob.unwrap_or(false),
                    shared_intermediate_size: self
                        .shared_expert_intermediate_size
                        .filter(|&s| s > 0 && !qwen3),
                    combine_temperature: self.combine_temperature(),
                }
            }
            _ => dense,
        }
    }

    /// Total and active parameter counts implied by the configuration.
    pub fn param_counts(&self) -> ParamCounts {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_width(),
            self.kv_heads() * self.head_width(),
        );
        let bias = if self.qkv_bias() { q + 2 * kv } else { 0 };
        let qk_norm = if self.architecture().is_ok_and(Architecture::qk_norm) {
            2 * self.head_width()
        } else {
            0
        };
        let attention =
            h * q + 2 * h * kv + q * h + bias + if self.o_bias() { h } else { 0 } + qk_norm;
        let swiglu = |i: usize| 3 * h * i;
        let mut counts = ParamCounts {
            total: v * h * if self.tie_word_embeddings { 1 } else { 2 } + h,
            active: 0,
            routed_experts: 0,
        };
        counts.active = counts.total;
        for layer in 0..self.num_hidden_layers {
            let common = attention + 2 * h;
            counts.total += common;
            counts.active += common;
            match self.ffn_spec(layer) {
                FfnSpec::Dense { intermediate_size } => {
                    counts.total += swiglu(intermediate_size);
                    counts.active += swiglu(intermediate_size);
                }
                FfnSpec::Moe {
                    num_experts,
                    top_k,
                    intermediate_size,
                    shared_intermediate_size,
                    ..
                } => {
                    let shared = shared_intermediate_size.map_or(0, |s| swiglu(s) + h);
                    let router = h * num_experts;
                    counts.routed_experts += num_experts * swiglu(intermediate_size);
                    counts.total += router + shared + num_experts * swiglu(intermediate_size);
                    counts.active += router + shared + top_k * swiglu(intermediate_size);
                }
            }
        }
        counts
    }

    /// Checks that the configuration describes a model this crate can build.
    pub fn validate(&self) -> Result<()> {
        let arch = self.architecture()?;
        let bad = |msg: String| Err(LlamaError::Config(msg));
        for (what, value, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 8 * MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("num_key_value_heads", self.kv_heads(), MAX_WIDTH),
        ] {
            if value == 0 || value > max {
                return bad(format!("{what} = {value} must be in 1..={max}"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(t) = self.combine_temperature
            && moekit_moe::RouterConfig::check_temperature(t).is_err()
        {
            return bad(format!(
                "moekit_combine_temperature = {t} must be finite and positive"
            ));
        }
        let d = self.head_width();
        if d == 0 || !d.is_multiple_of(2) || d > MAX_WIDTH {
            return bad(format!("head_dim {d} must be even and positive"));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only silu / SwiGLU)",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        let theta = self.rope_base();
        if !(theta.is_finite() && theta > 0.0) {
            return bad(format!("rope_theta {theta} must be finite and positive"));
        }
        if let Some(s) = self.rope_scaling()? {
            // Factors below 1 would squeeze positions together (transformers warns about
            // them, and no released model uses one); Llama-3's band needs low < high.
            let factor_ok = s.factor.is_some_and(|f| f.is_finite() && f >= 1.0);
            let positive = |x: Option<f64>| x.is_some_and(|x| x.is_finite() && x > 0.0);
            match s.rope_type.as_str() {
                "linear" | "llama3" if !factor_ok => {
                    return bad(format!(
                        "rope scaling factor {:?} must be a finite number of at least 1",
                        s.factor
                    ));
                }
                "linear" => {}
                "llama3"
                    if positive(s.low_freq_factor)
                        && positive(s.high_freq_factor)
                        && s.low_freq_factor < s.high_freq_factor
                        && s.original_max_position_embeddings.is_some_and(|n| n > 0) => {}
                "llama3" => {
                    return bad(format!(
                        "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and \
                         original_max_position_embeddings > 0 (low {:?}, high {:?}, original {:?})",
                        s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings
                    ));
                }
                other => {
                    return bad(format!(
                        "rope scaling `{other}` is unsupported or incomplete (supported: linear, llama3)"
                    ));
                }
            }
        }
        if self.extra.get("use_sliding_window") == Some(&Value::Bool(true)) {
            return bad("use_sliding_window: sliding-window attention is not implemented".into());
        }
        if let Some(f) = self.partial_rotary_factor()
            && f != 1.0
        {
            return bad(format!(
                "partial_rotary_factor {f}: only fully rotary heads are implemented"
            ));
        }
        if matches!(
            arch,
            Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe
        ) {
            for layer in 0..self.num_hidden_layers {
                if let FfnSpec::Moe {
                    num_experts,
                    top_k,
                    intermediate_size,
                    ..
                } = self.ffn_spec(layer)
                {
                    if num_experts == 0 || num_experts > MAX_EXPERTS {
                        return bad(format!(
                            "{num_experts} experts must be in 1..={MAX_EXPERTS}"
                        ));
                    }
                    if top_k == 0 || top_k > num_experts {
                        return bad(format!(
                            "num_experts_per_tok {top_k} must be in 1..={num_experts}"
                        ));
                    }
                    if intermediate_size == 0 || intermediate_size > 8 * MAX_WIDTH {
                        return bad(format!("expert width {intermediate_size} is out of range"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `config.json` (atomically) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LlamaError::Config(format!("cannot serialise: {e}")))?;
        crate::io::atomic::write(&dir.join("config.json"), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
      "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
      "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
      "rope_theta": 100000, "max_position_embeddings": 8192, "tie_word_embeddings": true,
      "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn smollm2_config_and_param_count() {
        let c: LlamaConfig = serde_json::from_str(SMOLLM2).unwrap();
        c.validate().unwrap();
        assert_eq!(c.head_width(), 64);
        assert_eq!(c.kv_heads(), 3);
        // The published size of SmolLM2-135M: 134,515,008 parameters.
        assert_eq!(c.param_counts().total, 134_515_008);
        assert_eq!(c.param_counts().active, c.param_counts().total);
        // Unknown fields survive a round trip.
        let back: LlamaConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.extra["torch_dtype"], "bfloat16");
        assert_eq!(back, c);
    }

    #[test]
    fn moe_layouts() {
        let mut c: LlamaConfig = serde_json::from_str(SMOLLM2).unwrap();
        c.model_type = "qwen2_moe".into();
        c.num_experts = Some(8);
        c.num_experts_per_tok = Some(2);
        c.moe_intermediate_size = Some(192);
        c.shared_expert_intermediate_size = Some(384);
        c.mlp_only_layers = Some(vec![0]);
        c.decoder_sparse_step = Some(2);
        assert_eq!(
            c.ffn_spec(0),
            FfnSpec::Dense {
                intermediate_size: 1536
            }
        );
        assert!(matches!(c.ffn_spec(2), FfnSpec::Dense { .. }));
        assert!(matches!(
            c.ffn_spec(1),
            FfnSpec::Moe {
                num_experts: 8,
                top_k: 2,
                renormalize: false,
                shared_intermediate_size: Some(384),
                ..
            }
        ));
        let p = c.param_counts();
        // 15 sparse layers, each with 6 inactive experts of 3·576·192 parameters.
        assert_eq!(p.total - p.active, 15 * 6 * 3 * 576 * 192);
    }

    #[test]
    fn bad_configs_are_rejected() {
        let base: LlamaConfig = serde_json::from_str(SMOLLM2).unwrap();
        let mut c = base.clone();
        c.model_type = "gpt_neox".into();
        assert!(matches!(
            c.validate(),
            Err(LlamaError::UnknownArchitecture(_))
        ));
        let mut c = base.clone();
        c.num_key_value_heads = Some(2);
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.hidden_size = usize::MAX;
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.rope_scaling = Some(RopeScaling {
            rope_type: "yarn".into(),
            factor: Some(2.0),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        });
        assert!(c.validate().is_err());
        // Numbers out of range: each refused in one message naming the field.
        let llama3 = |factor: f64, low: f64, high: f64| RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(factor),
            low_freq_factor: Some(low),
            high_freq_factor: Some(high),
            original_max_position_embeddings: Some(8192),
        };
        let linear = |factor: f64| RopeScaling {
            rope_type: "linear".into(),
            factor: Some(factor),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        };
        let mut ok = base.clone();
        ok.rope_scaling = Some(llama3(8.0, 1.0, 4.0));
        ok.validate().unwrap();
        for (theta, scaling, says) in [
            (0.0, None, "rope_theta"),
            (-1.0, None, "rope_theta"),
            (f64::NAN, None, "rope_theta"),
            (1e4, Some(linear(1e-30)), "factor"),
            (1e4, Some(linear(f64::INFINITY)), "factor"),
            (1e4, Some(llama3(8.0, 4.0, 4.0)), "low_freq_factor"),
            (1e4, Some(llama3(8.0, 0.0, 4.0)), "low_freq_factor"),
        ] {
            let mut c = base.clone();
            c.rope_theta = Some(theta);
            c.rope_scaling = scaling;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{theta}: {err}");
        }
    }

    #[test]
    fn rope_scaling_reads_rope_type_type_or_both() {
        let scaling = |block: &str| {
            let json = SMOLLM2.replace(
                "\"rope_theta\"",
                &format!("\"rope_scaling\": {block}, \"rope_theta\""),
            );
            serde_json::from_str::<LlamaConfig>(&json).map(|c| c.rope_scaling)
        };
        for block in [
            r#"{"rope_type": "linear", "factor": 2.0}"#,
            r#"{"type": "linear", "factor": 2.0}"#,
            // transformers 4.43+ writes both when it saves such a config again.
            r#"{"type": "linear", "rope_type": "linear", "factor": 2.0}"#,
        ] {
            let s = scaling(block).unwrap().expect(block);
            assert_eq!(
                (s.rope_type.as_str(), s.factor),
                ("linear", Some(2.0)),
                "{block}"
            );
        }
        let err = scaling(r#"{"type": "linear", "rope_type": "llama3"}"#).unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
        assert!(scaling(r#"{"factor": 2.0}"#).is_err());
        // Written back with `rope_type` only.
        let s = scaling(r#"{"type": "linear", "factor": 2.0}"#)
            .unwrap()
            .unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("\"rope_type\":\"linear\"") && !json.contains("\"type\""),
            "{json}"
        );
    }
}
