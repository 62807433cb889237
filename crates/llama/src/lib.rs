//! LLaMA-family decoders for burn, with dense or MoE FFN slots, and their checkpoint files.
//!
//! - [`Llama`]: RMSNorm, rotary embeddings (rotate-half, Llama-3 scaling), grouped-query
//!   attention with a KV cache, and per-layer [`FfnSlot`]s holding a dense SwiGLU or a
//!   [`moekit_moe::MoeLayer`]. [`LlamaConfig`] mirrors Hugging Face `config.json` for LLaMA,
//!   Mistral, Qwen2, SmolLM, Mixtral and Qwen2-MoE.
//! - [`Checkpoint`]: opens a Hugging Face directory (safetensors, single or sharded, f32 / f16 /
//!   bf16, memory-mapped) or a GGUF v2/v3 file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
//!   Q6_K de-quantised; llama.cpp's Q/K row permutation undone) with its [`Tokenizer`].
//! - [`save_pretrained`]: writes dense, Mixtral or Qwen2-MoE safetensors that Hugging Face
//!   transformers loads unchanged.
//!
//! ```no_run
//! # fn main() -> moekit_llama::Result<()> {
//! use moekit_llama::{Checkpoint, perplexity};
//! let device = burn::tensor::Device::flex();
//! let ckpt = Checkpoint::open("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! let model = ckpt.load(&device, &mut |_, _| {})?;
//! let ids = ckpt.tokenizer()?.encode("The quick brown fox jumps over the lazy dog.")?;
//! println!("{}", perplexity(&model, &ids, 2048, &mut |_, _| {})?.perplexity);
//! # Ok(()) }
//! ```

pub mod attention;
pub mod config;
pub mod distill;
mod error;
pub mod eval;
pub mod ffn;
pub mod generate;
pub mod io;
pub mod layer;
pub mod layer_source;
pub mod layered;
pub mod lm_head;
pub mod lora;
pub mod lora_ffn;
pub mod model;
pub mod rope;
pub mod tokenizer;

pub use attention::{Attention, KvCache};
pub use config::{Architecture, FfnSpec, LlamaConfig, ParamCounts};
pub use error::{LlamaError, Result};
pub use eval::{ExpertUsage, Perplexity, UsageCounter, perplexity};
pub use ffn::FfnSlot;
pub use generate::{GenerateConfig, Sampling, generate};
pub use io::adapter::{load_adapter, save_adapter};
pub use io::export::{ExportFormat, check_export, save_pretrained};
pub use io::layered_export::LayeredExport;
pub use io::load::Checkpoint;
pub use io::lock::FolderLock;
pub use io::safetensors::SaveDtype;
pub use layer::DecoderLayer;
pub use layer_source::LayerSource;
pub use layered::{HiddenStates, LayeredConfig, RopeCache, perplexity_layered};
pub use lm_head::{HeadScore, RunningLogSumExp, head_nll, head_scores};
pub use lora::{AdapterSite, Projection};
pub use lora_ffn::{FfnProj, LoraFfn};
pub use model::{Llama, ModelOutput};
pub use tokenizer::{Message, Tokenizer};
