//! The whole moekit pipeline in a few minutes, with nothing to download.
//!
//! 1. **Dense model**: a small LLaMA (4 layers, width 128, byte-level vocabulary) trained for
//!    about a minute on text embedded in this binary (moekit's own documentation, 50 KB).
//! 2. **Convert** (LLaMA-MoE / LaDiMo initialisation): each FFN is split into 8 experts of
//!    co-activated neurons, top-4 routing, routers initialised from hidden states.
//! 3. **Construct** (LaDiMo stage 1): each MoE block is trained on its own to reproduce its
//!    dense FFN on recorded activations.
//! 4. **Profile** (LaDiMo stage 2): routing is measured on calibration text and a per-layer
//!    top-k / top-p policy is chosen for a budget of 50% of the parameters active per token
//!    (80% for SmolLM2).
//! 5. **Distil** (MoE-KD): the student's routers and experts learn from the dense teacher's
//!    next-token distributions (forward KL), routed by the chosen policy.
//! 6. **Export**: a Mixtral checkpoint (with the model's own top-4) plus `policy.json`, read
//!    back and evaluated again.
//!
//! Perplexity is measured on the last 10% of the text, which no stage trains on.
//!
//! ```text
//! cargo run --release --example quickstart
//! cargo run --release --example quickstart -- --smollm2   # the same on SmolLM2-135M
//! ```
//!
//! `--smollm2` needs `scripts/fetch-smollm2.sh` to have fetched the model (or
//! `MOEKIT_SMOLLM2=/path/to/model.gguf`); it skips step 1 and uses the model's tokenizer.

use std::time::Instant;

use moekit::burn::module::Module;
use moekit::burn::optim::{AdamWConfig, GradientsParams};
use moekit::burn::tensor::Device;
use moekit::distill::{DistillConfig, IGNORE_INDEX, cross_entropy};
use moekit::llama::{
    Checkpoint, ExportFormat, LayeredConfig, Llama, LlamaConfig, SaveDtype, perplexity,
    save_pretrained,
};
use moekit::router::{ActiveParams, RoutingPolicy, SearchConfig, measure, proposals, select};
use moekit::train::{TokenWindows, TrainConfig, TrainObserver, Trainer};
#[path = "common/cache.rs"]
mod cache;

use moekit::upcycle::{
    ActivationStore, ConvertConfig, LayerwiseConfig, LogObserver, Method, RecordConfig, RouterInit,
    SplitStrategy, WarmupCosine, construct, convert,
};

/// The embedded corpus.
const TEXT: &str = include_str!("data/quickstart.txt");
/// Tokens per sequence everywhere.
const SEQ: usize = 128;

type Error = Box<dyn std::error::Error>;

/// How big each stage is: the tiny model and SmolLM2 differ.
struct Plan {
    pretrain_steps: usize,
    layerwise_steps: usize,
    distill_steps: usize,
    calib_tokens: usize,
    /// The activated-parameter budget of the routing policy, as a fraction of the model with
    /// every expert active (the dense model plus the routers).
    budget: f64,
}

/// One row of the before/after table.
struct Row {
    stage: String,
    perplexity: f64,
    activated: f64,
    seconds: f64,
}

/// Held-out perplexity and activated-parameter fraction of `model`.
fn measure_model(model: &Llama, held_out: &[u32]) -> Result<(f64, f64), Error> {
    let p = perplexity(model, held_out, SEQ, &mut |_, _| {})?;
    let k: Vec<f64> = p
        .experts_per_token
        .iter()
        .map(|e| e.experts_per_token)
        .collect();
    let activated = if k.is_empty() {
        1.0
    } else {
        ActiveParams::of(model, Some(&k))?.fraction()
    };
    Ok((p.perplexity, activated))
}

