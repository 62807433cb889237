//! Layer-at-a-time conversion of a checkpoint gives the model the whole-model conversion gives,
//! resumes after a crash at the first unfinished layer with the same result, and constructs
//! blocks layer by layer.

mod common;

use std::path::Path;

use common::*;
use moekit_llama::{
    Checkpoint, ExportFormat, Llama, SaveDtype, Tokenizer, perplexity, save_pretrained,
};
use moekit_testing::device;
use moekit_upcycle::{
    ConvertConfig, HiddenPath, LayeredSettings, LayerwiseConfig, LogObserver, Method, RouterInit,
    SplitStrategy, convert, convert_layered,
};

/// The tiny random model written as a checkpoint in `dir`.
fn dense_checkpoint(dir: &Path, seed: u64) -> (Llama, Checkpoint) {
    let device = device(seed);
    let mut config = tiny_config();
    config.num_hidden_layers = 3;
    let model = config.init(&device).unwrap();
    save_pretrained(&model, None, dir, ExportFormat::Dense, SaveDtype::F32).unwrap();
    (model, Checkpoint::open(dir).unwrap())
}

fn run(
    ckpt: &Checkpoint,
    ids: &[u32],
    config: &ConvertConfig,
    settings: &LayeredSettings,
    out: &Path,
    run: &Path,
) -> moekit_upcycle::LayeredReport {
    let device = device(0);
    convert_layered(
        ckpt,
        None::<&Tokenizer>,
        ids,
        config,
        settings,
        out,
        run,
        &device,
        &mut LogObserver,
        &mut |_, _| {},
    )
    .unwrap()
}

/// Windows of `seq_len` tokens, two per forward call (as [`in_memory`] records them).
fn settings(seq_len: usize) -> LayeredSettings {
    LayeredSettings {
        seq_len,
        batch: 2,
        ..LayeredSettings::default()
    }
}

/// Every tensor of the checkpoints in `a` and `b`, which must hold the same names.
fn same_tensors(a: &Path, b: &Path) {
    use moekit_llama::io::safetensors::SafetensorsDir;
    use moekit_llama::io::source::TensorSource;
    let (a, b) = (
        SafetensorsDir::open(a).unwrap(),
        SafetensorsDir::open(b).unwrap(),
    );
    assert_eq!(a.names(), b.names());
    for n in a.names() {
        assert_eq!(a.read(&n).unwrap(), b.read(&n).unwrap(), "{n}");
    }
}

#[test]
fn layered_conversion_writes_what_the_whole_model_conversion_writes() {
    let root = tempfile::tempdir().unwrap();
    let (model, ckpt) = dense_checkpoint(&root.path().join("dense"), 4);
    let ids = token_ids(16 * 6, 7);
    let device = device(0);
    for config in [
        ConvertConfig::new(
            Method::Split {
                strategy: SplitStrategy::Importance,
            },
            4,
            2,
        )
        .with_shared_experts(1)
        .with_router_init(RouterInit::HiddenStates),
        ConvertConfig::new(Method::Upcycle { noise: 0.1 }, 3, 2).with_seed(9),
    ] {
        let out = root.path().join("layered");
        let report = run(
            &ckpt,
            &ids,
            &config,
            &settings(16),
            &out,
            &root.path().join("run"),
        );
        // The whole model in memory, calibrated on the same windows.
        let store = config.needs_calibration().then(|| {
            moekit_upcycle::ActivationStore::record(
                &model,
                &ids,
                &in_memory(16),
                None,
                &mut |_, _| {},
            )
            .unwrap()
        });
        let whole = convert(model.clone(), &config, store.as_ref(), &mut |_, _| {}).unwrap();
        let reference = root.path().join("whole");
        save_pretrained(&whole, None, &reference, report.format, SaveDtype::F32).unwrap();
        same_tensors(&out, &reference);
        assert_eq!(
            report.params,
            Checkpoint::open(&reference)
                .unwrap()
                .param_counts()
                .unwrap()
        );
        assert_eq!(report.resumed_layers, 0);
        assert!(!root.path().join("run/state.json").exists());
        let ppl = |dir: &Path| {
            let m = Checkpoint::open(dir)
                .unwrap()
                .load(&device, &mut |_, _| {})
                .unwrap();
            perplexity(&m, &token_ids(40, 3), 40, &mut |_, _| {})
                .unwrap()
                .nll
        };
        assert_eq!(ppl(&out), ppl(&reference));
    }
}

#[test]
fn a_split_with_every_expert_chosen_is_the_dense_model() {
    let root = tempfile::tempdir().unwrap();
    let (model, ckpt) = dense_checkpoint(&root.path().join("dense"), 6);
    let config = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Random,
        },
        4,
        4,
    )
    .with_router_init(RouterInit::Uniform);
    let out = root.path().join("out");
    run(
        &ckpt,
        &[],
        &config,
        &settings(16),
        &out,
        &root.path().join("run"),
    );
    let device = device(0);
    let moe = Checkpoint::open(&out)
        .unwrap()
        .load(&device, &mut |_, _| {})
        .unwrap();
    let ids = token_ids(40, 3);
    let a = perplexity(&model, &ids, 40, &mut |_, _| {}).unwrap().nll;
    let b = perplexity(&moe, &ids, 40, &mut |_, _| {}).unwrap().nll;
    assert!((a / b - 1.0).abs() < 1e-5, "{a} vs {b}");
}

#[test]
fn an_interrupted_conversion_resumes_at_its_first_unfinished_layer() {
    let root = tempfile::tempdir().unwrap();
    let (_, ckpt) = dense_checkpoint(&root.path().join("dense"), 8);
    let ids = token_ids(16 * 4, 7);
    let config = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Coactivation,
        },
        4,
        2,
    );
    let lw = LayeredSettings {
        layerwise: Some(LayerwiseConfig::new().with_steps(3).with_batch_tokens(16)),
        path: HiddenPath::Converted,
        ..settings(16)
    };
    let whole = root.path().join("whole");
    let straight = run(
        &ckpt,
        &ids,
        &config,
        &lw,
        &whole,
        &root.path().join("run-a"),
    );
    assert_eq!(straight.layers.len(), 3);
    // A crash after layer 1 (a panic in the progress report, after the state is saved).
    let (out, work) = (root.path().join("out"), root.path().join("run-b"));
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        convert_layered(
            &ckpt,
            None,
            &ids,
            &config,
            &lw,
            &out,
            &work,
            &device(0),
            &mut LogObserver,
            &mut |done, _| assert!(done < 2, "killed"),
        )
    }));
    assert!(crashed.is_err());
    assert!(!out.join("config.json").exists(), "nothing looks finished");
    let resumed = run(&ckpt, &ids, &config, &lw, &out, &work);
    assert_eq!(resumed.resumed_layers, 2);
    assert_eq!(resumed.layers.len(), 3);
    same_tensors(&out, &whole);
}
