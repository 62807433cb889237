//! PESC on SmolLM2-135M-Instruct: adapter experts against plain LoRA at equal trainable
//! parameters.
//!
//! Both variants fine-tune SmolLM2-135M-Instruct on python3.11-doc's `library/` with plain
//! next-token cross-entropy, on the same tokens in the same order:
//!
//! - **PESC** (Wu et al. 2024): every FFN becomes `y + Σ_top2 wᵢ·adapterᵢ(y)` over 4 bottleneck
//!   adapters (width 17, identity activation, up-projections zero at the start) on the frozen
//!   dense FFN's output `y`; adapters and routers train;
//! - **LoRA**: rank-8 LoRA on all seven projections of every layer.
//!
//! Held-out perplexity on `tutorial/` (and KL to the original model) before and after are
//! printed and appended as JSON lines to `--out` (default `~/.cache/moekit/recipes/pesc.jsonl`).
//!
//! ```text
//! cargo run --release --example recipe_pesc -- --steps 60
//! ```

#[path = "common/recipe.rs"]
mod recipe;

use moekit::moe::Activation;
use moekit::upcycle::{ConvertConfig, Method, convert};
use recipe::{Error, Settings, load, lora_everywhere, run, table};

fn main() -> Result<(), Error> {
    let s = Settings::parse(60, 1e-3, "pesc.jsonl")?;
    let (teacher, _, train, eval) = load(&s)?;
    let pesc = ConvertConfig::new(
        Method::Pesc {
            bottleneck: 17,
            activation: Activation::Identity,
        },
        4,
        2,
    )
    .with_seed(s.seed);
    let pesc = convert(teacher.clone(), &pesc, None, &mut |_, _| {})?;
    let lora = lora_everywhere(8);
    let lora = teacher.clone().with_lora(&lora)?;
    let rows = vec![
        run(
            &s,
            "pesc",
            "PESC adapter experts (4, top-2)",
            &teacher,
            pesc,
            "ce:1",
            "router,experts",
            &train,
            &eval,
        )?,
        run(
            &s,
            "pesc",
            "LoRA rank 8, all projections",
            &teacher,
            lora,
            "ce:1",
            "adapters",
            &train,
            &eval,
        )?,
    ];
    table(&rows);
    Ok(())
}
