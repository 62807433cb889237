//! Recording FFN activations (in memory and on disk) and layer-wise expert construction with
//! resumption.

mod common;

use std::path::Path;

use burn::module::Module;
use common::*;
use moekit_llama::{FfnSlot, Llama, LlamaConfig};
use moekit_testing::{assert_close_msg, device, values};
use moekit_upcycle::{
    ActivationStore, ConvertConfig, LayerObserver, LayerReport, LayerwiseConfig, Method,
    RecordConfig, SplitStrategy, UpcycleError, construct, convert,
};

fn on_disk(seq_len: usize, fingerprint: &str) -> RecordConfig {
    RecordConfig {
        seq_len,
        batch: 2,
        memory_budget: 0,
        fingerprint: fingerprint.into(),
    }
}

fn host(store: &ActivationStore, l: usize, device: &burn::tensor::Device) -> (Vec<f32>, Vec<f32>) {
    let (x, y) = store.layer(l, device).unwrap();
    (values(x), values(y))
}

#[test]
fn recordings_in_memory_and_on_disk_hold_each_ffns_inputs_and_outputs() {
    let device = device(31);
    let model = tiny(&device);
    let ids = token_ids(40, 3);
    let mut seen = Vec::new();
    let mem = ActivationStore::record(&model, &ids, &in_memory(16), None, &mut |d, t| {
        seen.push((d, t))
    })
    .unwrap();
    // Windows of 16, 16 and 8 tokens; the first two run together.
    assert_eq!(seen, [(32, 40), (40, 40)]);
    assert!(!mem.on_disk());
    assert_eq!((mem.tokens(), mem.layers()), (40, 2));

    let dir = tempfile::tempdir().unwrap();
    let disk = ActivationStore::record(
        &model,
        &ids,
        &on_disk(16, "fp"),
        Some(dir.path()),
        &mut |_, _| {},
    )
    .unwrap();
    assert!(disk.on_disk());
    assert_eq!((disk.tokens(), disk.layers()), (40, 2));
    let reopened = ActivationStore::open(dir.path(), "fp")
        .unwrap()
        .expect("reopens");
    assert!(reopened.on_disk());
    assert_eq!(reopened.tokens(), 40);
    for l in 0..2 {
        let (mx, my) = host(&mem, l, &device);
        assert_eq!(mx.len(), 40 * HIDDEN);
        assert_eq!(
            host(&disk, l, &device),
            (mx.clone(), my.clone()),
            "layer {l}"
        );
        assert_eq!(host(&reopened, l, &device), (mx, my), "layer {l} reopened");
        // Sampled inputs read from disk (row by row) are the in-memory ones.
        for m in [1, 7, 40, 100] {
            assert_eq!(
                values(disk.inputs(l, m, &device).unwrap()),
                values(mem.inputs(l, m, &device).unwrap()),
                "layer {l}, {m} rows"
            );
        }
        // y is the dense FFN of x.
        let (x, y) = mem.layer(l, &device).unwrap();
        assert_close_msg(dense_ffn(&model, l).forward(x), y, 1e-5, 1e-6, "y = FFN(x)");
    }
    assert!(mem.layer(2, &device).is_err());
    // An unreadable manifest is an error naming the work directory's file.
    let manifest = dir.path().join("activations.json");
    let good = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, b"{ not json").unwrap();
    match ActivationStore::open(dir.path(), "fp") {
        Err(UpcycleError::WorkDir { path, .. }) => assert_eq!(path, manifest),
        other => panic!("{other:?}"),
    }
    std::fs::write(&manifest, good).unwrap();
    // Another fingerprint, or no recording, reopens nothing.
    assert!(
        ActivationStore::open(dir.path(), "other")
            .unwrap()
            .is_none()
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(ActivationStore::open(empty.path(), "fp").unwrap().is_none());
    // A truncated recording is not reused.
    let x0 = dir.path().join("layer000.x.f32");
    let bytes = std::fs::read(&x0).unwrap();
    std::fs::write(&x0, &bytes[..bytes.len() - 4]).unwrap();
    assert!(ActivationStore::open(dir.path(), "fp").unwrap().is_none());
    std::fs::write(&x0, &bytes).unwrap();
    assert!(ActivationStore::open(dir.path(), "fp").unwrap().is_some());
    // So is one with a missing file.
    let y1 = dir.path().join("layer001.y.f32");
    let y1_bytes = std::fs::read(&y1).unwrap();
    std::fs::remove_file(&y1).unwrap();
    assert!(ActivationStore::open(dir.path(), "fp").unwrap().is_none());
    std::fs::write(&y1, y1_bytes).unwrap();
    std::fs::write(&x0, &bytes[..bytes.len() - 4]).unwrap();
    // Reading a layer whose file was cut under a store is an error, not a panic.
    assert!(disk.layer(0, &device).is_err());
    assert!(disk.layer(1, &device).is_ok());
    // Removing the recording deletes its manifest and four files and leaves what else the
    // directory holds; a missing directory holds nothing to remove.
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    std::fs::write(dir.path().join("layer1.x.f32"), b"not ours").unwrap();
    std::fs::create_dir(dir.path().join("layer002.x.f32.d")).unwrap();
    assert_eq!(ActivationStore::remove(dir.path()).unwrap(), 5);
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["layer002.x.f32.d", "layer1.x.f32", "notes.txt"]);
    assert!(ActivationStore::open(dir.path(), "fp").unwrap().is_none());
    assert_eq!(
        ActivationStore::remove(&dir.path().join("missing")).unwrap(),
        0
    );
}

