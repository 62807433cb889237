//! `moekit info MODEL`.

use std::path::Path;

use moekit::llama::{Checkpoint, FfnSpec};
use serde_json::json;

use crate::error::CliError;

fn millions(n: usize) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

/// Describes one FFN kind.
fn describe(spec: &FfnSpec) -> String {
    match *spec {
        FfnSpec::Dense { intermediate_size } => format!("dense SwiGLU (I={intermediate_size})"),
        FfnSpec::Moe {
            num_experts,
            top_k,
            intermediate_size,
            renormalize,
            shared_intermediate_size,
            combine_temperature,
        } => {
            let mut s = format!(
                "MoE: {num_experts} experts of I={intermediate_size}, top-{top_k}{}",
                if renormalize { " renormalised" } else { "" }
            );
            if let Some(shared) = shared_intermediate_size {
                s.push_str(&format!(", shared expert I={shared}"));
            }
            if combine_temperature != 1.0 {
                s.push_str(&format!(", combine temperature {combine_temperature}"));
            }
            s
        }
    }
}

/// Prints what the configuration and file say; loads no weights.
pub fn run(path: &Path, as_json: bool) -> Result<(), CliError> {
    let ckpt = Checkpoint::open(path)?;
    let c = ckpt.config();
    let arch = c.architecture()?;
    let counts = ckpt.param_counts()?;
    // Runs of equal layer kinds, in order.
    let mut kinds: Vec<(FfnSpec, Vec<usize>)> = Vec::new();
    for l in 0..c.num_hidden_layers {
        let spec = c.ffn_spec(l);
        match kinds.iter_mut().find(|(s, _)| *s == spec) {
            Some((_, layers)) => layers.push(l),
            None => kinds.push((spec, vec![l])),
        }
    }
    let types = ckpt.tensor_types();
    if as_json {
        let layer_kinds: Vec<_> = kinds
            .iter()
            .map(|(s, layers)| json!({"kind": describe(s), "layers": layers}))
            .collect();
        let out = json!({
            "model": path.display().to_string(),
            "architecture": arch.model_type(),
            "class": arch.class_name(),
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.kv_heads(),
            "head_dim": c.head_width(),
            "vocab_size": c.vocab_size,
            "context": c.max_position_embeddings,
            "tied_embeddings": c.tie_word_embeddings,
            "params": counts,
            "layer_kinds": layer_kinds,
            "tensor_types": types.iter().map(|(t, n)| json!({"type": t, "count": n})).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!("model:        {}", path.display());
    println!(
        "architecture: {} ({})",
        arch.model_type(),
        arch.class_name()
    );
    println!(
        "shape:        {} layers, hidden {}, {} heads ({} kv, head_dim {}), vocab {}, context {}{}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.kv_heads(),
        c.head_width(),
        c.vocab_size,
        c.max_position_embeddings,
        if c.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    println!(
        "parameters:   {} total, {} active per token ({} in routed experts)",
        millions(counts.total),
        millions(counts.active),
        millions(counts.routed_experts)
    );
    for (spec, layers) in &kinds {
        println!("layers:       {} × {}", layers.len(), describe(spec));
    }
    let types: Vec<String> = types.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
    println!("tensors:      {}", types.join(", "));
    Ok(())
}
