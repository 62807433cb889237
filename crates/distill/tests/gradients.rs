//! Gradients w.r.t. the student against central finite differences of the f64 references,
//! stability at extreme logits, and padding that neither changes a loss nor gets a gradient.
//!
//! The tests live in a module named `distill` so that `cargo test --workspace -- distill`
//! selects them.

mod common;

mod distill {
    use super::common::*;
    use burn::tensor::{Device, Tensor};
    use moekit_testing::{device, tensor, values};

    /// The loss and its gradient w.r.t. the student, on an autodiff device.
    fn loss_and_grad(case: &Case, student: &[f32], device: &Device) -> (f64, Vec<f32>) {
        let s = tensor(student.to_vec(), case.shape, device).require_grad();
        let loss = (case.loss)(s.clone());
        let value = scalar(loss.clone());
        let grads = loss.backward();
        (
            value,
            values(s.grad(&grads).expect("the student has a gradient")),
        )
    }

    /// Central finite differences of the case's f64 reference.
    fn finite_differences(case: &Case, h: f64) -> Vec<f64> {
        let x: Vec<f64> = case.student.iter().map(|&v| v as f64).collect();
        (0..x.len())
            .map(|i| {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                ((case.reference)(&up) - (case.reference)(&down)) / (2.0 * h)
            })
            .collect()
    }

