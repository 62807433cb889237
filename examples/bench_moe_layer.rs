//! Times the MoE layer against dense SwiGLU FFNs, one JSON line per case.
//!
//! The cases, fields and methodology (T = 2048 tokens, H = 576, weights ~ N(0, 0.02), median of
//! the runs after a warm-up) are those of `../shared/anchors/torch_moe.py`, so the two outputs
//! compare line by line. Each MoE case is timed interleaved with a dense FFN of the same *active*
//! width (`k·I`), run for run, so that `ratio_fwd` and `ratio_fwd_bwd` are measured under the
//! same machine load.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_moe_layer -- \
//!     [--dispatch auto|fused|composed|masked|dense] [--runs N] [--only CASE]
//! ```

use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Distribution, Tensor};
use moekit::moe::{
    DispatchMode, DispatchPlan, FeedForward, FeedForwardConfig, MoeLayer, MoeLayerConfig, Selection,
};

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
        runs: 7,
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
                    "masked" => DispatchMode::Masked,
                    "dense" => DispatchMode::Dense,
                    other => exit(&format!(
                        "unknown dispatch '{other}': use auto, fused, composed, masked or dense"
                    )),
                }
            }
            "--runs" => {
                a.runs = value
                    .parse()
                    .ok()
                    .filter(|r| *r > 0)
                    .unwrap_or_else(|| exit("--runs takes a positive integer"))
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

/// Something to time, forward only or forward + backward.
trait Work {
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Work for MoeLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        MoeLayer::forward(self, x)
            .expect("shapes are consistent")
            .output
    }
}

impl Work for FeedForward {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        FeedForward::forward(self, x)
    }
}

fn run_once(work: &dyn Work, x: &Tensor<3>, backward: bool) -> f64 {
    let t = Instant::now();
    let y = work.forward(x.clone());
    if backward {
        let grads = y.sum().backward();
        // On GPU backends the backward pass is queued: wait for it before stopping the clock.
        x.device().sync().expect("device sync");
        drop(grads);
    } else {
        y.device().sync().expect("device sync");
    }
    t.elapsed().as_secs_f64() * 1e3
}

/// Median milliseconds of each work item, runs interleaved item by item.
fn interleaved(items: &[&dyn Work], x: &Tensor<3>, backward: bool, runs: usize) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(runs); items.len()];
    for w in items {
        run_once(*w, x, backward);
    }
    for _ in 0..runs {
        for (w, t) in items.iter().zip(&mut times) {
            t.push(run_once(*w, x, backward));
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// Forward and forward+backward medians of each item.
fn measure(items: &[(&dyn Work, &dyn Work)], device: &Device, runs: usize) -> Vec<(f64, f64)> {
    let x = Tensor::<3>::random([4, T / 4, H], Distribution::Normal(0.0, 1.0), device);
    let plain: Vec<&dyn Work> = items.iter().map(|(p, _)| *p).collect();
    let trained: Vec<&dyn Work> = items.iter().map(|(_, t)| *t).collect();
    let fwd = interleaved(&plain, &x, false, runs);
    let fwd_bwd = interleaved(&trained, &x.autodiff().require_grad(), true, runs);
    fwd.into_iter().zip(fwd_bwd).collect()
}

fn dense(i: usize, init: &Initializer, device: &Device) -> FeedForward {
    FeedForwardConfig::new(H, i)
        .with_initializer(init.clone())
        .init(device)
        .unwrap()
}

fn main() {
    let args = args();
    let device = moekit::default_device();
    device.seed(0);
    let init = Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    };
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    let gflop = |flop_per_token: usize| (flop_per_token * T) as f64 / 1e9;
    // The anchor's Mixtral shapes, then the routed parts of fine neuron splits of SmolLM2's FFN
    // (I = 1536): 48 of 24 neurons (64 parts, 16 shared), 192 of 6 (256 parts, 64 shared),
    // 384 of 3 (512 parts, 128 shared), half of them chosen.
    for (e, i, k) in [
        (8, 1536, 2),
        (8, 192, 2),
        (16, 96, 4),
        (64, 24, 8),
        (48, 24, 24),
        (192, 6, 96),
        (384, 3, 192),
    ] {
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
        layer.router.gate = Param::from_tensor(Tensor::random(
            [H, e],
            Distribution::Normal(0.0, 0.02),
            &device,
        ));
        let equiv = dense(k * i, &init, &device);
        let (layer_t, equiv_t) = (layer.clone().train(), equiv.clone().train());
        let m = measure(
            &[(&layer, &layer_t), (&equiv, &equiv_t)],
            &device,
            args.runs,
        );
        let ((f, fb), (df, dfb)) = (m[0], m[1]);
        let g = gflop(k * 6 * H * i + 2 * H * e);
        // What runs: Auto's choice depends on the bank and the routing of a batch.
        let probe = Tensor::<2>::random([T, H], Distribution::Normal(0.0, 1.0), &device);
        let plan = DispatchPlan::new(&layer.router.forward(probe.clone()), None, None)
            .unwrap_or_else(|err| exit(&err.to_string()));
        let dispatch = format!(
            "{:?}",
            args.dispatch
                .choose(&probe, &layer.experts.weights(), &plan)
        )
        .to_lowercase();
        println!(
            "{{\"case\": \"{name}\", \"tokens\": {T}, \"fwd_ms\": {f:.2}, \"fwd_bwd_ms\": {fb:.2}, \
             \"active_gflop_fwd\": {g:.2}, \"fwd_gflops\": {:.1}, \"dispatch\": \"{dispatch}\", \
             \"dense_equiv\": \"dense_I{}\", \"dense_equiv_fwd_ms\": {df:.2}, \"dense_equiv_fwd_bwd_ms\": {dfb:.2}, \
             \"ratio_fwd\": {:.2}, \"ratio_fwd_bwd\": {:.2}}}",
            g / (f / 1e3),
            k * i,
            f / df,
            fb / dfb
        );
    }
    for i in [1536, 384] {
        let name = format!("dense_I{i}");
        if !wanted(&name) {
            continue;
        }
        let ffn = dense(i, &init, &device);
        let ffn_t = ffn.clone().train();
        let (f, fb) = measure(&[(&ffn, &ffn_t)], &device, args.runs)[0];
        let g = gflop(6 * H * i);
        println!(
            "{{\"case\": \"{name}\", \"tokens\": {T}, \"fwd_ms\": {f:.2}, \"fwd_bwd_ms\": {fb:.2}, \
             \"active_gflop_fwd\": {g:.2}, \"fwd_gflops\": {:.1}, \"dispatch\": \"dense\"}}",
            g / (f / 1e3)
        );
    }
}
