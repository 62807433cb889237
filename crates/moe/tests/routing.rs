//! Router selection rules, noise, and configuration errors.

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor};
use moekit_moe::{
    Activation, ExpertBank, MoeError, MoeLayerConfig, RouterConfig, RouterNoise, Scoring, Selection,
};
use moekit_testing::{assert_close, device, normal, tensor, values};

fn probs_as_logits(p: &[f32]) -> Vec<f32> {
    p.iter().map(|v| v.ln()).collect()
}

fn kept(selection: Selection, p: &[f32]) -> (usize, Vec<f32>) {
    let device = device(1);
    let r = RouterConfig::new(2, p.len())
        .with_selection(selection)
        .init(&device)
        .unwrap();
    let routing = r.route_logits(tensor(probs_as_logits(p), [1, p.len()], &device));
    let active: Vec<bool> = routing.active.into_data().iter::<bool>().collect();
    (
        active.iter().filter(|a| **a).count(),
        values(routing.weights),
    )
}

#[test]
fn top_p_keeps_experts_until_the_mass_reaches_p() {
    let p = [0.05, 0.5, 0.15, 0.3];
    let top_p = |p_, max_k| Selection::TopP {
        p: p_,
        max_k,
        renormalize: false,
    };
    assert_eq!(kept(top_p(0.45, None), &p).0, 1); // 0.5 covers 0.45
    assert_eq!(kept(top_p(0.75, None), &p).0, 2); // 0.5 < 0.75 <= 0.8
    assert_eq!(kept(top_p(0.85, None), &p).0, 3); // 0.8 < 0.85 <= 0.95
    assert_eq!(kept(top_p(1.0, None), &p).0, 4);
    assert_eq!(kept(top_p(0.85, Some(2)), &p).0, 2); // bounded by max_k
    // Weights are the probabilities themselves, in decreasing order, zero when unused.
    let (_, w) = kept(top_p(0.75, None), &p);
    let want = [0.5, 0.3, 0.0, 0.0];
    assert!(
        w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
        "{w:?}"
    );
    // Renormalised: the kept probabilities over their sum (0.5 + 0.3), also when max_k cuts.
    let renormalized = |p_, max_k| Selection::TopP {
        p: p_,
        max_k,
        renormalize: true,
    };
    let (n, w) = kept(renormalized(0.75, None), &p);
    let want = [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0];
    assert_eq!(n, 2);
    assert!(
        w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
        "{w:?}"
    );
    let (n, w) = kept(renormalized(0.99, Some(1)), &p);
    assert_eq!((n, w.len()), (1, 1));
    assert!((w[0] - 1.0).abs() < 1e-6, "{w:?}");
    // A NaN logit makes every mass NaN: the first slot is still used, so the NaN reaches the
    // output as under top-k, instead of the token silently losing its routed experts.
    let device = device(1);
    let r = RouterConfig::new(2, 4)
        .with_selection(top_p(0.5, None))
        .init(&device)
        .unwrap();
    let routing = r.route_logits(tensor(vec![0.0, f32::NAN, 1.0, 2.0], [1, 4], &device));
    let active: Vec<bool> = routing.active.into_data().iter::<bool>().collect();
    assert!(active[0], "{active:?}");
    assert!(values(routing.weights)[0].is_nan());
}

#[test]
fn top_k_weights_with_and_without_renormalisation() {
    let p = [0.1, 0.4, 0.2, 0.3];
    let (_, w) = kept(
        Selection::TopK {
            k: 2,
            renormalize: true,
        },
        &p,
    );
    assert!(
        (w[0] - 4.0 / 7.0).abs() < 1e-5 && (w[1] - 3.0 / 7.0).abs() < 1e-5,
        "{w:?}"
    );
    let (_, w) = kept(
        Selection::TopK {
            k: 2,
            renormalize: false,
        },
        &p,
    );
    assert!(
        (w[0] - 0.4).abs() < 1e-5 && (w[1] - 0.3).abs() < 1e-5,
        "{w:?}"
    );
}

