//! Routing profiles, policy search and policies on small random MoE models, against closed
//! forms, brute force and independent whole-model computations.

use burn::module::Param;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use moekit_llama::{FfnSlot, LayeredConfig, Llama, LlamaConfig, perplexity};
use moekit_moe::Selection;
use moekit_router::{
    ActiveParams, Candidate, Candidates, Choice, LayerCandidates, MAX_RESOLUTION, Proposal,
    RouterError, RoutingPolicy, Rule, SearchConfig, Series, TOP1_THRESHOLDS, choose, measure,
    profile, profile_svg, proposals, route_by_oracle, score, select, top_k_grid, tradeoff_svg,
};
use moekit_testing::{device, normal};

const E: usize = 4;

fn mixtral(layers: usize, renormalize: bool, device: &Device) -> Llama {
    mixtral_of(E, layers, renormalize, device)
}

fn mixtral_of(experts: usize, layers: usize, renormalize: bool, device: &Device) -> Llama {
    let mut c = LlamaConfig::llama(40, 16, 24, layers, 4, 2);
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(experts);
    c.num_experts_per_tok = Some(2);
    let mut model = c.init(device).unwrap();
    for layer in &mut model.layers {
        let FfnSlot::Moe(m) = &mut layer.ffn else {
            panic!("mixtral layers are MoE")
        };
        // Sharper routing than the default init, so rules differ.
        m.router.gate = Param::from_tensor(normal([16, experts], 0.8, device));
        m.router.selection = Selection::TopK { k: 2, renormalize };
    }
    model
}

/// Layer-at-a-time settings: passes of a few sequences, so that several are taken.
fn layered() -> LayeredConfig {
    LayeredConfig::new().with_pass_tokens(40).with_batch(2)
}

/// [`measure`] on `model`, one layer at a time.
fn measure_on(
    model: &Llama,
    ids: &[u32],
    config: &SearchConfig,
) -> moekit_router::Result<Candidates> {
    measure(
        model,
        ids,
        config,
        &layered(),
        &model.device(),
        &mut |_, _| {},
    )
}

/// [`profile`] of `model`, one layer at a time.
fn profile_on(
    model: &Llama,
    ids: &[u32],
    seq_len: usize,
    thresholds: &[f64],
) -> moekit_router::Result<moekit_router::RoutingProfile> {
    profile(
        model,
        ids,
        seq_len,
        thresholds,
        &layered(),
        &model.device(),
        &mut |_, _| {},
    )
}

/// [`select`] on `model` over `ids` in windows of 32, one layer at a time.
fn select_on(
    model: &Llama,
    offered: Vec<Proposal>,
    ids: &[u32],
) -> (RoutingPolicy, Vec<(Proposal, moekit_router::PolicyScore)>) {
    select(
        model,
        offered,
        ids,
        32,
        &layered(),
        &model.device(),
        &mut |_, _| {},
    )
    .unwrap()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + i / 5) % 40) as u32).collect()
}

fn selections(model: &Llama) -> Vec<Selection> {
    model
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            FfnSlot::Moe(m) => Some(m.router.selection),
            _ => None,
        })
        .collect()
}

