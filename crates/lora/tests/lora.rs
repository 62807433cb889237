//! `LoraLinear` and `LoraAdapter` against naive f64 computations: forward, initialisation,
//! merge/unmerge, gradients (none for the frozen base), dropout, errors.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use moekit_lora::{LinearSlot, LoraAdapter, LoraConfig, LoraInit, LoraLinear};
use moekit_testing::{assert_close, device, matmul, normal, tensor, values};

const IN: usize = 12;
const OUT: usize = 7;
const R: usize = 3;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    values(t).into_iter().map(f64::from).collect()
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .flat_map(|j| (0..rows).map(move |i| a[i * cols + j]))
        .collect()
}

/// A layer with non-zero A, B and bias.
fn layer(alpha: f64, rslora: bool, device: &Device) -> LoraLinear {
    let base = LinearConfig::new(IN, OUT).init(device);
    let adapter = LoraAdapter::from_factors(
        normal([IN, R], 0.5, device),
        normal([R, OUT], 0.5, device),
        alpha,
        rslora,
    )
    .unwrap();
    LoraLinear::new(base, adapter).unwrap()
}

/// `x·W + b + s·x·A·B` in f64.
fn reference(l: &LoraLinear, x: &[f64], rows: usize) -> Vec<f64> {
    let w = host(l.base.weight.val());
    let b = host(l.base.bias.as_ref().unwrap().val());
    let (a, bb) = (host(l.adapter.a.val()), host(l.adapter.b.val()));
    let s = l.adapter.scaling();
    let base = matmul(x, &w, rows, IN, OUT);
    let low = matmul(&matmul(x, &a, rows, IN, R), &bb, rows, R, OUT);
    (0..rows * OUT)
        .map(|i| base[i] + b[i % OUT] + s * low[i])
        .collect()
}

fn to_tensor(v: &[f64], shape: [usize; 2], device: &Device) -> Tensor<2> {
    tensor(v.iter().map(|&x| x as f32).collect(), shape, device)
}