#[test]
fn recording_order_does_not_depend_on_batching() {
    let device = device(32);
    let model = tiny(&device);
    let ids = token_ids(33, 4);
    let mut one = in_memory(8);
    one.batch = 1;
    let mut three = in_memory(8);
    three.batch = 3;
    let a = ActivationStore::record(&model, &ids, &one, None, &mut |_, _| {}).unwrap();
    let b = ActivationStore::record(&model, &ids, &three, None, &mut |_, _| {}).unwrap();
    // The last window of a single token is dropped.
    assert_eq!((a.tokens(), b.tokens()), (32, 32));
    // The second window on its own gives rows 8..16.
    let w = ActivationStore::record(&model, &ids[8..16], &one, None, &mut |_, _| {}).unwrap();
    for l in 0..2 {
        let (ax, ay) = host(&a, l, &device);
        let (bx, by) = host(&b, l, &device);
        assert_vec_close(&ax, &bx, 1e-5, "x, batch 1 vs 3");
        assert_vec_close(&ay, &by, 1e-5, "y, batch 1 vs 3");
        let (wx, _) = host(&w, l, &device);
        assert_vec_close(&wx, &ax[8 * HIDDEN..16 * HIDDEN], 1e-5, "window 2");
        // Evenly spaced inputs.
        let sub = values(a.inputs(l, 5, &device).unwrap());
        assert_eq!(sub.len(), 5 * HIDDEN);
        for r in 0..5 {
            let t = r * 32 / 5;
            assert_eq!(
                &sub[r * HIDDEN..(r + 1) * HIDDEN],
                &ax[t * HIDDEN..(t + 1) * HIDDEN]
            );
        }
        assert_eq!(values(a.inputs(l, 1000, &device).unwrap()), ax);
    }
    // No tokens, or activations past the budget without a work directory: errors.
    let err = ActivationStore::record(&model, &ids[..1], &one, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, UpcycleError::Calibration(_)), "{err}");
    let err =
        ActivationStore::record(&model, &ids, &on_disk(8, ""), None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");
}

/// A random split into 4 experts, top-`k`.
fn split4(model: &Llama, k: usize) -> Llama {
    let config = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Random,
        },
        4,
        k,
    )
    .with_seed(5);
    convert(model.clone(), &config, None, &mut |_, _| {}).unwrap()
}

fn layerwise() -> LayerwiseConfig {
    LayerwiseConfig::new()
        .with_steps(60)
        .with_batch_tokens(32)
        .with_lr(5e-3)
        .with_holdout(0.25)
}

#[derive(Default)]
struct Counter {
    starts: Vec<(usize, usize)>,
    steps: usize,
    router_starts: Vec<(usize, usize)>,
    router_steps: usize,
    finished: Vec<LayerReport>,
}