#[test]
fn a_uniform_router_profiles_as_the_closed_form() {
    let device = device(1);
    let mut model = mixtral(2, true, &device);
    for layer in &mut model.layers {
        if let FfnSlot::Moe(m) = &mut layer.ffn {
            m.router.gate = Param::from_tensor(Tensor::zeros([16, E], &device));
        }
    }
    let p = profile_on(&model, &tokens(50), 16, &TOP1_THRESHOLDS).unwrap();
    assert_eq!(p.tokens, 50);
    assert_eq!(p.layers.len(), 2);
    for l in &p.layers {
        for m in &l.sorted_mass {
            assert!((m - 0.25).abs() < 1e-6, "{:?}", l.sorted_mass);
        }
        assert!((l.entropy - (E as f64).ln()).abs() < 1e-5);
        assert!(l.top1_above.iter().all(|t| t.fraction == 0.0));
        assert_eq!(l.experts_per_token, 2.0);
        assert!((l.mean_prob.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    }
}

#[test]
fn profiles_are_sorted_distributions_with_consistent_loads() {
    let device = device(2);
    let model = mixtral(2, true, &device);
    let p = profile_on(&model, &tokens(64), 32, &TOP1_THRESHOLDS).unwrap();
    for l in &p.layers {
        assert!((l.sorted_mass.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        assert!(l.sorted_mass.windows(2).all(|w| w[0] >= w[1]));
        assert!(l.entropy > 0.0 && l.entropy < (E as f64).ln());
        assert!((l.load.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // The top-1 fractions fall as the threshold rises.
        assert!(
            l.top1_above
                .windows(2)
                .all(|w| w[0].fraction >= w[1].fraction)
        );
        // The first sorted entry is the mean top-1 probability: at least 1/E.
        assert!(l.sorted_mass[0] >= 1.0 / E as f64);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    p.save(&path).unwrap();
    assert_eq!(moekit_router::RoutingProfile::load(&path).unwrap(), p);
    let svg = dir.path().join("profile.svg");
    profile_svg(&p, None, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("L0 ") && text.contains("L1 "));
}

#[test]
fn dense_models_too_little_text_and_bad_thresholds_are_errors() {
    let device = device(3);
    let model = LlamaConfig::llama(40, 16, 24, 1, 4, 2)
        .init(&device)
        .unwrap();
    assert!(matches!(
        profile_on(&model, &tokens(20), 8, &TOP1_THRESHOLDS),
        Err(RouterError::NoMoeLayers)
    ));
    assert!(matches!(
        measure_on(&model, &tokens(20), &SearchConfig::default()),
        Err(RouterError::NoMoeLayers)
    ));
    assert!(matches!(
        profile_on(&mixtral(1, true, &device), &tokens(1), 8, &TOP1_THRESHOLDS),
        Err(RouterError::Calibration(_))
    ));
    assert!(matches!(
        profile_on(&mixtral(1, true, &device), &tokens(20), 8, &[1.5]),
        Err(RouterError::Calibration(_))
    ));
}

/// The relative FFN error of `rule` in layer 0, computed through the whole model with the rule
/// applied there only (layer 0's input does not depend on routing).
fn first_layer_error(model: &Llama, rule: Rule, ids: &[u32]) -> f64 {
    let mut reduced = model.clone();
    RoutingPolicy {
        layers: vec![moekit_router::LayerPolicy { layer: 0, rule }],
        chosen: None,
    }
    .apply(&mut reduced)
    .unwrap();
    let device = model.device();
    let first_output = |m: &Llama| {
        let mut y = Vec::new();
        for w in ids.chunks(16) {
            m.forward_ffn_io(m.tokens(&[w], &device).unwrap(), &mut |l, _, out| {
                if l == 0 {
                    y.extend(moekit_testing::values(out.clone()));
                }
                Ok(())
            })
            .unwrap();
        }
        y
    };
    let (want, got) = (first_output(model), first_output(&reduced));
    let num: f64 = want
        .iter()
        .zip(&got)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
    num / den
}

#[test]
fn measured_candidates_match_whole_model_runs() {
    let device = device(4);
    for renormalize in [true, false] {
        let model = mixtral(2, renormalize, &device);
        let ids = tokens(48);
        let config = SearchConfig {
            top_p: vec![0.5, 0.9],
            seq_len: 16,
            ..SearchConfig::default()
        };
        let c = measure_on(&model, &ids, &config).unwrap();
        assert_eq!(c.tokens, 48);
        assert_eq!(c.layers.len(), 2);
        let layer0 = &c.layers[0];
        assert_eq!(layer0.candidates.len(), E + 2);
        assert_eq!(layer0.params_per_expert, 3 * 16 * 24);
        for cand in &layer0.candidates {
            if let Rule::TopK { k } = cand.rule {
                assert_eq!(cand.experts_per_token, k as f64);
            } else {
                assert!((1.0..=E as f64).contains(&cand.experts_per_token));
            }
            let want = first_layer_error(&model, cand.rule, &ids);
            assert!(
                (cand.error - want).abs() <= 1e-4 * want.max(1e-3),
                "{}: {} vs {want}",
                cand.rule,
                cand.error
            );
        }
        // The model's own rule reproduces it exactly.
        let own = layer0
            .candidates
            .iter()
            .find(|c| c.rule == Rule::TopK { k: 2 })
            .unwrap();
        assert_eq!(own.error, 0.0);
        // A higher threshold never keeps fewer experts.
        let p = |q: f64| {
            layer0
                .candidates
                .iter()
                .find(|c| c.rule == Rule::TopP { p: q, max_k: None })
                .unwrap()
                .experts_per_token
        };
        assert!(p(0.9) >= p(0.5));
    }
}

#[test]
fn top_k_grids_keep_the_own_k_both_ends_and_the_limit() {
    // Every k when E fits.
    assert_eq!(top_k_grid(6, 2, 6), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(top_k_grid(8, 5, 4), vec![1, 4, 5, 8]);
    // A limit below the least is raised to it.
    assert_eq!(top_k_grid(8, 5, 1), top_k_grid(8, 5, 4));
    for (e, max) in [(384, 64), (384, 4), (100, 9), (65, 64), (1000, 17), (6, 5)] {
        for own in [0, 1, 2, e / 3, e / 2, e - 1, e, e + 3] {
            let ks = top_k_grid(e, own, max);
            // Exactly the limit, increasing, from 1 to E.
            assert_eq!(ks.len(), max, "{e} {own} {max}: {ks:?}");
            assert!(ks.windows(2).all(|w| w[0] < w[1]), "{ks:?}");
            assert_eq!((ks[0], *ks.last().unwrap()), (1, e), "{ks:?}");
            // max / 2 consecutive values hold the own k (clamped into 1..=E), centred unless
            // they meet 1 or E.
            let (near, centre) = (max / 2, own.clamp(1, e));
            let centred = (1..=e + 1 - near).any(|s| {
                let end = s + near - 1;
                (s..=end).all(|k| ks.contains(&k))
                    && (s..=end).contains(&centre)
                    && (s == 1 || centre - s >= near / 2)
                    && (end == e || end - centre >= (near - 1) / 2)
            });
            assert!(centred, "{e} {own} {max}: {ks:?}");
        }
    }
    // The spread part: no gap wider than (E − 1) / (spread − 1), rounded up.
    let ks = top_k_grid(384, 199, 64);
    let widest = ks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(widest <= 383usize.div_ceil(31), "{widest}: {ks:?}");
    // `SearchConfig::thins` says which layers get fewer rules than experts.
    for max in [4, 9, 64] {
        let config = SearchConfig {
            max_top_k_rules: max,
            ..SearchConfig::default()
        };
        for e in 1..=2 * max {
            assert_eq!(
                config.thins(e),
                top_k_grid(e, 1, max).len() < e,
                "{e} {max}"
            );
        }
    }
}

#[test]
fn layers_with_more_experts_than_rules_measure_a_grid_of_k() {
    let device = device(14);
    let ids = tokens(48);
    for (renormalize, own) in [(true, None), (false, Some(0.99))] {
        let mut model = mixtral_of(16, 1, renormalize, &device);
        let FfnSlot::Moe(m) = &mut model.layers[0].ffn else {
            panic!("mixtral layers are MoE")
        };
        // Top-5 (the grid is then 1, 4, 5, 16; around k it is 1, k − 1, k, 16), or top-p.
        m.router.selection = match own {
            None => Selection::TopK { k: 5, renormalize },
            Some(p) => Selection::TopP {
                p,
                max_k: None,
                renormalize,
            },
        };
        let config = |max| SearchConfig {
            top_p: vec![0.6, 0.9, 0.99],
            seq_len: 16,
            max_top_k_rules: max,
        };
        let grid = measure_on(&model, &ids, &config(4)).unwrap();
        let every = measure_on(&model, &ids, &config(16)).unwrap();
        let ks = |c: &Candidates| -> Vec<usize> {
            c.layers[0]
                .candidates
                .iter()
                .filter_map(|c| match c.rule {
                    Rule::TopK { k } => Some(k),
                    Rule::TopP { .. } => None,
                })
                .collect()
        };
        assert_eq!(ks(&every), (1..=16).collect::<Vec<_>>());
        // The own k: 5, or the top-p rule's mean experts per token, rounded.
        let own_k = own.map_or(5, |p| {
            let rule = Rule::TopP { p, max_k: None };
            let c = every.layers[0].candidates.iter().find(|c| c.rule == rule);
            c.unwrap().experts_per_token.round() as usize
        });
        assert_eq!(ks(&grid), top_k_grid(16, own_k, 4));
        assert!(ks(&grid).contains(&own_k.clamp(1, 16)));
        // The own k decides the grid (another k would give another).
        assert!(own_k >= 4, "own k {own_k}");
        assert_ne!(ks(&grid), top_k_grid(16, 1, 4));
        // The same rules measure the same, and against whole-model runs.
        for c in &grid.layers[0].candidates {
            let same = every.layers[0]
                .candidates
                .iter()
                .find(|d| d.rule == c.rule)
                .unwrap();
            assert_eq!(c, same);
            let want = first_layer_error(&model, c.rule, &ids);
            assert!(
                (c.error - want).abs() <= 1e-4 * want.max(1e-3),
                "{}",
                c.rule
            );
        }
    }
    assert!(matches!(
        measure(
            &mixtral(1, true, &device),
            &ids,
            &SearchConfig {
                max_top_k_rules: 3,
                ..SearchConfig::default()
            },
            &layered(),
            &Llama::device(&mixtral(1, true, &device)),
            &mut |_, _| {}
        ),
        Err(RouterError::Policy(_))
    ));
}

/// Layers of different expert counts, expert sizes and numbers of candidates.
fn synthetic(layers: usize, options: usize, seed: u64) -> Candidates {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    Candidates {
        tokens: 1,
        always: 1000,
        layers: (0..layers)
            .map(|l| {
                let n = options + l % 3;
                LayerCandidates {
                    layer: l,
                    num_experts: n,
                    params_per_expert: 60 + 40 * (l % 4),
                    candidates: (0..n)
                        .map(|j| Candidate {
                            rule: Rule::TopK { k: j + 1 },
                            experts_per_token: (j + 1) as f64 * (0.5 + next()),
                            error: next(),
                        })
                        .collect(),
                }
            })
            .collect(),
        source: None,
    }
}

/// Every combination of picks, with its activated fraction and total error.
fn brute_force(c: &Candidates) -> Vec<(f64, f64)> {
    let mut all = vec![(Vec::new(), 0.0)];
    for l in &c.layers {
        all = all
            .into_iter()
            .flat_map(|(picks, err): (Vec<usize>, f64)| {
                l.candidates.iter().enumerate().map(move |(j, cand)| {
                    let mut p = picks.clone();
                    p.push(j);
                    (p, err + cand.error)
                })
            })
            .collect();
    }
    all.into_iter()
        .map(|(picks, err)| (c.active(&picks).fraction(), err))
        .collect()
}

#[test]
fn the_knapsack_finds_the_brute_force_optimum_within_its_resolution() {
    for seed in 0..6 {
        let c = synthetic(4, 5, seed);
        let all = brute_force(&c);
        let full = c.active(&[0; 4]).full() as f64;
        assert!(
            all.len() > 5usize.pow(4),
            "layers differ in their candidates"
        );
        // A budget of exactly the cheapest policy's cost is met, by that policy.
        let least = all.iter().map(|(f, _)| *f).fold(f64::INFINITY, f64::min);
        let cheapest = choose(&c, least, 1000).unwrap().chosen.unwrap();
        assert!((cheapest.predicted_fraction - least).abs() < 1e-9);
        for target in [0.3, 0.45, 0.6, 0.8, 1.0] {
            let resolution = 2000;
            match choose(&c, target, resolution) {
                Ok(policy) => {
                    let chosen = policy.chosen.unwrap();
                    assert!(chosen.predicted_fraction <= target + 1e-9);
                    // No feasible combination is better; every combination with room for
                    // the rounding (one step per layer) is at best equal.
                    let slack = 4.0 * (target * full - c.always as f64) / resolution as f64 / full;
                    let best_feasible = all
                        .iter()
                        .filter(|(f, _)| *f <= target + 1e-9)
                        .map(|(_, e)| *e)
                        .fold(f64::INFINITY, f64::min);
                    let best_with_room = all
                        .iter()
                        .filter(|(f, _)| *f <= target - slack)
                        .map(|(_, e)| *e)
                        .fold(f64::INFINITY, f64::min);
                    assert!(
                        chosen.error >= best_feasible - 1e-12,
                        "seed {seed} target {target}"
                    );
                    assert!(
                        chosen.error <= best_with_room + 1e-12,
                        "seed {seed} target {target}"
                    );
                    // The recorded error is the policy's.
                    let picks: Vec<usize> = policy
                        .layers
                        .iter()
                        .zip(&c.layers)
                        .map(|(p, l)| l.candidates.iter().position(|x| x.rule == p.rule).unwrap())
                        .collect();
                    let err: f64 = picks
                        .iter()
                        .zip(&c.layers)
                        .map(|(&j, l)| l.candidates[j].error)
                        .sum();
                    assert!((err - chosen.error).abs() < 1e-9);
                }
                Err(RouterError::Target(_)) => {
                    assert!(
                        all.iter().all(|(f, _)| *f > target),
                        "seed {seed} target {target}"
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

#[test]
fn bad_targets_are_errors() {
    let c = synthetic(2, 3, 9);
    for t in [0.0, -0.5, 1.5, f64::NAN] {
        assert!(
            matches!(choose(&c, t, 100), Err(RouterError::Target(_))),
            "{t}"
        );
    }
    assert!(matches!(choose(&c, 0.9, 0), Err(RouterError::Target(_))));
    // Too many budget steps is an error, not an overflow or an allocation of everything.
    for resolution in [usize::MAX, MAX_RESOLUTION + 1] {
        assert!(matches!(
            choose(&c, 0.9, resolution),
            Err(RouterError::Target(_))
        ));
    }
}

#[test]
fn a_policy_at_exactly_the_budget_is_found_when_a_cheaper_looking_one_is_just_over() {
    // Top-p costs a hair more than top-1 and errs less: rounded up to budget steps the two
    // cost the same, so the least-error table holds top-p in both layers, just over the
    // budget. Uniform top-1 costs exactly the budget and must be chosen.
    let layer = |l| LayerCandidates {
        layer: l,
        num_experts: 2,
        params_per_expert: 100,
        candidates: vec![
            Candidate {
                rule: Rule::TopK { k: 1 },
                experts_per_token: 1.0,
                error: 0.5,
            },
            Candidate {
                rule: Rule::TopP {
                    p: 0.5,
                    max_k: None,
                },
                experts_per_token: 1.00001,
                error: 0.1,
            },
            Candidate {
                rule: Rule::TopK { k: 2 },
                experts_per_token: 2.0,
                error: 0.0,
            },
        ],
    };
    let c = Candidates {
        tokens: 1,
        always: 1000,
        layers: vec![layer(0), layer(1)],
        source: None,
    };
    let policy = choose(&c, 1200.0 / 1400.0, 999).unwrap();
    let rules: Vec<Rule> = policy.layers.iter().map(|l| l.rule).collect();
    assert_eq!(rules, [Rule::TopK { k: 1 }; 2]);
    // With room for top-p in both layers, the least error wins again.
    let policy = choose(&c, 1200.01 / 1400.0, 999).unwrap();
    let rules: Vec<Rule> = policy.layers.iter().map(|l| l.rule).collect();
    assert_eq!(
        rules,
        [Rule::TopP {
            p: 0.5,
            max_k: None
        }; 2]
    );
}

#[test]
fn policies_apply_keep_the_combine_rule_and_refuse_what_does_not_fit() {
    let device = device(5);
    let mut model = mixtral(3, true, &device);
    RoutingPolicy::uniform(
        &model,
        Rule::TopP {
            p: 0.7,
            max_k: Some(3),
        },
    )
    .unwrap()
    .apply(&mut model)
    .unwrap();
    assert!(selections(&model).iter().all(|s| *s
        == Selection::TopP {
            p: 0.7,
            max_k: Some(3),
            renormalize: true
        }));
    assert_eq!(
        RoutingPolicy::of_model(&model),
        RoutingPolicy::uniform(
            &model,
            Rule::TopP {
                p: 0.7,
                max_k: Some(3)
            }
        )
        .unwrap()
    );
    let before = selections(&model);
    let bad = |layers: Vec<(usize, Rule)>| RoutingPolicy {
        layers: layers
            .into_iter()
            .map(|(layer, rule)| moekit_router::LayerPolicy { layer, rule })
            .collect(),
        chosen: None,
    };
    let k = |k| Rule::TopK { k };
    for (policy, says) in [
        (bad(vec![(0, k(1)), (7, k(1))]), "3 layers"),
        (bad(vec![(1, k(1)), (1, k(2))]), "twice"),
        (bad(vec![(0, k(1)), (2, k(E + 1))]), "does not fit"),
        (
            bad(vec![(
                0,
                Rule::TopP {
                    p: 1.5,
                    max_k: None,
                },
            )]),
            "does not fit",
        ),
    ] {
        let e = policy.apply(&mut model).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert_eq!(selections(&model), before, "an error changed the model");
    }
    let mut dense = LlamaConfig::llama(40, 16, 24, 1, 4, 2)
        .init(&device)
        .unwrap();
    let e = bad(vec![(0, k(1))]).apply(&mut dense).unwrap_err();
    assert!(e.to_string().contains("not a MoE layer"), "{e}");
}

#[test]
fn policy_files_round_trip_and_bad_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = mixtral(2, false, &device(6));
    let c = measure(
        &model,
        &tokens(40),
        &SearchConfig {
            top_p: vec![0.8],
            seq_len: 20,
            ..SearchConfig::default()
        },
        &layered(),
        &Llama::device(&model),
        &mut |_, _| {},
    )
    .unwrap();
    c.check(&ActiveParams::of(&model, None).unwrap()).unwrap();
    assert!(
        c.check(&ActiveParams::of(&mixtral(3, false, &device(6)), None).unwrap())
            .is_err()
    );
    let policy = choose(&c, 0.9, 512).unwrap();
    let path = dir.path().join("policy.json");
    policy.save(&path).unwrap();
    assert_eq!(RoutingPolicy::load(&path).unwrap(), policy);
    // The documented hand-written form.
    std::fs::write(
        &path,
        r#"{"layers": [{"layer": 0, "rule": "top-k", "k": 1},
                       {"layer": 1, "rule": "top-p", "p": 0.9}]}"#,
    )
    .unwrap();
    let hand = RoutingPolicy::load(&path).unwrap();
    assert_eq!(
        hand.layers[1].rule,
        Rule::TopP {
            p: 0.9,
            max_k: None
        }
    );
    for broken in [
        &b"{\"layers\": [{\"layer\": 0, \"rule\": \"top-q\"}]}"[..],
        b"{",
        b"",
    ] {
        std::fs::write(&path, broken).unwrap();
        assert!(matches!(
            RoutingPolicy::load(&path),
            Err(RouterError::Parse { .. })
        ));
    }
    assert!(matches!(
        RoutingPolicy::load(&dir.path().join("missing.json")),
        Err(RouterError::Io { .. })
    ));
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn proposals_hold_top_k_from_the_own_k_up_and_every_top_p_that_fit() {
    let device = device(15);
    let model = mixtral(2, true, &device);
    let c = measure(
        &model,
        &tokens(64),
        &SearchConfig {
            top_p: vec![0.3, 0.5, 0.7, 0.9, 0.99],
            seq_len: 32,
            ..SearchConfig::default()
        },
        &layered(),
        &Llama::device(&model),
        &mut |_, _| {},
    )
    .unwrap();
    // Whether a proposal routes every layer by top-k.
    let offers = |offered: &[Proposal], k: usize| {
        let uniform = |p: &Proposal| p.policy.layers.iter().all(|l| l.rule == Rule::TopK { k });
        offered.iter().any(uniform)
    };
    let fraction = |k: usize| c.active(&c.picks_of(Rule::TopK { k }).unwrap()).fraction();
    // The model's own k is 2: top-k from 2 up to the largest that fits, never top-1 ...
    for (budget, want) in [(3, vec![2, 3]), (4, vec![2, 3, 4])] {
        let offered = proposals(&c, fraction(budget), 1024).unwrap();
        for k in 1..=E {
            assert_eq!(
                offers(&offered, k),
                want.contains(&k),
                "top-{k} at top-{budget}'s cost"
            );
        }
    }
    // ... unless the own k does not fit: then the largest that does.
    let between = (fraction(1) + fraction(2)) / 2.0;
    let offered = proposals(&c, between, 1024).unwrap();
    assert!(offers(&offered, 1) && !offers(&offered, 2));
    let wide = fraction(3);
    let names = |offered: &[Proposal]| -> Vec<String> {
        let uniform = offered.iter().filter(|p| p.name.starts_with("uniform"));
        uniform.map(|p| p.name.clone()).collect()
    };
    let wide_names = names(&proposals(&c, wide, 1024).unwrap());
    // Every top-p threshold is offered exactly when it fits.
    let mut fitting = 0;
    for cand in &c.layers[0].candidates {
        if let Rule::TopP { .. } = cand.rule {
            let fraction = c.active(&c.picks_of(cand.rule).unwrap()).fraction();
            let offered = wide_names.contains(&format!("uniform {}", cand.rule));
            assert_eq!(
                offered,
                fraction <= wide + 1e-9,
                "{}: {wide_names:?}",
                cand.rule
            );
            fitting += usize::from(offered);
        }
    }
    assert!(fitting > 0, "some top-p fits");
}

#[test]
fn a_policy_costs_what_it_predicts_and_the_kl_grows_as_experts_go() {
    let device = device(7);
    let model = mixtral(2, true, &device);
    let ids = tokens(64);
    // Top-k rules only: their cost does not depend on earlier layers, so the prediction is
    // exact.
    let c = measure(
        &model,
        &ids,
        &SearchConfig {
            top_p: vec![],
            seq_len: 32,
            ..SearchConfig::default()
        },
        &layered(),
        &Llama::device(&model),
        &mut |_, _| {},
    )
    .unwrap();
    // Halfway between top-1 everywhere and the model's own top-2: some layer must give up
    // its own rule.
    let low = c
        .active(&c.picks_of(Rule::TopK { k: 1 }).unwrap())
        .fraction();
    let own = c
        .active(&c.picks_of(Rule::TopK { k: 2 }).unwrap())
        .fraction();
    let target = (low + own) / 2.0;
    let policy = choose(&c, target, 1024).unwrap();
    assert!(policy.layers.iter().any(|l| l.rule == Rule::TopK { k: 1 }));
    assert!(policy.chosen.as_ref().unwrap().error > 0.0);
    let mut reduced = model.clone();
    policy.apply(&mut reduced).unwrap();
    // Evaluating the reduced model on the calibration tokens computes the predicted experts.
    let ppl = perplexity(&reduced, &ids, 32, &mut |_, _| {}).unwrap();
    let k: Vec<f64> = ppl
        .experts_per_token
        .iter()
        .map(|u| u.experts_per_token)
        .collect();
    let active = ActiveParams::of(&reduced, Some(&k)).unwrap();
    let predicted = policy.chosen.as_ref().unwrap().predicted_fraction;
    assert!(
        (active.fraction() - predicted).abs() < 1e-9,
        "{} vs {predicted}",
        active.fraction()
    );
    assert!(active.fraction() <= target);

    // Whole-model scores: the reference routing has KL 0; top-1 everywhere deviates.
    let own = RoutingPolicy::of_model(&model);
    let top1 = RoutingPolicy::uniform(&model, Rule::TopK { k: 1 }).unwrap();
    let scores = score(
        &model,
        &[&own, &top1],
        &ids,
        32,
        &layered(),
        &Llama::device(&model),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(scores[0].kl, 0.0);
    assert!(scores[1].kl > 0.0);
    // Top-1's KL and NLL against the whole logits of the model routed that way.
    let mut routed = model.clone();
    top1.apply(&mut routed).unwrap();
    let (mut kl, mut nll, mut n) = (0.0f64, 0.0f64, 0usize);
    for w in ids.chunks(32).filter(|w| w.len() >= 2) {
        let t = w.len() - 1;
        let x = model.tokens(&[w], &device).unwrap();
        let lp = log_softmax(model.logits(x.clone()).unwrap().narrow(1, 0, t), 2);
        let lq = log_softmax(routed.logits(x).unwrap().narrow(1, 0, t), 2);
        kl += (lp.clone().exp() * (lp - lq.clone()))
            .sum()
            .into_scalar::<f32>() as f64;
        for (i, &next) in w[1..].iter().enumerate() {
            nll -= lq
                .clone()
                .slice([0..1, i..i + 1, next as usize..next as usize + 1])
                .into_scalar::<f32>() as f64;
        }
        n += t;
    }
    // Relative to the KL, with a floor for f32 rounding of the reference's sums when the KL is
    // small (the models' weights depend on the order tests seed the shared device).
    assert!(
        (scores[1].kl - kl / n as f64).abs() < 1e-4 * (kl / n as f64) + 1e-6,
        "{} vs {}",
        scores[1].kl,
        kl / n as f64
    );
    assert!(
        (scores[1].nll - nll / n as f64).abs() < 1e-4,
        "{} vs {}",
        scores[1].nll,
        nll / n as f64
    );
    // The reference's NLL is the perplexity evaluation's.
    let ppl = perplexity(&model, &ids, 32, &mut |_, _| {}).unwrap();
    assert!(
        (scores[0].nll - ppl.nll).abs() < 1e-4,
        "{} vs {}",
        scores[0].nll,
        ppl.nll
    );

    // Selection: the proposals hold the knapsack's optima and the uniform rules; the one of
    // least NLL wins, and no proposal within the budget beats it.
    let offered = proposals(&c, target, 1024).unwrap();
    assert!(offered.iter().any(|p| p.name == "uniform top-1"));
    assert!(!offered.iter().any(|p| p.name == "uniform top-2")); // over the budget
    assert!(offered.iter().any(|p| p.name.starts_with("knapsack")));
    let names: Vec<String> = offered.iter().map(|p| p.name.clone()).collect();
    let (best, scored) = select_on(&model, offered, &ids);
    assert_eq!(scored.len(), names.len());
    let selected = best.chosen.as_ref().unwrap().selection.clone().unwrap();
    for (p, s) in &scored {
        assert!(
            selected.score.nll <= s.nll,
            "{} beats {}",
            p.name,
            selected.proposal
        );
        assert!(p.policy.chosen.as_ref().unwrap().predicted_fraction <= target + 1e-9);
    }
    let winner = scored
        .iter()
        .find(|(p, _)| p.name == selected.proposal)
        .unwrap();
    assert_eq!(winner.0.policy.layers, best.layers);
    // Top-k rules cost exactly what they predict, on any text.
    for (p, s) in &scored {
        let predicted = p.policy.chosen.as_ref().unwrap().predicted_fraction;
        let measured = s.measured_fraction.unwrap();
        assert!(
            (measured - predicted).abs() < 1e-9,
            "{}: {measured} vs {predicted}",
            p.name
        );
    }
}

#[test]
fn selection_keeps_to_the_budget_that_the_policies_really_use() {
    // Candidates whose top-p costs are under-predicted (written as one expert per token):
    // the knapsack and the uniform top-p rule then look as cheap as top-1 and err less. On
    // the selection tokens they use more than the target, so top-1 must be selected.
    let device = device(8);
    let model = mixtral(2, true, &device);
    let ids = tokens(64);
    let mut c = measure(
        &model,
        &ids,
        &SearchConfig {
            top_p: vec![0.9],
            seq_len: 32,
            ..SearchConfig::default()
        },
        &layered(),
        &Llama::device(&model),
        &mut |_, _| {},
    )
    .unwrap();
    for l in &mut c.layers {
        for cand in &mut l.candidates {
            if matches!(cand.rule, Rule::TopP { .. }) {
                assert!(
                    cand.experts_per_token > 1.0,
                    "top-p 0.9 uses more than 1 expert"
                );
                cand.experts_per_token = 1.0;
            }
        }
    }
    let target = c
        .active(&c.picks_of(Rule::TopK { k: 1 }).unwrap())
        .fraction();
    let offered = proposals(&c, target, 1024).unwrap();
    assert!(
        offered.iter().any(|p| p
            .policy
            .layers
            .iter()
            .any(|l| matches!(l.rule, Rule::TopP { .. }))),
        "a proposal uses the under-predicted top-p"
    );
    let (best, scored) = select_on(&model, offered, &ids);
    // Only top-1 everywhere really fits: any top-p layer uses more than one expert.
    assert!(best.layers.iter().all(|l| l.rule == Rule::TopK { k: 1 }));
    let selected = best.chosen.unwrap().selection.unwrap();
    assert!(selected.score.measured_fraction.unwrap() <= target + 1e-9);
    assert!(
        scored
            .iter()
            .any(|(_, s)| s.measured_fraction.unwrap() > target + 1e-6),
        "some proposal measured over the target"
    );

    // The rule itself, whichever policy the NLL favours: the proposal with the lower NLL is
    // given a target below what it measures, the other one a target it meets; the one within
    // its target must win (selecting by NLL alone would take the other).
    let policies = [
        RoutingPolicy::uniform(&model, Rule::TopK { k: 2 }).unwrap(),
        RoutingPolicy::uniform(&model, Rule::TopK { k: 1 }).unwrap(),
    ];
    let scores = score(
        &model,
        &[&policies[0], &policies[1]],
        &ids,
        32,
        &layered(),
        &Llama::device(&model),
        &mut |_, _| {},
    )
    .unwrap();
    let low = usize::from(scores[1].nll < scores[0].nll);
    let offered: Vec<Proposal> = policies
        .iter()
        .zip(&scores)
        .enumerate()
        .map(|(i, (p, s))| {
            let measured = s.measured_fraction.unwrap();
            let target = if i == low { 0.9 * measured } else { measured };
            let mut policy = p.clone();
            policy.chosen = Some(Choice {
                target_fraction: target,
                predicted_fraction: target,
                error: 0.0,
                tokens: ids.len(),
                selection: None,
            });
            Proposal {
                name: format!("p{i}"),
                policy,
            }
        })
        .collect();
    let (best, _) = select_on(&model, offered, &ids);
    let selected = best.chosen.unwrap().selection.unwrap();
    assert_eq!(selected.proposal, format!("p{}", 1 - low));
}

#[test]
fn tradeoff_plots_draw_every_series_and_refuse_bad_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.svg");
    let series = [
        Series {
            name: "uniform top-k".into(),
            points: vec![(0.5, 40.0), (0.7, 20.0), (1.0, 12.0)],
            steps: true,
        },
        Series {
            name: "profiled".into(),
            points: vec![(0.5, 30.0), (0.7, 18.0)],
            steps: false,
        },
    ];
    tradeoff_svg(&series, "t", "activated", "perplexity", &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("uniform top-k") && text.contains("profiled"));
    let bad = [Series {
        name: "x".into(),
        points: vec![(0.5, f64::NAN)],
        steps: false,
    }];
    assert!(tradeoff_svg(&bad, "t", "x", "y", &path).is_err());
    assert!(tradeoff_svg(&[], "t", "x", "y", &path).is_err());
}

#[test]
fn oracle_routing_to_every_expert_is_the_router_and_bad_k_changes_nothing() {
    let device = device(9);
    let mut model = mixtral(2, true, &device);
    let ids = tokens(48);
    // With k = E the oracle picks the router's experts (in another order) and the router weighs
    // them: the same model.
    RoutingPolicy::uniform(&model, Rule::TopK { k: E })
        .unwrap()
        .apply(&mut model)
        .unwrap();
    let routed = perplexity(&model, &ids, 16, &mut |_, _| {}).unwrap();
    route_by_oracle(&mut model, Some(E)).unwrap();
    let oracle = perplexity(&model, &ids, 16, &mut |_, _| {}).unwrap();
    let rel = (oracle.perplexity / routed.perplexity - 1.0).abs();
    assert!(rel < 1e-5, "{} vs {}", oracle.perplexity, routed.perplexity);

    // k = 1 runs one expert per token in every layer, and differs from the router's top-1.
    route_by_oracle(&mut model, Some(1)).unwrap();
    let one = perplexity(&model, &ids, 16, &mut |_, _| {}).unwrap();
    assert!(
        one.experts_per_token
            .iter()
            .all(|u| u.experts_per_token == 1.0)
    );
    route_by_oracle(&mut model, None).unwrap();
    RoutingPolicy::uniform(&model, Rule::TopK { k: 1 })
        .unwrap()
        .apply(&mut model)
        .unwrap();
    let top1 = perplexity(&model, &ids, 16, &mut |_, _| {}).unwrap();
    assert!((one.perplexity / top1.perplexity - 1.0).abs() > 1e-4);

    // Too many experts is refused and changes nothing; a dense model has nothing to route.
    assert!(matches!(
        route_by_oracle(&mut model, Some(E + 1)),
        Err(RouterError::Policy(_))
    ));
    assert!(matches!(
        route_by_oracle(&mut model, Some(0)),
        Err(RouterError::Policy(_))
    ));
    let again = perplexity(&model, &ids, 16, &mut |_, _| {}).unwrap();
    assert_eq!(again.perplexity, top1.perplexity);
    let mut dense = LlamaConfig::llama(40, 16, 24, 1, 4, 2)
        .init(&device)
        .unwrap();
    assert!(matches!(
        route_by_oracle(&mut dense, Some(1)),
        Err(RouterError::NoMoeLayers)
    ));
}

/// Measuring, profiling and scoring read a saved checkpoint layer by layer as they read the
/// model in memory.
#[test]
fn a_checkpoint_on_disk_profiles_as_the_model_in_memory() {
    let device = device(12);
    let model = mixtral(3, true, &device);
    let dir = tempfile::tempdir().unwrap();
    moekit_llama::save_pretrained(
        &model,
        None,
        dir.path(),
        moekit_llama::ExportFormat::Mixtral,
        moekit_llama::SaveDtype::F32,
    )
    .unwrap();
    let ckpt = moekit_llama::Checkpoint::open(dir.path()).unwrap();
    let ids = tokens(96);
    let config = SearchConfig {
        top_p: vec![0.7],
        seq_len: 32,
        ..SearchConfig::default()
    };
    let run = |source: &dyn moekit_llama::LayerSource| {
        let c = measure(source, &ids, &config, &layered(), &device, &mut |_, _| {}).unwrap();
        let p = profile(
            source,
            &ids,
            32,
            &TOP1_THRESHOLDS,
            &layered(),
            &device,
            &mut |_, _| {},
        )
        .unwrap();
        let top1 = RoutingPolicy::uniform(&model, Rule::TopK { k: 1 }).unwrap();
        let s = score(
            source,
            &[&top1],
            &ids,
            32,
            &layered(),
            &device,
            &mut |_, _| {},
        )
        .unwrap();
        (c, p, s)
    };
    let (c_mem, p_mem, s_mem) = run(&model);
    let (c_disk, p_disk, s_disk) = run(&ckpt);
    assert_eq!(c_mem.always, c_disk.always);
    assert_eq!(c_mem.always, ActiveParams::of(&model, None).unwrap().always);
    assert_eq!(
        c_mem.always,
        ActiveParams::of_checkpoint(&ckpt, None).unwrap().always
    );
    for (a, b) in c_mem.layers.iter().zip(&c_disk.layers) {
        assert_eq!(
            (a.layer, a.num_experts, a.params_per_expert),
            (b.layer, b.num_experts, b.params_per_expert)
        );
        for (x, y) in a.candidates.iter().zip(&b.candidates) {
            assert_eq!(x.rule, y.rule);
            assert!((x.experts_per_token - y.experts_per_token).abs() < 1e-9);
            assert!(
                (x.error - y.error).abs() < 1e-5 * x.error.max(1e-3),
                "{x:?} vs {y:?}"
            );
        }
    }
    assert_eq!(p_mem.tokens, p_disk.tokens);
    for (a, b) in p_mem.layers.iter().zip(&p_disk.layers) {
        assert!((a.entropy - b.entropy).abs() < 1e-5);
        assert_eq!(a.load, b.load);
    }
    assert!((s_mem[0].nll - s_disk[0].nll).abs() < 1e-5);
    assert!((s_mem[0].kl - s_disk[0].kl).abs() < 1e-5);
    assert_eq!(s_mem[0].measured_fraction, s_disk[0].measured_fraction);
}
