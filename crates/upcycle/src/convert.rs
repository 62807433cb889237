//! Turning dense FFNs into MoE layers.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use moekit_llama::{FfnSlot, Llama};
use moekit_moe::{
    ExpertBank, ExpertInput, Experts, FeedForward, LowRankBank, MoeLayer, RouterConfig, Selection,
    SharedExpert,
};

use crate::config::{ConvertConfig, Method, SplitStrategy};
use crate::error::{Result, UpcycleError};
use crate::partition::{self, SplitMix64};
use crate::profile::{NeuronProfile, profile};
use crate::record::ActivationStore;
use crate::router_init::router_gate;
use crate::split;

/// Calibration tokens per layer used for neuron profiles and hidden-state router init.
pub const PROFILE_TOKENS: usize = 16_384;

/// Lloyd iterations of the balanced k-means of [`SplitStrategy::Cluster`].
const KMEANS_ITERS: usize = 25;

/// The seed of layer `layer`'s random choices.
pub(crate) fn layer_seed(seed: u64, layer: usize) -> u64 {
    seed ^ (layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn host_tensor<const D: usize>(data: Vec<f32>, shape: [usize; D], like: &Tensor<2>) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), &like.device())
}

/// Converts one dense FFN into a MoE layer as `config` says.
///
/// `inputs` `[T, H]` are calibration tokens at the FFN's input (needed by the co-activation
/// and importance splits, shared experts and hidden-state router init; see
/// [`ConvertConfig::needs_calibration`]). The same `seed` gives the same layer.
pub fn convert_ffn(
    ffn: &FeedForward,
    config: &ConvertConfig,
    inputs: Option<Tensor<2>>,
    seed: u64,
) -> Result<MoeLayer> {
    config.validate(ffn.hidden_size(), ffn.intermediate_size())?;
    if config.needs_calibration() && inputs.is_none() {
        return Err(UpcycleError::NeedsCalibration(
            "this split strategy, shared experts or hidden-state router init",
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let (h, i) = (ffn.hidden_size(), ffn.intermediate_size());
    if let Some(x) = &inputs
        && x.dims()[1] != h
    {
        return Err(UpcycleError::Config(format!(
            "calibration inputs of width {} do not fit an FFN of width {h} (recorded for another model?)",
            x.dims()[1]
        )));
    }
    let routed = config.routed_experts();
    let w = ffn.w_in.val();
    let mut groups = None;
    let (experts, shared, input, default_scale): (Experts, _, _, f64) = match &config.method {
        Method::Upcycle { noise } => {
            let bank = ExpertBank::replicate(ffn, routed)?;
            let bank = if *noise > 0.0 {
                let jitter = |t: Tensor<3>, rng: &mut SplitMix64| {
                    let std = t.clone().var(2).mean().sqrt().into_scalar::<f32>() as f64;
                    let dims = t.dims();
                    let n = dims.iter().product();
                    t + host_tensor(rng.normals(n, noise * std), dims, &w)
                };
                let w_in = jitter(bank.w_in.val(), &mut rng);
                let w_out = jitter(bank.w_out.val(), &mut rng);
                ExpertBank::from_weights(w_in, w_out, ffn.activation)?
            } else {
                bank
            };
            (bank.into(), None, ExpertInput::Hidden, 1.0)
        }
        Method::Split { strategy } => {
            let coactivation = matches!(strategy, SplitStrategy::Coactivation);
            let profile = inputs.clone().map(|x| profile(ffn, x, coactivation));
            let (shared_ids, parts) =
                split_neurons(ffn, *strategy, config, profile.as_ref(), seed)?;
            let shared = (!shared_ids.is_empty())
                .then(|| split::sub_ffn(ffn, &shared_ids))
                .transpose()?
                .map(|ffn| SharedExpert { ffn, gate: None });
            let bank = split::bank(ffn, &parts)?;
            groups = Some(parts);
            let scale = if config.renormalized() {
                config.top_k
            } else {
                routed
            };
            (bank.into(), shared, ExpertInput::Hidden, scale as f64)
        }
        Method::Pesc {
            bottleneck,
            activation,
        } => {
            let r = *bottleneck;
            // A gated adapter (SwiGLU) projects to `[gate | up]`, `2r` columns.
            let width = activation.in_width(r);
            let down = host_tensor(
                rng.normals(routed * h * width, 1.0 / (h as f64).sqrt()),
                [routed, h, width],
                &w,
            );
            let up = Tensor::zeros([routed, r, h], &w.device());
            let adapters = ExpertBank::from_weights(down, up, *activation)?;
            (
                adapters.into(),
                Some(frozen(ffn)),
                ExpertInput::SharedOutput,
                1.0,
            )
        }
        Method::LoraExperts {
            rank,
            intermediate_size,
            alpha,
        } => {
            let (r, m) = (*rank, intermediate_size.unwrap_or(i));
            let width = ffn.activation.in_width(m);
            let mut factor = |shape: [usize; 3], fan_in: usize| {
                let n = shape.iter().product();
                Param::from_tensor(host_tensor(
                    rng.normals(n, 1.0 / (fan_in as f64).sqrt()),
                    shape,
                    &w,
                ))
            };
            let bank = LowRankBank {
                in_a: factor([routed, h, r], h),
                in_b: factor([routed, r, width], r),
                out_a: factor([routed, m, r], m),
                out_b: Param::from_tensor(Tensor::zeros([routed, r, h], &w.device())),
                activation: ffn.activation,
            };
            (bank.into(), Some(frozen(ffn)), ExpertInput::Hidden, *alpha)
        }
    };
    let routed_inputs = inputs.map(|x| {
        let n = x.dims()[0].min(PROFILE_TOKENS);
        x.narrow(0, 0, n)
    });
    let router = RouterConfig::new(h, routed)
        .with_selection(Selection::TopK {
            k: config.top_k,
            renormalize: config.renormalized(),
        })
        .with_rank(config.router_rank)
        .with_combine_temperature(config.combine_temperature)
        .init(&w.device())?
        .with_weight(router_gate(
            config.router_init,
            ffn,
            routed,
            groups.as_deref(),
            routed_inputs,
            &mut rng,
        )?)?;
    Ok(MoeLayer::from_parts(router, experts, shared)?
        .with_output_scale(config.output_scale.unwrap_or(default_scale))?
        .with_expert_input(input)?)
}

/// The dense FFN as a frozen, ungated shared expert (PESC, LoRA experts).
fn frozen(ffn: &FeedForward) -> SharedExpert {
    moekit_lora::freeze(SharedExpert {
        ffn: ffn.clone(),
        gate: None,
    })
}

/// The shared neurons and the routed experts' neurons of a split.
fn split_neurons(
    ffn: &FeedForward,
    strategy: SplitStrategy,
    config: &ConvertConfig,
    profile: Option<&NeuronProfile>,
    seed: u64,
) -> Result<(Vec<usize>, Vec<Vec<usize>>)> {
    let i = ffn.intermediate_size();
    let part = i / config.num_experts;
    let routed = config.routed_experts();
    let need = |what| profile.ok_or(UpcycleError::NeedsCalibration(what));
    let (shared, rest) = if config.shared_experts > 0 {
        partition::by_importance(
            &need("shared experts")?.importance,
            config.shared_experts * part,
        )
    } else {
        (Vec::new(), (0..i).collect())
    };
    let local = match strategy {
        SplitStrategy::Random => partition::random(rest.len(), routed, seed),
        SplitStrategy::Cluster => {
            let features = neuron_features(ffn, &rest);
            partition::balanced_kmeans(
                &features,
                features.len() / rest.len(),
                routed,
                KMEANS_ITERS,
                seed,
            )
            .0
        }
        SplitStrategy::Coactivation => {
            let what = "the co-activation split";
            let p = need(what)?;
            let (all, rate) = p
                .coactivation
                .as_deref()
                .zip(p.firing_rate())
                .ok_or(UpcycleError::NeedsCalibration(what))?;
            let co: Vec<f32> = rest
                .iter()
                .flat_map(|&a| rest.iter().map(move |&b| all[a * i + b]))
                .collect();
            let activity: Vec<f32> = rest.iter().map(|&a| rate[a]).collect();
            partition::coactivation(&co, &activity, routed)
        }
        SplitStrategy::Importance => {
            let p = need("the importance split")?;
            let importance: Vec<f32> = rest.iter().map(|&a| p.importance[a]).collect();
            partition::importance_order(&importance)
                .chunks(part)
                .map(<[usize]>::to_vec)
                .collect()
        }
    };
    let parts = local
        .into_iter()
        .map(|g| {
            let mut ids: Vec<usize> = g.into_iter().map(|j| rest[j]).collect();
            ids.sort_unstable();
            ids
        })
        .collect();
    Ok((shared, parts))
}

/// Each neuron's unit-normalised input weights (`[gate | up]` columns for a SwiGLU), row-major
/// `[neurons.len(), features]`.
fn neuron_features(ffn: &FeedForward, neurons: &[usize]) -> Vec<f32> {
    let sub = split::sub_ffn(ffn, neurons).expect("neurons come from the FFN");
    let m = neurons.len();
    let w = sub.w_in.val(); // [H, in_width(m)]
    let rows = if ffn.activation.is_gated() {
        Tensor::cat(
            vec![
                w.clone().narrow(1, 0, m).transpose(),
                w.narrow(1, m, m).transpose(),
            ],
            1,
        )
    } else {
        w.transpose()
    };
    let norm = rows.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    (rows / norm)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// Converts every dense FFN of `model` (LoRA-adapted ones with their updates merged) into a
/// MoE layer. `calibration` holds each layer's recorded FFN inputs when the configuration
/// needs them. `progress(done, total)` reports layers.
pub fn convert(
    mut model: Llama,
    config: &ConvertConfig,
    calibration: Option<&ActivationStore>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Llama> {
    if config.needs_calibration() && calibration.is_none() {
        return Err(UpcycleError::NeedsCalibration(
            "this split strategy, shared experts or hidden-state router init",
        ));
    }
    let layers = model.layers.len();
    let device = model.device();
    for (l, layer) in model.layers.iter_mut().enumerate() {
        let ffn = layer
            .ffn
            .dense()
            .ok_or_else(|| UpcycleError::Config(format!("layer {l} is already a MoE layer")))?;
        let inputs = calibration
            .filter(|_| config.needs_calibration())
            .map(|c| c.inputs(l, PROFILE_TOKENS, &device))
            .transpose()?;
        let moe = convert_ffn(&ffn, config, inputs, layer_seed(config.seed, l))?;
        layer.ffn = FfnSlot::Moe(moe);
        progress(l + 1, layers);
    }
    tracing::info!(
        layers,
        method = ?config.method,
        experts = config.num_experts,
        top_k = config.top_k,
        "converted"
    );
    Ok(model)
}
