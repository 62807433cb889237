//! Sparse dispatch against the dense "every expert, then mask" oracle: forward and gradients.

use burn::tensor::{Device, Tensor};
use moekit_moe::{
    Activation, DispatchMode, MoeLayer, MoeLayerConfig, Selection, SharedExpertConfig,
};
use moekit_testing::{assert_close, assert_close_msg, device, normal};
use proptest::prelude::*;

struct Case {
    tokens: usize,
    hidden: usize,
    inter: usize,
    experts: usize,
    selection: Selection,
    activation: Activation,
}

fn layer(c: &Case, device: &Device) -> MoeLayer {
    MoeLayerConfig::new(c.hidden, c.inter, c.experts)
        .with_selection(c.selection)
        .with_activation(c.activation)
        .init(device)
        .unwrap()
}

fn with_mode(layer: &MoeLayer, mode: DispatchMode) -> MoeLayer {
    let mut l = layer.clone();
    l.dispatch = mode;
    l
}

/// Output and gradients (input, router gate, both expert banks) of `Σ output ⊙ r` for one mode.
fn run(layer: &MoeLayer, x: &Tensor<3>, r: &Tensor<3>, mode: DispatchMode) -> [Tensor<3>; 5] {
    let layer = with_mode(layer, mode);
    let x = x.clone().require_grad();
    let out = layer.forward(x.clone()).unwrap().output;
    let grads = (out.clone() * r.clone()).sum().backward();
    [
        out.detach(),
        x.grad(&grads).unwrap(),
        layer.router.gate.val().grad(&grads).unwrap().unsqueeze(),
        layer
            .experts
            .full()
            .unwrap()
            .w_in
            .val()
            .grad(&grads)
            .unwrap(),
        layer
            .experts
            .full()
            .unwrap()
            .w_out
            .val()
            .grad(&grads)
            .unwrap(),
    ]
}

fn check(c: Case, seed: u64) {
    let device = device(seed).autodiff();
    let layer = layer(&c, &device);
    let x = normal([1, c.tokens, c.hidden], 1.0, &device);
    let r = normal([1, c.tokens, c.hidden], 1.0, &device);
    let oracle = run(&layer, &x, &r, DispatchMode::Dense);
    for mode in [
        DispatchMode::Fused,
        DispatchMode::Composed,
        DispatchMode::Masked,
    ] {
        let got = run(&layer, &x, &r, mode);
        let names = ["output", "d input", "d router", "d w_in", "d w_out"];
        for ((g, o), name) in got.into_iter().zip(oracle.clone()).zip(names) {
            assert_close_msg(g, o, 1e-3, 1e-4, &format!("{mode:?} {name}"));
        }
    }
}

