//! The weighted combination, its string form, the learned projection and the distillation
//! step with models.
//!
//! The tests live in a module named `distill` so that `cargo test --workspace -- distill`
//! selects them.

mod common;

mod distill {
    use super::common::*;
    use burn::module::{Module, Param};
    use burn::nn::Linear;
    use burn::tensor::{Device, Int, Tensor};
    use moekit_distill::{
        DistillConfig, DistillError, DistillLoss, DistillModel, DistillOutput, Distiller,
        HiddenProjection, HiddenProjectionConfig, LossKind, LossTerm, TokenMask, cross_entropy,
        forward_kl, generalized_jsd, hidden_cosine, hidden_mse, reverse_kl, skew_forward_kl,
        skew_reverse_kl, top_k_kl, total_variation,
    };
    use moekit_testing::{device, normal, values};

    const ALL: &str = "kl:1,rkl:0.3,skew-kl:0.4,skew-rkl:0.6,jsd:0.5,tv:0.2,topk-kl:0.7,ce:0.1,\
                       hidden-mse:0.5,hidden-cos:0.25";

    /// Outputs with logits `[2, 4, 9]` and three hidden states `[2, 4, 6]`.
    fn outputs(seed: u64, device: &Device) -> DistillOutput {
        let b = Batch::random(2, 4, 9, 1.5, seed);
        let hidden = (0..3)
            .map(|i| normal([2, 4, 6], 1.0 + i as f64, device))
            .collect();
        DistillOutput::new(b.student_t(device)).with_hidden(hidden)
    }

    fn labels(device: &Device) -> Tensor<2, Int> {
        ints(vec![1, 8, -100, 0, 3, 3, 7, -100], [2, 4], device)
    }