#[test]
fn sigmoid_scoring_ranks_by_sigmoid_and_normalises_probabilities() {
    let device = device(2);
    let r = RouterConfig::new(2, 3)
        .with_scoring(Scoring::Sigmoid)
        .with_selection(Selection::TopK {
            k: 1,
            renormalize: false,
        })
        .init(&device)
        .unwrap();
    let routing = r.route_logits(tensor(vec![0.0, 2.0, -1.0], [1, 3], &device));
    let s = [
        0.5f32,
        1.0 / (1.0 + (-2f32).exp()),
        1.0 / (1.0 + 1f32.exp()),
    ];
    let sum: f32 = s.iter().sum();
    assert_eq!(
        routing
            .experts
            .into_data()
            .iter::<i64>()
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert!((values(routing.weights)[0] - s[1]).abs() < 1e-6);
    let probs = values(routing.probs);
    assert!(probs.iter().zip(s).all(|(p, s)| (p - s / sum).abs() < 1e-6));
}

#[test]
fn noise_only_while_training_on_an_autodiff_device() {
    for noise in [RouterNoise::Jitter { eps: 0.2 }, RouterNoise::NoisyTopK] {
        let cfg = RouterConfig::new(6, 4).with_noise(noise);
        let eval_device = device(3);
        let mut r = cfg.init(&eval_device).unwrap();
        if r.noise_gate.is_some() {
            // A non-zero noise weight, so that noisy top-k perturbs at all.
            r.noise_gate = Some(Param::from_tensor(normal([6, 4], 1.0, &eval_device)));
        }
        let x = normal([5, 6], 1.0, &eval_device);
        assert_close(r.logits(x.clone()), r.logits(x.clone()), 0.0, 0.0);

        let training = r.clone().train();
        // Both copies of x in one call: one noise draw, so that a parallel test reseeding the
        // shared device cannot make two draws coincide.
        let xt = Tensor::cat(vec![x.clone(), x.clone()], 0).autodiff();
        let noisy = values(training.logits(xt));
        let (a, b) = noisy.split_at(noisy.len() / 2);
        assert!(a != b, "{noise:?} should perturb training logits");

        let validation = training.valid();
        assert_close(validation.logits(x.clone()), validation.logits(x), 0.0, 0.0);
    }
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let device = device(4);
    let layer = |e: usize, sel: Selection| {
        MoeLayerConfig::new(8, 4, e)
            .with_selection(sel)
            .init(&device)
            .map(|_| ())
    };
    assert_eq!(
        layer(
            4,
            Selection::TopK {
                k: 5,
                renormalize: true
            }
        ),
        Err(MoeError::InvalidTopK { k: 5, experts: 4 })
    );
    assert_eq!(
        layer(
            4,
            Selection::TopK {
                k: 0,
                renormalize: true
            }
        ),
        Err(MoeError::InvalidTopK { k: 0, experts: 4 })
    );
    assert_eq!(
        layer(
            0,
            Selection::TopK {
                k: 1,
                renormalize: true
            }
        ),
        Err(MoeError::NoExperts)
    );
    for p in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(
            matches!(
                layer(
                    4,
                    Selection::TopP {
                        p,
                        max_k: None,
                        renormalize: false
                    }
                ),
                Err(MoeError::InvalidTopP(_))
            ),
            "p = {p}"
        );
    }
    assert!(
        layer(
            4,
            Selection::TopP {
                p: 0.5,
                max_k: Some(9),
                renormalize: true
            }
        )
        .is_err()
    );
    let bad_capacity = MoeLayerConfig::new(8, 4, 4)
        .with_capacity_factor(Some(0.0))
        .init(&device);
    assert!(matches!(
        bad_capacity,
        Err(MoeError::OutOfRange {
            what: "capacity_factor",
            ..
        })
    ));
    let bad_jitter = RouterConfig::new(8, 4)
        .with_noise(RouterNoise::Jitter { eps: 1.5 })
        .init(&device);
    assert!(matches!(bad_jitter, Err(MoeError::OutOfRange { .. })));
    assert!(matches!(
        MoeLayerConfig::new(0, 4, 4).init(&device),
        Err(MoeError::ZeroSize { .. })
    ));

    let ok = MoeLayerConfig::new(8, 4, 4).init(&device).unwrap();
    let wrong_width = ok.forward(normal([1, 3, 7], 1.0, &device));
    assert_eq!(
        wrong_width.err(),
        Some(MoeError::HiddenSizeMismatch {
            expected: 8,
            got: 7
        })
    );
    let mask = Tensor::<2, Int>::ones([1, 2], &device).bool();
    let wrong_mask = ok.forward_masked(normal([1, 3, 8], 1.0, &device), Some(mask));
    assert_eq!(
        wrong_mask.err(),
        Some(MoeError::MaskShapeMismatch {
            expected: [1, 3],
            got: [1, 2]
        })
    );
    let mismatched = ExpertBank::from_weights(
        normal([2, 8, 6], 1.0, &device),
        normal([2, 4, 8], 1.0, &device),
        Activation::SwiGlu,
    );
    // A SwiGLU bank with I = 4 needs w_in of width 8.
    assert_eq!(
        mismatched.err(),
        Some(MoeError::WeightShape {
            what: "w_in",
            expected: vec![2, 8, 8],
            got: vec![2, 8, 6]
        })
    );
    let router = RouterConfig::new(8, 3).init(&device).unwrap();
    let w_in = normal([2, 8, 8], 1.0, &device);
    let bank = ExpertBank::from_weights(w_in, normal([2, 4, 8], 1.0, &device), Activation::SwiGlu)
        .unwrap();
    assert_eq!(
        moekit_moe::MoeLayer::from_parts(router, bank.clone(), None).err(),
        Some(MoeError::ExpertCountMismatch { router: 3, bank: 2 })
    );
    // A router, or a shared expert, of another width than the bank's.
    let narrow = RouterConfig::new(6, 2).init(&device).unwrap();
    assert!(matches!(
        moekit_moe::MoeLayer::from_parts(narrow, bank.clone(), None),
        Err(MoeError::WeightShape {
            what: "router gate",
            ..
        })
    ));
    let router = RouterConfig::new(8, 2).init(&device).unwrap();
    let shared = moekit_moe::SharedExpert {
        ffn: moekit_moe::FeedForwardConfig::new(6, 4)
            .init(&device)
            .unwrap(),
        gate: None,
    };
    assert!(matches!(
        moekit_moe::MoeLayer::from_parts(router.clone(), bank.clone(), Some(shared)),
        Err(MoeError::WeightShape {
            what: "shared expert",
            ..
        })
    ));
    // A gate holding NaN is refused when it is set.
    let nan = Tensor::<2>::full([8, 2], f32::NAN, &device);
    assert_eq!(
        router.with_weight(nan).err(),
        Some(MoeError::NonFinite("router gate"))
    );
}

