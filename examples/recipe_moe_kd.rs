//! MoE-KD on SmolLM2-135M-Instruct: a depth-pruned student recovers from its teacher.
//!
//! Teacher: SmolLM2-135M-Instruct (30 layers). Student: the same model with every other layer
//! removed (15 layers). Three variants, each trained on the same `library/` tokens in the same
//! order, with (nearly) equal trainable parameters:
//!
//! - **(a) dense + LoRA, distilled**: rank-18 LoRA on all seven projections of every layer,
//!   skew reverse KL to the teacher (DistiLLM / MoE-KD, α = 0.1);
//! - **(b) LoRA experts, distilled** (MoE-KD): every FFN keeps its frozen dense weights and
//!   gains 4 low-rank SwiGLU experts (rank 8, top-2, raw router probabilities), trained with
//!   their routers by skew reverse KL;
//! - **(c) LoRA experts, cross-entropy**: (b) trained on the next tokens alone.
//!
//! Held-out perplexity and KL to the teacher on `tutorial/`, before and after, are printed
//! as a table and appended as JSON lines to `--out` (default `~/.cache/moekit/recipes/moe_kd.jsonl`).
//!
//! ```text
//! scripts/fetch-smollm2.sh && apt-get install python3.11-doc
//! cargo run --release --example recipe_moe_kd -- --steps 60
//! ```

#[path = "common/recipe.rs"]
mod recipe;

use moekit::upcycle::{ConvertConfig, Method, convert};
use recipe::{Error, Settings, load, lora_everywhere, run, table};

fn main() -> Result<(), Error> {
    let s = Settings::parse(60, 1e-3, "moe_kd.jsonl")?;
    let (teacher, _, train, eval) = load(&s)?;
    let keep: Vec<usize> = (0..teacher.layers.len()).step_by(2).collect();
    let student = teacher.clone().keep_layers(&keep)?;
    println!("student: layers {keep:?} of {}", teacher.layers.len());

    let lora = lora_everywhere(18);
    let dense_lora = student.clone().with_lora(&lora)?;
    let experts = ConvertConfig::new(
        Method::LoraExperts {
            rank: 8,
            intermediate_size: None,
            alpha: 1.0,
        },
        4,
        2,
    )
    .with_seed(s.seed);
    let lora_experts = convert(student, &experts, None, &mut |_, _| {})?;

    let skew = "skew-rkl:1";
    let rows = vec![
        run(
            &s,
            "moe-kd",
            "(a) dense + LoRA, distilled",
            &teacher,
            dense_lora,
            skew,
            "adapters",
            &train,
            &eval,
        )?,
        run(
            &s,
            "moe-kd",
            "(b) LoRA experts, distilled",
            &teacher,
            lora_experts.clone(),
            skew,
            "router,experts",
            &train,
            &eval,
        )?,
        run(
            &s,
            "moe-kd",
            "(c) LoRA experts, cross-entropy",
            &teacher,
            lora_experts,
            "ce:1",
            "router,experts",
            &train,
            &eval,
        )?,
    ];
    table(&rows);
    Ok(())
}
