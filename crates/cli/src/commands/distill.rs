//! `moekit distill --teacher T --student S --data FILE... --steps N --out DIR`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::ProgressBar;
use moekit::distill::{DistillConfig, DistillLoss, HiddenProjectionConfig};
use moekit::llama::{Llama, SaveDtype, save_adapter, save_pretrained};
use moekit::lora::LoraConfig;
use moekit::router::RoutingPolicy;
use moekit::train::{
    EvalReport, StepReport, TokenWindows, TrainConfig, TrainObserver, TrainableSet, Trainer,
};
use moekit::upcycle::calibration;
use serde_json::json;

use crate::error::CliError;
use crate::progress;

/// Arguments of `moekit distill`.
#[derive(Args, Debug)]
pub struct DistillArgs {
    /// The teacher: a Hugging Face model directory or a .gguf file.
    #[arg(long)]
    teacher: PathBuf,
    /// The student (e.g. the output of `moekit convert`); it must share the teacher's
    /// tokenizer.
    #[arg(long)]
    student: PathBuf,
    /// Training text: files or directories (read recursively, in name order).
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    data: Vec<PathBuf>,
    /// Held-out text for evaluation (default: the last --eval-tokens of --data, not trained
    /// on).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    eval_data: Vec<PathBuf>,
    /// Training tokens read from --data (default: all of it). A run that needs more tokens
    /// than this (steps × batch × accumulation × seq-len) trains on the same text again, and
    /// says so.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Held-out tokens evaluated.
    #[arg(long, default_value_t = 8192)]
    eval_tokens: usize,
    /// Weighted losses: kl, rkl, skew-kl, skew-rkl, jsd, tv, topk-kl, ce, hidden-mse,
    /// hidden-cos.
    #[arg(long, default_value = "kl:1")]
    loss: String,
    /// Softmax temperature of the logit divergences (values scaled by τ²).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Skew α of skew-kl / skew-rkl.
    #[arg(long, default_value_t = 0.1)]
    skew_alpha: f64,
    /// Parameter sets trained (the rest is frozen): router, experts, shared, adapters,
    /// attention, norms, embeddings, all.
    #[arg(long, default_value = "router,experts")]
    trainable: String,
    /// Add LoRA adapters of this rank to the student before training (train them with
    /// --trainable adapters); they are saved in PEFT layout in OUT/adapter and merged into
    /// OUT/model.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA α (scale α / r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// LoRA target projections (regular expressions on the projection names).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// Route the student by this per-layer policy (from `moekit profile`) while training; it
    /// is copied to OUT/model/policy.json, and the checkpoint keeps the model's own top-k
    /// (apply the policy with `moekit eval --policy`).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Optimiser steps.
    #[arg(long)]
    steps: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Linear warm-up steps, then cosine decay.
    #[arg(long, default_value_t = 10)]
    warmup_steps: usize,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Global gradient-norm clip (0: none; otherwise finite and > 0).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    max_grad_norm: f64,
    /// Weight of the MoE auxiliary (load-balancing, z) losses.
    #[arg(long, default_value_t = 0.01)]
    aux_weight: f64,
    /// Evaluate every N steps (0: before and after only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N steps (and at the end) in OUT/checkpoints; a rerun resumes.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// Output directory: model/, adapter/ (with --lora-rank), checkpoints/, train.jsonl,
    /// summary.json.
    #[arg(long)]
    out: PathBuf,
}

impl DistillArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig::new(self.steps)
            .with_lr(self.lr)
            .with_warmup_steps(self.warmup_steps)
            .with_min_lr_ratio(self.min_lr_ratio)
            .with_weight_decay(self.weight_decay)
            .with_batch_size(self.batch_size)
            .with_seq_len(self.seq_len)
            .with_grad_accum(self.grad_accum)
            .with_max_grad_norm((self.max_grad_norm != 0.0).then_some(self.max_grad_norm))
            .with_aux_weight(self.aux_weight)
            .with_eval_every(self.eval_every)
            .with_checkpoint_every(self.checkpoint_every)
            .with_seed(self.seed)
    }
}

/// Student hidden state `j` ↔ teacher hidden state `round(j · L_T / L_S)` for every `j`
/// (embeddings to embeddings, last layer to last layer).
fn layer_map(student: &Llama, teacher: &Llama) -> Vec<(usize, usize)> {
    let (ls, lt) = (student.layers.len(), teacher.layers.len());
    (0..=ls)
        .map(|j| (j, ((j * lt) as f64 / ls as f64).round() as usize))
        .collect()
}

