//! Dense-to-MoE conversion of LLaMA-family models, and layer-wise expert construction.
//!
//! - [`convert`] turns every dense FFN into a MoE layer with one of four methods
//!   ([`Method`]): sparse upcycling, neuron splitting (random, balanced k-means,
//!   co-activation, importance, with optional shared experts), PESC adapter experts and
//!   MoE-KD's LoRA experts; routers start random, uniform, at cluster centroids or at
//!   calibration hidden states ([`RouterInit`]).
//! - [`ActivationStore::record`] runs the dense model over calibration text and keeps every
//!   FFN's input and output (in memory, or streamed to disk past a budget).
//! - [`construct`] (LaDiMo, stage 1) trains each MoE block on its own to reproduce its dense
//!   FFN, resuming per layer.
//!
//! Export goes through `moekit_llama::save_pretrained` (Mixtral or Qwen2-MoE); output scales
//! and PESC/LoRA experts are folded into plain experts there.
#![warn(missing_docs)]

pub mod calibration;
pub mod config;
pub mod convert;
pub mod error;
pub mod layered;
pub mod layerwise;
pub mod partition;
pub mod profile;
pub mod record;
pub mod router_init;
pub mod schedule;
pub mod split;

pub use config::{ConvertConfig, Method, RouterInit, SplitStrategy};
pub use convert::{convert, convert_ffn};
pub use error::{Result, UpcycleError};
pub use layered::{HiddenPath, LayeredReport, LayeredSettings, convert_layered};
pub use layerwise::{
    LayerObserver, LayerReport, LayerwiseConfig, LogObserver, construct, construct_layer,
    fit_router, oracle_experts, refine_experts, router_supervision,
};
pub use profile::{NeuronProfile, profile};
pub use record::{ActivationStore, RecordConfig};
pub use schedule::WarmupCosine;
