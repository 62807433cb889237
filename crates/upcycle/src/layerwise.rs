//! Layer-wise expert construction (LaDiMo, stage 1): each MoE block is trained on its own to
//! reproduce the output of the dense FFN it replaces, on recorded calibration activations.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, IndexingUpdateOp, Tensor, TensorData};
use moekit_llama::{FfnSlot, Llama};
use moekit_moe::{MoeLayer, Selection};

use crate::error::{Result, UpcycleError};
use crate::partition::SplitMix64;
use crate::record::ActivationStore;
use crate::schedule::WarmupCosine;

/// Configuration of [`construct`].
#[derive(Config, Debug)]
pub struct LayerwiseConfig {
    /// Optimiser steps per layer.
    #[config(default = 200)]
    pub steps: usize,
    /// Tokens per step, drawn without replacement (reshuffled every pass).
    #[config(default = 2048)]
    pub batch_tokens: usize,
    /// Peak AdamW learning rate (linear warm-up over the first 5% of steps, then cosine decay
    /// to 10%).
    #[config(default = 1e-3)]
    pub lr: f64,
    /// Weight on the layer's auxiliary (load-balancing and z) losses.
    #[config(default = 1.0)]
    pub aux_weight: f64,
    /// Weight `λ` of router supervision (see [`router_supervision`]): the router is also
    /// trained to rank first the `k` experts whose outputs are largest on each token, the
    /// experts an oracle would pick (MoEfication, Zhang et al. 2022, trains its routers on the
    /// same kind of target). With renormalised top-1 the MSE gives the router no gradient at
    /// all, and with few steps it barely moves it; this term trains it directly. 0: off.
    #[config(default = 0.0)]
    pub router_loss: f64,
    /// Router-only steps after each block is trained ([`fit_router`]; 0: none). While the
    /// block trains, its experts move the oracle's choices that the supervision above chases;
    /// these steps fit the router, alone, to the choices of the experts it will route to. They
    /// cost one pass of every expert over the rows, then steps of router size only.
    #[config(default = 0)]
    pub router_steps: usize,
    /// Peak learning rate of the router-only steps (same warm-up and cosine decay).
    #[config(default = 1e-3)]
    pub router_lr: f64,
    /// Steps that train the block's experts again after the router-only steps, the router
    /// frozen ([`refine_experts`]; 0: none), so that they work with the fitted router's
    /// combine weights. Like the router-only steps they run after the block is saved.
    #[config(default = 0)]
    pub refine_steps: usize,
    /// Fraction of the recorded tokens held out to measure the error (at most 8192 tokens).
    #[config(default = 0.05)]
    pub holdout: f64,
    /// Seed of the batch order.
    #[config(default = 0)]
    pub seed: u64,
}

impl LayerwiseConfig {
    /// Checks the settings before any work: positive learning rates and batch, a hold-out
    /// fraction in `[0, 1)`, finite non-negative loss weights.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, value: f64| {
            Err(UpcycleError::Config(format!(
                "layer-wise construction: {what}, not {value}"
            )))
        };
        for (what, lr) in [
            ("the learning rate", self.lr),
            ("the router learning rate", self.router_lr),
        ] {
            if !(lr > 0.0 && lr.is_finite()) {
                return bad(&format!("{what} must be a finite number > 0"), lr);
            }
        }
        if self.batch_tokens == 0 {
            return bad("the batch must hold at least one token", 0.0);
        }
        if !(0.0..1.0).contains(&self.holdout) {
            return bad("the held-out fraction must be in [0, 1)", self.holdout);
        }
        for (what, w) in [
            ("the aux loss weight", self.aux_weight),
            ("the router supervision weight", self.router_loss),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return bad(&format!("{what} must be a finite number >= 0"), w);
            }
        }
        Ok(())
    }

    /// The settings a trained block depends on: these, with the router-only ones reset to
    /// their defaults. [`construct`] saves each block before its router-only steps, so blocks
    /// saved under one router setting serve every other (key a work directory with this).
    pub fn block_settings(&self) -> Self {
        let defaults = Self::new();
        self.clone()
            .with_router_steps(defaults.router_steps)
            .with_router_lr(defaults.router_lr)
            .with_refine_steps(defaults.refine_steps)
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    /// Layer index.
    pub layer: usize,
    /// Held-out `‖MoE(x) − FFN(x)‖² / ‖FFN(x)‖²` before training.
    pub error_before: f64,
    /// The same after training.
    pub error_after: f64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Loaded from an earlier, interrupted run instead of trained.
    pub resumed: bool,
    /// Recall of the router against the oracle on the held-out rows (on the training rows when
    /// none are held out): the fraction of the `k` experts with the largest outputs on a token
    /// that the router also picks; 1 means the router routes as the oracle would. `None` for
    /// top-p routers and for blocks that were not trained (they reproduce their FFN exactly).
    pub oracle_recall: Option<f64>,
}

