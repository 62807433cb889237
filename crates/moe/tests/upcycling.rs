//! Sparse upcycling's invariant: E copies of a dense FFN under renormalised top-k routing equal
//! the dense FFN, whatever the router does.

use moekit_moe::{
    Activation, DispatchMode, ExpertBank, FeedForwardConfig, MoeLayer, RouterConfig, Selection,
};
use moekit_testing::{assert_close_msg, device, normal};

#[test]
fn identical_experts_with_renormalised_top_k_equal_the_dense_ffn() {
    let device = device(11);
    for (experts, k) in [(8, 2), (4, 1), (4, 4), (16, 3)] {
        for activation in [Activation::SwiGlu, Activation::Gelu] {
            let dense = FeedForwardConfig::new(24, 40)
                .with_activation(activation)
                .init(&device)
                .unwrap();
            // A random router with large logits: routing is arbitrary and sharp.
            let mut router = RouterConfig::new(24, experts)
                .with_selection(Selection::TopK {
                    k,
                    renormalize: true,
                })
                .init(&device)
                .unwrap();
            router.gate = burn::module::Param::from_tensor(normal([24, experts], 3.0, &device));
            let bank = ExpertBank::replicate(&dense, experts).unwrap();
            let mut layer = MoeLayer::from_parts(router, bank, None).unwrap();
            let x = normal([3, 17, 24], 1.0, &device);
            let want = dense.forward(x.clone());
            for mode in [
                DispatchMode::Fused,
                DispatchMode::Composed,
                DispatchMode::Dense,
            ] {
                layer.dispatch = mode;
                let got = layer.forward(x.clone()).unwrap().output;
                assert_close_msg(
                    got,
                    want.clone(),
                    1e-5,
                    1e-5,
                    &format!("E{experts} k{k} {activation:?} {mode:?}"),
                );
            }
        }
    }
}
