//! Factored (low-rank) router gates: logits, parameter count, best rank-r factors, errors.

use burn::module::Module;
use burn::tensor::Tensor;
use moekit_moe::{MoeError, RouterConfig, low_rank_factors};
use moekit_testing::{device, matmul, normal, tensor, values};

/// The Householder reflection `I − 2·v·vᵀ/‖v‖²` `[n, n]`: orthogonal, in closed form.
fn householder(v: &[f32]) -> Vec<f32> {
    let n = v.len();
    let norm: f32 = v.iter().map(|x| x * x).sum();
    let mut q = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            q[i * n + j] = f32::from(i == j) - 2.0 * v[i] * v[j] / norm;
        }
    }
    q
}

fn frobenius(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt()
}

#[test]
fn a_factored_gate_routes_on_x_times_both_factors() {
    let device = device(3);
    let (h, e, r) = (12, 9, 4);
    let router = RouterConfig::new(h, e)
        .with_rank(Some(r))
        .init(&device)
        .unwrap();
    assert_eq!((router.num_experts(), router.hidden_size()), (e, h));
    assert_eq!(router.rank(), Some(r));
    assert_eq!(router.num_params(), r * (h + e));
    let down = normal([h, r], 1.0, &device);
    let up = normal([r, e], 1.0, &device);
    let router = router.with_factors(down.clone(), up.clone()).unwrap();
    let x = normal([5, h], 1.0, &device);
    let want = matmul(
        &matmul(&values(x.clone()), &values(down), 5, h, r),
        &values(up),
        5,
        r,
        e,
    );
    let got = values(router.logits(x));
    assert!(frobenius(&got, &want) < 1e-4 * frobenius(&want, &vec![0.0; want.len()]));
    // A full router of the same shape counts H·E and has no rank.
    let full = RouterConfig::new(h, e).init(&device).unwrap();
    assert_eq!((full.rank(), full.num_params()), (None, h * e));
}

