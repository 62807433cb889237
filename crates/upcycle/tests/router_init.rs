//! Router initialisation against naive host computations, and the settings conversion refuses.

mod common;

use common::*;
use moekit_llama::FfnSlot;
use moekit_moe::{Activation, FeedForward, FeedForwardConfig, MoeLayer};
use moekit_testing::{device, normal, values};
use moekit_upcycle::{
    ConvertConfig, Method, RouterInit, SplitStrategy, UpcycleError, convert, convert_ffn,
};

fn split(strategy: SplitStrategy, e: usize, k: usize, init: RouterInit) -> ConvertConfig {
    ConvertConfig::new(Method::Split { strategy }, e, k).with_router_init(init)
}

fn ffn(device: &burn::tensor::Device) -> FeedForward {
    FeedForwardConfig::new(HIDDEN, INTERMEDIATE)
        .init(device)
        .unwrap()
}

/// The router gate `[H, E]` as a host matrix.
fn gate(layer: &MoeLayer) -> Mat {
    Mat::of(layer.router.gate.val())
}

/// The dense neurons of every routed expert.
fn groups(ffn: &FeedForward, layer: &MoeLayer) -> Vec<Vec<usize>> {
    let bank = layer.experts.full().unwrap();
    expert_neurons(ffn, &bank.w_in.val(), &bank.w_out.val())
}

#[test]
fn centroid_columns_are_mean_gate_columns_of_each_experts_neurons() {
    let device = device(21);
    let ffn = ffn(&device);
    let calib = normal([30, HIDDEN], 1.0, &device);
    for (strategy, e, s) in [
        (SplitStrategy::Random, 4, 0),
        (SplitStrategy::Cluster, 8, 0),
        (SplitStrategy::Importance, 4, 1),
    ] {
        let config = split(strategy, e, 1, RouterInit::Centroids).with_shared_experts(s);
        let layer = convert_ffn(&ffn, &config, Some(calib.clone()), 3).unwrap();
        let g = gate(&layer);
        assert_eq!((g.rows, g.cols), (HIDDEN, e - s));
        let w_in = Mat::of(ffn.w_in.val());
        for (k, ids) in groups(&ffn, &layer).iter().enumerate() {
            for h in 0..HIDDEN {
                let mean = ids.iter().map(|&j| w_in.at(h, j)).sum::<f32>() / ids.len() as f32;
                let got = g.at(h, k);
                assert!(
                    (got - mean).abs() <= 1e-5,
                    "{strategy:?} expert {k} row {h}: {got} vs {mean}"
                );
            }
        }
    }
}

/// Column `e`: the mean unit-normalised input of the tokens whose neurons in expert `e` carry
/// the most activation mass (naive host arithmetic).
fn host_hidden_states(x: &Mat, ffn: &FeedForward, groups: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let acts = swiglu_acts(x, &Mat::of(ffn.w_in.val()));
    let e = groups.len();
    let mut sums = vec![vec![0f32; x.cols]; e];
    let mut counts = vec![0usize; e];
    for (t, a) in acts.iter().enumerate() {
        let load: Vec<f32> = groups
            .iter()
            .map(|g| g.iter().map(|&j| a[j].abs()).sum())
            .collect();
        let best = (0..e).max_by(|&p, &q| load[p].total_cmp(&load[q])).unwrap();
        let norm = x.row(t).iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        for (s, v) in sums[best].iter_mut().zip(x.row(t)) {
            *s += v / norm;
        }
        counts[best] += 1;
    }
    sums.into_iter()
        .zip(counts)
        .map(|(s, c)| s.into_iter().map(|v| v / c.max(1) as f32).collect())
        .collect()
}

#[test]
fn hidden_state_columns_are_mean_normalised_inputs_of_the_tokens_each_expert_loads_most() {
    let device = device(22);
    let ffn = ffn(&device);
    let x = normal([60, HIDDEN], 1.5, &device);
    let xm = Mat::of(x.clone());
    for (strategy, e, s) in [
        (SplitStrategy::Random, 4, 0),
        (SplitStrategy::Coactivation, 4, 0),
        (SplitStrategy::Importance, 8, 2),
    ] {
        let config = split(strategy, e, 2, RouterInit::HiddenStates).with_shared_experts(s);
        let layer = convert_ffn(&ffn, &config, Some(x.clone()), 5).unwrap();
        let g = gate(&layer);
        let groups = groups(&ffn, &layer);
        let want = host_hidden_states(&xm, &ffn, &groups);
        let mut used = 0;
        for (k, col) in want.iter().enumerate() {
            used += usize::from(col.iter().any(|&v| v != 0.0));
            for (h, &want) in col.iter().enumerate() {
                assert!(
                    (g.at(h, k) - want).abs() <= 1e-4,
                    "{strategy:?} expert {k} row {h}: {} vs {want}",
                    g.at(h, k),
                );
            }
        }
        assert!(
            used >= 2,
            "{strategy:?}: only {used} experts are ever loaded most"
        );
    }
}