/// Follows [`construct`]: one layer at a time.
pub trait LayerObserver {
    /// Layer `layer` starts `steps` steps.
    fn start(&mut self, layer: usize, steps: usize);
    /// Step `step` (1-based) gave training MSE `mse`.
    fn step(&mut self, layer: usize, step: usize, mse: f32);
    /// Layer `layer`'s router starts `steps` router-only steps ([`fit_router`]).
    fn start_router(&mut self, _layer: usize, _steps: usize) {}
    /// Router-only step `step` (1-based) gave cross-entropy `ce` to the oracle.
    fn router_step(&mut self, _layer: usize, _step: usize, _ce: f32) {}
    /// The layer is done.
    fn finish(&mut self, report: &LayerReport);
}

/// An observer that only logs.
pub struct LogObserver;

impl LayerObserver for LogObserver {
    fn start(&mut self, _: usize, _: usize) {}
    fn step(&mut self, _: usize, _: usize, _: f32) {}
    fn finish(&mut self, r: &LayerReport) {
        tracing::info!(?r, "layer constructed");
    }
}

fn checkpoint(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("moe_layer{layer:03}.bpk"))
}

/// Host rows `[N·H]` of one layer's recording.
struct Rows<'a> {
    x: &'a [f32],
    y: &'a [f32],
    hidden: usize,
}

impl<'a> Rows<'a> {
    /// Layer `layer`'s rows, or an error when `x` and `y` do not make the same non-empty rows.
    fn checked(x: &'a [f32], y: &'a [f32], hidden: usize, layer: usize) -> Result<Self> {
        let rows = Rows { x, y, hidden };
        if hidden == 0 || rows.len() == 0 || y.len() != x.len() {
            return Err(UpcycleError::Config(format!(
                "layer {layer}: {} input and {} output values do not make rows of width {hidden}",
                x.len(),
                y.len()
            )));
        }
        Ok(rows)
    }

    fn len(&self) -> usize {
        self.x.len() / self.hidden
    }

    /// Rows `range` of `x` and `y` as `[rows, H]` tensors on `device`.
    fn slice(&self, range: std::ops::Range<usize>, device: &Device) -> (Tensor<2>, Tensor<2>) {
        (
            slice_rows(self.x, self.hidden, range.clone(), device),
            slice_rows(self.y, self.hidden, range, device),
        )
    }

    /// The rows `ids` of `x` and `y` gathered on the host, as `[ids.len(), H]` tensors.
    fn gather(&self, ids: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        (
            gather_rows(self.x, self.hidden, ids, device),
            gather_rows(self.y, self.hidden, ids, device),
        )
    }
}

/// The rows `range` of the host matrix `v` (`[N·H]`) as a `[range.len(), H]` tensor.
fn slice_rows(v: &[f32], h: usize, range: std::ops::Range<usize>, device: &Device) -> Tensor<2> {
    let n = range.len();
    Tensor::from_data(
        TensorData::new(v[range.start * h..range.end * h].to_vec(), [n, h]),
        device,
    )
}

/// The rows `ids` of the host matrix `v` (`[N·H]`) as a `[ids.len(), H]` tensor.
fn gather_rows(v: &[f32], h: usize, ids: &[usize], device: &Device) -> Tensor<2> {
    let rows: Vec<f32> = ids
        .iter()
        .flat_map(|&i| v[i * h..(i + 1) * h].iter().copied())
        .collect();
    Tensor::from_data(TensorData::new(rows, [ids.len(), h]), device)
}

/// Batches of row indices drawn without replacement, reshuffled every pass.
struct Batches {
    order: Vec<usize>,
    cursor: usize,
    batch: usize,
    rng: SplitMix64,
}

impl Batches {
    /// Batches of `batch` (at most `n`) of the rows `0..n`.
    fn new(n: usize, batch: usize, seed: u64) -> Self {
        Self {
            order: (0..n).collect(),
            cursor: n,
            batch: batch.clamp(1, n),
            rng: SplitMix64::new(seed),
        }
    }

