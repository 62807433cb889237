//! Writes a model as a Hugging Face checkpoint that transformers loads as it is: dense, or
//! sparse-upcycled into a Mixtral / Qwen2-MoE model whose every FFN becomes `E` identical
//! experts with renormalised top-k routing — which equals the dense model exactly, so the
//! exported MoE must give the dense perplexity in transformers too.
//!
//! ```text
//! cargo run --release --example export_hf -- MODEL OUT_DIR [dense|mixtral|qwen2_moe] [E] [K]
//! python scripts/hf_reference.py OUT_DIR --text /usr/share/common-licenses/GPL-3
//! ```

use std::path::PathBuf;

use moekit::llama::{Checkpoint, ExportFormat, FfnSlot, SaveDtype, save_pretrained};
use moekit::moe::{ExpertBank, MoeLayer, RouterConfig, Selection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out, rest @ ..] = args.as_slice() else {
        return Err("usage: export_hf MODEL OUT_DIR [dense|mixtral|qwen2_moe] [E] [K]".into());
    };
    let format = match rest.first().map(String::as_str).unwrap_or("dense") {
        "dense" => ExportFormat::Dense,
        "mixtral" => ExportFormat::Mixtral,
        "qwen2_moe" => ExportFormat::Qwen2Moe,
        other => return Err(format!("unknown format `{other}`").into()),
    };
    let experts: usize = rest.get(1).map_or(Ok(4), |s| s.parse())?;
    let top_k: usize = rest.get(2).map_or(Ok(2), |s| s.parse())?;
    let device = moekit::default_device();
    let ckpt = Checkpoint::open(&PathBuf::from(model))?;
    let mut model = ckpt.load(&device, &mut |_, _| {})?;
    if format != ExportFormat::Dense {
        let hidden = model.config.hidden_size;
        for layer in &mut model.layers {
            if let FfnSlot::Dense(ffn) = &layer.ffn {
                let router = RouterConfig::new(hidden, experts)
                    .with_selection(Selection::TopK {
                        k: top_k,
                        renormalize: true,
                    })
                    .init(&device)?;
                let bank = ExpertBank::replicate(ffn, experts)?;
                layer.ffn = FfnSlot::Moe(MoeLayer::from_parts(router, bank, None)?);
            }
        }
    }
    let config = save_pretrained(
        &model,
        Some(&ckpt.tokenizer()?),
        out.as_ref(),
        format,
        SaveDtype::F32,
    )?;
    println!(
        "wrote {out}: {} ({} parameters, {} active)",
        config.model_type,
        config.param_counts().total,
        config.param_counts().active
    );
    Ok(())
}
