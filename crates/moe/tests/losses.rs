//! Auxiliary losses: closed forms, limits and finite-difference gradients.

use burn::tensor::{Device, Tensor};
use moekit_moe::losses::{AuxLosses, aux_losses, logsumexp};
use moekit_moe::{DispatchPlan, Router, RouterConfig, Selection};
use moekit_testing::{device, normal, tensor, values};

fn router(experts: usize, selection: Selection, device: &Device) -> Router {
    RouterConfig::new(4, experts)
        .with_selection(selection)
        .init(device)
        .unwrap()
}

/// All losses of routing `logits` `[T, E]`.
fn losses(router: &Router, logits: Tensor<2>) -> AuxLosses {
    let routing = router.route_logits(logits);
    let plan = DispatchPlan::new(&routing, None, None).unwrap();
    aux_losses(&routing, None, &plan.routed)
}

fn scalar(t: Tensor<1>) -> f32 {
    values(t)[0]
}

/// `[T, E]` logits where token `t` prefers expert `t mod E` by `margin`.
fn balanced(t: usize, e: usize, margin: f32, device: &Device) -> Tensor<2> {
    let v = (0..t * e)
        .map(|i| if i % e == (i / e) % e { margin } else { 0.0 })
        .collect();
    tensor(v, [t, e], device)
}

/// `[T, E]` logits where every token prefers expert 0 by `margin`.
fn collapsed(t: usize, e: usize, margin: f32, device: &Device) -> Tensor<2> {
    let v = (0..t * e)
        .map(|i| if i % e == 0 { margin } else { 0.0 })
        .collect();
    tensor(v, [t, e], device)
}

fn top1(e: usize, device: &Device) -> Router {
    router(
        e,
        Selection::TopK {
            k: 1,
            renormalize: true,
        },
        device,
    )
}

#[test]
fn load_balancing_is_one_when_balanced_and_grows_with_collapse() {
    let device = device(1);
    let e = 4;
    let r = top1(e, &device);
    // Token t prefers expert t mod E: every expert gets the same load and mean probability.
    let lb = scalar(losses(&r, balanced(8, e, 2.0, &device)).load_balancing);
    assert!((lb - 1.0).abs() < 1e-5, "balanced: {lb}");
    // Uniform probabilities: 1 as well, whatever the (tie-broken) choice.
    let lb = scalar(losses(&r, Tensor::zeros([8, e], &device)).load_balancing);
    assert!((lb - 1.0).abs() < 1e-5, "uniform: {lb}");
    // Everyone prefers expert 0, more and more sharply.
    let mut last = 1.0;
    for sharpness in [0.5f32, 1.0, 2.0, 4.0, 8.0] {
        let lb = scalar(losses(&r, collapsed(8, e, sharpness, &device)).load_balancing);
        assert!(lb > last, "collapse {sharpness}: {lb} <= {last}");
        assert!(lb <= e as f32 + 1e-5);
        last = lb;
    }
    assert!(last > 0.99 * e as f32, "full collapse approaches E: {last}");
}

#[test]
fn z_loss_matches_its_closed_form() {
    let device = device(2);
    let r = router(
        3,
        Selection::TopK {
            k: 2,
            renormalize: false,
        },
        &device,
    );
    let l = [[1.0f64, 2.0, 3.0], [-1.0, 0.0, 50.0]];
    let want: f64 = l
        .iter()
        .map(|row| row.iter().map(|v| v.exp()).sum::<f64>().ln().powi(2))
        .sum::<f64>()
        / 2.0;
    let logits = tensor(
        l.iter().flatten().map(|&v| v as f32).collect(),
        [2, 3],
        &device,
    );
    let z = scalar(losses(&r, logits).router_z) as f64;
    assert!((z - want).abs() < 1e-4 * want, "{z} vs {want}");
}

#[test]
fn logsumexp_is_finite_for_extreme_logits() {
    let device = device(3);
    let x = tensor(vec![1e4, -1e4, 0.0, 1e4, 1e4, 1e4], [2, 3], &device);
    let v = values(logsumexp(x));
    assert!(
        (v[0] - 1e4).abs() < 1e-2 && (v[1] - (1e4 + 3f32.ln())).abs() < 1e-2,
        "{v:?}"
    );
}

#[test]
fn importance_and_load_cv2_are_zero_when_balanced() {
    let device = device(4);
    let e = 4;
    let r = top1(e, &device);
    let l = losses(&r, balanced(8, e, 2.0, &device));
    assert!(scalar(l.importance_cv2).abs() < 1e-6);
    assert!(scalar(l.load_cv2).abs() < 1e-6);
    // All load on one expert of four: CV² of [n, 0, 0, 0] is E - 1 = 3.
    let l = losses(&r, collapsed(8, e, 5.0, &device));
    assert!((scalar(l.load_cv2) - 3.0).abs() < 1e-4);
}

#[test]
fn padding_is_excluded_from_every_loss() {
    let device = device(5);
    let r = router(
        4,
        Selection::TopK {
            k: 2,
            renormalize: true,
        },
        &device,
    );
    let logits = normal([6, 4], 1.0, &device);
    let real = logits.clone().narrow(0, 0, 4);
    let routing = r.route_logits(logits);
    let keep = tensor(vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0], [6], &device);
    let plan = DispatchPlan::new(&routing, Some(keep.clone().greater_elem(0.5)), None).unwrap();
    let masked = aux_losses(&routing, Some(keep), &plan.routed);
    let unpadded = losses(&r, real);
    for (a, b) in [
        (masked.load_balancing, unpadded.load_balancing),
        (masked.router_z, unpadded.router_z),
        (masked.importance_cv2, unpadded.importance_cv2),
        (masked.load_cv2, unpadded.load_cv2),
    ] {
        let (a, b) = (scalar(a), scalar(b));
        assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

/// Central finite differences of `f` at `x` against autodiff.
fn check_gradient(f: impl Fn(Tensor<2>) -> Tensor<1>, x: Vec<f32>, shape: [usize; 2], name: &str) {
    let device = device(6).autodiff();
    let xt = tensor(x.clone(), shape, &device).require_grad();
    let grads = f(xt.clone()).backward();
    let analytic = values(xt.grad(&grads).unwrap());
    let eps = 1e-2f32;
    for i in 0..x.len() {
        let at = |d: f32| {
            let mut v = x.clone();
            v[i] += d;
            scalar(f(tensor(v, shape, &device)).detach()) as f64
        };
        let numeric = ((at(eps) - at(-eps)) / (2.0 * eps as f64)) as f32;
        let tol = 2e-3 + 2e-2 * numeric.abs();
        assert!(
            (analytic[i] - numeric).abs() < tol,
            "{name}[{i}]: autodiff {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

#[test]
fn loss_gradients_match_finite_differences() {
    let d = device(7);
    // Clear margins between experts so that ±eps never changes the top-k choice.
    let logits = vec![
        2.0, 0.5, -1.0, 0.0, -0.5, 1.5, 0.3, -2.0, 1.0, 0.1, 2.5, -0.8,
    ];
    for selection in [
        Selection::TopK {
            k: 2,
            renormalize: true,
        },
        Selection::TopK {
            k: 1,
            renormalize: false,
        },
    ] {
        let r = router(4, selection, &d);
        check_gradient(
            |l| losses(&r, l).load_balancing,
            logits.clone(),
            [3, 4],
            "load balancing",
        );
        check_gradient(|l| losses(&r, l).router_z, logits.clone(), [3, 4], "z-loss");
        check_gradient(
            |l| losses(&r, l).importance_cv2,
            logits.clone(),
            [3, 4],
            "importance",
        );
    }
}
