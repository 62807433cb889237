//! Every loss against a naive f64 reference, and the closed forms and limits of the family.
//!
//! The tests live in a module named `distill` so that `cargo test --workspace -- distill`
//! selects them.

mod common;

mod distill {
    use super::common::*;
    use burn::tensor::Tensor;
    use moekit_distill::{
        DistillError, TokenMask, cross_entropy, forward_kl, generalized_jsd, hidden_cosine,
        hidden_mse, reverse_kl, skew_forward_kl, skew_reverse_kl, top_k_kl, total_variation,
    };
    use moekit_testing::{device, tensor, values};

    #[test]
    fn every_divergence_matches_the_f64_reference_with_and_without_padding() {
        let device = device(1);
        for (seed, std) in [(1u64, 1.0), (2, 4.0)] {
            let batch = Batch::random(3, 5, 11, std, seed);
            let mask = batch.mask(&device);
            for tau in [1.0, 2.5, 0.5] {
                for kind in kinds(batch.v) {
                    for masked in [false, true] {
                        let m = masked.then_some(&mask);
                        let got = scalar(
                            run(
                                kind,
                                batch.teacher_t(&device),
                                batch.student_t(&device),
                                m,
                                tau,
                            )
                            .unwrap(),
                        );
                        let valid = masked.then_some(batch.valid.as_slice());
                        let want =
                            reference(kind, &batch.teacher, &batch.student, batch.v, valid, tau);
                        assert_near(
                            got,
                            want,
                            2e-5,
                            2e-6,
                            &format!("{kind:?} std {std} tau {tau} masked {masked}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn teacher_logits_of_minus_infinity_add_nothing_instead_of_nan() {
        // A teacher that masks part of its vocabulary with -inf logits: every divergence that
        // stays finite (all but the reverse KL and the JSD at β = 1, which is the reverse KL:
        // +inf by definition, the student puts mass where the teacher has none) must equal the
        // f64 reference with those logits at -1e30, where 0·log 0 never arises, and the
        // student must get a finite gradient.
        let device = device(9);
        let mut batch = Batch::random(2, 3, 9, 2.0, 4);
        let masked = |i: usize| i % batch.v >= batch.v - 3;
        for (i, t) in batch.teacher.iter_mut().enumerate() {
            if masked(i) {
                *t = f32::NEG_INFINITY;
            }
        }
        let finite: Vec<f32> = batch
            .teacher
            .iter()
            .map(|&t| if t.is_finite() { t } else { -1e30 })
            .collect();
        let infinite = [Kind::Rkl, Kind::Jsd(1.0)];
        for kind in kinds(batch.v).into_iter().filter(|k| !infinite.contains(k)) {
            let got = scalar(
                run(
                    kind,
                    batch.teacher_t(&device),
                    batch.student_t(&device),
                    None,
                    1.5,
                )
                .unwrap(),
            );
            let want = reference(kind, &finite, &batch.student, batch.v, None, 1.5);
            assert_near(got, want, 2e-5, 2e-6, &format!("{kind:?}"));

            let train = device.clone().autodiff();
            let student = batch.student_t(&train).require_grad();
            let loss = run(kind, batch.teacher_t(&train), student.clone(), None, 1.5).unwrap();
            let grad = student.grad(&loss.backward()).expect("a gradient");
            assert!(
                values(grad).iter().all(|g| g.is_finite()),
                "{kind:?}: finite gradient"
            );
        }
    }

    #[test]
    fn cross_entropy_matches_the_reference_and_skips_ignored_labels() {
        let device = device(2);
        let batch = Batch::random(2, 4, 7, 2.0, 3);
        let labels = vec![0i64, 6, -100, 3, 5, -100, 1, 2];
        let want = reference_ce(&batch.student, 7, &labels, Some(&batch.valid));
        let got = cross_entropy(
            batch.student_t(&device),
            ints(labels.clone(), [2, 4], &device),
            Some(&batch.mask(&device)),
            -100,
        )
        .unwrap();
        assert_near(scalar(got), want, 1e-5, 1e-6, "ce masked");
        let want = reference_ce(&batch.student, 7, &labels, None);
        let got = cross_entropy(
            batch.student_t(&device),
            ints(labels, [2, 4], &device),
            None,
            -100,
        )
        .unwrap();
        assert_near(scalar(got), want, 1e-5, 1e-6, "ce");
        // Uniform logits: -log(1/V).
        let uniform = Tensor::<3>::zeros([1, 3, 7], &device);
        let got = cross_entropy(uniform, ints(vec![0, 3, 6], [1, 3], &device), None, -100);
        assert_near(scalar(got.unwrap()), 7f64.ln(), 1e-6, 1e-6, "uniform ce");
    }

    #[test]
    fn cross_entropy_rejects_labels_outside_the_vocabulary() {
        let device = device(3);
        let student = Tensor::<3>::zeros([1, 3, 5], &device);
        for bad in [5i64, -1, -99] {
            let err = cross_entropy(
                student.clone(),
                ints(vec![0, bad, 2], [1, 3], &device),
                None,
                -100,
            )
            .unwrap_err();
            assert_eq!(
                err,
                DistillError::LabelOutOfRange {
                    label: bad,
                    vocab: 5,
                    ignore_index: -100
                }
            );
        }
        // An out-of-range label at a padding position is never read.
        let m = mask(&[true, false, true], [1, 3], &device);
        let ok = cross_entropy(
            student,
            ints(vec![0, 77, 2], [1, 3], &device),
            Some(&m),
            -100,
        );
        assert_near(scalar(ok.unwrap()), 5f64.ln(), 1e-6, 1e-6, "padding label");
    }

    #[test]
    fn hidden_losses_match_the_reference() {
        let device = device(4);
        let batch = Batch::random(3, 4, 6, 1.5, 5);
        let mask = batch.mask(&device);
        for masked in [false, true] {
            let m = masked.then_some(&mask);
            let valid = masked.then_some(batch.valid.as_slice());
            let (s, t) = (batch.student_t(&device), batch.teacher_t(&device));
            let got = scalar(hidden_mse(s.clone(), t.clone(), m).unwrap());
            let want = reference_hidden(false, &batch.student, &batch.teacher, 6, valid);
            assert_near(got, want, 1e-5, 1e-6, "mse");
            let got = scalar(hidden_cosine(s, t, m).unwrap());
            let want = reference_hidden(true, &batch.student, &batch.teacher, 6, valid);
            assert_near(got, want, 1e-5, 1e-6, "cosine");
        }
        // Closed forms: parallel vectors have cosine distance 0 whatever their scale,
        // opposite ones 2, and a zero vector 1 (cosine 0).
        let a = tensor(vec![1.0, -2.0, 3.0, 0.0, 0.0, 0.0], [1, 2, 3], &device);
        let b = tensor(vec![1.0, -2.0, 3.0, 0.5, 1.0, 0.0], [1, 2, 3], &device);
        let cos = |a: Tensor<3>, b: Tensor<3>| scalar(hidden_cosine(a, b, None).unwrap());
        let first = |x: Tensor<3>| x.narrow(1, 0, 1);
        assert_near(
            cos(first(a.clone()) * 7.0, first(b.clone())),
            0.0,
            0.0,
            1e-6,
            "parallel",
        );
        assert_near(
            cos(first(a.clone()).neg(), first(b.clone())),
            2.0,
            0.0,
            1e-6,
            "opposite",
        );
        assert_near(cos(a, b), 0.5, 0.0, 1e-6, "zero vector");
    }

    #[test]
    fn divergence_of_a_distribution_from_itself_is_zero() {
        let device = device(5);
        let batch = Batch::random(2, 3, 9, 3.0, 6);
        for tau in [1.0, 3.0] {
            // (Top-k is not 0 here: the student is not renormalised over the top k.)
            for kind in kinds(9).into_iter().filter(|k| !matches!(k, Kind::TopK(_))) {
                let x = batch.student_t(&device);
                let got = scalar(run(kind, x.clone(), x, None, tau).unwrap());
                assert!(got.abs() < 1e-6, "{kind:?} tau {tau}: {got}");
            }
        }
    }

    #[test]
    fn the_symmetric_jsd_is_symmetric_and_bounded_by_ln_2() {
        let device = device(6);
        for (seed, std) in [(7u64, 1.0), (8, 10.0), (9, 100.0)] {
            let b = Batch::random(2, 3, 8, std, seed);
            let pq = scalar(
                generalized_jsd(b.teacher_t(&device), b.student_t(&device), None, 1.0, 0.5)
                    .unwrap(),
            );
            let qp = scalar(
                generalized_jsd(b.student_t(&device), b.teacher_t(&device), None, 1.0, 0.5)
                    .unwrap(),
            );
            assert_near(pq, qp, 1e-5, 1e-7, "symmetry");
            assert!(pq > 0.0 && pq <= 2f64.ln() + 1e-6, "std {std}: {pq}");
        }
        // Disjoint supports reach the bound.
        let p = tensor(vec![50.0, -50.0], [1, 1, 2], &device);
        let q = tensor(vec![-50.0, 50.0], [1, 1, 2], &device);
        let jsd = scalar(generalized_jsd(p, q, None, 1.0, 0.5).unwrap());
        assert_near(jsd, 2f64.ln(), 1e-6, 1e-6, "disjoint");
    }

    #[test]
    fn total_variation_is_at_most_one_and_reaches_it_for_disjoint_supports() {
        let device = device(7);
        for (seed, std) in [(10u64, 1.0), (11, 30.0)] {
            let b = Batch::random(2, 4, 6, std, seed);
            let tv = scalar(
                total_variation(b.teacher_t(&device), b.student_t(&device), None, 1.0).unwrap(),
            );
            assert!(tv > 0.0 && tv <= 1.0 + 1e-6, "{tv}");
        }
        let p = tensor(vec![50.0, -50.0, -50.0], [1, 1, 3], &device);
        let q = tensor(vec![-50.0, 50.0, -50.0], [1, 1, 3], &device);
        assert_near(
            scalar(total_variation(p, q, None, 1.0).unwrap()),
            1.0,
            1e-6,
            1e-6,
            "tv",
        );
    }

    #[test]
    fn forward_kl_at_temperature_tau_is_tau_squared_times_the_kl_of_the_tempered_logits() {
        let device = device(8);
        let b = Batch::random(2, 3, 10, 2.0, 12);
        for tau in [0.5, 2.0, 4.0] {
            let at_tau =
                scalar(forward_kl(b.teacher_t(&device), b.student_t(&device), None, tau).unwrap());
            let tempered = scalar(
                forward_kl(
                    b.teacher_t(&device) / tau,
                    b.student_t(&device) / tau,
                    None,
                    1.0,
                )
                .unwrap(),
            );
            assert_near(at_tau, tau * tau * tempered, 1e-5, 1e-7, "tau²");
            // And against the host computation of the tempered distributions.
            // (The reference includes the τ² factor.)
            let want = reference(Kind::Fkl, &b.teacher, &b.student, 10, None, tau);
            assert_near(at_tau, want, 1e-5, 1e-7, "reference");
        }
    }

    #[test]
    fn skew_kls_reduce_to_the_plain_kls_at_alpha_zero_and_vanish_at_one() {
        let device = device(9);
        let b = Batch::random(2, 3, 7, 2.0, 13);
        let (t, s) = (b.teacher_t(&device), b.student_t(&device));
        let m = b.mask(&device);
        let fkl = scalar(forward_kl(t.clone(), s.clone(), Some(&m), 1.5).unwrap());
        let rkl = scalar(reverse_kl(t.clone(), s.clone(), Some(&m), 1.5).unwrap());
        let sf0 = scalar(skew_forward_kl(t.clone(), s.clone(), Some(&m), 1.5, 0.0).unwrap());
        let sr0 = scalar(skew_reverse_kl(t.clone(), s.clone(), Some(&m), 1.5, 0.0).unwrap());
        assert_eq!(sf0, fkl);
        assert_eq!(sr0, rkl);
        // A tiny α is continuous with α = 0 (the log-space mixture has no jump).
        let sf = scalar(skew_forward_kl(t.clone(), s.clone(), Some(&m), 1.5, 1e-6).unwrap());
        assert_near(sf, fkl, 1e-4, 1e-6, "alpha -> 0");
        for f in [skew_forward_kl, skew_reverse_kl] {
            assert_eq!(
                scalar(f(t.clone(), s.clone(), Some(&m), 1.5, 1.0).unwrap()),
                0.0
            );
            // Bounded by -ln α·τ².
            let v = scalar(f(t.clone(), s.clone(), Some(&m), 1.0, 0.1).unwrap());
            assert!(v > 0.0 && v <= -(0.1f64.ln()), "{v}");
        }
    }

    #[test]
    fn gkd_beta_ends_are_forward_and_reverse_kl_and_its_limits_agree() {
        let device = device(10);
        let b = Batch::random(2, 3, 6, 1.5, 14);
        let (t, s) = (b.teacher_t(&device), b.student_t(&device));
        let fkl = scalar(forward_kl(t.clone(), s.clone(), None, 2.0).unwrap());
        let rkl = scalar(reverse_kl(t.clone(), s.clone(), None, 2.0).unwrap());
        let jsd = |beta| scalar(generalized_jsd(t.clone(), s.clone(), None, 2.0, beta).unwrap());
        assert_eq!(jsd(0.0), fkl);
        assert_eq!(jsd(1.0), rkl);
        assert_ne!(fkl, rkl);
        // JSD_β / β → KL(p_T ‖ q_S) as β → 0; JSD_β / (1 − β) → KL(q_S ‖ p_T) as β → 1.
        let beta = 1e-3;
        assert_near(jsd(beta) / beta, fkl, 2e-2, 0.0, "beta -> 0");
        assert_near(jsd(1.0 - beta) / beta, rkl, 2e-2, 0.0, "beta -> 1");
    }

    #[test]
    fn top_k_with_k_equal_to_the_vocabulary_is_the_forward_kl() {
        let device = device(11);
        let b = Batch::random(3, 4, 9, 2.0, 15);
        let m = b.mask(&device);
        for tau in [1.0, 2.0] {
            let (t, s) = (b.teacher_t(&device), b.student_t(&device));
            let fkl = scalar(forward_kl(t.clone(), s.clone(), Some(&m), tau).unwrap());
            let topk = scalar(top_k_kl(t.clone(), s.clone(), Some(&m), tau, 9).unwrap());
            assert_near(topk, fkl, 1e-5, 1e-7, "k = V");
            // Fewer tokens: still non-negative, and a student equal to the teacher scores 0
            // only if it puts no mass outside the top k.
            for k in [1, 4] {
                let v = scalar(top_k_kl(t.clone(), s.clone(), Some(&m), tau, k).unwrap());
                assert!(v >= 0.0, "k {k}: {v}");
                let own = scalar(top_k_kl(t.clone(), t.clone(), Some(&m), tau, k).unwrap());
                assert!(
                    own > 0.0,
                    "k {k}: the teacher's own tail mass counts: {own}"
                );
            }
        }
        for k in [0, 10] {
            let err = top_k_kl(b.teacher_t(&device), b.student_t(&device), None, 1.0, k);
            assert_eq!(err.unwrap_err(), DistillError::InvalidTopK { k, vocab: 9 });
        }
    }

    #[test]
    fn an_all_padding_batch_gives_exactly_zero() {
        let device = device(12);
        let b = Batch::random(2, 3, 5, 2.0, 16);
        let none = mask(&[false; 6], [2, 3], &device);
        for kind in kinds(5) {
            let v = run(
                kind,
                b.teacher_t(&device),
                b.student_t(&device),
                Some(&none),
                2.0,
            );
            assert_eq!(scalar(v.unwrap()), 0.0, "{kind:?}");
        }
        let ce = cross_entropy(
            b.student_t(&device),
            ints(vec![1; 6], [2, 3], &device),
            Some(&none),
            -100,
        );
        assert_eq!(scalar(ce.unwrap()), 0.0);
        let ce = cross_entropy(
            b.student_t(&device),
            ints(vec![-100; 6], [2, 3], &device),
            None,
            -100,
        );
        assert_eq!(scalar(ce.unwrap()), 0.0);
        let h = hidden_mse(b.student_t(&device), b.teacher_t(&device), Some(&none));
        assert_eq!(scalar(h.unwrap()), 0.0);
        let h = hidden_cosine(b.student_t(&device), b.teacher_t(&device), Some(&none));
        assert_eq!(scalar(h.unwrap()), 0.0);
    }

    #[test]
    fn float_masks_equal_boolean_masks() {
        let device = device(13);
        let b = Batch::random(3, 4, 5, 1.0, 17);
        let floats: Vec<f32> = b.valid.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
        let fm = TokenMask::from(tensor(floats, [3, 4], &device));
        let bm = b.mask(&device);
        let a =
            scalar(forward_kl(b.teacher_t(&device), b.student_t(&device), Some(&fm), 1.0).unwrap());
        let c =
            scalar(forward_kl(b.teacher_t(&device), b.student_t(&device), Some(&bm), 1.0).unwrap());
        assert_eq!(a, c);
    }

    #[test]
    fn bad_shapes_and_hyper_parameters_are_typed_errors() {
        let device = device(14);
        let b = Batch::random(2, 3, 5, 1.0, 18);
        let (t, s) = (b.teacher_t(&device), b.student_t(&device));
        let err = forward_kl(t.clone().narrow(2, 0, 4), s.clone(), None, 1.0).unwrap_err();
        assert!(matches!(
            err,
            DistillError::ShapeMismatch {
                what: "teacher logits",
                ..
            }
        ));
        let m = mask(&[true; 4], [2, 2], &device);
        let err = reverse_kl(t.clone(), s.clone(), Some(&m), 1.0).unwrap_err();
        assert!(matches!(
            err,
            DistillError::ShapeMismatch {
                what: "token mask",
                ..
            }
        ));
        for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = total_variation(t.clone(), s.clone(), None, tau).unwrap_err();
            assert!(matches!(
                err,
                DistillError::OutOfRange {
                    what: "temperature",
                    ..
                }
            ));
        }
        for bad in [-0.1, 1.5, f64::NAN] {
            let err = skew_forward_kl(t.clone(), s.clone(), None, 1.0, bad).unwrap_err();
            assert!(matches!(
                err,
                DistillError::OutOfRange { what: "alpha", .. }
            ));
            let err = generalized_jsd(t.clone(), s.clone(), None, 1.0, bad).unwrap_err();
            assert!(matches!(err, DistillError::OutOfRange { what: "beta", .. }));
        }
        let err = hidden_mse(s.clone(), t.narrow(2, 0, 4), None).unwrap_err();
        assert!(matches!(err, DistillError::ShapeMismatch { .. }));
        let err = cross_entropy(s, ints(vec![0; 3], [1, 3], &device), None, -100).unwrap_err();
        assert!(matches!(
            err,
            DistillError::ShapeMismatch { what: "labels", .. }
        ));
    }
}