/// Trains `model` with plain cross-entropy on `tokens` (a custom loop on burn's AdamW).
fn pretrain(model: Llama, tokens: &[u32], steps: usize) -> Result<Llama, Error> {
    let device = model.device().autodiff();
    let mut model = model.fork(&device).train();
    let windows = TokenWindows::new(tokens.to_vec(), SEQ)?;
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let schedule = WarmupCosine::new(3e-3, steps / 20, steps, 0.1);
    let batch = 8;
    for step in 0..steps {
        let ids: Vec<usize> = (0..batch)
            .map(|i| (step * batch + i) * 7919 % windows.len())
            .collect();
        let b = windows.batch(&ids, &device);
        let loss = cross_entropy(model.logits(b.tokens)?, b.labels, None, IGNORE_INDEX)?;
        if step.is_multiple_of(100) {
            println!(
                "  pretraining step {step:>4}: loss {:.3}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(schedule.lr(step), model, grads);
    }
    Ok(model.valid())
}

/// Prints a line every 25 distillation steps.
struct Print;

impl TrainObserver for Print {
    fn step(&mut self, r: &moekit::train::StepReport) {
        if r.step.is_multiple_of(25) {
            println!("  distillation step {:>4}: kl {:.4}", r.step, r.loss);
        }
    }
}

fn main() -> Result<(), Error> {
    let smollm2 = std::env::args().any(|a| a == "--smollm2");
    let device: Device = moekit::default_device();
    device.seed(0);
    let total = Instant::now();
    let mut rows = Vec::new();
    let mut stage = |stage: &str, model: &Llama, held: &[u32], t: Instant| -> Result<(), Error> {
        let (perplexity, activated) = measure_model(model, held)?;
        rows.push(Row {
            stage: stage.to_string(),
            perplexity,
            activated,
            seconds: t.elapsed().as_secs_f64(),
        });
        println!(
            "{stage}: perplexity {perplexity:.3}, {:.1}% of parameters active",
            100.0 * activated
        );
        Ok(())
    };

    // 1. The dense model and the text.
    let t = Instant::now();
    let (dense, tokens, plan) = if smollm2 {
        let path = cache::smollm2_gguf();
        let ckpt = Checkpoint::open(&path)
            .map_err(|e| format!("{e} (run scripts/fetch-smollm2.sh or set MOEKIT_SMOLLM2)"))?;
        let tokens = ckpt.tokenizer()?.encode(TEXT)?;
        let model = ckpt.load(&device, &mut |_, _| {})?;
        let plan = Plan {
            pretrain_steps: 0,
            layerwise_steps: 40,
            distill_steps: 30,
            calib_tokens: 8192,
            // Attention and the 49K-word output projection are 41% of what a SmolLM2 token
            // multiplies with: a 50% budget would leave about one expert per layer.
            budget: 0.8,
        };
        (model, tokens, plan)
    } else {
        let tokens: Vec<u32> = TEXT.bytes().map(u32::from).collect();
        let model = LlamaConfig::llama(256, 128, 512, 4, 4, 2).init(&device)?;
        let plan = Plan {
            pretrain_steps: 400,
            layerwise_steps: 150,
            distill_steps: 150,
            calib_tokens: 16_384,
            budget: 0.5,
        };
        (model, tokens, plan)
    };
    let split = tokens.len() * 9 / 10;
    let (train, held) = tokens.split_at(split);
    println!(
        "{} training and {} held-out tokens",
        train.len(),
        held.len()
    );
    let dense = if plan.pretrain_steps > 0 {
        pretrain(dense, train, plan.pretrain_steps)?
    } else {
        dense
    };
    stage("dense model", &dense, held, t)?;

    // 2. Convert: 8 experts of co-activated neurons, top-4, hidden-state routers.
    let t = Instant::now();
    let calib = &train[..plan.calib_tokens.min(train.len())];
    let record = RecordConfig {
        seq_len: SEQ,
        batch: 8,
        memory_budget: 1 << 30,
        fingerprint: "quickstart".into(),
    };
    // Activations past the memory budget stream to files in the work directory.
    let work = tempfile::tempdir()?;
    let recording = work.path().join("activations");
    let store = ActivationStore::record(&dense, calib, &record, Some(&recording), &mut |_, _| {})?;
    let config = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Coactivation,
        },
        8,
        4,
    )
    .with_router_init(RouterInit::HiddenStates);
    let moe = convert(dense.clone(), &config, Some(&store), &mut |_, _| {})?;
    stage("converted: 8 experts, top-4", &moe, held, t)?;

    // 3. Construct: each block against its dense FFN.
    let t = Instant::now();
    let layerwise = LayerwiseConfig::new()
        .with_steps(plan.layerwise_steps)
        .with_batch_tokens(1024)
        .with_lr(3e-3);
    let (moe, _) = construct(moe, &store, &layerwise, None, &mut LogObserver)?;
    drop(store);
    stage("+ layer-wise construction", &moe, held, t)?;

    // 4. Profile: a per-layer policy within the budget.
    let t = Instant::now();
    let search = SearchConfig {
        seq_len: SEQ,
        ..SearchConfig::default()
    };
    let layered = LayeredConfig::new();
    let candidates = measure(
        &moe,
        &calib[..calib.len().min(8192)],
        &search,
        &layered,
        &device,
        &mut |_, _| {},
    )?;
    let offered = proposals(&candidates, plan.budget, 4096)?;
    let (policy, _) = select(
        &moe,
        offered,
        &calib[..calib.len().min(2048)],
        SEQ,
        &layered,
        &device,
        &mut |_, _| {},
    )?;
    let file_routing = RoutingPolicy::of_model(&moe);
    let mut routed = moe;
    policy.apply(&mut routed)?;
    let label = format!(
        "+ profiled routing policy ({:.0}% budget)",
        100.0 * plan.budget
    );
    stage(&label, &routed, held, t)?;

    // 5. Distil routers and experts from the dense teacher, under the policy.
    let t = Instant::now();
    let train_config = TrainConfig::new(plan.distill_steps)
        .with_lr(1e-3)
        .with_batch_size(8)
        .with_seq_len(SEQ)
        .with_aux_weight(0.01);
    let distiller = DistillConfig::new("kl:1".parse()?).init(&device)?;
    let mut trainer = Trainer::new(
        dense.clone(),
        routed,
        distiller,
        "router,experts".parse()?,
        train_config,
        TokenWindows::new(train.to_vec(), SEQ)?,
        None,
    )?
    .with_checkpoints(work.path().join("checkpoints"));
    trainer.run(&mut Print)?;
    let distilled = trainer.student();
    stage("+ distillation from the dense model", &distilled, held, t)?;

    // 6. Export: the checkpoint keeps the model's own top-4; the policy is a file beside it.
    let t = Instant::now();
    let out = work.path().join("moe");
    let mut plain = distilled;
    file_routing.apply(&mut plain)?;
    let format = if moekit::llama::check_export(&plain, ExportFormat::Mixtral).is_ok() {
        ExportFormat::Mixtral
    } else {
        ExportFormat::Qwen2Moe
    };
    save_pretrained(&plain, None, &out, format, SaveDtype::F32)?;
    policy.save(&out.join("policy.json"))?;
    let mut reloaded = Checkpoint::open(&out)?.load(&device, &mut |_, _| {})?;
    RoutingPolicy::load(&out.join("policy.json"))?.apply(&mut reloaded)?;
    stage("exported and read back", &reloaded, held, t)?;

    println!("\n| stage | held-out perplexity | activated parameters | seconds |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.3} | {:.1}% | {:.1} |",
            r.stage,
            r.perplexity,
            100.0 * r.activated,
            r.seconds
        );
    }
    println!(
        "\nrouting policy: {}",
        policy
            .layers
            .iter()
            .map(|l| format!("{}:{}", l.layer, l.rule))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("total {:.0} s", total.elapsed().as_secs_f64());
    let (exported, distilled) = (
        rows[rows.len() - 1].perplexity,
        rows[rows.len() - 2].perplexity,
    );
    assert!(
        (exported / distilled - 1.0).abs() < 1e-3,
        "the exported model evaluates differently: {exported} vs {distilled}"
    );
    Ok(())
}
