//! Times SmolLM2-135M-Instruct in moekit: GGUF load, and the eval forward pass, one JSON line
//! each, with the case names and methodology of `../shared/anchors/torch_smollm2.py` (batch 4 × 256
//! random token ids, median of 3 runs after a warm-up) so the outputs compare line by line.
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_smollm2 -- [GGUF]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use moekit::llama::Checkpoint;

#[path = "common/cache.rs"]
mod cache;

const B: usize = 4;
const T: usize = 256;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(cache::smollm2_gguf);
    let device = moekit::default_device();

    let start = Instant::now();
    let ckpt = Checkpoint::open(&path)?;
    let model = ckpt.load(&device, &mut |_, _| {})?;
    let tokenizer = ckpt.tokenizer()?;
    let load_s = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"case": "smollm2_load_gguf", "seconds": load_s,
                           "vocab": tokenizer.vocab_size(), "params": model.param_counts().total})
    );

    // Token ids from a fixed linear congruential sequence (the anchor uses torch.randint).
    let mut state = 0x2545_F491u64;
    let rows: Vec<Vec<u32>> = (0..B)
        .map(|_| {
            (0..T)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % 49152) as u32
                })
                .collect()
        })
        .collect();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let run = || -> Result<f64, Box<dyn std::error::Error>> {
        let start = Instant::now();
        let logits = model.logits(model.tokens(&rows, &device)?)?;
        let _ = logits.into_data();
        Ok(start.elapsed().as_secs_f64())
    };
    run()?;
    let times = (0..3).map(|_| run()).collect::<Result<Vec<_>, _>>()?;
    let s = median(times);
    println!(
        "{}",
        serde_json::json!({"case": "smollm2_eval_fwd", "batch": B, "seq": T,
                           "tokens_per_s": ((B * T) as f64 / s * 10.0).round() / 10.0})
    );
    Ok(())
}
