//! Layer-wise expert construction (LaDiMo, stage 1): each MoE block is trained on its own to
//! reproduce the output of the dense FFN it replaces, on recorded calibration activations.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use moekit_llama::{FfnSlot, Llama};
use moekit_moe::MoeLayer;

use crate::error::{Result, UpcycleError};
use crate::partition::SplitMix64;
use crate::record::ActivationStore;

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
    /// Fraction of the recorded tokens held out to measure the error (at most 8192 tokens).
    #[config(default = 0.05)]
    pub holdout: f64,
    /// Seed of the batch order.
    #[config(default = 0)]
    pub seed: u64,
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
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
}

/// Follows [`construct`]: one layer at a time.
pub trait LayerObserver {
    /// Layer `layer` starts `steps` steps.
    fn start(&mut self, layer: usize, steps: usize);
    /// Step `step` (1-based) gave training MSE `mse`.
    fn step(&mut self, layer: usize, step: usize, mse: f32);
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

/// Relative squared error of `moe` on `(x, y)`, in slices.
fn relative_error(moe: &MoeLayer, x: &Tensor<2>, y: &Tensor<2>) -> Result<f64> {
    let [n, h] = x.dims();
    let (mut err, mut norm) = (0f64, 0f64);
    for start in (0..n).step_by(4096) {
        let rows = 4096.min(n - start);
        let xb = x.clone().narrow(0, start, rows).reshape([1, rows, h]);
        let yb = y.clone().narrow(0, start, rows);
        let out = moe.forward(xb)?.output.reshape([rows, h]);
        err += (out - yb.clone()).square().sum().into_scalar::<f32>() as f64;
        norm += yb.square().sum().into_scalar::<f32>() as f64;
    }
    Ok(err / norm.max(f64::MIN_POSITIVE))
}

fn rows(x: &Tensor<2>, ids: &[usize], device: &Device) -> Tensor<2> {
    let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let idx: Tensor<1, Int> = Tensor::from_data(TensorData::new(idx, [ids.len()]), &x.device());
    let picked = x.clone().select(0, idx);
    Tensor::from_data(picked.into_data(), device)
}

/// Learning rate at `step` of `steps` (0-based).
fn schedule(peak: f64, step: usize, steps: usize) -> f64 {
    let warm = (steps / 20).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (steps - warm).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// Trains one MoE block to reproduce `y = FFN(x)`: MSE plus the block's auxiliary losses, on
/// an autodiff device. Frozen parameters (PESC's and LoRA experts' shared FFN) stay frozen.
pub fn train_block(
    moe: MoeLayer,
    x: &Tensor<2>,
    y: &Tensor<2>,
    config: &LayerwiseConfig,
    layer: usize,
    observer: &mut dyn LayerObserver,
) -> Result<MoeLayer> {
    let [n, h] = x.dims();
    let train = x.device().autodiff();
    let mut moe = moe.fork(&train).train();
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut rng = SplitMix64::new(config.seed ^ layer as u64);
    let mut order: Vec<usize> = (0..n).collect();
    let mut cursor = n;
    let batch = config.batch_tokens.clamp(1, n);
    for step in 0..config.steps {
        if cursor + batch > n {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let ids = &order[cursor..cursor + batch];
        cursor += batch;
        let xb = rows(x, ids, &train).reshape([1, batch, h]);
        let yb = rows(y, ids, &train);
        let out = moe.forward(xb)?;
        let mse = (out.output.clone().reshape([batch, h]) - yb)
            .square()
            .mean();
        let loss = mse.clone() + out.aux_loss() * config.aux_weight;
        let grads = GradientsParams::from_grads(loss.backward(), &moe);
        moe = optim.step(schedule(config.lr, step, config.steps), moe, grads);
        let mse = mse.into_scalar::<f32>();
        if !mse.is_finite() {
            return Err(UpcycleError::NonFinite {
                layer,
                step: step + 1,
                value: mse,
            });
        }
        observer.step(layer, step + 1, mse);
    }
    Ok(moe.valid())
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
    if store.layers() != model.layers.len() {
        return Err(UpcycleError::Config(format!(
            "the recording has {} layers, the model {}",
            store.layers(),
            model.layers.len()
        )));
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
        let start = Instant::now();
        let (x, y) = store.layer(l, &device)?;
        let n = x.dims()[0];
        let held = ((n as f64 * config.holdout) as usize).min(8192).min(n / 2);
        let (train_n, hx, hy) = if held > 0 {
            (
                n - held,
                x.clone().narrow(0, n - held, held),
                y.clone().narrow(0, n - held, held),
            )
        } else {
            (n, x.clone(), y.clone())
        };
        let error_before = relative_error(moe, &hx, &hy)?;
        let saved = work_dir.map(|d| checkpoint(d, l));
        let (trained, resumed) = match &saved {
            Some(path) if path.exists() => {
                let loaded =
                    moe.clone()
                        .try_load_file(path)
                        .map_err(|e| UpcycleError::WorkDir {
                            path: path.clone(),
                            reason: format!(
                                "cannot load the saved layer ({e}); delete it to retrain"
                            ),
                        })?;
                (loaded, true)
            }
            _ => {
                observer.start(l, config.steps);
                let (tx, ty) = (x.narrow(0, 0, train_n), y.narrow(0, 0, train_n));
                let trained = train_block(moe.clone(), &tx, &ty, config, l, observer)?;
                if let Some(path) = &saved {
                    let tmp = path.with_extension("bpk.tmp");
                    trained
                        .clone()
                        .save_file(&tmp)
                        .map_err(|e| UpcycleError::WorkDir {
                            path: tmp.clone(),
                            reason: format!("cannot save the layer: {e}"),
                        })?;
                    std::fs::rename(&tmp, path).map_err(|e| UpcycleError::io(path, e))?;
                }
                (trained, false)
            }
        };
        let report = LayerReport {
            layer: l,
            error_before,
            error_after: relative_error(&trained, &hx, &hy)?,
            seconds: start.elapsed().as_secs_f64(),
            resumed,
        };
        observer.finish(&report);
        reports.push(report);
        layer.ffn = FfnSlot::Moe(trained);
    }
    Ok((model, reports))
}
