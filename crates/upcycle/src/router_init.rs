//! Initial router weights (random, uniform, cluster centroids, hidden states).

use burn::tensor::{Device, Tensor, TensorData};
use moekit_moe::{Activation, FeedForward};

use crate::config::RouterInit;
use crate::error::{Result, UpcycleError};
use crate::partition::SplitMix64;

/// Standard deviation of [`RouterInit::Random`] weights.
pub const RANDOM_STD: f64 = 0.02;

/// `[I, E]` with `value(group size)` where neuron `j` belongs to expert `e`, 0 elsewhere.
fn membership(
    groups: &[Vec<usize>],
    neurons: usize,
    device: &Device,
    value: fn(usize) -> f32,
) -> Tensor<2> {
    let e = groups.len();
    let mut m = vec![0f32; neurons * e];
    for (g, ids) in groups.iter().enumerate() {
        for &j in ids {
            m[j * e + g] = value(ids.len());
        }
    }
    Tensor::from_data(TensorData::new(m, [neurons, e]), device)
}

/// The columns of `W_in` that decide whether a neuron fires: the gate half of a SwiGLU.
fn gate_columns(ffn: &FeedForward) -> Tensor<2> {
    let i = ffn.intermediate_size();
    match ffn.activation {
        Activation::SwiGlu => ffn.w_in.val().narrow(1, 0, i),
        _ => ffn.w_in.val(),
    }
}

/// The router's gate weight `[H, E]` for `E = groups.len()` experts.
///
/// - `Random`: `N(0, 0.02²)` from `rng`.
/// - `Uniform`: zeros.
/// - `Centroids` (MoEfication): column `e` is the mean gate column `W_gate[:, j]` of the
///   expert's neurons `j`, so the logit of `e` is the mean gate pre-activation of its neurons.
/// - `HiddenStates`: each calibration token is assigned to the expert whose neurons carry the
///   most activation mass `Σ_{j∈e} |aⱼ|`; column `e` is the mean of the unit-normalised hidden
///   states assigned to it (zero if none).
///
/// `groups` are the experts' neurons (`None` when experts are not made of neurons:
/// upcycling, PESC, LoRA experts, where only `Random` and `Uniform` apply); `inputs` `[T, H]`
/// are calibration tokens.
pub fn router_gate(
    init: RouterInit,
    ffn: &FeedForward,
    experts: usize,
    groups: Option<&[Vec<usize>]>,
    inputs: Option<Tensor<2>>,
    rng: &mut SplitMix64,
) -> Result<Tensor<2>> {
    let h = ffn.hidden_size();
    let device = ffn.w_in.val().device();
    let need_groups = || {
        groups.ok_or_else(|| {
            UpcycleError::Config(format!(
                "router init {init:?} needs experts made of neurons (use the split method)"
            ))
        })
    };
    Ok(match init {
        RouterInit::Random => Tensor::from_data(
            TensorData::new(rng.normals(h * experts, RANDOM_STD), [h, experts]),
            &device,
        ),
        RouterInit::Uniform => Tensor::zeros([h, experts], &device),
        RouterInit::Centroids => {
            let groups = need_groups()?;
            let mean = membership(groups, ffn.intermediate_size(), &device, |n| 1.0 / n as f32);
            gate_columns(ffn).matmul(mean)
        }
        RouterInit::HiddenStates => {
            let groups = need_groups()?;
            let x = inputs.ok_or(UpcycleError::NeedsCalibration("router init hidden-states"))?;
            let member = membership(groups, ffn.intermediate_size(), &device, |_| 1.0);
            let a = ffn.activation.apply(x.clone().matmul(ffn.w_in.val())).abs();
            let load = a.matmul(member); // [T, E]
            let tokens = load.dims()[0];
            // One expert per token, also where loads tie.
            let best: Tensor<2> = load.argmax(1).reshape([tokens]).one_hot(experts).float();
            let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-6);
            let unit = x / norm;
            let sums = best.clone().transpose().matmul(unit); // [E, H]
            let counts = best.sum_dim(0).transpose().clamp_min(1.0); // [E, 1]
            (sums / counts).transpose()
        }
    })
}
