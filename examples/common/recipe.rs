//! What the paper recipes (`recipe_*.rs`) share: the SmolLM2 teacher, python3.11-doc text,
//! one distillation run per variant and the results table.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use moekit::distill::DistillConfig;
use moekit::llama::{Checkpoint, Llama, Tokenizer};
use moekit::lora::LoraConfig;
use moekit::train::{EvalReport, StepReport, TokenWindows, TrainConfig, TrainObserver, Trainer};
use moekit::upcycle::calibration;

#[path = "cache.rs"]
mod cache;

pub type Error = Box<dyn std::error::Error>;

/// Command-line settings shared by the recipes (`--name value` pairs).
pub struct Settings {
    /// The SmolLM2 GGUF (`--model`, default `$MOEKIT_SMOLLM2` or the fetch script's cache).
    pub model: PathBuf,
    /// python3.11-doc's `_sources` (`--doc`).
    pub doc: PathBuf,
    /// Optimiser steps per variant (`--steps`).
    pub steps: usize,
    /// Sequences per step (`--batch-size`) of `--seq-len` tokens.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Held-out tutorial tokens evaluated (`--eval-tokens`).
    pub eval_tokens: usize,
    /// Peak learning rate (`--lr`).
    pub lr: f64,
    /// Data-order seed (`--seed`).
    pub seed: u64,
    /// JSON lines of results are appended here (`--out`, default in
    /// `$MOEKIT_CACHE/recipes/`, outside the repo).
    pub out: PathBuf,
}

impl Settings {
    /// Parses `--name value` pairs over the defaults.
    pub fn parse(steps: usize, lr: f64, out: &str) -> Result<Self, Error> {
        let mut s = Settings {
            model: cache::smollm2_gguf(),
            doc: PathBuf::from("/usr/share/doc/python3.11/html/_sources"),
            steps,
            batch_size: 4,
            seq_len: 256,
            eval_tokens: 4096,
            lr,
            seed: 0,
            out: cache::cache_dir().join("recipes").join(out),
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        for pair in args.chunks(2) {
            let [name, value] = pair else {
                return Err(format!("`{}` needs a value", pair[0]).into());
            };
            match name.as_str() {
                "--model" => s.model = value.into(),
                "--doc" => s.doc = value.into(),
                "--steps" => s.steps = value.parse()?,
                "--batch-size" => s.batch_size = value.parse()?,
                "--seq-len" => s.seq_len = value.parse()?,
                "--eval-tokens" => s.eval_tokens = value.parse()?,
                "--lr" => s.lr = value.parse()?,
                "--seed" => s.seed = value.parse()?,
                "--out" => s.out = value.into(),
                other => return Err(format!("unknown option {other}").into()),
            }
        }
        Ok(s)
    }

    /// Training tokens all variants see: `steps · batch_size · seq_len` (+1) from `library/`.
    pub fn train_tokens(&self) -> usize {
        self.steps * self.batch_size * self.seq_len + 1
    }
}

/// LoRA of rank `rank` (α = 2r) on all seven projections of every layer.
pub fn lora_everywhere(rank: usize) -> LoraConfig {
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    LoraConfig::new(rank)
        .with_alpha(2.0 * rank as f64)
        .with_target_modules(all.map(String::from).to_vec())
}

/// The teacher, its tokenizer, and the training (`library/`) and held-out (`tutorial/`)
/// token streams.
pub fn load(s: &Settings) -> Result<(Llama, Tokenizer, Vec<u32>, Vec<u32>), Error> {
    let ckpt = Checkpoint::open(&s.model)
        .map_err(|e| format!("{e} (run scripts/fetch-smollm2.sh or pass --model)"))?;
    let tokenizer = ckpt.tokenizer()?;
    let teacher = ckpt.load(&moekit::default_device(), &mut |_, _| {})?;
    let read = |dir: &str, n: usize| -> Result<Vec<u32>, Error> {
        let files = calibration::files(&[s.doc.join(dir)])
            .map_err(|e| format!("{e} (apt-get install python3.11-doc, or pass --doc)"))?;
        Ok(calibration::tokens(&tokenizer, &files, n)?)
    };
    let train = read("library", s.train_tokens())?;
    let eval = read("tutorial", s.eval_tokens + 1)?;
    Ok((teacher, tokenizer, train, eval))
}

/// The result of one variant.
#[derive(serde::Serialize)]
pub struct Outcome {
    pub recipe: String,
    pub variant: String,
    pub loss: String,
    pub trainable: String,
    pub trainable_params: usize,
    pub active_params: usize,
    pub steps: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub before: EvalReport,
    pub after: EvalReport,
    pub seed: u64,
}

/// Prints progress every 10 steps.
struct Print<'a>(&'a str, Instant);