/// A progress bar over steps with the loss and rate, and a JSON line per event in
/// `train.jsonl`.
struct Observer {
    bar: ProgressBar,
    log: std::fs::File,
    tokens_per_step: usize,
}

impl Observer {
    fn line(&mut self, value: serde_json::Value) {
        if let Err(e) = writeln!(self.log, "{value}") {
            tracing::warn!("cannot append to train.jsonl: {e}");
        }
    }
}

impl TrainObserver for Observer {
    fn start(&mut self, first: usize, steps: usize) {
        self.bar.set_length(steps as u64);
        self.bar.set_position(first as u64 - 1);
        self.bar.reset_eta();
        if first > 1 {
            self.bar
                .println(format!("resuming after step {}", first - 1));
        }
    }

    fn step(&mut self, r: &StepReport) {
        self.bar.set_position(r.step as u64);
        let rate = self.tokens_per_step as f64 / r.seconds.max(1e-9);
        let parts: Vec<String> = r.parts.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
        self.bar.set_message(format!(
            "loss {:.4} ({}) {rate:.0} tok/s",
            r.loss,
            parts.join(", ")
        ));
        self.line(json!({ "event": "step", "report": r }));
        tracing::info!(step = r.step, loss = r.loss, "step");
    }

    fn eval(&mut self, r: &EvalReport) {
        self.bar.println(format!(
            "step {:>5}: held-out perplexity {:.3}, KL to the teacher {:.4} ({} tokens)",
            r.step, r.perplexity, r.kl, r.tokens
        ));
        self.line(json!({ "event": "eval", "report": r }));
    }

    fn checkpoint(&mut self, step: usize, path: &Path) {
        tracing::info!(step, path = %path.display(), "checkpoint");
    }
}

/// Tokens of `paths`, at most `max`.
fn tokens(
    tokenizer: &moekit::llama::Tokenizer,
    paths: &[PathBuf],
    max: usize,
) -> Result<Vec<u32>, CliError> {
    let files = calibration::files(paths)?;
    Ok(calibration::tokens(tokenizer, &files, max)?)
}

/// What a run starts from besides its data and settings, part of its checkpoints' identity:
/// the student's and teacher's weights and configurations (under their canonical paths, so
/// that the path as typed and files written beside them do not count), the routing policy
/// file and the LoRA settings.
fn source(args: &DistillArgs) -> String {
    let policy = args
        .policy
        .as_deref()
        .map(|p| super::stamp(&p.canonicalize().unwrap_or_else(|_| p.to_path_buf())));
    format!(
        "student {}\nteacher {}\npolicy {policy:?}\nlora {:?} {} {:?}",
        super::stamp_model(&args.student),
        super::stamp_model(&args.teacher),
        args.lora_rank,
        args.lora_alpha,
        args.lora_targets
    )
}