fn selection() -> impl Strategy<Value = (usize, Selection)> {
    (1usize..=9).prop_flat_map(|e| {
        prop_oneof![
            (1..=e, any::<bool>())
                .prop_map(move |(k, renormalize)| (e, Selection::TopK { k, renormalize })),
            (0.05f64..=1.0, proptest::option::of(1..=e), any::<bool>()).prop_map(
                move |(p, max_k, renormalize)| (
                    e,
                    Selection::TopP {
                        p,
                        max_k,
                        renormalize
                    }
                )
            ),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sparse_dispatch_equals_dense_oracle(
        tokens in 1usize..40,
        hidden in 1usize..12,
        inter in 1usize..10,
        (experts, selection) in selection(),
        act in prop_oneof![Just(Activation::SwiGlu), Just(Activation::Gelu), Just(Activation::Relu)],
        seed in 0u64..1000,
    ) {
        check(Case { tokens, hidden, inter, experts, selection, activation: act }, seed);
    }
}

#[test]
fn all_experts_active_and_empty_experts() {
    // k = E: every expert computes every token.
    check(
        Case {
            tokens: 7,
            hidden: 6,
            inter: 5,
            experts: 4,
            selection: Selection::TopK {
                k: 4,
                renormalize: false,
            },
            activation: Activation::SwiGlu,
        },
        1,
    );
    // Many experts, few tokens: most experts receive nothing.
    check(
        Case {
            tokens: 2,
            hidden: 5,
            inter: 3,
            experts: 16,
            selection: Selection::TopK {
                k: 1,
                renormalize: true,
            },
            activation: Activation::SwiGlu,
        },
        2,
    );
}

#[test]
fn large_expert_groups_split_into_tasks() {
    // k = E = 2: each expert computes all 300 tokens, more than one kernel task (256 rows).
    check(
        Case {
            tokens: 300,
            hidden: 8,
            inter: 6,
            experts: 2,
            selection: Selection::TopK {
                k: 2,
                renormalize: true,
            },
            activation: Activation::SwiGlu,
        },
        3,
    );
}

#[test]
fn shared_expert_and_padding_mask() {
    let device = device(4);
    let layer = MoeLayerConfig::new(8, 6, 4)
        .with_shared_expert(Some(SharedExpertConfig::new(10).with_gated(true)))
        .init(&device)
        .unwrap();
    let x = normal([2, 5, 8], 1.0, &device);
    let mask =
        Tensor::<2, burn::tensor::Int>::from_data([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &device)
            .bool();
    for mode in [
        DispatchMode::Fused,
        DispatchMode::Composed,
        DispatchMode::Masked,
    ] {
        padded_tokens_get_only_the_shared_expert(&with_mode(&layer, mode), &x, &mask);
    }
}

fn padded_tokens_get_only_the_shared_expert(
    layer: &MoeLayer,
    x: &Tensor<3>,
    mask: &Tensor<2, burn::tensor::Bool>,
) {
    let (x, mask) = (x.clone(), mask.clone());
    let out = layer.forward_masked(x.clone(), Some(mask)).unwrap();
    assert_eq!(out.stats.tokens, 8);
    assert_eq!(out.stats.tokens_per_expert.iter().sum::<usize>(), 8 * 2);
    // Padded tokens get only the shared expert's output; real ones match the unmasked call.
    let full = layer.forward(x.clone()).unwrap().output;
    let shared = layer
        .shared
        .as_ref()
        .unwrap()
        .forward(x.reshape([10, 8]))
        .reshape([2, 5, 8]);
    assert_close(
        out.output.clone().narrow(1, 3, 2).narrow(0, 0, 1),
        shared.narrow(1, 3, 2).narrow(0, 0, 1),
        1e-5,
        1e-6,
    );
    assert_close(out.output.narrow(0, 1, 1), full.narrow(0, 1, 1), 1e-5, 1e-6);
}

#[test]
fn capacity_drops_the_latest_tokens() {
    let device = device(5);
    let mut layer = MoeLayerConfig::new(4, 3, 2)
        .with_selection(Selection::TopK {
            k: 1,
            renormalize: true,
        })
        .with_capacity_factor(Some(0.5))
        .init(&device)
        .unwrap();
    // Route everything to expert 0: a gate that only looks at feature 0, inputs with feature 0 > 0.
    layer.router.gate = burn::module::Param::from_tensor(Tensor::from_data(
        [[5.0, -5.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        &device,
    ));
    let x = normal([1, 8, 4], 1.0, &device).abs();
    for mode in [
        DispatchMode::Fused,
        DispatchMode::Composed,
        DispatchMode::Masked,
    ] {
        capacity_keeps_the_first_two(&with_mode(&layer, mode), &x);
    }
}

fn capacity_keeps_the_first_two(layer: &MoeLayer, x: &Tensor<3>) {
    let x = x.clone();
    let out = layer.forward(x.clone()).unwrap();
    // capacity = ceil(0.5 · 8 · 1 / 2) = 2
    assert_eq!(out.stats.tokens_per_expert, vec![2, 0]);
    assert_eq!(out.stats.routed_per_expert, vec![8, 0]);
    assert_eq!(out.stats.dropped, 6);
    // The kept ones are the first two tokens; the others output exactly zero.
    let tail = out.output.clone().narrow(1, 2, 6);
    assert_close(tail.clone(), tail.zeros_like(), 0.0, 0.0);
    let e0 = layer
        .experts
        .full()
        .unwrap()
        .expert(0)
        .forward(x.narrow(1, 0, 2));
    assert_close(out.output.narrow(1, 0, 2), e0, 1e-5, 1e-6);
}

#[test]
fn auto_masks_many_narrow_experts_and_matches_the_oracle() {
    let device = device(5);
    let case = |experts, inter, k| Case {
        tokens: 12,
        hidden: 8,
        inter,
        experts,
        selection: Selection::TopK {
            k,
            renormalize: true,
        },
        activation: Activation::SwiGlu,
    };
    let narrow = case(16, 2, 8);
    let layer_narrow = layer(&narrow, &device);
    let x = normal([1, 12, 8], 1.0, &device);
    let oracle = with_mode(&layer_narrow, DispatchMode::Dense)
        .forward(x.clone())
        .unwrap()
        .output;
    let auto = layer_narrow.forward(x.clone()).unwrap().output;
    assert_close(auto, oracle, 1e-4, 1e-5);
    // Which one Auto takes: masked for 16 experts of 2 neurons, half chosen; not for 4 of 16,
    // nor for 16 of 2 with one chosen.
    let takes_masked = |c: &Case| {
        let l = layer(c, &device);
        let x2 = x.clone().reshape([12, 8]);
        let routing = l.router.forward(x2.clone());
        let plan = moekit_moe::DispatchPlan::new(&routing, None, None).unwrap();
        let bank = l.experts.weights();
        DispatchMode::Auto.choose(&x2, &bank, &plan) == DispatchMode::Masked
    };
    // Auto considers the masked dispatch where it was measured, on Flex (with the fused kernel).
    let flex = DispatchMode::Auto.resolve(&x.clone().reshape([12, 8])) == DispatchMode::Fused;
    assert_eq!(takes_masked(&narrow), flex);
    assert!(!takes_masked(&case(4, 16, 2)));
    assert!(!takes_masked(&case(16, 2, 1)));
}