#[test]
fn initial_factored_logits_have_the_scale_of_a_full_gate() {
    let device = device(5);
    let (h, e) = (64, 48);
    let std = |rank: Option<usize>| {
        let w = values(
            RouterConfig::new(h, e)
                .with_rank(rank)
                .init(&device)
                .unwrap()
                .weight(),
        );
        (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt()
    };
    let (full, factored) = (std(None), std(Some(8)));
    assert!((full - 0.02).abs() < 0.002, "{full}");
    assert!((factored / full - 1.0).abs() < 0.25, "{factored} vs {full}");
}

#[test]
fn factors_are_the_best_rank_r_approximation() {
    // W = Q_h · diag(s) · Q_e with orthogonal Householder reflections: its singular values are
    // s, and the best rank-r error is √(Σ_{i≥r} s_i²) (Eckart–Young).
    let (h, e) = (7, 5);
    let s = [5.0f32, 3.0, 2.0, 1.0, 0.5];
    let qh = householder(&[1.0, -2.0, 0.5, 3.0, 1.0, -1.0, 2.0]);
    let qe = householder(&[2.0, 1.0, -1.0, 0.5, 1.5]);
    let mut diag = vec![0f32; h * e];
    for (i, v) in s.iter().enumerate() {
        diag[i * e + i] = *v;
    }
    let w = matmul(&matmul(&qh, &diag, h, h, e), &qe, h, e, e);
    let device = device(1);
    for r in 1..=e {
        let (down, up) = low_rank_factors(tensor(w.clone(), [h, e], &device), r).unwrap();
        assert_eq!((down.dims(), up.dims()), ([h, r], [r, e]));
        let approx = matmul(&values(down.clone()), &values(up.clone()), h, r, e);
        let want = s[r..].iter().map(|v| v * v).sum::<f32>().sqrt();
        let err = frobenius(&approx, &w);
        assert!(
            (err - want).abs() < 1e-4,
            "rank {r}: error {err}, optimum {want}"
        );
        // W_down's columns are orthonormal; row j of W_up has norm s_j.
        let (d, u) = (values(down), values(up));
        for j in 0..r {
            for l in 0..r {
                let dot: f32 = (0..h).map(|i| d[i * r + j] * d[i * r + l]).sum();
                assert!(
                    (dot - f32::from(j == l)).abs() < 1e-4,
                    "columns {j}, {l}: {dot}"
                );
            }
            let row: f32 = (0..e)
                .map(|k| u[j * e + k] * u[j * e + k])
                .sum::<f32>()
                .sqrt();
            assert!((row - s[j]).abs() < 1e-4, "row {j}: {row}");
        }
    }
}

#[test]
fn with_weight_keeps_the_rank_and_reproduces_a_rank_r_gate() {
    let device = device(9);
    let (h, e, r) = (10, 8, 3);
    let w = normal([h, r], 1.0, &device).matmul(normal([r, e], 1.0, &device));
    let full = RouterConfig::new(h, e)
        .init(&device)
        .unwrap()
        .with_weight(w.clone())
        .unwrap();
    assert_eq!(values(full.weight()), values(w.clone()));
    let factored = RouterConfig::new(h, e)
        .with_rank(Some(r))
        .init(&device)
        .unwrap()
        .with_weight(w.clone())
        .unwrap();
    assert_eq!(factored.rank(), Some(r));
    let (got, want) = (values(factored.weight()), values(w));
    let scale = frobenius(&want, &vec![0.0; want.len()]);
    assert!(frobenius(&got, &want) < 1e-4 * scale);
}

/// Whether the gradient of `Σ (x·W_g − t)²` reaches `W_down` and `W_up` with non-zero values.
fn factor_gradients(router: moekit_moe::Router, train: &burn::tensor::Device) -> [bool; 2] {
    let router = router.fork(train).train();
    let target = normal([4, 5], 1.0, train);
    let loss = (router.logits(normal([4, 6], 1.0, train)) - target)
        .square()
        .sum();
    let grads = loss.backward();
    let up = router.gate_up.as_ref().unwrap();
    [router.gate.val(), up.val()].map(|p| {
        p.grad(&grads)
            .is_some_and(|g| values(g).iter().any(|v| *v != 0.0))
    })
}

#[test]
fn factors_get_gradients_even_from_a_zero_gate() {
    let device = device(2);
    let train = device.clone().autodiff();
    let router = RouterConfig::new(6, 5)
        .with_rank(Some(2))
        .init(&device)
        .unwrap();
    assert_eq!(factor_gradients(router.clone(), &train), [true, true]);
    // A zero gate (uniform routing) factors into orthonormal W_down and W_up = 0: W_up still
    // gets a gradient through W_down, so the router can leave zero.
    let zero = router.with_weight(Tensor::zeros([6, 5], &device)).unwrap();
    assert!(values(zero.weight()).iter().all(|v| *v == 0.0));
    assert_eq!(factor_gradients(zero, &train), [false, true]);
}

#[test]
fn bad_ranks_shapes_and_weights_are_errors() {
    let device = device(0);
    let rank = |r| {
        RouterConfig::new(6, 4)
            .with_rank(Some(r))
            .init(&device)
            .map(|_| ())
    };
    // 6·4 = 24 gate parameters: rank 2 factors hold 2·(6 + 4) = 20, rank 3 already 30.
    assert!(rank(2).is_ok());
    for r in [0, 3, 4, 9] {
        assert_eq!(
            rank(r),
            Err(MoeError::InvalidRank {
                rank: r,
                hidden: 6,
                experts: 4
            })
        );
    }
    let message = rank(3).unwrap_err().to_string();
    assert!(message.contains("1 <= rank <= 2"), "{message}");
    let router = RouterConfig::new(6, 4)
        .with_rank(Some(2))
        .init(&device)
        .unwrap();
    assert!(matches!(
        router
            .clone()
            .with_factors(normal([6, 2], 1.0, &device), normal([2, 5], 1.0, &device)),
        Err(MoeError::WeightShape { .. })
    ));
    assert!(matches!(
        router.clone().with_weight(normal([4, 6], 1.0, &device)),
        Err(MoeError::WeightShape { .. })
    ));
    let mut nan = vec![0.5f32; 24];
    nan[7] = f32::NAN;
    assert_eq!(
        router.with_weight(tensor(nan, [6, 4], &device)).map(|_| ()),
        Err(MoeError::NonFinite("router gate"))
    );
    // The best rank-r factors themselves exist up to min(H, E).
    assert!(low_rank_factors(normal([6, 4], 1.0, &device), 4).is_ok());
    assert!(matches!(
        low_rank_factors(normal([6, 4], 1.0, &device), 5),
        Err(MoeError::OutOfRange { .. })
    ));
}

#[test]
fn a_full_router_becomes_factored_with_factors() {
    let device = device(4);
    let (down, up) = (normal([6, 2], 1.0, &device), normal([2, 4], 1.0, &device));
    let router = RouterConfig::new(6, 4)
        .init(&device)
        .unwrap()
        .with_factors(down.clone(), up.clone())
        .unwrap();
    assert_eq!((router.rank(), router.num_experts()), (Some(2), 4));
    let want = matmul(&values(down), &values(up), 6, 2, 4);
    assert!(frobenius(&values(router.weight()), &want) < 1e-5);
}
