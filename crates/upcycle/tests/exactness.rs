//! What each conversion method promises about the converted model: upcycling and full splits
//! reproduce the dense model, splits partition the neurons, PESC and LoRA experts start as the
//! dense model, `plain_experts` folds everything export needs, and exported checkpoints reload
//! with the same logits.

mod common;

use burn::module::Param;
use burn::tensor::Device;
use common::*;
use moekit_llama::{
    Checkpoint, ExportFormat, FfnSlot, Llama, LlamaError, SaveDtype, save_pretrained,
};
use moekit_moe::{
    Activation, ExpertInput, Experts, FeedForward, FeedForwardConfig, MoeLayer, Selection,
};
use moekit_testing::{assert_close_msg, device, normal, values};
use moekit_upcycle::{
    ActivationStore, ConvertConfig, Method, RouterInit, SplitStrategy, convert, convert_ffn,
};

const STRATEGIES: [SplitStrategy; 4] = [
    SplitStrategy::Random,
    SplitStrategy::Cluster,
    SplitStrategy::Coactivation,
    SplitStrategy::Importance,
];

fn split(strategy: SplitStrategy, experts: usize, k: usize) -> ConvertConfig {
    ConvertConfig::new(Method::Split { strategy }, experts, k)
}

fn run(model: &Llama, config: &ConvertConfig, store: Option<&ActivationStore>) -> Llama {
    let mut calls = 0;
    let out = convert(model.clone(), config, store, &mut |done, total| {
        calls += 1;
        assert_eq!((done, total), (calls, model.layers.len()));
    })
    .unwrap();
    assert_eq!(calls, model.layers.len(), "progress once per layer");
    for l in 0..out.layers.len() {
        assert!(matches!(out.layers[l].ffn, FfnSlot::Moe(_)), "layer {l}");
    }
    out
}

fn full_bank(moe: &MoeLayer) -> &moekit_moe::ExpertBank {
    moe.experts.full().expect("a full expert bank")
}

#[test]
fn upcycling_without_noise_reproduces_the_dense_model() {
    let device = device(1);
    let model = tiny(&device);
    let dense = logits(&model, &device);
    for (e, k) in [(4, 2), (4, 1), (8, 3)] {
        let config = ConvertConfig::new(Method::Upcycle { noise: 0.0 }, e, k).with_seed(3);
        let moe = run(&model, &config, None);
        assert_vec_close(&logits(&moe, &device), &dense, 1e-5, &format!("E{e} k{k}"));
        let m = common::moe(&moe, 0);
        assert_eq!(m.experts.num_experts(), e);
        assert_eq!(
            m.router.selection,
            Selection::TopK {
                k,
                renormalize: true
            }
        );
        assert_eq!(m.output_scale, 1.0);
    }
    // Without renormalisation the top-k weights sum to less than 1: not the dense model.
    let config =
        ConvertConfig::new(Method::Upcycle { noise: 0.0 }, 4, 2).with_renormalize(Some(false));
    let moe = run(&model, &config, None);
    assert!(max_diff(&logits(&moe, &device), &dense) > 1e-3);
}

#[test]
fn upcycling_noise_perturbs_every_copy_by_the_relative_amount() {
    let device = device(2);
    let model = tiny(&device);
    let dense = logits(&model, &device);
    let noise = 0.1;
    let config = ConvertConfig::new(Method::Upcycle { noise }, 4, 2).with_seed(5);
    let moe = run(&model, &config, None);
    assert!(
        max_diff(&logits(&moe, &device), &dense) > 1e-4,
        "noise changed nothing"
    );
    for l in 0..2 {
        let ffn = dense_ffn(&model, l);
        let bank = full_bank(common::moe(&moe, l));
        for (w, d) in [
            (bank.w_in.val(), ffn.w_in.val()),
            (bank.w_out.val(), ffn.w_out.val()),
        ] {
            let d = values(d);
            let norm = d.iter().map(|v| v * v).sum::<f32>().sqrt();
            let copies: Vec<Vec<f32>> = (0..4).map(|e| slice(&w, e).data).collect();
            for (e, c) in copies.iter().enumerate() {
                let rel = c
                    .iter()
                    .zip(&d)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f32>()
                    .sqrt()
                    / norm;
                assert!(
                    (0.05..0.2).contains(&rel),
                    "layer {l} expert {e}: relative perturbation {rel}, expected ~{noise}"
                );
            }
            for (a, x) in copies.iter().enumerate() {
                for (b, y) in copies.iter().enumerate().skip(a + 1) {
                    assert!(max_diff(x, y) > 1e-4, "experts {a} and {b} equal");
                }
            }
        }
    }
    // The same seed gives the same model, another seed another one.
    let again = run(&model, &config, None);
    assert_eq!(logits(&again, &device), logits(&moe, &device));
    let other = run(&model, &config.clone().with_seed(6), None);
    assert_ne!(logits(&other, &device), logits(&moe, &device));
}