    fn next(&mut self) -> &[usize] {
        if self.cursor + self.batch > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.cursor = 0;
        }
        self.cursor += self.batch;
        &self.order[self.cursor - self.batch..self.cursor]
    }
}

/// The `k` of a top-k router, the number of experts the oracle picks; top-p is refused.
fn oracle_k(moe: &MoeLayer, layer: usize) -> Result<usize> {
    match moe.router.selection {
        Selection::TopK { k, .. } => Ok(k),
        Selection::TopP { .. } => Err(UpcycleError::Config(format!(
            "layer {layer}: router supervision needs top-k routing (the oracle picks k \
             experts); this router uses top-p"
        ))),
    }
}

/// Row slices of at most `size` of the `n` rows.
fn chunks(n: usize, size: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n).step_by(size).map(move |s| s..(s + size).min(n))
}

/// The oracle's `k` experts per row of the host rows `x` (`[N·H]`), as `[N·k]`, row-major.
fn oracle_ids(moe: &MoeLayer, x: &[f32], h: usize, k: usize, device: &Device) -> Vec<i64> {
    let mut ids = Vec::with_capacity(x.len() / h * k);
    for range in chunks(x.len() / h, 2048) {
        let xb = slice_rows(x, h, range, device);
        ids.extend(moe.oracle_experts(xb, k).into_data().iter::<i64>());
    }
    ids
}

/// Held-out recall of the router's top-k against the oracle's (see
/// [`LayerReport::oracle_recall`]).
fn oracle_recall(moe: &MoeLayer, data: &Rows, device: &Device) -> Option<f64> {
    let Selection::TopK { k, .. } = moe.router.selection else {
        return None;
    };
    let h = data.hidden;
    let oracle = oracle_ids(moe, data.x, h, k, device);
    let mut routed = Vec::with_capacity(oracle.len());
    for range in chunks(data.len(), 2048) {
        let xb = slice_rows(data.x, h, range, device);
        routed.extend(moe.router.forward(xb).experts.into_data().iter::<i64>());
    }
    let hits: usize = oracle
        .chunks(k)
        .zip(routed.chunks(k))
        .map(|(o, r)| o.iter().filter(|e| r.contains(e)).count())
        .sum();
    Some(hits as f64 / oracle.len().max(1) as f64)
}

/// Relative squared error of `moe` on the rows, in slices.
fn relative_error(moe: &MoeLayer, data: &Rows, device: &Device) -> Result<f64> {
    let h = data.hidden;
    let (mut err, mut norm) = (0f64, 0f64);
    for range in chunks(data.len(), 4096) {
        let rows = range.len();
        let (xb, yb) = data.slice(range, device);
        let out = moe
            .forward(xb.reshape([1, rows, h]))?
            .output
            .reshape([rows, h]);
        err += (out - yb.clone()).square().sum().into_scalar::<f32>() as f64;
        norm += yb.square().sum().into_scalar::<f32>() as f64;
    }
    Ok(err / norm.max(f64::MIN_POSITIVE))
}

/// The experts an oracle would route each token to: `[T, E]`, `1/k` for the `k` routed experts
/// whose outputs `‖Eᵢ(x)‖` are largest on the token ([`MoeLayer::oracle_experts`]), 0
/// elsewhere (a constant: no gradient).
///
/// # Shapes
/// - x: `[T, H]`
pub fn oracle_experts(moe: &MoeLayer, x: Tensor<2>, k: usize) -> Tensor<2> {
    let [t, _] = x.dims();
    let e = moe.router.num_experts();
    let device = x.device();
    let ids = moe.oracle_experts(x, k);
    let k = ids.dims()[1];
    Tensor::<2>::zeros([t, e], &device).scatter(
        1,
        ids,
        Tensor::full([t, k], 1.0 / k as f64, &device),
        IndexingUpdateOp::Add,
    )
}

/// Router supervision: the cross-entropy `−Σₑ tₑ·log softmax(logits)ₑ` of the router's
/// distribution against the oracle target `t` of [`oracle_experts`], averaged over tokens.
///
/// # Shapes
/// - logits: `[T, E]`
/// - target: `[T, E]`, rows summing to 1
pub fn router_supervision(logits: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    let t = logits.dims()[0].max(1);
    (target * log_softmax(logits, 1)).sum().neg() / t as f64
}