/// Distils the student from the teacher and writes the trained model.
pub fn run(args: &DistillArgs) -> Result<(), CliError> {
    let loss: DistillLoss = args
        .loss
        .parse()
        .map_err(|e| CliError::Usage(format!("--loss {}: {e}", args.loss)))?;
    let trainable: TrainableSet = args
        .trainable
        .parse()
        .map_err(|e| CliError::Usage(format!("--trainable: {e}")))?;
    let config = args.config();
    config
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;

    // f32 weights of both; the student's gradients and AdamW's two moments besides, unless
    // only LoRA adapters train.
    let per_student_param = if args.lora_rank.is_some() { 4 } else { 16 };
    crate::memory::check(
        "distillation",
        4 * crate::memory::params(&args.teacher)?
            + per_student_param * crate::memory::params(&args.student)?,
    )?;
    let (teacher, tokenizer) = super::load(&args.teacher, None)?;
    let (mut student, _) = super::load(&args.student, None)?;
    let format = super::auto_format(&student)?;
    let own_routing = RoutingPolicy::of_model(&student);
    let policy = args
        .policy
        .as_deref()
        .map(RoutingPolicy::load)
        .transpose()?;
    if let Some(p) = &policy {
        p.apply(&mut student)?;
    }
    if let Some(rank) = args.lora_rank {
        let lora = LoraConfig::new(rank)
            .with_alpha(args.lora_alpha)
            .with_target_modules(args.lora_targets.clone());
        student = student.with_lora(&lora)?;
    }

    let consumed = args.steps * config.tokens_per_step();
    let max_tokens = args.max_tokens.unwrap_or(usize::MAX);
    let mut ids = tokens(
        &tokenizer,
        &args.data,
        max_tokens.saturating_add(args.eval_tokens),
    )?;
    let eval_ids = if args.eval_data.is_empty() {
        let held = args.eval_tokens.min(ids.len() / 2);
        let eval = ids.split_off(ids.len() - held);
        ids.truncate(max_tokens);
        eval
    } else {
        ids.truncate(max_tokens);
        tokens(&tokenizer, &args.eval_data, args.eval_tokens)?
    };
    let data = TokenWindows::new(ids, args.seq_len)?;
    let eval = TokenWindows::new(eval_ids, args.seq_len)?;
    let available = data.len() * args.seq_len;
    if consumed > available {
        // Repeated text overfits: the training loss keeps falling while held-out text stops
        // improving (docs/results.md, "LaDiMo with shared experts").
        let passes = consumed as f64 / available.max(1) as f64;
        tracing::warn!(
            "{} steps of {} tokens pass {passes:.1} times over the {available} training \
             tokens; add --data or raise --max-tokens to train on fresh text",
            args.steps,
            config.tokens_per_step()
        );
    }

    let layers = layer_map(&student, &teacher);
    let (hs, ht) = (student.config.hidden_size, teacher.config.hidden_size);
    // Hidden-state losses between models of different widths go through learned maps (and
    // only they: logit losses need none).
    let projection = (hs != ht && loss.wants_hidden())
        .then(|| HiddenProjectionConfig::new(hs, ht).with_pairs(layers.len()));
    let distiller = DistillConfig::new(loss)
        .with_temperature(args.temperature)
        .with_alpha(args.skew_alpha)
        .with_layers(layers)
        .with_projection(projection)
        .init(&student.device())?;
    let mut trainer = Trainer::new(
        teacher,
        student,
        distiller,
        trainable,
        config.clone(),
        data,
        Some(eval),
    )?
    .with_checkpoints(args.out.join("checkpoints"))
    .with_source(source(args));
    // One run per output folder at a time (its checkpoints, log and model).
    let lock = moekit::llama::FolderLock::acquire(&args.out)?;
    trainer.resume()?;

    std::fs::create_dir_all(&args.out).map_err(|source| CliError::Read {
        path: args.out.clone(),
        source,
    })?;
    let log_path = args.out.join("train.jsonl");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| CliError::Read {
            path: log_path.clone(),
            source,
        })?;
    let mut observer = Observer {
        bar: progress::bar("distill", "steps"),
        log,
        tokens_per_step: config.tokens_per_step(),
    };
    let params = trainer.trainable_params();
    observer.bar.println(format!(
        "training {params} parameters ({}), {} tokens per step",
        args.trainable,
        config.tokens_per_step()
    ));
    let summary = trainer.run(&mut observer)?;
    observer.bar.finish_and_clear();

    let mut student = trainer.student();
    own_routing.apply(&mut student)?;
    let model_dir = args.out.join("model");
    let adapter_dir = args.out.join("adapter");
    let exported = if student.adapters().is_empty() {
        student
    } else {
        save_adapter(&student, &adapter_dir, None, SaveDtype::F32)?;
        student.merge_lora()
    };
    save_pretrained(
        &exported,
        Some(&tokenizer),
        &model_dir,
        format,
        SaveDtype::F32,
    )?;
    if let Some(p) = &policy {
        p.save(&model_dir.join("policy.json"))?;
    }

    let (first, last) = (summary.evals.first(), summary.evals.last());
    let report = json!({
        "out": args.out,
        "model": model_dir,
        "adapter": (args.lora_rank.is_some()).then_some(&adapter_dir),
        "loss": args.loss,
        "trainable": args.trainable,
        "trainable_params": params,
        "steps": summary.steps,
        "first_step": summary.first_step,
        "schedule": summary.schedule,
        "tokens": summary.tokens,
        "seconds": summary.seconds,
        "before": first,
        "after": last,
        "last_step": summary.last,
    });
    moekit::router::file::save_json(&report, &args.out.join("summary.json"))?;
    if args.json {
        println!("{report}");
    } else {
        println!(
            "wrote {} after {} steps ({} tokens, {:.0} s)",
            model_dir.display(),
            summary.steps,
            summary.tokens,
            summary.seconds
        );
        if let (Some(a), Some(b)) = (first, last) {
            println!(
                "held-out perplexity {:.3} -> {:.3}, KL to the teacher {:.4} -> {:.4}",
                a.perplexity, b.perplexity, a.kl, b.kl
            );
        }
    }
    lock.release()?;
    Ok(())
}