#[test]
fn every_split_with_all_experts_active_reproduces_the_dense_model() {
    let device = device(3);
    let model = tiny(&device);
    let store = record(&model, 4);
    let dense = logits(&model, &device);
    for strategy in STRATEGIES {
        for renormalize in [None, Some(false)] {
            let config = split(strategy, 4, 4)
                .with_router_init(RouterInit::Uniform)
                .with_renormalize(renormalize)
                .with_seed(9);
            let moe = run(&model, &config, Some(&store));
            let what = format!("{strategy:?} renormalize {renormalize:?}");
            assert_vec_close(&logits(&moe, &device), &dense, 1e-4, &what);
            let m = common::moe(&moe, 1);
            assert_eq!(m.output_scale, 4.0, "{what}");
            assert_eq!(m.experts.intermediate_size(), INTERMEDIATE / 4);
            assert!(m.shared.is_none());
        }
    }
    // Eight experts of eight neurons.
    let config = split(SplitStrategy::Random, 8, 8).with_router_init(RouterInit::Uniform);
    assert_vec_close(
        &logits(&run(&model, &config, None), &device),
        &dense,
        1e-4,
        "E8",
    );
    // With fewer experts per token than parts the split is no longer the dense model.
    let config = split(SplitStrategy::Random, 4, 2).with_router_init(RouterInit::Uniform);
    assert!(max_diff(&logits(&run(&model, &config, None), &device), &dense) > 1e-3);
}

/// Mean `|a_j|` per neuron over the tokens `x` (naive host arithmetic).
fn host_importance(x: &Mat, ffn: &FeedForward) -> Vec<f32> {
    let acts = swiglu_acts(x, &Mat::of(ffn.w_in.val()));
    let i = ffn.intermediate_size();
    (0..i)
        .map(|j| acts.iter().map(|a| a[j].abs()).sum::<f32>() / acts.len() as f32)
        .collect()
}

#[test]
fn shared_expert_splits_reproduce_the_dense_model_and_share_the_most_active_neurons() {
    let device = device(4);
    let model = tiny(&device);
    let store = record(&model, 4);
    let dense = logits(&model, &device);
    for (strategy, e, s) in [
        (SplitStrategy::Importance, 4, 1),
        (SplitStrategy::Random, 4, 2),
        (SplitStrategy::Cluster, 8, 2),
        (SplitStrategy::Coactivation, 4, 1),
    ] {
        let what = format!("{strategy:?} E{e} S{s}");
        let config = split(strategy, e, e - s)
            .with_shared_experts(s)
            .with_router_init(RouterInit::Uniform);
        let moe = run(&model, &config, Some(&store));
        assert_vec_close(&logits(&moe, &device), &dense, 1e-4, &what);
        for l in 0..2 {
            let m = common::moe(&moe, l);
            let part = INTERMEDIATE / e;
            assert_eq!(m.experts.num_experts(), e - s, "{what}");
            assert_eq!(m.output_scale, (e - s) as f64, "{what}");
            let shared = m.shared.as_ref().expect("a shared expert");
            assert!(shared.gate.is_none());
            assert_eq!(shared.ffn.intermediate_size(), s * part, "{what}");
            // The shared neurons are the most important ones on the calibration tokens.
            let ffn = dense_ffn(&model, l);
            let (x, _) = store.layer(l, &device).unwrap();
            let importance = host_importance(&Mat::of(x), &ffn);
            let w_in = shared.ffn.w_in.val().unsqueeze_dim::<3>(0);
            let w_out = shared.ffn.w_out.val().unsqueeze_dim::<3>(0);
            let ids = &expert_neurons(&ffn, &w_in, &w_out)[0];
            let min_shared = ids.iter().map(|&j| importance[j]).fold(f32::MAX, f32::min);
            let max_rest = (0..INTERMEDIATE)
                .filter(|j| !ids.contains(j))
                .map(|j| importance[j])
                .fold(f32::MIN, f32::max);
            assert!(
                min_shared >= max_rest * (1.0 - 1e-4),
                "{what} layer {l}: shared neuron importance {min_shared} < routed {max_rest}"
            );
        }
    }
}

