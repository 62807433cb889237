//! Times the MoE layer against dense SwiGLU FFNs, one JSON line per case.
//!
//! The cases, fields and methodology (T = 2048 tokens, H = 576, weights ~ N(0, 0.02), median of
//! 5 runs after a warm-up) are those of `shared/anchors/torch_moe.py`, so the two outputs compare
//! line by line. Extra dense cases give every MoE case a dense FFN of the same *active* width.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_moe_layer -- [--dispatch auto|composed|dense] [--runs N] [--only CASE]
//! ```

use std::time::Instant;

use burn::nn::Initializer;
use burn::tensor::{Device, Distribution, Tensor};
use moekit::moe::{DispatchMode, FeedForwardConfig, MoeLayerConfig, Selection};

const H: usize = 576;
const T: usize = 2048;

struct Args {
    dispatch: DispatchMode,
    runs: usize,
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        dispatch: DispatchMode::Auto,
        runs: 5,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--dispatch" => {
                a.dispatch = match value.as_str() {
                    "auto" => DispatchMode::Auto,
                    "fused" => DispatchMode::Fused,
                    "composed" => DispatchMode::Composed,
                    "dense" => DispatchMode::Dense,
                    other => exit(&format!(
                        "unknown dispatch '{other}': use auto, fused, composed or dense"
                    )),
                }
            }
            "--runs" => {
                a.runs = value
                    .parse()
                    .unwrap_or_else(|_| exit("--runs takes a positive integer"))
            }
            "--only" => a.only = Some(value),
            other => exit(&format!(
                "unknown flag '{other}': use --dispatch, --runs or --only"
            )),
        }
    }
    a
}

fn exit(msg: &str) -> ! {
    eprintln!("bench_moe_layer: {msg}");
    std::process::exit(2)
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[runs / 2]
}

fn report(name: &str, fwd_ms: f64, fwd_bwd_ms: f64, flop_per_token: usize, dispatch: &str) {
    let gflop = (flop_per_token * T) as f64 / 1e9;
    println!(
        "{{\"case\": \"{name}\", \"tokens\": {T}, \"fwd_ms\": {fwd_ms:.2}, \"fwd_bwd_ms\": {fwd_bwd_ms:.2}, \
         \"active_gflop_fwd\": {gflop:.2}, \"fwd_gflops\": {:.1}, \"dispatch\": \"{dispatch}\"}}",
        gflop / (fwd_ms / 1e3)
    );
}

/// Times `forward` without autodiff and `forward + backward` with it.
fn time(runs: usize, device: &Device, forward: impl Fn(Tensor<3>) -> Tensor<3>) -> (f64, f64) {
    let x = Tensor::<3>::random([4, T / 4, H], Distribution::Normal(0.0, 1.0), device);
    let fwd = median_ms(runs, || {
        let y = forward(x.clone());
        y.device().sync().expect("device sync");
    });
    let xg = x.clone().autodiff().require_grad();
    let fwd_bwd = median_ms(runs, || {
        let grads = forward(xg.clone()).sum().backward();
        drop(grads);
    });
    (fwd, fwd_bwd)
}

fn main() {
    let args = args();
    let device = Device::default();
    device.seed(0);
    let init = Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    };
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    for (e, i, k) in [(8, 1536, 2), (8, 192, 2), (16, 96, 4), (64, 24, 8)] {
        let name = format!("mixtral_E{e}_I{i}_k{k}");
        if !wanted(&name) {
            continue;
        }
        let mut layer = MoeLayerConfig::new(H, i, e)
            .with_selection(Selection::TopK {
                k,
                renormalize: true,
            })
            .with_initializer(init.clone())
            .with_dispatch(args.dispatch)
            .init(&device)
            .unwrap_or_else(|err| exit(&err.to_string()));
        layer.router.gate = burn::module::Param::from_tensor(Tensor::random(
            [H, e],
            Distribution::Normal(0.0, 0.02),
            &device,
        ));
        let layer_ad = burn::module::Module::train(layer.clone());
        let resolved = args.dispatch.resolve(&Tensor::zeros([1, H], &device));
        let run = |x: Tensor<3>| {
            let l = if x.device().is_autodiff() {
                &layer_ad
            } else {
                &layer
            };
            l.forward(x).expect("shapes are consistent").output
        };
        let (f, fb) = time(args.runs, &device, run);
        report(
            &name,
            f,
            fb,
            k * 6 * H * i + 2 * H * e,
            &format!("{resolved:?}").to_lowercase(),
        );
    }
    for i in [1536, 384, 3072, 192] {
        let name = format!("dense_I{i}");
        if !wanted(&name) {
            continue;
        }
        let ffn = FeedForwardConfig::new(H, i)
            .with_initializer(init.clone())
            .init(&device)
            .unwrap();
        let ffn_ad = burn::module::Module::train(ffn.clone());
        let run = |x: Tensor<3>| {
            if x.device().is_autodiff() {
                ffn_ad.forward(x)
            } else {
                ffn.forward(x)
            }
        };
        let (f, fb) = time(args.runs, &device, run);
        report(&name, f, fb, 6 * H * i, "dense");
    }
}