/// Chosen expert ids and weights of `router` on `x`.
fn route(router: &moekit_moe::Router, x: Tensor<2>) -> (Vec<i64>, Vec<f32>) {
    let r = router.forward(x);
    (
        r.experts.into_data().iter::<i64>().collect(),
        values(r.weights),
    )
}

#[test]
fn combine_temperature_weighs_the_choice_of_the_raw_logits() {
    let device = device(5);
    let (h, e, k, t) = (6, 5, 3, 4usize);
    let x = normal([t, h], 1.0, &device);
    for renormalize in [true, false] {
        let config = RouterConfig::new(h, e).with_selection(Selection::TopK { k, renormalize });
        let plain = config.init(&device).unwrap();
        let tau = 2.5;
        let warm = plain.clone().with_combine_temperature(tau).unwrap();
        let (ids, _) = route(&plain, x.clone());
        let (warm_ids, warm_w) = route(&warm, x.clone());
        // The choice, the logits and the probabilities (losses) do not move.
        assert_eq!(ids, warm_ids);
        assert_close(
            plain.forward(x.clone()).probs,
            warm.forward(x.clone()).probs,
            0.0,
            0.0,
        );
        // Naive reference: softmax of logits / τ over all experts, taken at the chosen ones.
        let logits = values(plain.logits(x.clone()));
        for row in 0..t {
            let l = &logits[row * e..(row + 1) * e];
            let z: f64 = l.iter().map(|v| (*v as f64 / tau).exp()).sum();
            let chosen: Vec<f64> = ids[row * k..(row + 1) * k]
                .iter()
                .map(|&c| (l[c as usize] as f64 / tau).exp() / z)
                .collect();
            let sum: f64 = chosen.iter().sum();
            for (slot, p) in chosen.iter().enumerate() {
                let want = if renormalize { p / sum } else { *p };
                let got = warm_w[row * k + slot] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "{renormalize} {row} {slot}: {got} vs {want}"
                );
            }
        }
        // Folding: gate W with temperature τ routes exactly as gate W/τ with temperature 1.
        let folded = plain.clone().with_weight(plain.weight() / tau).unwrap();
        let (folded_ids, folded_w) = route(&folded, x.clone());
        assert_eq!(folded_ids, ids);
        assert!(
            folded_w
                .iter()
                .zip(&warm_w)
                .all(|(a, b)| (a - b).abs() < 1e-6),
            "{folded_w:?} vs {warm_w:?}"
        );
    }
}