#[test]
fn split_experts_together_use_every_neuron_exactly_once() {
    let device = device(5);
    let model = tiny(&device);
    let store = record(&model, 4);
    let x = normal([13, HIDDEN], 1.0, &device);
    for (strategy, e, s) in [
        (SplitStrategy::Random, 4, 0),
        (SplitStrategy::Cluster, 8, 0),
        (SplitStrategy::Coactivation, 4, 0),
        (SplitStrategy::Importance, 4, 0),
        (SplitStrategy::Importance, 4, 1),
        (SplitStrategy::Cluster, 4, 2),
    ] {
        let what = format!("{strategy:?} E{e} S{s}");
        let config = split(strategy, e, 1).with_shared_experts(s).with_seed(1);
        let moe = run(&model, &config, Some(&store));
        for l in 0..2 {
            let ffn = dense_ffn(&model, l);
            let m = common::moe(&moe, l);
            let bank = full_bank(m);
            let mut groups = expert_neurons(&ffn, &bank.w_in.val(), &bank.w_out.val());
            if let Some(shared) = &m.shared {
                let w_in = shared.ffn.w_in.val().unsqueeze_dim::<3>(0);
                let w_out = shared.ffn.w_out.val().unsqueeze_dim::<3>(0);
                groups.extend(expert_neurons(&ffn, &w_in, &w_out));
            }
            let mut all: Vec<usize> = groups.concat();
            all.sort_unstable();
            assert_eq!(
                all,
                (0..INTERMEDIATE).collect::<Vec<_>>(),
                "{what} layer {l}"
            );
            // Functionally: every expert with weight 1 (plus the shared one) is the dense FFN.
            let mut sum = bank.forward_all(x.clone()).sum_dim(0).reshape([13, HIDDEN]);
            if let Some(shared) = &m.shared {
                sum = sum + shared.forward(x.clone());
            }
            assert_close_msg(sum, ffn.forward(x.clone()), 1e-4, 1e-5, &what);
        }
        // Different layers are split differently (per-layer seeds / statistics).
        if strategy == SplitStrategy::Random {
            let a = expert_neurons(
                &dense_ffn(&model, 0),
                &full_bank(common::moe(&moe, 0)).w_in.val(),
                &full_bank(common::moe(&moe, 0)).w_out.val(),
            );
            let b = expert_neurons(
                &dense_ffn(&model, 1),
                &full_bank(common::moe(&moe, 1)).w_in.val(),
                &full_bank(common::moe(&moe, 1)).w_out.val(),
            );
            assert_ne!(a, b, "both layers split alike");
        }
    }
}

/// Sets every zero-initialised factor of `model`'s MoE layers to random values.
fn randomise_zero_factors(model: &mut Llama, device: &Device) {
    for layer in &mut model.layers {
        let FfnSlot::Moe(m) = &mut layer.ffn else {
            panic!("not converted")
        };
        match &mut m.experts {
            Experts::Full(bank) => {
                bank.w_out = Param::from_tensor(normal(bank.w_out.dims(), 0.3, device))
            }
            Experts::LowRank(bank) => {
                bank.out_b = Param::from_tensor(normal(bank.out_b.dims(), 0.3, device))
            }
        }
    }
}

