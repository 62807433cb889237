//! Criterion benchmarks of the MoE layer: each dispatch implementation (fused, composed,
//! masked; named by the implementation that really runs, e.g. composed where the fused kernel
//! is unavailable) against the dense FFN of the same active width, forward and forward +
//! backward, on a 512-token batch: 8 large experts, 64 fine ones, and 256 experts of 6 neurons
//! with 96 chosen (the shape the masked dispatch is for).
//!
//! `cargo bench --bench moe_layer`; the full-size, JSON-reporting comparison with PyTorch is
//! `examples/bench_moe_layer.rs`.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use moekit::moe::{DispatchMode, FeedForwardConfig, MoeLayerConfig, Selection};

const H: usize = 576;
const T: usize = 512;

fn bench(c: &mut Criterion) {
    let device = moekit::default_device();
    device.seed(0);
    let init = Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    };
    let x = Tensor::<3>::random([1, T, H], Distribution::Normal(0.0, 1.0), &device);
    let xg = x.clone().autodiff().require_grad();
    let rows = x.clone().reshape([T, H]);
    for (e, i, k) in [(8, 192, 2), (64, 24, 8), (256, 6, 96)] {
        let mut group = c.benchmark_group(format!("E{e}_I{i}_k{k}"));
        group.sample_size(20);
        let mut seen = Vec::new();
        for mode in [
            DispatchMode::Fused,
            DispatchMode::Composed,
            DispatchMode::Masked,
        ] {
            // Fused falls back to composed off Flex: bench each implementation once.
            let resolved = mode.resolve(&rows);
            if seen.contains(&resolved) {
                continue;
            }
            seen.push(resolved);
            let mut layer = MoeLayerConfig::new(H, i, e)
                .with_selection(Selection::TopK {
                    k,
                    renormalize: true,
                })
                .with_initializer(init.clone())
                .with_dispatch(mode)
                .init(&device)
                .unwrap();
            layer.router.gate = Param::from_tensor(Tensor::random(
                [H, e],
                Distribution::Normal(0.0, 0.02),
                &device,
            ));
            let trained = layer.clone().train();
            let name = format!("{resolved:?}").to_lowercase();
            group.bench_function(BenchmarkId::new("forward", &name), |b| {
                b.iter(|| layer.forward(x.clone()).unwrap().output.into_data())
            });
            group.bench_function(BenchmarkId::new("forward_backward", &name), |b| {
                b.iter(|| {
                    let grads = trained.forward(xg.clone()).unwrap().output.sum().backward();
                    device.sync().expect("device sync");
                    grads
                })
            });
        }
        let dense = FeedForwardConfig::new(H, k * i)
            .with_initializer(init.clone())
            .init(&device)
            .unwrap();
        let trained = dense.clone().train();
        group.bench_function(BenchmarkId::new("forward", "dense_equiv"), |b| {
            b.iter(|| dense.forward(x.clone()).into_data())
        });
        group.bench_function(BenchmarkId::new("forward_backward", "dense_equiv"), |b| {
            b.iter(|| {
                let grads = trained.forward(xg.clone()).sum().backward();
                device.sync().expect("device sync");
                grads
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
