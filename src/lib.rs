#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// The burn version moekit is built on, re-exported so that users share its tensor types.
pub use burn;
/// Knowledge distillation: KL, reverse KL, skew KL, generalised JSD, TV and top-k losses on
/// logits, hidden-state losses, weighted combinations (`kl:1,hidden-mse:0.5,ce:0.1`) and the
/// `Distiller` for custom training loops.
pub use moekit_distill as distill;
/// LLaMA-family models: decoder, checkpoints (safetensors, GGUF), tokenizer, generation.
pub use moekit_llama as llama;
/// LoRA adapters: factored `x·A·B` layers, merge/unmerge, PEFT adapter names and config.
pub use moekit_lora as lora;
/// Sparse Mixture-of-Experts layers: routers, expert banks, dispatch, auxiliary losses.
pub use moekit_moe as moe;
/// Adaptive routing (LaDiMo, stage 2): routing profiles, per-layer top-k / top-p policies
/// chosen for an activated-parameter budget, plots.
pub use moekit_router as router;
/// Distillation training: the `DistillStep` of custom loops and the `Trainer` (AdamW,
/// warm-up + cosine, accumulation, clipping, trainable sets, evaluation, atomic checkpoints
/// and exact resume).
pub use moekit_train as train;
/// Dense-to-MoE conversion (sparse upcycling, neuron splitting, PESC, LoRA experts), router
/// initialisation, activation recording and layer-wise expert construction (LaDiMo).
pub use moekit_upcycle as upcycle;

use burn::tensor::Device;

/// The device that this crate's backend features select.
///
/// With a GPU feature (`cuda`, `vulkan`, `metal`, `wgpu`) this is burn's default device (the
/// fastest enabled GPU backend; `BURN_DEVICE` overrides it), otherwise the Flex CPU backend.
/// Unlike `Device::default()`, it does not switch to WGPU merely because another crate in the
/// build enabled burn's `wgpu` feature.
#[cfg(any(
    feature = "cuda",
    feature = "vulkan",
    feature = "metal",
    feature = "wgpu"
))]
pub fn default_device() -> Device {
    Device::default()
}

/// The device that this crate's backend features select: Flex, the only backend enabled.
#[cfg(all(
    feature = "flex",
    not(any(
        feature = "cuda",
        feature = "vulkan",
        feature = "metal",
        feature = "wgpu"
    ))
))]
pub fn default_device() -> Device {
    Device::flex()
}

#[cfg(not(any(
    feature = "flex",
    feature = "cuda",
    feature = "vulkan",
    feature = "metal",
    feature = "wgpu"
)))]
compile_error!("moekit needs a backend feature: flex (default), wgpu, vulkan, metal or cuda");

#[doc = include_str!("../docs/rust.md")]
pub mod guide {}