#[test]
fn pesc_and_lora_experts_start_as_the_dense_model() {
    let device = device(6);
    let model = tiny(&device);
    let dense = logits(&model, &device);
    let methods = [
        Method::Pesc {
            bottleneck: 4,
            activation: Activation::Identity,
        },
        Method::Pesc {
            bottleneck: 4,
            activation: Activation::Gelu,
        },
        Method::Pesc {
            bottleneck: 3,
            activation: Activation::SwiGlu,
        },
        Method::LoraExperts {
            rank: 4,
            intermediate_size: None,
            alpha: 2.0,
        },
        Method::LoraExperts {
            rank: 2,
            intermediate_size: Some(16),
            alpha: 0.5,
        },
    ];
    for method in methods {
        let what = format!("{method:?}");
        let config = ConvertConfig::new(method.clone(), 4, 2).with_seed(2);
        let mut moe = run(&model, &config, None);
        assert_vec_close(&logits(&moe, &device), &dense, 1e-5, &what);
        let m = common::moe(&moe, 0);
        assert!(
            m.shared.is_some(),
            "{what}: the dense FFN is kept as shared expert"
        );
        match method {
            Method::Pesc { .. } => {
                assert_eq!(m.expert_input, ExpertInput::SharedOutput);
                assert_eq!(m.output_scale, 1.0);
            }
            Method::LoraExperts { alpha, .. } => {
                assert_eq!(m.expert_input, ExpertInput::Hidden);
                assert_eq!(m.output_scale, alpha);
                // LoRA experts use the raw probabilities.
                assert_eq!(
                    m.router.selection,
                    Selection::TopK {
                        k: 2,
                        renormalize: false
                    }
                );
            }
            _ => unreachable!(),
        }
        randomise_zero_factors(&mut moe, &device);
        assert!(
            max_diff(&logits(&moe, &device), &dense) > 1e-3,
            "{what}: random adapters change nothing"
        );
    }
}

/// `layer` with its routed experts replaced by `plain_experts()`, scale 1 and hidden input.
fn plain(layer: &MoeLayer) -> MoeLayer {
    MoeLayer {
        experts: Experts::Full(layer.plain_experts().unwrap()),
        output_scale: 1.0,
        expert_input: ExpertInput::Hidden,
        ..layer.clone()
    }
}

fn randomise_layer(m: &mut MoeLayer, device: &Device) {
    match &mut m.experts {
        Experts::Full(bank) => {
            bank.w_out = Param::from_tensor(normal(bank.w_out.dims(), 0.3, device))
        }
        Experts::LowRank(bank) => {
            bank.out_b = Param::from_tensor(normal(bank.out_b.dims(), 0.3, device))
        }
    }
}