/// `value` if it is finite, else the error that stops layer `layer`'s training at `step`.
fn finite(value: f32, layer: usize, step: usize) -> Result<f32> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(UpcycleError::NonFinite { layer, step, value })
    }
}

/// Trains one MoE block to reproduce `y = FFN(x)` (host rows `[N·H]` each): MSE plus the
/// block's auxiliary losses, on the autodiff version of `device`. Frozen parameters (PESC's
/// and LoRA experts' shared FFN) stay frozen.
#[allow(clippy::too_many_arguments)]
pub fn train_block(
    moe: MoeLayer,
    x: &[f32],
    y: &[f32],
    hidden: usize,
    device: &Device,
    config: &LayerwiseConfig,
    layer: usize,
    observer: &mut dyn LayerObserver,
) -> Result<MoeLayer> {
    config.validate()?;
    let supervised_k = (config.router_loss > 0.0)
        .then(|| oracle_k(&moe, layer))
        .transpose()?;
    let data = Rows::checked(x, y, hidden, layer)?;
    let steps = BlockSteps {
        steps: config.steps,
        aux_weight: config.aux_weight,
        supervision: supervised_k.map(|k| (k, config.router_loss)),
        freeze_router: false,
        seed: config.seed ^ layer as u64,
    };
    steps.run(moe, &data, device, config, layer, observer)
}

/// Trains the experts (and shared expert) of `moe` again, its router frozen, to reproduce
/// `y = FFN(x)` (MSE only) for `config.refine_steps` steps at `config.lr`. After
/// [`fit_router`] the experts were trained under other combine weights than the fitted
/// router gives; these steps adapt them to it. 0 steps: `moe` as it is.
#[allow(clippy::too_many_arguments)]
pub fn refine_experts(
    moe: MoeLayer,
    x: &[f32],
    y: &[f32],
    hidden: usize,
    device: &Device,
    config: &LayerwiseConfig,
    layer: usize,
    observer: &mut dyn LayerObserver,
) -> Result<MoeLayer> {
    config.validate()?;
    let data = Rows::checked(x, y, hidden, layer)?;
    let steps = BlockSteps {
        steps: config.refine_steps,
        aux_weight: 0.0,
        supervision: None,
        freeze_router: true,
        seed: (config.seed ^ layer as u64).rotate_left(32),
    };
    steps.run(moe, &data, device, config, layer, observer)
}

/// A run of block training steps (see [`train_block`] and [`refine_experts`]).
struct BlockSteps {
    steps: usize,
    aux_weight: f64,
    /// Router supervision: the oracle's `k` and the loss weight.
    supervision: Option<(usize, f64)>,
    freeze_router: bool,
    seed: u64,
}

impl BlockSteps {
    fn run(
        &self,
        moe: MoeLayer,
        data: &Rows,
        device: &Device,
        config: &LayerwiseConfig,
        layer: usize,
        observer: &mut dyn LayerObserver,
    ) -> Result<MoeLayer> {
        let (n, h) = (data.len(), data.hidden);
        let train = device.clone().autodiff();
        let mut moe = moe.fork(&train).train();
        if self.freeze_router {
            moe.router = moekit_lora::freeze(moe.router);
        }
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let mut batches = Batches::new(n, config.batch_tokens, self.seed);
        let schedule = WarmupCosine::new(config.lr, self.steps / 20, self.steps, 0.1);
        if self.steps > 0 {
            observer.start(layer, self.steps);
        }
        for step in 0..self.steps {
            let ids = batches.next();
            let batch = ids.len();
            let (xb, yb) = data.gather(ids, &train);
            let out = moe.forward(xb.clone().reshape([1, batch, h]))?;
            let mse = (out.output.clone().reshape([batch, h]) - yb)
                .square()
                .mean();
            let mut loss = mse.clone();
            if self.aux_weight > 0.0 {
                loss = loss + out.aux_loss() * self.aux_weight;
            }
            if let Some((k, weight)) = self.supervision {
                let target = oracle_experts(&moe, xb, k);
                loss = loss + router_supervision(out.router_logits(), target) * weight;
            }
            // The whole loss is checked before the update (a NaN from the auxiliary or
            // supervision terms would otherwise reach the weights unseen at the last step);
            // one read for both values.
            let values = Tensor::cat(vec![mse.reshape([1]), loss.clone().reshape([1])], 0)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data");
            finite(values[1], layer, step + 1)?;
            let grads = GradientsParams::from_grads(loss.backward(), &moe);
            moe = optim.step(schedule.lr(step), moe, grads);
            observer.step(layer, step + 1, values[0]);
        }
        Ok(moe.valid())
    }
}

