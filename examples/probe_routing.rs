//! Can a router pick a fine split's parts? Two probes on one layer of a recording of the dense
//! model's FFN inputs (`WORK/layerNNN.x.f32`), used in docs/results.md ("Can a small router
//! learn the choice?"). `record` writes one with [`ActivationStore::record`] (the dense model
//! over TOKENS tokens of the calibration files, in windows of 512); the results used 100,000
//! tokens of python3.11-doc's `library/`.
//!
//! ```text
//! cargo run --release --example probe_routing -- record DENSE WORK TOKENS CALIB...
//! cargo run --release --example probe_routing -- recall MODEL WORK LAYER K VARIANT[,VARIANT...] [STEPS]
//! cargo run --release --example probe_routing -- selection DENSE WORK LAYER BUDGET RANK[,RANK...] [MOE]
//! ```
//!
//! `recall` fits routers of other shapes and losses to the oracle of MODEL's layer (the `K`
//! routed experts with the largest outputs, [`moekit::moe::MoeLayer::oracle_experts`]) on
//! 60,000 recorded rows and reports their recall of it on the last 8,192 rows (and on 4,096
//! training rows), next to MODEL's own router. A VARIANT is `KIND:WIDTH:LOSS:LR`: KIND `lin`
//! (logits `x·D·U + b`, rank WIDTH) or `mlp` (`relu(x·D + b₁)·U + b₂`, WIDTH hidden units);
//! LOSS `ce` (cross-entropy to the uniform target on the oracle's K, the router supervision of
//! `moekit convert`), `bce` (per-expert logistic loss on membership) or `lognorm` (logits
//! regressed on the centred log output norms); AdamW at peak rate LR, batches of 2,048.
//!
//! `selection` asks how well neurons chosen per token reproduce the DENSE model's FFN
//! (relative squared error on 4,096 held-out rows) when every layer may activate BUDGET FFN
//! parameters per token: `S` always-on neurons (most important first) plus the top-k of the
//! rest by (a) their true contribution `|aᵢ|·‖dᵢ‖` (an oracle, no router cost), (b) the exact
//! gate pre-activation `gᵢ = x·wᵢ` (a router that costs `H` per routed neuron) and (c) the best
//! rank-r linear prediction of `g` (reduced-rank regression, `r·(H + routed)` parameters);
//! each at the best `S`. With MOE (a split of DENSE), also that model's layer with equal
//! combine weights, routed by its router and by the oracle.

use std::error::Error;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{log_sigmoid, log_softmax, relu, silu};
use burn::tensor::{Device, Tensor, TensorData};
use moekit::llama::{Checkpoint, FfnSlot, Llama};
use moekit::moe::MoeLayer;
use moekit::upcycle::{ActivationStore, RecordConfig, WarmupCosine, calibration};

type Res<T> = Result<T, Box<dyn Error>>;

/// A way to choose neurons: its name, each held-out row's scores `[T·I]`, and the router
/// parameters it costs for a given number of routed neurons.
type Scorer = (String, Vec<f32>, Box<dyn Fn(f64) -> f64>);

const HELD_OUT: usize = 8192;
const TRAIN_ROWS: usize = 60_000;
const BATCH: usize = 2048;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("record") if args.len() >= 5 => record(&args[1..]),
        Some("recall") if args.len() >= 6 => recall(&args[1..]),
        Some("selection") if args.len() >= 6 => selection(&args[1..]),
        _ => Err("usage: probe_routing record DENSE WORK TOKENS CALIB... | \
                  recall MODEL WORK LAYER K VARIANTS [STEPS] | \
                  selection DENSE WORK LAYER BUDGET RANKS [MOE]"
            .into()),
    }
}

/// `record DENSE WORK TOKENS CALIB...`: every layer's FFN inputs and outputs on disk in WORK.
fn record(args: &[String]) -> Res<()> {
    let (dense, work, tokens) = (&args[0], Path::new(&args[1]), args[2].parse()?);
    let files: Vec<std::path::PathBuf> = args[3..].iter().map(Into::into).collect();
    let device = moekit::default_device();
    let ckpt = Checkpoint::open(Path::new(dense))?;
    let ids = calibration::tokens(&ckpt.tokenizer()?, &calibration::files(&files)?, tokens)?;
    let model = ckpt.load(&device, &mut |_, _| {})?;
    let config = RecordConfig {
        memory_budget: 0,
        ..RecordConfig::default()
    };
    let store = ActivationStore::record(&model, &ids, &config, Some(work), &mut |_, _| {})?;
    println!("recorded {} tokens in {}", store.tokens(), work.display());
    Ok(())
}