#[test]
fn plain_experts_fold_scales_adapters_and_low_rank_experts() {
    let device = device(7);
    let ffn = FeedForwardConfig::new(HIDDEN, INTERMEDIATE)
        .init(&device)
        .unwrap();
    let calib = normal([40, HIDDEN], 1.0, &device);
    let x = normal([2, 7, HIDDEN], 1.0, &device);
    let cases: Vec<(ConvertConfig, bool)> = vec![
        (split(SplitStrategy::Random, 4, 2), false),
        (
            split(SplitStrategy::Cluster, 4, 1).with_renormalize(Some(false)),
            false,
        ),
        (
            split(SplitStrategy::Importance, 4, 2)
                .with_shared_experts(1)
                .with_output_scale(Some(0.6)),
            false,
        ),
        (
            ConvertConfig::new(Method::Upcycle { noise: 0.2 }, 4, 2).with_output_scale(Some(0.7)),
            false,
        ),
        (
            ConvertConfig::new(
                Method::Pesc {
                    bottleneck: 5,
                    activation: Activation::Identity,
                },
                4,
                2,
            ),
            true,
        ),
        (
            ConvertConfig::new(
                Method::Pesc {
                    bottleneck: 5,
                    activation: Activation::Identity,
                },
                4,
                1,
            )
            .with_output_scale(Some(1.5)),
            true,
        ),
        (
            ConvertConfig::new(
                Method::LoraExperts {
                    rank: 3,
                    intermediate_size: Some(24),
                    alpha: 0.5,
                },
                4,
                2,
            ),
            true,
        ),
    ];
    for (config, randomise) in cases {
        let what = format!("{:?} scale {:?}", config.method, config.output_scale);
        let mut layer = convert_ffn(&ffn, &config, Some(calib.clone()), 11).unwrap();
        if randomise {
            randomise_layer(&mut layer, &device);
        }
        let want = layer.forward(x.clone()).unwrap().output;
        // The routed part is not zero, so folding is actually tested.
        let shared = layer
            .shared
            .as_ref()
            .map(|s| s.forward(x.clone().reshape([14, HIDDEN])));
        let routed = match shared {
            Some(s) => want.clone().reshape([14, HIDDEN]) - s,
            None => want.clone().reshape([14, HIDDEN]),
        };
        let routed_norm = routed.abs().max().into_scalar::<f32>();
        assert!(routed_norm > 1e-2, "{what}: routed output {routed_norm}");
        let folded = plain(&layer);
        assert_eq!(folded.experts.activation(), Activation::SwiGlu, "{what}");
        let got = folded.forward(x.clone()).unwrap().output;
        assert_close_msg(got, want, 1e-4, 1e-5, &what);
    }
    // Non-linear adapters on the shared output cannot be folded.
    for activation in [Activation::Gelu, Activation::Relu, Activation::SwiGlu] {
        let config = ConvertConfig::new(
            Method::Pesc {
                bottleneck: 4,
                activation,
            },
            4,
            2,
        );
        let layer = convert_ffn(&ffn, &config, None, 1).unwrap();
        assert!(
            layer.plain_experts().is_err(),
            "{activation:?} adapters folded"
        );
    }
}

fn reload(dir: &std::path::Path, device: &Device) -> Llama {
    Checkpoint::open(dir)
        .unwrap()
        .load(device, &mut |_, _| {})
        .unwrap()
}

#[test]
fn exported_conversions_reload_with_the_same_logits() {
    let device = device(8);
    let model = tiny(&device);
    let store = record(&model, 3);
    let split_random = split(SplitStrategy::Random, 4, 2).with_seed(4);
    let split_shared = split(SplitStrategy::Importance, 4, 2).with_shared_experts(1);
    let lora = ConvertConfig::new(
        Method::LoraExperts {
            rank: 3,
            intermediate_size: Some(16),
            alpha: 1.5,
        },
        4,
        2,
    );
    let pesc = ConvertConfig::new(
        Method::Pesc {
            bottleneck: 4,
            activation: Activation::Identity,
        },
        3,
        2,
    );
    let cases = [
        (&split_random, ExportFormat::Qwen2Moe, false),
        (&split_random, ExportFormat::Mixtral, false),
        (&split_shared, ExportFormat::Qwen2Moe, false),
        (&lora, ExportFormat::Qwen2Moe, true),
        (&pesc, ExportFormat::Qwen2Moe, true),
    ];
    for (config, format, randomise) in cases {
        let what = format!("{:?} as {format:?}", config.method);
        let mut moe = run(&model, config, Some(&store));
        if randomise {
            randomise_zero_factors(&mut moe, &device);
        }
        let dir = tempfile::tempdir().unwrap();
        let written = save_pretrained(&moe, None, dir.path(), format, SaveDtype::F32)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let back = reload(dir.path(), &device);
        assert_vec_close(&logits(&back, &device), &logits(&moe, &device), 1e-4, &what);
        let m = common::moe(&moe, 0);
        let b = common::moe(&back, 0);
        assert_eq!(b.router.selection, m.router.selection, "{what}");
        assert_eq!(b.experts.num_experts(), config.routed_experts(), "{what}");
        assert_eq!(written.num_experts_per_tok, Some(config.top_k), "{what}");
        if format == ExportFormat::Qwen2Moe {
            assert_eq!(
                written.norm_topk_prob,
                Some(config.renormalized()),
                "{what}"
            );
        }
    }
    // Non-linear PESC adapters have no Hugging Face form: an export error, no file.
    let gelu = ConvertConfig::new(
        Method::Pesc {
            bottleneck: 4,
            activation: Activation::Gelu,
        },
        4,
        2,
    );
    let moe = run(&model, &gelu, None);
    let dir = tempfile::tempdir().unwrap();
    let err = save_pretrained(
        &moe,
        None,
        dir.path(),
        ExportFormat::Qwen2Moe,
        SaveDtype::F32,
    )
    .unwrap_err();
    assert!(matches!(err, LlamaError::Export { .. }), "{err}");
    assert!(!dir.path().join("model.safetensors").exists());
    // A shared expert has no Mixtral form.
    let moe = run(&model, &split_shared, Some(&store));
    let err = save_pretrained(
        &moe,
        None,
        dir.path(),
        ExportFormat::Mixtral,
        SaveDtype::F32,
    )
    .unwrap_err();
    assert!(matches!(err, LlamaError::Export { .. }), "{err}");
}