    #[test]
    fn the_total_is_the_weighted_sum_of_parts_that_equal_the_standalone_losses() {
        let device = device(40);
        let (t, s) = (outputs(41, &device), outputs(42, &device));
        let mask = Batch::random(2, 4, 9, 1.0, 0).mask(&device);
        let config = DistillConfig::new(ALL.parse().unwrap())
            .with_temperature(2.0)
            .with_alpha(0.2)
            .with_beta(0.3)
            .with_top_k(4)
            .with_layers(vec![(0, 2), (2, 1)]);
        let distiller = config.init(&device).unwrap();
        let parts = distiller
            .loss(t.clone(), s.clone(), Some(labels(&device)), Some(&mask))
            .unwrap();
        let names: Vec<&str> = parts.parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "kl",
                "rkl",
                "skew-kl",
                "skew-rkl",
                "jsd",
                "tv",
                "topk-kl",
                "ce",
                "hidden-mse",
                "hidden-cos"
            ]
        );
        let m = Some(&mask);
        let (tl, sl) = (t.logits.clone(), s.logits.clone());
        type HiddenLoss =
            fn(Tensor<3>, Tensor<3>, Option<&TokenMask>) -> moekit_distill::Result<Tensor<1>>;
        let hidden = |f: HiddenLoss| {
            let a = f(s.hidden[0].clone(), t.hidden[2].clone(), m).unwrap();
            let b = f(s.hidden[2].clone(), t.hidden[1].clone(), m).unwrap();
            (scalar(a) + scalar(b)) / 2.0
        };
        let want = [
            scalar(forward_kl(tl.clone(), sl.clone(), m, 2.0).unwrap()),
            scalar(reverse_kl(tl.clone(), sl.clone(), m, 2.0).unwrap()),
            scalar(skew_forward_kl(tl.clone(), sl.clone(), m, 2.0, 0.2).unwrap()),
            scalar(skew_reverse_kl(tl.clone(), sl.clone(), m, 2.0, 0.2).unwrap()),
            scalar(generalized_jsd(tl.clone(), sl.clone(), m, 2.0, 0.3).unwrap()),
            scalar(total_variation(tl.clone(), sl.clone(), m, 2.0).unwrap()),
            scalar(top_k_kl(tl.clone(), sl.clone(), m, 2.0, 4).unwrap()),
            scalar(cross_entropy(sl.clone(), labels(&device), m, -100).unwrap()),
            hidden(hidden_mse),
            hidden(hidden_cosine),
        ];
        let mut weighted = 0.0;
        for (((name, got), want), term) in parts.parts.iter().zip(want).zip(config.loss.terms()) {
            assert_near(*got as f64, want, 1e-5, 1e-6, name);
            weighted += term.weight * *got as f64;
        }
        assert_near(parts.value as f64, weighted, 1e-5, 1e-6, "total");
        assert_eq!(parts.value as f64, scalar(parts.total.clone()));
        assert_eq!(parts.get("tv"), Some(parts.parts[5].1));
        assert_eq!(parts.get("nope"), None);
        let shown = parts.to_string();
        assert!(
            shown.starts_with("loss ") && shown.contains("hidden-cos"),
            "{shown}"
        );
    }

    #[test]
    fn loss_strings_parse_print_and_report_clear_errors() {
        let loss: DistillLoss = "kl:1,hidden-mse:0.5,ce:0.1".parse().unwrap();
        assert_eq!(
            loss.terms()[1],
            LossTerm {
                kind: LossKind::HiddenMse,
                weight: 0.5
            }
        );
        assert_eq!(loss.to_string(), "kl:1,hidden-mse:0.5,ce:0.1");
        assert_eq!(
            "Forward-KL:2, TOPK:1e-1"
                .parse::<DistillLoss>()
                .unwrap()
                .to_string(),
            "kl:2,topk-kl:0.1"
        );
        let err = "kl:1,klx:2".parse::<DistillLoss>().unwrap_err();
        assert!(matches!(&err, DistillError::UnknownLoss { name, .. } if name == "klx"));
        let msg = err.to_string();
        assert!(msg.contains("klx") && msg.contains("hidden-mse"), "{msg}");
        for bad in ["abc", "-1", "inf", "NaN", ""] {
            let err = format!("kl:{bad}").parse::<DistillLoss>().unwrap_err();
            assert_eq!(
                err,
                DistillError::InvalidWeight {
                    name: "kl".into(),
                    weight: bad.into()
                },
                "{bad}"
            );
        }
        for bad in ["", "  ", "kl:1,", ",kl", "kl:1,,ce:1", "kl:0", "kl:0,ce:0"] {
            let err = bad.parse::<DistillLoss>().unwrap_err();
            assert!(
                matches!(err, DistillError::InvalidSpec { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = "kl:1,ce:1,fkl:2".parse::<DistillLoss>().unwrap_err();
        assert_eq!(err, DistillError::DuplicateLoss { name: "kl".into() });
        let err = DistillLoss::new(vec![LossTerm {
            kind: LossKind::Jsd,
            weight: -0.5,
        }])
        .unwrap_err();
        assert!(matches!(err, DistillError::InvalidWeight { .. }));
    }

    #[test]
    fn the_config_round_trips_through_json() {
        let config = DistillConfig::new("skew-rkl:1,ce:0.1,hidden-cos:0.5".parse().unwrap())
            .with_alpha(0.1)
            .with_layers(vec![(1, 3), (2, 6)])
            .with_projection(Some(HiddenProjectionConfig::new(4, 8).with_pairs(2)));
        use burn::config::Config;
        let json = config.to_string();
        assert!(json.contains("skew-rkl:1,ce:0.1,hidden-cos:0.5"), "{json}");
        let back = DistillConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(back.loss, config.loss);
        assert_eq!(back.layers, config.layers);
        assert_eq!(back.projection.unwrap().pairs, 2);
    }

    #[test]
    fn a_non_finite_part_is_a_typed_error_naming_it() {
        let device = device(43);
        let distiller = DistillConfig::new("ce:1,kl:1".parse().unwrap())
            .init(&device)
            .unwrap();
        let s = outputs(44, &device);
        let mut t = outputs(45, &device);
        // NaN in the teacher only: the cross-entropy is fine, the KL is not.
        t.logits = t.logits.clone().slice_fill([0..1, 1..2, 0..1], f32::NAN);
        let err = distiller
            .loss(t.clone(), s.clone(), Some(labels(&device)), None)
            .unwrap_err();
        assert!(
            matches!(&err, DistillError::NonFinite { part, .. } if part == "kl"),
            "{err}"
        );
        // Masking that position away removes the problem.
        let mut valid = vec![true; 8];
        valid[1] = false;
        let m = mask(&valid, [2, 4], &device);
        let ok = distiller
            .loss(t, s, Some(labels(&device)), Some(&m))
            .unwrap();
        assert!(ok.value.is_finite());
    }

    #[test]
    fn missing_inputs_and_bad_layer_maps_are_typed_errors() {
        let device = device(46);
        let (t, s) = (outputs(47, &device), outputs(48, &device));
        let d = DistillConfig::new("kl:1,ce:0.5".parse().unwrap())
            .init(&device)
            .unwrap();
        let err = d.loss(t.clone(), s.clone(), None, None).unwrap_err();
        assert_eq!(err, DistillError::MissingLabels);

        let err = DistillConfig::new("kl:1,hidden-mse:1".parse().unwrap())
            .init(&device)
            .unwrap_err();
        assert_eq!(err, DistillError::NoLayerPairs { term: "hidden-mse" });

        let d = DistillConfig::new("hidden-cos:1".parse().unwrap())
            .with_layers(vec![(0, 0), (1, 5)])
            .init(&device)
            .unwrap();
        let err = d.loss(t.clone(), s.clone(), None, None).unwrap_err();
        assert_eq!(
            err,
            DistillError::HiddenIndex {
                side: "teacher",
                index: 5,
                available: 3
            }
        );
        let err = d
            .loss(t.clone(), DistillOutput::new(s.logits.clone()), None, None)
            .unwrap_err();
        assert!(matches!(
            err,
            DistillError::HiddenIndex {
                side: "student",
                ..
            }
        ));

        let err = DistillConfig::new("hidden-mse:1".parse().unwrap())
            .with_layers(vec![(0, 0), (1, 1)])
            .with_projection(Some(HiddenProjectionConfig::new(6, 8).with_pairs(3)))
            .init(&device)
            .unwrap_err();
        assert_eq!(
            err,
            DistillError::ProjectionPairs {
                expected: 2,
                got: 3
            }
        );
        // Widths that differ without a projection.
        let d = DistillConfig::new("hidden-mse:1".parse().unwrap())
            .with_layers(vec![(0, 0)])
            .init(&device)
            .unwrap();
        let wide = t.clone().with_hidden(vec![normal([2, 4, 8], 1.0, &device)]);
        let err = d.loss(wide, s.clone(), None, None).unwrap_err();
        assert!(matches!(err, DistillError::ShapeMismatch { .. }));
        for bad in [
            DistillConfig::new("kl".parse().unwrap()).with_temperature(0.0),
            DistillConfig::new("kl".parse().unwrap()).with_alpha(1.5),
            DistillConfig::new("kl".parse().unwrap()).with_beta(-0.5),
            DistillConfig::new("kl".parse().unwrap()).with_top_k(0),
        ] {
            assert!(matches!(
                bad.init(&device).unwrap_err(),
                DistillError::OutOfRange { .. }
            ));
        }
    }

    /// One SGD step on every map of the projection.
    fn sgd(p: HiddenProjection, grads: &burn::tensor::Gradients, lr: f64) -> HiddenProjection {
        HiddenProjection {
            maps: p
                .maps
                .into_iter()
                .map(|m| {
                    let w = m.weight.val();
                    let g = w.grad(grads).expect("the projection has a gradient");
                    assert!(values(g.clone()).iter().any(|&x| x != 0.0));
                    Linear {
                        weight: Param::from_tensor((w.inner() - g * lr).autodiff().require_grad()),
                        bias: None,
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn the_learned_projection_receives_gradients_and_learns() {
        let device = device(49).autodiff();
        // The teacher's hidden states are a fixed linear map of the student's, 6 -> 10 wide.
        let target = normal([6, 10], 0.5, &device.clone().without_autodiff());
        let student_h: Vec<Tensor<3>> = (0..2).map(|_| normal([4, 8, 6], 1.0, &device)).collect();
        let teacher_h: Vec<Tensor<3>> = student_h
            .iter()
            .map(|h| {
                h.clone()
                    .without_autodiff()
                    .matmul(target.clone().unsqueeze())
            })
            .collect();
        let logits = Tensor::<3>::zeros([4, 8, 4], &device);
        let mut distiller: Distiller =
            DistillConfig::new("hidden-mse:1,hidden-cos:1".parse().unwrap())
                .with_layers(vec![(0, 0), (1, 1)])
                .with_projection(Some(HiddenProjectionConfig::new(6, 10).with_pairs(2)))
                .init(&device)
                .unwrap();
        assert_eq!(distiller.num_params(), 2 * 6 * 10);
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..60 {
            let parts = distiller
                .loss(
                    DistillOutput::new(logits.clone()).with_hidden(teacher_h.clone()),
                    DistillOutput::new(logits.clone()).with_hidden(student_h.clone()),
                    None,
                    None,
                )
                .unwrap();
            first.get_or_insert(parts.value);
            last = parts.value;
            let grads = parts.total.backward();
            distiller.projection = Some(sgd(distiller.projection.take().unwrap(), &grads, 2.0));
        }
        let first = first.unwrap();
        assert!(
            last < 0.05 * first,
            "the projection did not learn: {first} -> {last}"
        );
    }

    /// A model whose logits and hidden state are rows of tables indexed by the token.
    struct Table {
        logits: Tensor<2>,
        hidden: Tensor<2>,
        asked_hidden: std::cell::Cell<Option<bool>>,
    }

    impl DistillModel for Table {
        fn distill_forward(
            &self,
            tokens: Tensor<2, Int>,
            want_hidden: bool,
        ) -> moekit_distill::Result<DistillOutput> {
            self.asked_hidden.set(Some(want_hidden));
            let [b, t] = tokens.dims();
            let ids = tokens.to_device(&self.logits.device()).reshape([b * t]);
            let rows = |x: &Tensor<2>| {
                let w = x.dims()[1];
                x.clone().select(0, ids.clone()).reshape([b, t, w])
            };
            let out = DistillOutput::new(rows(&self.logits));
            Ok(if want_hidden {
                out.with_hidden(vec![rows(&self.hidden)])
            } else {
                out
            })
        }
    }

    fn table(v: usize, h: usize, device: &Device) -> Table {
        let param = |x: Tensor<2>| {
            if device.is_autodiff() {
                x.require_grad()
            } else {
                x
            }
        };
        Table {
            logits: param(normal([v, v], 2.0, device)),
            hidden: param(normal([v, h], 1.0, device)),
            asked_hidden: Default::default(),
        }
    }

    #[test]
    fn step_runs_both_models_and_only_the_student_learns() {
        let train = device(50).autodiff();
        // The teacher on an autodiff device too, to check that nothing flows back to it.
        let teacher = table(7, 5, &train);
        let student = table(7, 5, &train);
        let tokens = ints(vec![0, 3, 6, 2, 2, 5], [2, 3], &train);
        let d = DistillConfig::new("kl:1".parse().unwrap())
            .init(&train)
            .unwrap();
        let parts = d
            .step(&teacher, &student, tokens.clone(), None, None)
            .unwrap();
        assert_eq!(teacher.asked_hidden.get(), Some(false));
        assert_eq!(student.asked_hidden.get(), Some(false));
        let grads = parts.total.backward();
        assert!(
            teacher
                .logits
                .grad(&grads)
                .is_none_or(|g| values(g).iter().all(|&x| x == 0.0))
        );
        let g = values(student.logits.grad(&grads).unwrap());
        // Only the rows of the tokens seen get a gradient.
        for (i, x) in g.iter().enumerate() {
            assert_eq!(
                *x != 0.0,
                [0, 2, 3, 5, 6].contains(&(i / 7)),
                "row {}",
                i / 7
            );
        }

        let d = DistillConfig::new("kl:1,hidden-mse:1".parse().unwrap())
            .with_layers(vec![(0, 0)])
            .init(&train)
            .unwrap();
        let parts = d.step(&teacher, &student, tokens, None, None).unwrap();
        assert_eq!(teacher.asked_hidden.get(), Some(true));
        assert_eq!(student.asked_hidden.get(), Some(true));
        let grads = parts.total.backward();
        assert!(student.hidden.grad(&grads).is_some());
        assert!(
            teacher
                .hidden
                .grad(&grads)
                .is_none_or(|g| values(g).iter().all(|&x| x == 0.0))
        );
    }

    /// A teacher that must not be asked.
    struct Absent;

    impl DistillModel for Absent {
        fn distill_forward(
            &self,
            _tokens: Tensor<2, Int>,
            _want_hidden: bool,
        ) -> moekit_distill::Result<DistillOutput> {
            panic!("the teacher was run although no term of weight > 0 needs it")
        }
    }

    #[test]
    fn terms_of_weight_zero_are_skipped_and_ce_alone_never_runs_the_teacher() {
        let train = device(52).autodiff();
        let student = table(6, 4, &train);
        let tokens = ints(vec![1, 2, 3, 4], [1, 4], &train);
        let labels = ints(vec![2, 3, 4, 5], [1, 4], &train);
        let d = DistillConfig::new("kl:0,hidden-mse:0,ce:1".parse().unwrap())
            .with_layers(vec![(0, 0)])
            .init(&train)
            .unwrap();
        assert!(!d.wants_hidden());
        let parts = d
            .step(
                &Absent,
                &student,
                tokens.clone(),
                Some(labels.clone()),
                None,
            )
            .unwrap();
        assert_eq!(student.asked_hidden.get(), Some(false));
        let names: Vec<&str> = parts.parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ce"]);
        let ce = DistillConfig::new("ce:1".parse().unwrap())
            .init(&train)
            .unwrap()
            .step(&Absent, &student, tokens.clone(), Some(labels), None)
            .unwrap();
        assert_eq!(parts.value, ce.value);

        // A term of weight 0 whose value would be NaN does not fail the step: a teacher with
        // finite logits and NaN hidden states.
        let teacher = table(6, 4, &train);
        let teacher = Table {
            hidden: teacher.hidden.clone().mul_scalar(f32::NAN),
            ..teacher
        };
        let with = |spec: &str| {
            DistillConfig::new(spec.parse().unwrap())
                .with_layers(vec![(0, 0)])
                .init(&train)
                .unwrap()
                .step(&teacher, &student, tokens.clone(), None, None)
        };
        // A hidden-state term of weight 0 needs no layer map either.
        assert!(
            DistillConfig::new("kl:1,hidden-mse:0".parse().unwrap())
                .init(&train)
                .is_ok()
        );
        let err = with("kl:1,hidden-mse:1").unwrap_err();
        assert!(err.to_string().contains("hidden-mse"), "{err}");
        let parts = with("kl:1,hidden-mse:0").unwrap();
        assert!(parts.value.is_finite());
        assert_eq!(teacher.asked_hidden.get(), Some(false));
    }

    #[test]
    fn a_teacher_without_autodiff_works_with_an_autodiff_student() {
        let plain = device(51);
        let train = plain.clone().autodiff();
        let teacher = table(6, 4, &plain);
        let student = table(6, 4, &train);
        let d = DistillConfig::new("jsd:1,hidden-cos:0.5".parse().unwrap())
            .with_layers(vec![(0, 0)])
            .init(&train)
            .unwrap();
        let tokens = ints(vec![1, 2, 3, 4], [1, 4], &train);
        let parts = d.step(&teacher, &student, tokens, None, None).unwrap();
        assert!(parts.value > 0.0);
        let grads = parts.total.backward();
        assert!(
            values(student.logits.grad(&grads).unwrap())
                .iter()
                .any(|&x| x != 0.0)
        );
    }
}