impl LayerObserver for Counter {
    fn start(&mut self, layer: usize, steps: usize) {
        self.starts.push((layer, steps));
    }
    fn step(&mut self, _: usize, _: usize, mse: f32) {
        assert!(mse.is_finite());
        self.steps += 1;
    }
    fn start_router(&mut self, layer: usize, steps: usize) {
        self.router_starts.push((layer, steps));
    }
    fn router_step(&mut self, _: usize, _: usize, ce: f32) {
        assert!(ce.is_finite());
        self.router_steps += 1;
    }
    fn finish(&mut self, report: &LayerReport) {
        self.finished.push(*report);
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn construction_reduces_every_layers_error_and_resumes_from_its_work_dir() {
    let device = device(33);
    let model = tiny(&device);
    let store = record(&model, 8);
    let config = layerwise();
    let dir = tempfile::tempdir().unwrap();

    let mut obs = Counter::default();
    let (first, reports) = construct(
        split4(&model, 1),
        &store,
        &config,
        Some(dir.path()),
        &mut obs,
    )
    .unwrap();
    assert_eq!(obs.starts, [(0, 60), (1, 60)]);
    assert_eq!(obs.steps, 120);
    assert_eq!(obs.finished, reports);
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert!(!r.resumed);
        assert!(r.error_before.is_finite() && r.error_before > 0.1, "{r:?}");
        assert!(r.error_after < r.error_before, "{r:?}");
    }
    assert_eq!(files(dir.path()), ["moe_layer000.bpk", "moe_layer001.bpk"]);
    let want = logits(&first, &device);
    // Training changed the model.
    assert!(max_diff(&want, &logits(&split4(&model, 1), &device)) > 1e-4);

    // A rerun loads every layer.
    let mut obs = Counter::default();
    let (again, resumed) = construct(
        split4(&model, 1),
        &store,
        &config,
        Some(dir.path()),
        &mut obs,
    )
    .unwrap();
    assert!(obs.starts.is_empty() && obs.steps == 0);
    for (r, s) in resumed.iter().zip(&reports) {
        assert!(r.resumed, "{r:?}");
        assert_eq!(r.error_before, s.error_before);
        assert!(
            (r.error_after - s.error_after).abs() <= 1e-9,
            "{r:?} vs {s:?}"
        );
    }
    assert_vec_close(&logits(&again, &device), &want, 1e-6, "resumed model");

    // An interrupted run resumes at the missing layer; training is deterministic.
    std::fs::remove_file(dir.path().join("moe_layer001.bpk")).unwrap();
    let mut obs = Counter::default();
    let (partial, reports) = construct(
        split4(&model, 1),
        &store,
        &config,
        Some(dir.path()),
        &mut obs,
    )
    .unwrap();
    assert_eq!(obs.starts, [(1, 60)]);
    assert_eq!(
        reports.iter().map(|r| r.resumed).collect::<Vec<_>>(),
        [true, false]
    );
    assert_vec_close(
        &logits(&partial, &device),
        &want,
        1e-4,
        "half-resumed model",
    );
    assert_eq!(files(dir.path()), ["moe_layer000.bpk", "moe_layer001.bpk"]);

    // Without a work directory nothing is written and the result is the same.
    let (plain, _) = construct(
        split4(&model, 1),
        &store,
        &config,
        None,
        &mut moekit_upcycle::LogObserver,
    )
    .unwrap();
    assert_vec_close(&logits(&plain, &device), &want, 1e-4, "no work dir");
}

#[test]
fn unusable_work_dirs_and_recordings_are_errors_not_panics() {
    let device = device(34);
    let model = tiny(&device);
    let store = record(&model, 4);
    let config = layerwise().with_steps(3);
    let moe = split4(&model, 1);

    // A corrupt saved layer.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("moe_layer000.bpk"), b"not a burnpack file").unwrap();
    let err = construct(
        moe.clone(),
        &store,
        &config,
        Some(dir.path()),
        &mut Counter::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UpcycleError::WorkDir { .. }), "{err}");