#[test]
fn random_router_init_is_seeded_and_uniform_is_zero() {
    let device = device(23);
    let ffn = ffn(&device);
    let config = split(SplitStrategy::Random, 4, 2, RouterInit::Random);
    let a = values(
        convert_ffn(&ffn, &config, None, 7)
            .unwrap()
            .router
            .gate
            .val(),
    );
    let b = values(
        convert_ffn(&ffn, &config, None, 7)
            .unwrap()
            .router
            .gate
            .val(),
    );
    let c = values(
        convert_ffn(&ffn, &config, None, 8)
            .unwrap()
            .router
            .gate
            .val(),
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    assert!(
        (0.012..0.028).contains(&std),
        "router std {std}, expected 0.02"
    );
    // Every method gets a seeded random router.
    let up = ConvertConfig::new(Method::Upcycle { noise: 0.0 }, 4, 2);
    let u1 = values(convert_ffn(&ffn, &up, None, 7).unwrap().router.gate.val());
    let u2 = values(convert_ffn(&ffn, &up, None, 7).unwrap().router.gate.val());
    assert_eq!(u1, u2);

    let uniform = split(SplitStrategy::Random, 4, 2, RouterInit::Uniform);
    let z = values(
        convert_ffn(&ffn, &uniform, None, 7)
            .unwrap()
            .router
            .gate
            .val(),
    );
    assert!(z.iter().all(|&v| v == 0.0));
    // Whole models: the same seed, the same model.
    let model = tiny(&device);
    let config = config.with_seed(42);
    let m1 = convert(model.clone(), &config, None, &mut |_, _| {}).unwrap();
    let m2 = convert(model.clone(), &config, None, &mut |_, _| {}).unwrap();
    assert_eq!(logits(&m1, &device), logits(&m2, &device));
}

#[track_caller]
fn refused(config: ConvertConfig, calib: bool) -> UpcycleError {
    let device = device(24);
    let ffn = ffn(&device);
    let inputs = calib.then(|| normal([20, HIDDEN], 1.0, &device));
    match convert_ffn(&ffn, &config, inputs, 0) {
        Ok(_) => panic!("{config:?} was accepted"),
        Err(e) => e,
    }
}

#[track_caller]
fn config_error(config: ConvertConfig, calib: bool) {
    let err = refused(config, calib);
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");
    assert!(!err.to_string().is_empty());
}

#[test]
fn inconsistent_settings_are_errors_not_panics() {
    let upcycle = Method::Upcycle { noise: 0.0 };
    let random = Method::Split {
        strategy: SplitStrategy::Random,
    };
    // Centroids and hidden states need experts made of neurons.
    for init in [RouterInit::Centroids, RouterInit::HiddenStates] {
        config_error(
            ConvertConfig::new(upcycle.clone(), 4, 2).with_router_init(init),
            true,
        );
        config_error(
            ConvertConfig::new(
                Method::LoraExperts {
                    rank: 2,
                    intermediate_size: None,
                    alpha: 1.0,
                },
                4,
                2,
            )
            .with_router_init(init),
            true,
        );
    }
    // Hidden-state init, the calibration strategies and shared experts need calibration.
    for config in [
        ConvertConfig::new(random.clone(), 4, 2).with_router_init(RouterInit::HiddenStates),
        ConvertConfig::new(random.clone(), 4, 2).with_shared_experts(1),
        ConvertConfig::new(
            Method::Split {
                strategy: SplitStrategy::Coactivation,
            },
            4,
            2,
        ),
        ConvertConfig::new(
            Method::Split {
                strategy: SplitStrategy::Importance,
            },
            4,
            2,
        ),
    ] {
        assert!(config.needs_calibration());
        let err = refused(config, false);
        assert!(matches!(err, UpcycleError::NeedsCalibration(_)), "{err}");
    }
    // Shared experts come from splitting only.
    config_error(
        ConvertConfig::new(upcycle.clone(), 4, 2).with_shared_experts(1),
        true,
    );
    // Shared experts must leave routed ones, and top-k must fit the routed ones.
    config_error(
        ConvertConfig::new(random.clone(), 4, 1).with_shared_experts(4),
        true,
    );
    config_error(
        ConvertConfig::new(random.clone(), 4, 4).with_shared_experts(1),
        true,
    );
    config_error(ConvertConfig::new(random.clone(), 4, 5), false);
    config_error(ConvertConfig::new(random.clone(), 4, 0), false);
    config_error(ConvertConfig::new(upcycle.clone(), 0, 1), false);
    config_error(ConvertConfig::new(upcycle.clone(), 2, 3), false);
    // 64 neurons do not split into 5 or 128 parts.
    config_error(ConvertConfig::new(random.clone(), 5, 1), false);
    config_error(ConvertConfig::new(random.clone(), 128, 1), false);
    // Out-of-range method parameters.
    for noise in [-0.1, f64::NAN, f64::INFINITY] {
        config_error(ConvertConfig::new(Method::Upcycle { noise }, 4, 2), false);
    }
    config_error(
        ConvertConfig::new(
            Method::Pesc {
                bottleneck: 0,
                activation: Activation::Identity,
            },
            4,
            2,
        ),
        false,
    );
    for (rank, intermediate_size, alpha) in [(0, None, 1.0), (2, None, f64::NAN), (2, Some(0), 1.0)]
    {
        config_error(
            ConvertConfig::new(
                Method::LoraExperts {
                    rank,
                    intermediate_size,
                    alpha,
                },
                4,
                2,
            ),
            false,
        );
    }
    config_error(
        ConvertConfig::new(random.clone(), 4, 2).with_output_scale(Some(f64::NAN)),
        false,
    );

    // Whole models: missing calibration, and converting twice.
    let device = device(25);
    let model = tiny(&device);
    let needs = ConvertConfig::new(random.clone(), 4, 2).with_shared_experts(1);
    let err = convert(model.clone(), &needs, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, UpcycleError::NeedsCalibration(_)), "{err}");
    let bad = ConvertConfig::new(random.clone(), 3, 1);
    let err = convert(model.clone(), &bad, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");
    let ok = ConvertConfig::new(random, 4, 2);
    let once = convert(model, &ok, None, &mut |_, _| {}).unwrap();
    assert!(once.layers.iter().all(|l| matches!(l.ffn, FfnSlot::Moe(_))));
    let err = convert(once, &ok, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");
}

#[test]
fn calibration_of_another_width_is_an_error_not_a_panic() {
    let device = device(26);
    let ffn = ffn(&device);
    let config = split(SplitStrategy::Importance, 4, 2, RouterInit::HiddenStates);
    let narrow = normal([20, HIDDEN / 2], 1.0, &device);
    let err = convert_ffn(&ffn, &config, Some(narrow), 0).unwrap_err();
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");
    // A whole model with a recording of a narrower model.
    let model = tiny(&device);
    let other = moekit_llama::LlamaConfig::llama(VOCAB, HIDDEN / 2, INTERMEDIATE, 2, 4, 2)
        .init(&device)
        .unwrap();
    let store = record(&other, 2);
    let err = convert(model, &config, Some(&store), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");
}

#[test]
fn a_factored_router_starts_from_the_best_rank_r_approximation_of_its_init() {
    let device = device(29);
    let ffn = ffn(&device);
    let calib = normal([30, HIDDEN], 1.0, &device);
    let e = 8;
    for init in [
        RouterInit::Centroids,
        RouterInit::HiddenStates,
        RouterInit::Random,
    ] {
        let config = split(SplitStrategy::Cluster, e, 2, init);
        let full = convert_ffn(&ffn, &config, Some(calib.clone()), 5).unwrap();
        let rank = 2;
        let factored = convert_ffn(
            &ffn,
            &config.clone().with_router_rank(Some(rank)),
            Some(calib.clone()),
            5,
        )
        .unwrap();
        assert_eq!(factored.router.rank(), Some(rank), "{init:?}");
        // The same partition and full initialisation, factored: its product is the truncated
        // SVD of the full gate.
        assert_eq!(groups(&ffn, &full), groups(&ffn, &factored), "{init:?}");
        let (down, up) = moekit_moe::low_rank_factors(full.router.weight(), rank).unwrap();
        let want = values(down.matmul(up));
        let got = values(factored.router.weight());
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * scale, "{init:?}: {g} vs {w}");
        }
    }
    // A rank the layer cannot use is refused with the layer's sizes in the message.
    let config = split(SplitStrategy::Random, e, 2, RouterInit::Random).with_router_rank(Some(e));
    let message = convert_ffn(&ffn, &config, None, 5).unwrap_err().to_string();
    assert!(message.contains("router rank 8"), "{message}");
}