/// The recorded FFN inputs of `layer`, `[N·H]`.
fn recorded_inputs(work: &str, layer: usize) -> Res<Vec<f32>> {
    let path = Path::new(work).join(format!("layer{layer:03}.x.f32"));
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn load(path: &str, device: &Device) -> Res<Llama> {
    Ok(Checkpoint::open(Path::new(path))?.load(device, &mut |_, _| {})?)
}

fn moe_layer(model: &Llama, layer: usize) -> Res<&MoeLayer> {
    match &model.layers.get(layer).map(|l| &l.ffn) {
        Some(FfnSlot::Moe(moe)) => Ok(moe),
        _ => Err(format!("layer {layer} is not a MoE layer").into()),
    }
}

/// Rows `ids` of the host rows `x` (`[N·H]`) as a `[len, H]` tensor.
fn rows(x: &[f32], h: usize, ids: &[usize], device: &Device) -> Tensor<2> {
    let data: Vec<f32> = ids
        .iter()
        .flat_map(|&i| x[i * h..(i + 1) * h].iter().copied())
        .collect();
    Tensor::from_data(TensorData::new(data, [ids.len(), h]), device)
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// `f` applied to `ids` in batches, row-major `[len·width]` results concatenated.
fn batched(ids: &[usize], f: impl FnMut(&[usize]) -> Vec<f32>) -> Vec<f32> {
    ids.chunks(BATCH).flat_map(f).collect()
}

/// The `k` largest of `v` among `candidates` (all of `v` when `None`), largest first.
fn top_k(v: &[f32], candidates: Option<&[usize]>, k: usize) -> Vec<usize> {
    let mut c: Vec<usize> = candidates.map_or_else(|| (0..v.len()).collect(), <[usize]>::to_vec);
    c.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    c.truncate(k);
    c
}

/// A probe router: `x·D·U + b` (rank `width`) or `relu(x·D + b₁)·U + b₂`.
#[derive(Module, Debug)]
struct Probe {
    down: Param<Tensor<2>>,
    hidden_bias: Param<Tensor<1>>,
    up: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
    #[module(skip)]
    mlp: bool,
}

impl Probe {
    fn new(h: usize, width: usize, e: usize, mlp: bool, device: &Device) -> Self {
        let normal = |std: f64| Initializer::Normal { mean: 0.0, std };
        Probe {
            down: normal(1.0 / (h as f64).sqrt()).init_with([h, width], None, None, device),
            hidden_bias: Initializer::Zeros.init_with([width], None, None, device),
            up: normal(1.0 / (width as f64).sqrt()).init_with([width, e], None, None, device),
            bias: Initializer::Zeros.init_with([e], None, None, device),
            mlp,
        }
    }

    fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        let mut z = x.matmul(self.down.val());
        if self.mlp {
            z = relu(z + self.hidden_bias.val().unsqueeze());
        }
        z.matmul(self.up.val()) + self.bias.val().unsqueeze()
    }
}

/// The training target of `loss` for rows `ids`, `[len, E]`.
fn target(
    loss: &str,
    ids: &[usize],
    oracle: &[Vec<usize>],
    norms: &[f32],
    e: usize,
) -> Res<Vec<f32>> {
    let k = oracle[0].len();
    let mut t = vec![0f32; ids.len() * e];
    for (j, &i) in ids.iter().enumerate() {
        let row = &mut t[j * e..(j + 1) * e];
        match loss {
            "ce" => oracle[i].iter().for_each(|&c| row[c] = 1.0 / k as f32),
            "bce" => {
                row.fill(-1.0);
                oracle[i].iter().for_each(|&c| row[c] = 1.0);
            }
            "lognorm" => {
                let n = &norms[i * e..(i + 1) * e];
                let mean = n.iter().map(|v| 0.5 * (v + 1e-8).ln()).sum::<f32>() / e as f32;
                for (r, v) in row.iter_mut().zip(n) {
                    *r = 0.5 * (v + 1e-8).ln() - mean;
                }
            }
            _ => return Err(format!("unknown loss `{loss}` (ce, bce, lognorm)").into()),
        }
    }
    Ok(t)
}

fn recall(args: &[String]) -> Res<()> {
    let (model, work, layer, k) = (&args[0], &args[1], args[2].parse()?, args[3].parse()?);
    let steps: usize = args.get(5).map_or(Ok(1000), |s| s.parse())?;
    let device = moekit::default_device();
    let model = load(model, &device)?;
    let moe = moe_layer(&model, layer)?;
    let (h, e) = (moe.hidden_size(), moe.router.num_experts());
    let x = recorded_inputs(work, layer)?;
    let n = x.len() / h;
    if n < HELD_OUT + BATCH {
        return Err(format!("{n} recorded rows; the probe needs {}", HELD_OUT + BATCH).into());
    }
    let (train_n, all): (usize, Vec<usize>) = ((n - HELD_OUT).min(TRAIN_ROWS), (0..n).collect());
    let bank = moe.experts.weights();
    let norms = batched(&all, |c| host(bank.output_norms(rows(&x, h, c, &device))));
    let oracle: Vec<Vec<usize>> = (0..n)
        .map(|i| top_k(&norms[i * e..(i + 1) * e], None, k))
        .collect();
    let recall_of = |ids: &[usize], logits: &[f32]| {
        let hits: usize = ids
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let chosen = top_k(&logits[j * e..(j + 1) * e], None, k);
                chosen.iter().filter(|c| oracle[i].contains(c)).count()
            })
            .sum();
        hits as f64 / (ids.len() * k) as f64
    };
    let held: Vec<usize> = (n - HELD_OUT..n).collect();
    let seen: Vec<usize> = (0..4096.min(train_n)).collect();
    let own = batched(&held, |c| host(moe.router.logits(rows(&x, h, c, &device))));
    println!(
        "layer {layer}, top-{k} of {e}: own router held-out recall {:.4}",
        recall_of(&held, &own)
    );
    let train = device.clone().autodiff();
    for variant in args[4].split(',') {
        let parts: Vec<&str> = variant.split(':').collect();
        let [kind, width, loss, lr] = parts[..] else {
            return Err(format!("`{variant}` is not KIND:WIDTH:LOSS:LR").into());
        };
        let mlp = match kind {
            "lin" => false,
            "mlp" => true,
            _ => return Err(format!("unknown kind `{kind}` (lin, mlp)").into()),
        };
        let mut probe = Probe::new(h, width.parse()?, e, mlp, &train);
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let schedule = WarmupCosine::new(lr.parse()?, steps / 20, steps, 0.1);
        let mut rng = moekit::upcycle::partition::SplitMix64::new(layer as u64);
        for step in 0..steps {
            let ids: Vec<usize> = (0..BATCH).map(|_| rng.below(train_n)).collect();
            let t = target(loss, &ids, &oracle, &norms, e)?;
            let t = Tensor::<2>::from_data(TensorData::new(t, [BATCH, e]), &train);
            let logits = probe.logits(rows(&x, h, &ids, &train));
            let value = match loss {
                "ce" => (t * log_softmax(logits, 1)).sum().neg() / BATCH as f64,
                "bce" => log_sigmoid(logits * t).mean().neg(),
                _ => (logits.clone() - logits.mean_dim(1) - t).square().mean(),
            };
            let grads = GradientsParams::from_grads(value.backward(), &probe);
            probe = optim.step(schedule.lr(step), probe, grads);
        }
        let probe = probe.valid();
        let on = |ids: &[usize]| batched(ids, |c| host(probe.logits(rows(&x, h, c, &device))));
        println!(
            "layer {layer} {variant}, {steps} steps: held-out recall {:.4}, training rows {:.4}",
            recall_of(&held, &on(&held)),
            recall_of(&seen, &on(&seen))
        );
    }
    Ok(())
}