impl TrainObserver for Print<'_> {
    fn step(&mut self, r: &StepReport) {
        if r.step.is_multiple_of(10) {
            println!(
                "  {} step {:>4}: loss {:.4} ({:.0} s)",
                self.0,
                r.step,
                r.loss,
                self.1.elapsed().as_secs_f64()
            );
        }
    }
    fn eval(&mut self, r: &EvalReport) {
        println!(
            "  {} eval at step {}: perplexity {:.3}, KL {:.4}",
            self.0, r.step, r.perplexity, r.kl
        );
    }
}

/// Trains `student` from `teacher` with `loss` on the same tokens as every other variant and
/// evaluates it before and after on the held-out tokens.
#[allow(clippy::too_many_arguments)]
pub fn run(
    s: &Settings,
    recipe: &str,
    variant: &str,
    teacher: &Llama,
    student: Llama,
    loss: &str,
    trainable: &str,
    train: &[u32],
    eval: &[u32],
) -> Result<Outcome, Error> {
    let active_params = student.param_counts().active;
    let config = TrainConfig::new(s.steps)
        .with_lr(s.lr)
        .with_warmup_steps((s.steps / 10).max(1))
        .with_batch_size(s.batch_size)
        .with_seq_len(s.seq_len)
        .with_aux_weight(0.01)
        .with_seed(s.seed);
    let distiller = DistillConfig::new(loss.parse()?)
        .with_temperature(1.0)
        .init(&student.device())?;
    let mut trainer = Trainer::new(
        teacher.clone(),
        student,
        distiller,
        trainable.parse()?,
        config,
        TokenWindows::new(train.to_vec(), s.seq_len)?,
        Some(TokenWindows::new(eval.to_vec(), s.seq_len)?),
    )?;
    let trainable_params = trainer.trainable_params();
    println!("{recipe} / {variant}: {trainable_params} trainable parameters, loss {loss}");
    let summary = trainer.run(&mut Print(variant, Instant::now()))?;
    let outcome = Outcome {
        recipe: recipe.into(),
        variant: variant.into(),
        loss: loss.into(),
        trainable: trainable.into(),
        trainable_params,
        active_params,
        steps: summary.steps,
        tokens: summary.tokens,
        seconds: summary.seconds,
        before: summary
            .evals
            .first()
            .cloned()
            .expect("evaluated before training"),
        after: summary
            .evals
            .last()
            .cloned()
            .expect("evaluated after training"),
        seed: s.seed,
    };
    if let Some(dir) = s.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&s.out)?;
    writeln!(f, "{}", serde_json::to_string(&outcome)?)?;
    Ok(outcome)
}

/// The results as a Markdown table.
pub fn table(rows: &[Outcome]) {
    println!(
        "\n| variant | loss | trainable params | active params | perplexity before → after | KL to teacher before → after | time |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | `{}` | {} | {} | {:.2} → {:.2} | {:.3} → {:.3} | {:.0} s |",
            r.variant,
            r.loss,
            r.trainable_params,
            r.active_params,
            r.before.perplexity,
            r.after.perplexity,
            r.before.kl,
            r.after.kl,
            r.seconds
        );
    }
}