#[test]
fn a_large_combine_temperature_gives_equal_weights_and_oracle_routing_uses_it() {
    let device = device(6);
    let (h, e, k, t) = (6, 8, 3, 5usize);
    let x = normal([t, h], 1.0, &device);
    let mut layer = MoeLayerConfig::new(h, 4, e)
        .with_selection(Selection::TopK {
            k,
            renormalize: true,
        })
        .with_combine_temperature(1e4)
        .init(&device)
        .unwrap();
    // A gate whose logits spread over a few units: at τ = 1 the weights are far from equal.
    layer.router = layer
        .router
        .clone()
        .with_weight(normal([h, e], 1.0, &device))
        .unwrap();
    let plain = layer.router.clone().with_combine_temperature(1.0).unwrap();
    let (_, w) = route(&plain, x.clone());
    assert!(w.iter().any(|v| (v - 1.0 / k as f32).abs() > 0.05), "{w:?}");
    let (_, w) = route(&layer.router, x.clone());
    assert!(w.iter().all(|v| (v - 1.0 / k as f32).abs() < 1e-3), "{w:?}");
    // The oracle's experts get the same equal weights.
    let oracle = layer.oracle_experts(x.clone(), k);
    let routed = layer.router.route_to(x, oracle);
    let w = values(routed.weights);
    assert!(w.iter().all(|v| (v - 1.0 / k as f32).abs() < 1e-3), "{w:?}");
}

#[test]
fn top_p_with_a_combine_temperature_zeroes_unused_slots() {
    // Probabilities 0.5, 0.3, 0.15, 0.05: p = 0.75 keeps two; at τ = 2 their weights are
    // √0.5 and √0.3 over their sum (renormalised), the other slots 0.
    let device = device(7);
    let p = [0.05f32, 0.5, 0.15, 0.3];
    let router = RouterConfig::new(2, 4)
        .with_selection(Selection::TopP {
            p: 0.75,
            max_k: None,
            renormalize: true,
        })
        .with_combine_temperature(2.0)
        .init(&device)
        .unwrap();
    let w = values(
        router
            .route_logits(tensor(probs_as_logits(&p), [1, 4], &device))
            .weights,
    );
    let (a, b) = (0.5f32.sqrt(), 0.3f32.sqrt());
    let want = [a / (a + b), b / (a + b), 0.0, 0.0];
    assert!(
        w.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5),
        "{w:?}"
    );
}

#[test]
fn a_combine_temperature_must_be_finite_and_positive() {
    let device = device(8);
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = RouterConfig::new(4, 3)
            .with_combine_temperature(tau)
            .init(&device)
            .map(|_| ());
        assert!(
            matches!(
                err,
                Err(MoeError::OutOfRange {
                    what: "combine temperature",
                    ..
                })
            ),
            "{tau}: {err:?}"
        );
        let router = RouterConfig::new(4, 3).init(&device).unwrap();
        assert!(router.with_combine_temperature(tau).is_err(), "{tau}");
    }
}