fn selection(args: &[String]) -> Res<()> {
    let (dense, work, layer): (&String, &String, usize) = (&args[0], &args[1], args[2].parse()?);
    let budget: f64 = args[3].parse()?;
    let ranks: Vec<usize> = args[4]
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let device = moekit::default_device();
    let model = load(dense, &device)?;
    let Some(FfnSlot::Dense(ffn)) = model.layers.get(layer).map(|l| &l.ffn) else {
        return Err(format!("layer {layer} of {dense} is not a dense FFN").into());
    };
    let (w_in, w_out) = (ffn.w_in.val(), ffn.w_out.val()); // [H, 2I], [I, H]
    let [h, i2] = w_in.dims();
    let i = i2 / 2;
    let (w_gate, w_up) = (w_in.clone().narrow(1, 0, i), w_in.narrow(1, i, i));
    let down_norm = host(w_out.clone().square().sum_dim(1).sqrt().reshape([1, i]));
    let x = recorded_inputs(work, layer)?;
    let n = x.len() / h;
    let (held, train_n) = (4096, 20_000);
    if n < held + train_n {
        return Err(format!("{n} recorded rows; the probe needs {}", held + train_n).into());
    }
    // Importance (mean contribution) and the gate's covariance, on training rows.
    let mut importance = vec![0f64; i];
    let mut gram = Tensor::<2>::zeros([i, i], &device);
    for c in (0..train_n).collect::<Vec<_>>().chunks(BATCH) {
        let xb = rows(&x, h, c, &device);
        let g = xb.clone().matmul(w_gate.clone());
        gram = gram + g.clone().transpose().matmul(g.clone());
        for (j, a) in host(silu(g) * xb.matmul(w_up.clone())).iter().enumerate() {
            importance[j % i] += (a.abs() * down_norm[j % i]) as f64;
        }
    }
    let mut order: Vec<usize> = (0..i).collect();
    order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]));
    let xs = rows(&x, h, &(n - held..n).collect::<Vec<_>>(), &device);
    let g = xs.clone().matmul(w_gate.clone());
    let act = silu(g.clone()) * xs.clone().matmul(w_up);
    let y = act.clone().matmul(w_out.clone());
    let y_norm = y.clone().square().sum().into_scalar::<f32>() as f64;
    let error =
        |yhat: Tensor<2>| (yhat - y.clone()).square().sum().into_scalar::<f32>() as f64 / y_norm;
    if let Some(moe) = args.get(5) {
        let split = load(moe, &device)?;
        let mut flat = moe_layer(&split, layer)?.clone();
        flat.router = flat.router.clone().with_combine_temperature(1e3)?;
        let k = flat.router.slots();
        for oracle in [None, Some(k)] {
            let out = flat
                .clone()
                .with_oracle(oracle)?
                .forward(xs.clone().reshape([1, held, h]))?;
            let err = error(out.output.reshape([held, h]));
            let by = if oracle.is_some() {
                "the oracle"
            } else {
                "its router"
            };
            println!(
                "layer {layer} {moe_name} top-{k}, equal weights, routed by {by}: error {err:.4}",
                moe_name = args[5]
            );
        }
    }
    let contribution: Vec<f32> = host(act.clone())
        .iter()
        .enumerate()
        .map(|(j, a)| a.abs() * down_norm[j % i])
        .collect();
    let mut scorers: Vec<Scorer> = vec![
        ("oracle |a|·‖d‖".into(), contribution, Box::new(|_| 0.0)),
        (
            "exact gate g".into(),
            host(g.clone()),
            Box::new(move |routed| h as f64 * routed),
        ),
    ];
    let (basis, _, _) = burn::linalg::svd::<2, 1>(gram, 100);
    for r in ranks {
        let v = basis.clone().narrow(1, 0, r);
        let predicted = xs
            .clone()
            .matmul(w_gate.clone().matmul(v.clone()))
            .matmul(v.transpose());
        let cost = move |routed: f64| (r as f64) * (h as f64 + routed);
        scorers.push((
            format!("rank-{r} prediction of g"),
            host(predicted),
            Box::new(cost),
        ));
    }
    let neuron = 3.0 * h as f64;
    for (name, score, router_cost) in &scorers {
        let mut best = (f64::INFINITY, 0, 0);
        for shared in (0..=i.min(1000)).step_by(50) {
            let routed = &order[shared..];
            let left = budget - neuron * shared as f64 - router_cost(routed.len() as f64);
            if left < 0.0 {
                continue;
            }
            let k = ((left / neuron) as usize).min(routed.len());
            let mut mask = vec![0f32; held * i];
            for t in 0..held {
                let row = &mut mask[t * i..(t + 1) * i];
                order[..shared].iter().for_each(|&j| row[j] = 1.0);
                top_k(&score[t * i..(t + 1) * i], Some(routed), k)
                    .iter()
                    .for_each(|&j| row[j] = 1.0);
            }
            let mask = Tensor::<2>::from_data(TensorData::new(mask, [held, i]), &device);
            let err = error((act.clone() * mask).matmul(w_out.clone()));
            if err < best.0 {
                best = (err, shared, k);
            }
        }
        let (err, shared, k) = best;
        println!(
            "layer {layer} {name}: error {err:.4} at {shared} always-on + top-{k} of {}",
            i - shared
        );
    }
    Ok(())
}