/// Fits the router of `moe` alone to the oracle (host rows `x`, `[N·H]`): the `k` experts
/// whose outputs are largest on each row ([`MoeLayer::oracle_experts`]), computed once with
/// the experts as they are, are the target of `config.router_steps` AdamW steps of
/// [`router_supervision`] on batches of `config.batch_tokens` rows, peak learning rate
/// `config.router_lr` (warm-up over 5% of the steps, cosine decay to 10%). Only the router
/// changes. MoEfication (Zhang et al. 2022) trains its routers the same way, on a frozen
/// partition; layer-wise construction calls this after a block's training when
/// `config.router_steps > 0`.
#[allow(clippy::too_many_arguments)]
pub fn fit_router(
    mut moe: MoeLayer,
    x: &[f32],
    hidden: usize,
    device: &Device,
    config: &LayerwiseConfig,
    layer: usize,
    observer: &mut dyn LayerObserver,
) -> Result<MoeLayer> {
    config.validate()?;
    let k = oracle_k(&moe, layer)?;
    let (n, e) = (x.len() / hidden.max(1), moe.router.num_experts());
    if hidden != moe.hidden_size() {
        return Err(UpcycleError::Config(format!(
            "layer {layer}: rows of width {hidden} for a block of width {}",
            moe.hidden_size()
        )));
    }
    if n == 0 || !x.len().is_multiple_of(hidden) {
        return Err(UpcycleError::Config(format!(
            "layer {layer}: {} input values do not make rows of width {hidden}",
            x.len()
        )));
    }
    if config.router_steps == 0 {
        return Ok(moe);
    }
    let chosen = oracle_ids(&moe, x, hidden, k, device);
    let train = device.clone().autodiff();
    let mut router = moe.router.clone().fork(&train).train();
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    // A seed of its own, so that the router sees other batches than the block did.
    let mut batches = Batches::new(n, config.batch_tokens, !(config.seed ^ layer as u64));
    let steps = config.router_steps;
    let schedule = WarmupCosine::new(config.router_lr, steps / 20, steps, 0.1);
    observer.start_router(layer, steps);
    for step in 0..steps {
        let ids = batches.next();
        let mut target = vec![0f32; ids.len() * e];
        for (row, &i) in ids.iter().enumerate() {
            for &c in &chosen[i * k..(i + 1) * k] {
                target[row * e + c as usize] = 1.0 / k as f32;
            }
        }
        let target = Tensor::from_data(TensorData::new(target, [ids.len(), e]), &train);
        let xb = gather_rows(x, hidden, ids, &train);
        let ce = router_supervision(router.logits(xb), target);
        let grads = GradientsParams::from_grads(ce.clone().backward(), &router);
        router = optim.step(schedule.lr(step), router, grads);
        let ce = finite(ce.into_scalar::<f32>(), layer, step + 1)?;
        observer.router_step(layer, step + 1, ce);
    }
    moe.router = router.valid();
    Ok(moe)
}

/// Layer-wise construction: every MoE layer of `model` is trained on its own against the
/// dense FFN outputs recorded in `store`, in order. With a `work_dir`, each finished layer is
/// saved there (atomically), and a rerun with the same directory loads finished layers
/// instead of training them, so an interrupted run resumes at the layer it stopped in.
pub fn construct(
    mut model: Llama,
    store: &ActivationStore,
    config: &LayerwiseConfig,
    work_dir: Option<&Path>,
    observer: &mut dyn LayerObserver,
) -> Result<(Llama, Vec<LayerReport>)> {
    config.validate()?;
    if store.layers() != model.layers.len() {
        return Err(UpcycleError::Config(format!(
            "the recording has {} layers, the model {}",
            store.layers(),
            model.layers.len()
        )));
    }
    if config.router_loss > 0.0 || config.router_steps > 0 {
        for (l, layer) in model.layers.iter().enumerate() {
            if let FfnSlot::Moe(moe) = &layer.ffn {
                oracle_k(moe, l)?;
            }
        }
    }
    if let Some(dir) = work_dir {
        std::fs::create_dir_all(dir).map_err(|e| UpcycleError::io(dir, e))?;
    }
    let device = model.device();
    let mut reports = Vec::new();
    for (l, layer) in model.layers.iter_mut().enumerate() {
        let FfnSlot::Moe(moe) = &layer.ffn else {
            continue;
        };
        let (x, y) = store.layer_host(l)?;
        let (trained, report) = construct_layer(
            l,
            moe,
            &x,
            &y,
            store.hidden(),
            &device,
            config,
            work_dir,
            observer,
        )?;
        reports.push(report);
        layer.ffn = FfnSlot::Moe(trained);
    }
    Ok((model, reports))
}

