//! Checkpoint files: Hugging Face safetensors and GGUF in, Hugging Face safetensors out.

pub mod adapter;
pub mod atomic;
pub mod export;
pub mod gguf;
pub mod host;
pub mod layered_export;
pub mod load;
pub mod lock;
pub mod names;
pub mod quant;
pub mod router_factors;
pub mod safetensors;
pub mod shards;
pub mod source;