#[test]
fn a_uniform_router_gives_every_chosen_split_expert_weight_one() {
    // Zero logits: the first k experts are chosen, and the default scale makes each weigh 1,
    // with or without renormalisation.
    let device = device(9);
    let ffn = FeedForwardConfig::new(HIDDEN, INTERMEDIATE)
        .init(&device)
        .unwrap();
    let calib = normal([24, HIDDEN], 1.0, &device);
    let x = normal([3, 5, HIDDEN], 1.0, &device);
    let flat = x.clone().reshape([15, HIDDEN]);
    for (e, s, k) in [(4, 0, 2), (4, 0, 1), (8, 0, 3), (8, 2, 2), (4, 1, 1)] {
        for renormalize in [None, Some(false)] {
            let what = format!("E{e} S{s} k{k} renormalize {renormalize:?}");
            let config = split(SplitStrategy::Random, e, k)
                .with_shared_experts(s)
                .with_renormalize(renormalize)
                .with_router_init(RouterInit::Uniform);
            let layer = convert_ffn(&ffn, &config, Some(calib.clone()), 3).unwrap();
            let bank = full_bank(&layer);
            let mut want = layer
                .shared
                .as_ref()
                .map(|sh| sh.forward(flat.clone()))
                .unwrap_or_else(|| flat.clone().zeros_like());
            for i in 0..k {
                want = want + bank.expert(i).forward(flat.clone());
            }
            let got = layer
                .forward(x.clone())
                .unwrap()
                .output
                .reshape([15, HIDDEN]);
            assert_close_msg(got, want, 1e-4, 1e-5, &what);
        }
    }
}

#[test]
fn lora_adapted_ffns_are_converted_with_their_updates_merged() {
    let device = device(10);
    let base_model = tiny(&device);
    let base = logits(&base_model, &device);
    let mut model = base_model
        .with_lora(
            &moekit_lora::LoraConfig::new(4)
                .with_alpha(8.0)
                .with_target_modules(vec!["gate_proj|up_proj|down_proj|q_proj".into()]),
        )
        .unwrap();
    assert_vec_close(&logits(&model, &device), &base, 1e-6, "fresh adapters");
    let sites: Vec<_> = model
        .adapters()
        .into_iter()
        .map(|(s, a)| (s, a.clone()))
        .collect();
    assert!(sites.len() >= 8);
    for (site, a) in sites {
        let b = normal(a.b.dims(), 0.3, &device);
        let new =
            moekit_lora::LoraAdapter::from_factors(a.a.val(), b, a.alpha, a.use_rslora).unwrap();
        model.set_adapter(site, new).unwrap();
    }
    assert!(matches!(model.layers[0].ffn, FfnSlot::Lora(_)));
    let adapted = logits(&model, &device);
    let merged = logits(&model.clone().merge_lora(), &device);
    assert_vec_close(&merged, &adapted, 1e-4, "merge_lora");
    assert!(
        max_diff(&adapted, &base) > 1e-3,
        "the adapters change nothing"
    );
    for config in [
        ConvertConfig::new(Method::Upcycle { noise: 0.0 }, 4, 2),
        split(SplitStrategy::Cluster, 4, 4).with_router_init(RouterInit::Uniform),
    ] {
        let moe = run(&model, &config, None);
        assert_vec_close(
            &logits(&moe, &device),
            &adapted,
            1e-4,
            &format!("{config:?}"),
        );
    }
}
