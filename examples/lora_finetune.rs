//! LoRA fine-tuning of a real checkpoint in a few lines, then the adapter saved in Hugging Face
//! PEFT's layout (so `PeftModel.from_pretrained` and `moekit eval --adapter` both load it).
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! cargo run --release --example lora_finetune -- MODEL TEXT OUT [STEPS]
//! moekit eval MODEL --text OTHER_TEXT --adapter OUT
//! ```
//!
//! Trains q/v/down projections (r = 8, α = 16) with AdamW (lr 1e-3) on consecutive 128-token
//! windows of TEXT, next-token cross-entropy, printing the loss.

use std::path::PathBuf;
use std::time::Instant;

use moekit::burn::optim::{AdamWConfig, GradientsParams};
use moekit::distill::{IGNORE_INDEX, cross_entropy};
use moekit::llama::{Checkpoint, SaveDtype, save_adapter};
use moekit::lora::LoraConfig;

const WINDOW: usize = 128;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, text_path, out] = match &args[..args.len().min(3)] {
        [m, t, o] => [m, t, o].map(PathBuf::from),
        _ => return Err("usage: lora_finetune MODEL TEXT OUT [STEPS]".into()),
    };
    let steps: usize = args.get(3).map_or(Ok(30), |s| s.parse())?;

    let device = moekit::default_device().autodiff();
    let ckpt = Checkpoint::open(&model_path)?;
    let tokenizer = ckpt.tokenizer()?;
    let config = LoraConfig::new(8)
        .with_alpha(16.0)
        .with_target_modules(vec!["q_proj|v_proj".into(), "down_proj".into()]);
    let mut model = ckpt.load(&device, &mut |_, _| {})?.with_lora(&config)?;
    println!(
        "{} adapters, {} trainable parameters",
        model.adapters().len(),
        model.adapter_params()
    );

    let ids = tokenizer.encode(&std::fs::read_to_string(&text_path)?)?;
    if ids.len() < (WINDOW + 1) * steps {
        return Err(format!("{}: too little text for {steps} steps", text_path.display()).into());
    }
    let mut optim = AdamWConfig::new().init();
    let start = Instant::now();
    for step in 0..steps {
        let window = &ids[step * WINDOW..(step + 1) * WINDOW + 1];
        let tokens = model.tokens(&[window], &device)?;
        let input = tokens.clone().narrow(1, 0, WINDOW);
        let labels = tokens.narrow(1, 1, WINDOW);
        let loss = cross_entropy(model.logits(input)?, labels, None, IGNORE_INDEX)?;
        let value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
        println!(
            "step {step:3}  loss {value:.4}  ({:.1} s)",
            start.elapsed().as_secs_f64()
        );
    }
    let written = save_adapter(&model, &out, None, SaveDtype::F32)?;
    println!(
        "saved {} (r = {}, target_modules = {:?})",
        out.display(),
        written.r,
        written.target_modules
    );
    Ok(())
}