#[test]
fn forward_matches_the_naive_formula_with_both_scalings() {
    let device = device(1);
    for (alpha, rslora, s) in [(6.0, false, 2.0), (6.0, true, 6.0 / 3f64.sqrt())] {
        let l = layer(alpha, rslora, &device);
        assert!((l.adapter.scaling() - s).abs() < 1e-12);
        let x = normal([5, IN], 1.0, &device);
        let expected = reference(&l, &host(x.clone()), 5);
        assert_close(
            l.forward(x),
            to_tensor(&expected, [5, OUT], &device),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn fresh_adapters_leave_the_base_unchanged_and_follow_their_init() {
    let device = device(2);
    let (d_in, d_out, r) = (256, 64, 8);
    let base = LinearConfig::new(d_in, d_out).init(&device);
    let x = normal([4, d_in], 1.0, &device);
    let kaiming = LoraConfig::new(r).init(d_in, d_out, &device).unwrap();
    let a = values(kaiming.a.val());
    let bound = 1.0 / (d_in as f32).sqrt();
    assert!(
        a.iter().all(|v| v.abs() <= bound),
        "kaiming-uniform bound 1/sqrt(in)"
    );
    let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max > 0.9 * bound, "uses the whole range: {max} vs {bound}");
    assert!(values(kaiming.b.val()).iter().all(|&v| v == 0.0), "B = 0");
    let l = LoraLinear::new(base.clone(), kaiming).unwrap();
    assert_eq!(
        values(l.forward(x.clone())),
        values(base.forward(x)),
        "exactly the base"
    );

    let gauss = LoraConfig::new(r)
        .with_init(LoraInit::Gaussian)
        .init(d_in, d_out, &device)
        .unwrap();
    let a = values(gauss.a.val());
    let n = a.len() as f32;
    let mean = a.iter().sum::<f32>() / n;
    let std = (a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
    assert!(
        (std - 1.0 / r as f32).abs() < 0.1 / r as f32,
        "std {std} vs 1/r"
    );
}

#[test]
fn merge_and_unmerge_are_exact() {
    let device = device(3);
    let mut l = layer(4.0, false, &device);
    let x = normal([6, IN], 1.0, &device);
    let before = l.forward(x.clone());
    let w = values(l.base.weight.val());
    l.merge();
    assert!(l.is_merged());
    // Merged: x·(W + s·A·B) + b equals the factored forward up to rounding.
    assert_close(l.forward(x.clone()), before.clone(), 1e-5, 1e-5);
    let merged_w = host(l.merged_weight());
    let (a, b) = (host(l.adapter.a.val()), host(l.adapter.b.val()));
    let ab = matmul(&a, &b, IN, R, OUT);
    let expected: Vec<f64> = w
        .iter()
        .zip(&ab)
        .map(|(&w, d)| f64::from(w) + l.adapter.scaling() * d)
        .collect();
    assert_close(
        to_tensor(&merged_w, [IN, OUT], &device),
        to_tensor(&expected, [IN, OUT], &device),
        1e-5,
        1e-6,
    );
    l.unmerge();
    assert_eq!(values(l.base.weight.val()), w, "base weight bit for bit");
    assert_eq!(
        values(l.forward(x.clone())),
        values(before.clone()),
        "same as before merging"
    );
    let plain: Linear = l.into_merged();
    assert_close(plain.forward(x), before, 1e-5, 1e-5);
}

#[test]
fn merging_works_on_an_autodiff_device() {
    // A and B are tracked there, so `W + s·A·B` is a graph node; turning it into a parameter
    // must not panic (burn refuses to track a non-leaf tensor).
    let device = device(13).autodiff();
    let mut l = layer(4.0, false, &device);
    let x = normal([4, IN], 1.0, &device);
    let before = l.forward(x.clone());
    l.merge();
    assert_close(l.forward(x.clone()), before.clone(), 1e-5, 1e-5);
    let plain = l.clone().into_merged();
    assert_close(plain.forward(x.clone()), before.clone(), 1e-5, 1e-5);
    // The merged plain layer trains: its weight is a leaf that gets a gradient.
    let grads = plain.forward(x.clone()).sum().backward();
    assert!(plain.weight.val().grad(&grads).is_some());
    let mut slot = LinearSlot::Lora(l);
    slot.merge_into_plain();
    assert_close(slot.forward(x), before, 1e-5, 1e-5);
}

#[test]
fn only_the_adapter_gets_gradients_and_they_match_the_closed_form() {
    // L = Σ y ⊙ G: dL/dB = s·(x·A)ᵀ·G, dL/dA = s·xᵀ·(G·Bᵀ), dL/dx = G·Wᵀ + s·G·Bᵀ·Aᵀ.
    let device = device(4).autodiff();
    let l = layer(6.0, false, &device);
    let rows = 5;
    let x = normal([rows, IN], 1.0, &device).require_grad();
    let g = normal([rows, OUT], 1.0, &device);
    let grads = (l.forward(x.clone()) * g.clone()).sum().backward();
    assert!(
        l.base.weight.val().grad(&grads).is_none(),
        "frozen base weight"
    );
    assert!(
        l.base.bias.as_ref().unwrap().val().grad(&grads).is_none(),
        "frozen bias"
    );

    let (xh, gh) = (host(x.clone()), host(g));
    let (a, b) = (host(l.adapter.a.val()), host(l.adapter.b.val()));
    let w = host(l.base.weight.val());
    let s = l.adapter.scaling();
    let xa = matmul(&xh, &a, rows, IN, R);
    let d_b: Vec<f64> = matmul(&transpose(&xa, rows, R), &gh, R, rows, OUT)
        .iter()
        .map(|v| s * v)
        .collect();
    let gbt = matmul(&gh, &transpose(&b, R, OUT), rows, OUT, R);
    let d_a: Vec<f64> = matmul(&transpose(&xh, rows, IN), &gbt, IN, rows, R)
        .iter()
        .map(|v| s * v)
        .collect();
    let d_x_base = matmul(&gh, &transpose(&w, IN, OUT), rows, OUT, IN);
    let d_x_low = matmul(&gbt, &transpose(&a, IN, R), rows, R, IN);
    let d_x: Vec<f64> = d_x_base
        .iter()
        .zip(&d_x_low)
        .map(|(p, q)| p + s * q)
        .collect();

    let plain = device.inner();
    let check = |got: Option<Tensor<2>>, want: &[f64], shape: [usize; 2]| {
        let got = got.expect("a gradient").to_device(&plain);
        assert_close(got, to_tensor(want, shape, &plain), 1e-4, 1e-5);
    };
    check(l.adapter.b.val().grad(&grads), &d_b, [R, OUT]);
    check(l.adapter.a.val().grad(&grads), &d_a, [IN, R]);
    check(x.grad(&grads), &d_x, [rows, IN]);
}

#[test]
fn dropout_touches_only_the_adapter_path_and_only_in_training() {
    let device = device(5);
    let l = layer(6.0, false, &device);
    let adapter = l.adapter.clone().with_dropout(0.9).unwrap();
    let dropped = LoraLinear::new(l.base.clone(), adapter).unwrap();
    let x = normal([8, IN], 1.0, &device);
    // Not on an autodiff device: no dropout, identical to the layer without it.
    assert_eq!(
        values(dropped.forward(x.clone())),
        values(l.forward(x.clone()))
    );
    // Training: the adapter's input is dropped, so the output changes...
    let train = device.clone().autodiff();
    let (dropped_t, l_t) = (dropped.clone().fork(&train), l.clone().fork(&train));
    let x_t = Tensor::<2>::from_data(x.to_data(), &train);
    assert!(x_t.device().is_autodiff());
    let diff = values((dropped_t.forward(x_t.clone()) - l_t.forward(x_t.clone())).abs())
        .into_iter()
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "dropout changed nothing");
    // ...but with B = 0 the base path is untouched by dropout.
    let mut zero_b = dropped_t.clone();
    zero_b.adapter.b = Param::from_tensor(Tensor::zeros([R, OUT], &train));
    assert_eq!(
        values(zero_b.forward(x_t.clone())),
        values(zero_b.base.forward(x_t))
    );
}

#[test]
fn slots_attach_and_merge() {
    let device = device(6);
    let base = LinearConfig::new(IN, OUT).init(&device);
    let mut slot = LinearSlot::from(base.clone());
    assert!(slot.adapter().is_none());
    let x = normal([3, IN], 1.0, &device);
    let l = layer(2.0, false, &device);
    slot.attach(l.adapter.clone()).unwrap();
    let adapted = LoraLinear::new(base.clone(), l.adapter.clone()).unwrap();
    assert_eq!(
        values(slot.forward(x.clone())),
        values(adapted.forward(x.clone()))
    );
    assert_eq!(slot.dims(), (IN, OUT));
    let expected = slot.forward(x.clone());
    slot.merge_into_plain();
    assert!(matches!(slot, LinearSlot::Plain(_)));
    assert_close(slot.forward(x), expected, 1e-5, 1e-5);
}

#[test]
fn bad_hyper_parameters_and_shapes_are_errors() {
    let device = device(7);
    for (config, needle) in [
        (LoraConfig::new(0), "rank 0"),
        (LoraConfig::new(8), "rank 8"),
        (LoraConfig::new(2).with_dropout(1.0), "dropout"),
        (LoraConfig::new(2).with_alpha(f64::NAN), "alpha"),
    ] {
        let err = config.init(IN, 7.min(OUT).min(5), &device).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let a = normal([IN, R], 1.0, &device);
    assert!(
        LoraAdapter::from_factors(a.clone(), normal([R + 1, OUT], 1.0, &device), 1.0, false)
            .is_err()
    );
    let wrong =
        LoraAdapter::from_factors(a, normal([R, OUT + 1], 1.0, &device), 1.0, false).unwrap();
    let err = LoraLinear::new(LinearConfig::new(IN, OUT).init(&device), wrong).unwrap_err();
    assert!(err.to_string().contains("cannot wrap"), "{err}");
}