    #[track_caller]
    fn check_gradient(case: &Case, device: &Device, h: f64, rtol: f64, atol: f64) {
        let (value, grad) = loss_and_grad(case, &case.student, device);
        let x: Vec<f64> = case.student.iter().map(|&v| v as f64).collect();
        let want = (case.reference)(&x);
        assert_near(value, want, 1e-4, 1e-5, &format!("{}: value", case.name));
        let fd = finite_differences(case, h);
        let scale = fd.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(
            scale > 1e-4,
            "{}: the gradient is trivially zero",
            case.name
        );
        for (i, (&g, &f)) in grad.iter().zip(&fd).enumerate() {
            let g = g as f64;
            assert!(
                g.is_finite() && (g - f).abs() <= atol * scale + rtol * f.abs(),
                "{}: d/dx[{i}] = {g} vs finite difference {f}",
                case.name
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_of_the_reference() {
        let device = device(20).autodiff();
        let batch = Batch::random(2, 3, 7, 1.5, 21);
        for tau in [1.0, 2.0] {
            for masked in [false, true] {
                for case in cases(&batch, tau, masked, &device) {
                    check_gradient(&case, &device, 1e-4, 1e-3, 1e-4);
                }
            }
        }
    }

    /// Rows where teacher and student put all their mass on different tokens, with logits of
    /// ±1e4 in the same row.
    fn extreme_batch() -> Batch {
        let (b, t, v) = (2, 3, 5);
        let mut rng = Rng::new(30);
        let mut teacher = rng.normals(b * t * v, 1.0);
        let mut student = rng.normals(b * t * v, 1.0);
        for r in 0..b * t {
            let (i, j) = (r % v, (r + 2) % v);
            teacher[r * v + i] = 1e4;
            teacher[r * v + j] = -1e4;
            student[r * v + i] = -1e4;
            student[r * v + j] = 1e4;
            if r % 2 == 0 {
                // A near tie at the top of the teacher, far below the student's favourite.
                teacher[r * v + (r + 1) % v] = 1e4 - 1.0;
            }
        }
        let mut batch = Batch::random(b, t, v, 1.0, 31);
        batch.teacher = teacher;
        batch.student = student;
        batch
    }

    #[test]
    fn extreme_logits_give_finite_losses_and_finite_gradients_that_match_the_reference() {
        let device = device(22).autodiff();
        let batch = extreme_batch();
        for tau in [1.0, 3.0] {
            for masked in [false, true] {
                for case in cases(&batch, tau, masked, &device) {
                    let (value, grad) = loss_and_grad(&case, &case.student, &device);
                    assert!(value.is_finite(), "{}: {value}", case.name);
                    assert!(
                        grad.iter().all(|g| g.is_finite()),
                        "{}: {grad:?}",
                        case.name
                    );
                    let x: Vec<f64> = case.student.iter().map(|&v| v as f64).collect();
                    let want = (case.reference)(&x);
                    assert_near(value, want, 1e-4, 1e-4, &format!("{}: value", case.name));
                    // In f32, exp(-2e4) is exactly 0: the saturated gradients are exact.
                    let fd = finite_differences(&case, 1e-3);
                    for (i, (&g, &f)) in grad.iter().zip(&fd).enumerate() {
                        let g = g as f64;
                        assert!(
                            (g - f).abs() <= 1e-3 + 1e-3 * f.abs(),
                            "{}: d/dx[{i}] = {g} vs finite difference {f}",
                            case.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn padding_changes_nothing_and_gets_zero_gradient_whatever_it_holds() {
        let device = device(23).autodiff();
        let batch = Batch::random(3, 4, 6, 1.0, 24);
        let mut garbage = batch.clone();
        let mut rng = Rng::new(25);
        for r in 0..batch.rows() {
            if !batch.valid[r] {
                for k in 0..batch.v {
                    let i = r * batch.v + k;
                    garbage.student[i] = match k {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => -1e30,
                        _ => (rng.normal() * 1e3) as f32,
                    };
                    garbage.teacher[i] = if k == 3 {
                        f32::NAN
                    } else {
                        -garbage.student[i]
                    };
                }
            }
        }
        let clean = cases(&batch, 2.0, true, &device);
        let dirty = cases(&garbage, 2.0, true, &device);
        for (c, d) in clean.iter().zip(&dirty) {
            let (v_clean, g_clean) = loss_and_grad(c, &c.student, &device);
            let (v_dirty, g_dirty) = loss_and_grad(d, &d.student, &device);
            assert_eq!(v_clean, v_dirty, "{}", c.name);
            for (i, (a, b)) in g_clean.iter().zip(&g_dirty).enumerate() {
                assert_eq!(a, b, "{}: gradient {i}", c.name);
                if !batch.valid[i / batch.v] {
                    assert_eq!(*b, 0.0, "{}: padding gradient {i}", c.name);
                }
            }
        }
    }

    #[test]
    fn an_all_padding_batch_has_zero_gradient() {
        let device = device(26).autodiff();
        let mut batch = Batch::random(2, 3, 4, 1.0, 27);
        batch.valid = vec![false; 6];
        for case in cases(&batch, 1.0, true, &device) {
            let (value, grad) = loss_and_grad(&case, &case.student, &device);
            assert_eq!(value, 0.0, "{}", case.name);
            assert!(grad.iter().all(|&g| g == 0.0), "{}: {grad:?}", case.name);
        }
    }

    #[test]
    fn no_gradient_reaches_the_teacher() {
        let device = device(28).autodiff();
        let batch = Batch::random(2, 3, 5, 1.0, 29);
        for kind in kinds(5) {
            let t = batch.teacher_t(&device).require_grad();
            let s = batch.student_t(&device).require_grad();
            let loss = run(kind, t.clone(), s.clone(), None, 1.5).unwrap();
            let grads = loss.backward();
            let tg = t.grad(&grads).map(values);
            assert!(
                tg.is_none_or(|g| g.iter().all(|&x| x == 0.0)),
                "{kind:?}: the teacher got a gradient"
            );
            assert!(s.grad(&grads).is_some(), "{kind:?}");
        }
        let t = Tensor::<3>::ones([1, 2, 3], &device).require_grad();
        let s = Tensor::<3>::zeros([1, 2, 3], &device).require_grad();
        for loss in [
            moekit_distill::hidden_mse(s.clone(), t.clone(), None).unwrap(),
            moekit_distill::hidden_cosine(s.clone() + 1.0, t.clone(), None).unwrap(),
        ] {
            let grads = loss.backward();
            assert!(
                t.grad(&grads)
                    .is_none_or(|g| values(g).iter().all(|&x| x == 0.0))
            );
        }
    }
}
