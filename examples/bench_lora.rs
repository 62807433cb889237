//! LoRA training step: moekit's factored adapters against burn's `Module::apply_lora` (which
//! rebuilds `W + s·A·B` on every forward), on a SmolLM2-135M-sized decoder stack (30 layers,
//! width 576, FFN 1536, 9 query / 3 KV heads; a 2048-token vocabulary so the stack, not the head,
//! dominates). One step = forward, cross-entropy, backward, AdamW. Peak memory is the high-water
//! mark of heap bytes above the model itself (a counting global allocator; Flex keeps every
//! tensor on the heap), so it is what the step adds: activations, gradients, optimizer state,
//! and any materialised weights. One JSON line per case.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_lora -- [LAYERS] [STEPS]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use moekit::burn::module::{Lora, Module, ParamGroup, ParamId};
use moekit::burn::optim::{AdamWConfig, GradientsParams};
use moekit::burn::tensor::{Device, Distribution, Int, Tensor};
use moekit::distill::{IGNORE_INDEX, cross_entropy};
use moekit::llama::{Llama, LlamaConfig};
use moekit::lora::LoraConfig;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new) };
        if !q.is_null() {
            if new > layout.size() {
                let now =
                    CURRENT.fetch_add(new - layout.size(), Ordering::Relaxed) + new - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const RANK: usize = 8;
const ALPHA: f64 = 16.0;
const B: usize = 2;
const T: usize = 128;

fn config(layers: usize) -> LlamaConfig {
    let mut c = LlamaConfig::llama(2048, 576, 1536, layers, 9, 3);
    c.tie_word_embeddings = true;
    c
}

/// The ids of the weights `targets` names, for burn's `ParamGroup`.
fn target_ids(model: &Llama, all_linear: bool) -> Vec<ParamId> {
    let mut ids = Vec::new();
    for layer in &model.layers {
        let a = &layer.attention;
        ids.push(a.q_proj.base().weight.id);
        ids.push(a.v_proj.base().weight.id);
        if all_linear {
            ids.push(a.k_proj.base().weight.id);
            ids.push(a.o_proj.base().weight.id);
            if let moekit::llama::FfnSlot::Dense(ffn) = &layer.ffn {
                ids.push(ffn.w_in.id);
                ids.push(ffn.w_out.id);
            }
        }
    }
    ids
}

/// Runs `steps` timed training steps after one warm-up; returns (median seconds, peak bytes
/// above the model).
fn train(mut model: Llama, steps: usize, device: &Device) -> (f64, usize) {
    let mut optim = AdamWConfig::new().init();
    let mut times = Vec::new();
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    for step in 0..=steps {
        let tokens: Tensor<2, Int> =
            Tensor::random([B, T + 1], Distribution::Uniform(0.0, 2048.0), device);
        let input = tokens.clone().narrow(1, 0, T);
        let labels = tokens.narrow(1, 1, T);
        let start = Instant::now();
        let logits = model.logits(input).expect("forward");
        let loss = cross_entropy(logits, labels, None, IGNORE_INDEX).expect("loss");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        let _ = model.layers[0].input_norm.gamma.val().into_data();
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], PEAK.load(Ordering::Relaxed) - base)
}

/// One case, in this process: prints its JSON line.
fn run_case(impl_name: &str, all_linear: bool, layers: usize, steps: usize) {
    let device = moekit::default_device().autodiff();
    device.seed(0);
    let model = config(layers).init(&device).expect("model");
    let model = if impl_name == "moekit" {
        let targets: Vec<String> = if all_linear {
            vec!["self_attn.*".into(), "mlp.*".into()]
        } else {
            vec!["q_proj|v_proj".into()]
        };
        let lora = LoraConfig::new(RANK)
            .with_alpha(ALPHA)
            .with_target_modules(targets);
        model.with_lora(&lora).expect("lora")
    } else {
        let group = ParamGroup::from_ids(target_ids(&model, all_linear));
        // Initialise the lazily built weights first (as `with_lora` does), so both cases
        // start from the same materialised model.
        moekit::lora::freeze(model).apply_lora(Lora::new(RANK, ALPHA).set_param_group(group))
    };
    let (seconds, peak) = train(model, steps, &device);
    println!(
        "{}",
        serde_json::json!({
            "case": "lora_train_step", "impl": impl_name,
            "targets": if all_linear { "all-linear" } else { "q,v" },
            "layers": layers, "rank": RANK, "batch": B, "seq": T,
            "step_s": seconds, "tokens_per_s": (B * T) as f64 / seconds,
            "peak_mib": peak as f64 / (1 << 20) as f64,
        })
    );
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, name: &str, default: usize| -> Result<usize, String> {
        args.get(i).map_or(Ok(default), |a| {
            a.parse()
                .map_err(|_| format!("{name} must be a whole number, got `{a}`"))
        })
    };
    let at = usize::from(args.first().map(String::as_str) == Some("--case")) * 3;
    let layers = number(at, "LAYERS", 30)?;
    let steps = number(at + 1, "STEPS", 3)?;
    if layers == 0 || steps < 2 {
        return Err(format!(
            "LAYERS {layers} and STEPS {steps}: at least 1 layer and 2 steps (the first step, \
             a warm-up, is not timed)"
        ));
    }
    if at > 0 {
        run_case(&args[1], args[2] == "all-linear", layers, steps);
        return Ok(());
    }
    // Each case in a fresh process, so one-time allocations (thread pools, caches) and
    // allocator state do not carry over between cases.
    let exe = std::env::current_exe().expect("own path");
    for targets in ["q,v", "all-linear"] {
        for impl_name in ["moekit", "burn-apply_lora"] {
            let status = std::process::Command::new(&exe)
                .args(["--case", impl_name, targets])
                .args([layers.to_string(), steps.to_string()])
                .status()
                .expect("spawn a case");
            if !status.success() {
                return Err(format!("case {impl_name} {targets} failed"));
            }
        }
    }
    Ok(())
}