    // A saved layer of another shape (2 experts instead of 4).
    let two = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Random,
        },
        2,
        1,
    );
    let other = convert(model.clone(), &two, None, &mut |_, _| {}).unwrap();
    let FfnSlot::Moe(layer) = &other.layers[0].ffn else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    layer
        .clone()
        .save_file(dir.path().join("moe_layer000.bpk"))
        .unwrap();
    let err = construct(
        moe.clone(),
        &store,
        &config,
        Some(dir.path()),
        &mut Counter::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UpcycleError::WorkDir { .. }), "{err}");

    // A recording of another model depth.
    let mut one_layer = LlamaConfig::llama(VOCAB, HIDDEN, INTERMEDIATE, 1, 4, 2);
    one_layer.tie_word_embeddings = false;
    let short = record(&one_layer.init(&device).unwrap(), 2);
    let err = construct(moe.clone(), &short, &config, None, &mut Counter::default()).unwrap_err();
    assert!(matches!(err, UpcycleError::Config(_)), "{err}");

    // NaN activations: a NonFinite error.
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids(64, 9);
    ActivationStore::record(
        &model,
        &ids,
        &on_disk(16, "nan"),
        Some(dir.path()),
        &mut |_, _| {},
    )
    .unwrap();
    let x0 = dir.path().join("layer000.x.f32");
    let n = std::fs::read(&x0).unwrap().len() / 4;
    let nan: Vec<u8> = (0..n).flat_map(|_| f32::NAN.to_le_bytes()).collect();
    std::fs::write(&x0, nan).unwrap();
    let poisoned = ActivationStore::open(dir.path(), "nan").unwrap().unwrap();
    let err = construct(moe, &poisoned, &config, None, &mut Counter::default()).unwrap_err();
    assert!(
        matches!(
            err,
            UpcycleError::NonFinite {
                layer: 0,
                step: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn blocks_that_already_reproduce_their_ffn_are_not_trained() {
    let device = device(36);
    let model = tiny(&device);
    let store = record(&model, 6);
    let method = Method::Pesc {
        bottleneck: 4,
        activation: moekit_moe::Activation::Identity,
    };
    let moe = convert(
        model,
        &ConvertConfig::new(method, 4, 2),
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let want = logits(&moe, &device);
    let mut obs = Counter::default();
    let (same, reports) = construct(moe, &store, &layerwise(), None, &mut obs).unwrap();
    assert!(obs.starts.is_empty() && obs.steps == 0);
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert_eq!(
            (r.error_before, r.error_after, r.resumed),
            (0.0, 0.0, false)
        );
    }
    assert_eq!(max_diff(&want, &logits(&same, &device)), 0.0);
}

#[test]
fn construction_trains_adapters_and_keeps_the_dense_ffn_frozen() {
    let device = device(35);
    let model = tiny(&device);
    let store = record(&model, 6);
    for method in [
        Method::Pesc {
            bottleneck: 4,
            activation: moekit_moe::Activation::Identity,
        },
        Method::LoraExperts {
            rank: 2,
            intermediate_size: Some(16),
            alpha: 1.0,
        },
    ] {
        let what = format!("{method:?}");
        let mut moe = convert(
            model.clone(),
            &ConvertConfig::new(method, 4, 2),
            None,
            &mut |_, _| {},
        )
        .unwrap();
        // Random zero-initialised factors: the block starts off the dense FFN.
        for layer in &mut moe.layers {
            let FfnSlot::Moe(m) = &mut layer.ffn else {
                unreachable!()
            };
            match &mut m.experts {
                moekit_moe::Experts::Full(b) => {
                    b.w_out = burn::module::Param::from_tensor(moekit_testing::normal(
                        b.w_out.dims(),
                        0.3,
                        &device,
                    ))
                }
                moekit_moe::Experts::LowRank(b) => {
                    b.out_b = burn::module::Param::from_tensor(moekit_testing::normal(
                        b.out_b.dims(),
                        0.3,
                        &device,
                    ))
                }
            }
        }
        let before: Vec<_> = (0..2)
            .map(|l| {
                let m = common::moe(&moe, l);
                let s = &m.shared.as_ref().unwrap().ffn;
                (
                    values(s.w_in.val()),
                    values(s.w_out.val()),
                    values(m.experts.weights().w_out),
                )
            })
            .collect();
        let (trained, reports) = construct(
            moe,
            &store,
            &layerwise().with_steps(30),
            None,
            &mut Counter::default(),
        )
        .unwrap();
        for (l, (w_in, w_out, experts)) in before.into_iter().enumerate() {
            let m = common::moe(&trained, l);
            let s = &m.shared.as_ref().unwrap().ffn;
            assert_eq!(values(s.w_in.val()), w_in, "{what}: layer {l} shared w_in");
            assert_eq!(
                values(s.w_out.val()),
                w_out,
                "{what}: layer {l} shared w_out"
            );
            assert!(
                max_diff(&values(m.experts.weights().w_out), &experts) > 1e-4,
                "{what}: layer {l}'s experts did not train"
            );
            let r = reports[l];
            assert!(r.error_after < r.error_before, "{what}: {r:?}");
        }
    }
}

/// The expert each held-out token's largest output comes from, and the router's top choice.
fn top1_agreement(moe: &moekit_moe::MoeLayer, x: burn::tensor::Tensor<2>) -> f64 {
    let oracle = Mat::of(moekit_upcycle::oracle_experts(moe, x.clone(), 1));
    let logits = Mat::of(moe.router.logits(x));
    let argmax = |row: &[f32]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    };
    let n = oracle.rows;
    let hits = (0..n)
        .filter(|&t| argmax(oracle.row(t)) == argmax(logits.row(t)))
        .count();
    hits as f64 / n as f64
}

#[test]
fn oracle_experts_are_the_k_largest_expert_outputs() {
    let device = device(37);
    let model = split4(&tiny(&device), 1);
    let moe = common::moe(&model, 0);
    let x = moekit_testing::normal([40, tiny_config().hidden_size], 1.0, &device);
    let bank = moe.experts.to_bank();
    // Naive: each expert's output norm, one expert at a time, ranked on the host.
    let norms: Vec<Vec<f32>> = (0..bank.num_experts())
        .map(|e| {
            let y = Mat::of(bank.expert(e).forward(x.clone()));
            (0..y.rows)
                .map(|t| y.row(t).iter().map(|v| v * v).sum())
                .collect()
        })
        .collect();
    for k in 1..=3 {
        let target = Mat::of(moekit_upcycle::oracle_experts(moe, x.clone(), k));
        for t in 0..40 {
            let (chosen, rest): (Vec<usize>, Vec<usize>) =
                (0..norms.len()).partition(|&e| target.at(t, e) > 0.0);
            assert_eq!(chosen.len(), k, "k {k} token {t}");
            for &e in &chosen {
                assert_eq!(
                    target.at(t, e),
                    1.0 / k as f32,
                    "k {k} token {t} expert {e}"
                );
            }
            // Every chosen expert's output is at least as large as every other's (up to the
            // rounding of two different kernels: near-ties may go either way).
            let weakest = chosen.iter().map(|&e| norms[e][t]).fold(f32::MAX, f32::min);
            let strongest = rest.iter().map(|&e| norms[e][t]).fold(0.0, f32::max);
            assert!(
                weakest >= strongest * (1.0 - 1e-4),
                "k {k} token {t}: chose {weakest} over {strongest}"
            );
        }
    }
}

#[test]
fn router_supervision_is_the_cross_entropy_to_the_oracle_target() {
    let device = device(38);
    let logits = [[0.5f32, -1.0, 2.0], [0.0, 0.0, 0.0]];
    let target = [[0.5f32, 0.0, 0.5], [0.0, 1.0, 0.0]];
    let to = |m: [[f32; 3]; 2]| {
        burn::tensor::Tensor::<2>::from_data(
            burn::tensor::TensorData::new(m.concat(), [2, 3]),
            &device,
        )
    };
    let got = moekit_upcycle::router_supervision(to(logits), to(target)).into_scalar::<f32>();
    let mut want = 0.0f64;
    for (l, t) in logits.iter().zip(&target) {
        let lse = l.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        want -= l
            .iter()
            .zip(t)
            .map(|(&v, &p)| p as f64 * (v as f64 - lse))
            .sum::<f64>();
    }
    want /= 2.0;
    assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn router_supervision_teaches_routers_the_oracle_choice() {
    // With renormalised top-1 the MSE gives the router no gradient (its one weight is always
    // 1); supervision is what makes it pick the expert with the largest output. Enough steps
    // that the supervised router's agreement clears the unsupervised one by a wide margin: with
    // the default 60 the two were within rounding drift of each other, which differs between
    // CPUs (the unsupervised agreement measured 0.41-0.71 on different machines).
    let device = device(39);
    let model = tiny(&device);
    let store = record(&model, 8);
    let plain = layerwise().with_aux_weight(0.0).with_steps(240);
    let supervised = plain.clone().with_router_loss(1.0);
    let run = |config: &LayerwiseConfig| {
        construct(
            split4(&model, 1),
            &store,
            config,
            None,
            &mut moekit_upcycle::LogObserver,
        )
        .unwrap()
    };
    let (without, without_reports) = run(&plain);
    let (with, with_reports) = run(&supervised);
    let start = split4(&model, 1);
    for l in 0..2 {
        let (x, _) = store.layer(l, &device).unwrap();
        // Without supervision (and without the balancing loss) the router only sees rounding
        // noise: it stays where it started.
        let moved = max_diff(
            &values(common::moe(&without, l).router.gate.val()),
            &values(common::moe(&start, l).router.gate.val()),
        );
        assert!(
            moved < 1e-5,
            "layer {l}: the unsupervised router moved {moved}"
        );
        // The oracle is judged on each model's own trained experts (which also adapt to the
        // router, so an unsupervised router agrees with it more than by chance): supervision
        // lowers the router's cross-entropy to the oracle and does not lower the agreement.
        let ce = |m: &Llama| {
            let moe = common::moe(m, l);
            let target = moekit_upcycle::oracle_experts(moe, x.clone(), 1);
            moekit_upcycle::router_supervision(moe.router.logits(x.clone()), target)
                .into_scalar::<f32>()
        };
        let (ce_before, ce_after) = (ce(&without), ce(&with));
        let before = top1_agreement(common::moe(&without, l), x.clone());
        let after = top1_agreement(common::moe(&with, l), x.clone());
        assert!(
            ce_after < 0.9 * ce_before && after >= before,
            "layer {l}: cross-entropy to the oracle {ce_after:.3} (unsupervised {ce_before:.3}), \
             top-1 agreement {after:.2} (unsupervised {before:.2})"
        );
        assert!(
            with_reports[l].error_after.is_finite() && without_reports[l].error_after.is_finite()
        );
    }
}

#[test]
fn bad_layerwise_settings_are_refused_before_any_work() {
    let device = device(40);
    let model = tiny(&device);
    let store = record(&model, 4);
    for bad in [
        layerwise().with_router_loss(-1.0),
        layerwise().with_router_loss(f64::NAN),
        layerwise().with_lr(0.0),
        layerwise().with_router_lr(0.0),
        layerwise().with_router_lr(f64::NAN),
        layerwise().with_batch_tokens(0),
        layerwise().with_holdout(1.0),
    ] {
        let mut obs = Counter::default();
        let err = construct(split4(&model, 1), &store, &bad, None, &mut obs).unwrap_err();
        assert!(matches!(err, UpcycleError::Config(_)), "{err}");
        assert!(obs.starts.is_empty(), "{bad:?} started training");
    }
    // The oracle picks k experts: a top-p router cannot be supervised.
    let mut top_p = split4(&model, 1);
    for layer in &mut top_p.layers {
        let FfnSlot::Moe(m) = &mut layer.ffn else {
            unreachable!()
        };
        m.router = m
            .router
            .clone()
            .with_selection(moekit_moe::Selection::TopP {
                p: 0.5,
                max_k: None,
                renormalize: true,
            })
            .unwrap();
    }
    for config in [
        layerwise().with_router_loss(1.0),
        layerwise().with_router_steps(5),
    ] {
        let mut obs = Counter::default();
        let err = construct(top_p.clone(), &store, &config, None, &mut obs).unwrap_err();
        assert!(err.to_string().contains("top-p"), "{err}");
        assert!(obs.starts.is_empty(), "{config:?} started training");
    }
}

/// The `k` indices of the largest values of `row`, as a set.
fn top_k_set(row: &[f32], k: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..row.len()).collect();
    ids.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    ids.truncate(k);
    ids
}

/// Naive recall of the router's top-k against the oracle's: each expert's output norm computed
/// one expert at a time, both rankings done on the host.
fn naive_recall(moe: &moekit_moe::MoeLayer, x: burn::tensor::Tensor<2>, k: usize) -> f64 {
    let bank = moe.experts.to_bank();
    let outputs: Vec<Mat> = (0..bank.num_experts())
        .map(|e| Mat::of(bank.expert(e).forward(x.clone())))
        .collect();
    let logits = Mat::of(moe.router.logits(x));
    let mut hits = 0;
    for t in 0..logits.rows {
        let norms: Vec<f32> = outputs
            .iter()
            .map(|y| y.row(t).iter().map(|v| v * v).sum())
            .collect();
        let routed = top_k_set(logits.row(t), k);
        hits += top_k_set(&norms, k)
            .iter()
            .filter(|e| routed.contains(e))
            .count();
    }
    hits as f64 / (logits.rows * k) as f64
}

#[test]
fn fit_router_trains_the_router_alone_towards_the_oracle() {
    let device = device(41);
    let model = tiny(&device);
    let store = record(&model, 8);
    let h = tiny_config().hidden_size;
    let (built, _) = construct(
        split4(&model, 2),
        &store,
        &layerwise().with_steps(30),
        None,
        &mut Counter::default(),
    )
    .unwrap();
    let fit = layerwise().with_router_steps(150).with_router_lr(1e-2);
    for l in 0..2 {
        let moe = common::moe(&built, l);
        let (x, _) = store.layer_host(l).unwrap();
        let mut obs = Counter::default();
        let fitted =
            moekit_upcycle::fit_router(moe.clone(), &x, h, &device, &fit, l, &mut obs).unwrap();
        assert_eq!(
            (obs.router_starts.as_slice(), obs.router_steps),
            (&[(l, 150)][..], 150)
        );
        assert!(obs.starts.is_empty());
        // Only the router moved.
        let w = |m: &moekit_moe::MoeLayer| {
            let w = m.experts.weights();
            (values(w.w_in), values(w.w_out))
        };
        assert_eq!(w(&fitted), w(moe), "layer {l}: the experts changed");
        assert!(
            max_diff(
                &values(fitted.router.gate.val()),
                &values(moe.router.gate.val())
            ) > 1e-3,
            "layer {l}: the router did not move"
        );
        // It moved towards the oracle of these (unchanged) experts.
        let (xt, _) = store.layer(l, &device).unwrap();
        let ce = |m: &moekit_moe::MoeLayer| {
            let target = moekit_upcycle::oracle_experts(m, xt.clone(), 2);
            moekit_upcycle::router_supervision(m.router.logits(xt.clone()), target)
                .into_scalar::<f32>()
        };
        let (ce_before, ce_after) = (ce(moe), ce(&fitted));
        let (before, after) = (
            naive_recall(moe, xt.clone(), 2),
            naive_recall(&fitted, xt.clone(), 2),
        );
        assert!(
            ce_after < 0.9 * ce_before && after > before,
            "layer {l}: cross-entropy {ce_before:.3} -> {ce_after:.3}, recall {before:.2} -> \
             {after:.2}"
        );
    }
    // Refining the experts under the fitted router changes only the experts and lowers the
    // error the router fit left (a large router learning rate moved the combine weights).
    let (x, y) = store.layer_host(0).unwrap();
    let jolt = layerwise().with_router_steps(150).with_router_lr(1e-1);
    let fitted = moekit_upcycle::fit_router(
        common::moe(&built, 0).clone(),
        &x,
        h,
        &device,
        &jolt,
        0,
        &mut Counter::default(),
    )
    .unwrap();
    let mut obs = Counter::default();
    let refined = moekit_upcycle::refine_experts(
        fitted.clone(),
        &x,
        &y,
        h,
        &device,
        &jolt.clone().with_refine_steps(40),
        0,
        &mut obs,
    )
    .unwrap();
    assert_eq!((obs.starts.as_slice(), obs.steps), (&[(0, 40)][..], 40));
    assert_eq!(
        values(refined.router.gate.val()),
        values(fitted.router.gate.val()),
        "the router moved"
    );
    let (xt, yt) = store.layer(0, &device).unwrap();
    let error = |m: &moekit_moe::MoeLayer| {
        let out = m.forward(xt.clone().unsqueeze()).unwrap().output;
        let d = out.squeeze_dim::<2>(0) - yt.clone();
        d.square().sum().into_scalar::<f32>() / yt.clone().square().sum().into_scalar::<f32>()
    };
    let (before, after) = (error(&fitted), error(&refined));
    assert!(after < 0.9 * before, "error {before} -> {after}");

    // Rows that do not fit the width, or rows of another width than the block's, are errors.
    let (x, _) = store.layer_host(0).unwrap();
    for (rows, width) in [(&x[..h + 1], h), (&x[..4 * h], 2 * h), (&x[..0], h)] {
        let err = moekit_upcycle::fit_router(
            common::moe(&built, 0).clone(),
            rows,
            width,
            &device,
            &fit,
            0,
            &mut Counter::default(),
        )
        .unwrap_err();
        assert!(matches!(err, UpcycleError::Config(_)), "{err}");
    }
}

#[test]
fn router_steps_follow_the_saved_blocks_and_the_reports_measure_recall() {
    let device = device(42);
    let model = tiny(&device);
    let store = record(&model, 8);
    let dir = tempfile::tempdir().unwrap();
    let plain = layerwise().with_steps(20);
    let fit = plain
        .clone()
        .with_router_steps(40)
        .with_router_lr(1e-2)
        .with_refine_steps(5);

    let mut obs = Counter::default();
    let (fitted, reports) =
        construct(split4(&model, 2), &store, &fit, Some(dir.path()), &mut obs).unwrap();
    // Each layer: the block's steps, then (after it is saved) the refinement's.
    assert_eq!(obs.starts, [(0, 20), (0, 5), (1, 20), (1, 5)]);
    assert_eq!(obs.router_starts, [(0, 40), (1, 40)]);
    assert_eq!(obs.router_steps, 80);

    // The saved blocks are the ones before the router fit: a rerun without router steps loads
    // them and equals a run that never fitted.
    let mut obs = Counter::default();
    let (resumed, resumed_reports) = construct(
        split4(&model, 2),
        &store,
        &plain,
        Some(dir.path()),
        &mut obs,
    )
    .unwrap();
    assert!(obs.starts.is_empty() && obs.router_starts.is_empty());
    let (unfitted, _) = construct(split4(&model, 2), &store, &plain, None, &mut obs).unwrap();
    assert_vec_close(
        &logits(&resumed, &device),
        &logits(&unfitted, &device),
        1e-4,
        "resumed without router steps",
    );
    // A rerun with the router steps loads the blocks and fits their routers again, to the
    // same result.
    let mut obs = Counter::default();
    let (refitted, _) =
        construct(split4(&model, 2), &store, &fit, Some(dir.path()), &mut obs).unwrap();
    assert_eq!(obs.starts, [(0, 5), (1, 5)]);
    assert_eq!(obs.router_starts, [(0, 40), (1, 40)]);
    assert_vec_close(
        &logits(&refitted, &device),
        &logits(&fitted, &device),
        1e-5,
        "refitted from the saved blocks",
    );

    let n = store.tokens();
    let held = n / 4;
    for l in 0..2 {
        let (x, _) = store.layer(l, &device).unwrap();
        let holdout = x.narrow(0, n - held, held);
        let (f, r) = (common::moe(&fitted, l), common::moe(&resumed, l));
        let w = |m: &moekit_moe::MoeLayer| values(m.experts.weights().w_out);
        assert!(
            max_diff(&w(f), &w(r)) > 1e-6,
            "layer {l}: the refinement left the experts as saved"
        );
        let gate = |m: &moekit_moe::MoeLayer| values(m.router.gate.val());
        assert!(
            max_diff(&gate(f), &gate(r)) > 1e-3,
            "layer {l}: the fitted router is the saved one"
        );
        // Each report's recall is the held-out recall of its own router (one near-tie may
        // rank the other way in the two computations).
        for (m, report) in [(f, reports[l]), (r, resumed_reports[l])] {
            let want = naive_recall(m, holdout.clone(), 2);
            let got = report.oracle_recall.expect("a top-k router has a recall");
            assert!(
                (got - want).abs() <= 1.0 / (2 * held) as f64 + 1e-12,
                "layer {l}: {got} vs {want}"
            );
        }
    }
}