/// Layer-wise construction of one block: `moe` (layer `l`) trained against the dense FFN's
/// outputs `y` on its inputs `x` (host rows `[N·H]`, the last `config.holdout` of them held out
/// to measure the error), then its router fitted and its experts refined as `config` says.
/// With a `work_dir`, the trained block is saved there (before the router-only steps, so that
/// it serves every router setting) and loaded instead of trained when it is there already.
#[allow(clippy::too_many_arguments)]
pub fn construct_layer(
    l: usize,
    moe: &MoeLayer,
    x: &[f32],
    y: &[f32],
    h: usize,
    device: &Device,
    config: &LayerwiseConfig,
    work_dir: Option<&Path>,
    observer: &mut dyn LayerObserver,
) -> Result<(MoeLayer, LayerReport)> {
    config.validate()?;
    Rows::checked(x, y, h, l)?;
    if let Some(dir) = work_dir {
        std::fs::create_dir_all(dir).map_err(|e| UpcycleError::io(dir, e))?;
    }
    let device = device.clone();
    let start = Instant::now();
    let n = x.len() / h;
    let held = ((n as f64 * config.holdout) as usize).min(8192).min(n / 2);
    let train_n = if held > 0 { n - held } else { n };
    let holdout = if held > 0 {
        Rows {
            x: &x[train_n * h..],
            y: &y[train_n * h..],
            hidden: h,
        }
    } else {
        Rows { x, y, hidden: h }
    };
    let error_before = relative_error(moe, &holdout, &device)?;
    let (tx, ty) = (&x[..train_n * h], &y[..train_n * h]);
    let saved = work_dir.map(|d| checkpoint(d, l));
    let untouched = error_before == 0.0;
    let (trained, resumed) = match &saved {
        // A block that already reproduces its FFN exactly (PESC and LoRA experts at
        // initialisation contain the frozen FFN and add zero) has a zero gradient: there
        // is nothing to train.
        _ if untouched => {
            tracing::info!(
                layer = l,
                "the block reproduces its FFN exactly; not trained"
            );
            (moe.clone(), false)
        }
        Some(path) if path.exists() => {
            let loaded = moe
                .clone()
                .try_load_file(path)
                .map_err(|e| UpcycleError::WorkDir {
                    path: path.clone(),
                    reason: format!("cannot load the saved layer ({e}); delete it to retrain"),
                })?;
            (loaded, true)
        }
        _ => {
            let trained = train_block(moe.clone(), tx, ty, h, &device, config, l, observer)?;
            if let Some(path) = &saved {
                // Serialised here and written by the one atomic writer (synced, a unique
                // temporary name, I/O errors kept typed: a full disk is reported as one).
                let bytes = trained.clone().into_record().into_bytes().map_err(|e| {
                    UpcycleError::WorkDir {
                        path: path.clone(),
                        reason: format!("cannot save the layer: {e}"),
                    }
                })?;
                moekit_llama::io::atomic::write(path, &bytes)?;
            }
            (trained, false)
        }
    };
    // The saved layer holds the trained block; the router fit and the refinement run on
    // it every time, so that one work directory serves several of their settings.
    let trained = if config.router_steps > 0 && !untouched {
        fit_router(trained, tx, h, &device, config, l, observer)?
    } else {
        trained
    };
    let trained = if config.refine_steps > 0 && !untouched {
        refine_experts(trained, tx, ty, h, &device, config, l, observer)?
    } else {
        trained
    };
    let recall = (!untouched)
        .then(|| oracle_recall(&trained, &holdout, &device))
        .flatten();
    let report = LayerReport {
        layer: l,
        error_before,
        error_after: if untouched {
            error_before
        } else {
            relative_error(&trained, &holdout, &device)?
        },
        seconds: start.elapsed().as_secs_f64(),
        resumed,
        oracle_recall: recall,
    };
    observer.finish(&report);
    Ok((trained, report))
}
