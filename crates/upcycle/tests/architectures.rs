//! Every dense architecture converts into each MoE layout that fits it, one layer at a time:
//! Qwen3 into Qwen3-MoE, Phi-3 (fused projections) into Mixtral and Qwen2-MoE, Qwen2 (biased
//! Q/K/V) into Qwen2-MoE (LLaMA into Mixtral and Qwen2-MoE: tests/layered.rs). Upcycled models,
//! and splits with every expert chosen, compute the dense model's logits.

use std::path::{Path, PathBuf};

use moekit_llama::{Checkpoint, ExportFormat, Llama, LlamaError, Tokenizer};
use moekit_testing::device;
use moekit_upcycle::{
    ConvertConfig, LayeredSettings, LogObserver, Method, RouterInit, SplitStrategy, UpcycleError,
    convert_layered,
};

/// The checkpoint transformers wrote (crates/llama's fixture), rebuilt in a temporary folder.
fn fixture(kind: &str) -> tempfile::TempDir {
    moekit_testing::rebuild_fixture(
        &moekit_testing::package_dir()
            .join(format!("../llama/tests/fixtures/architectures/{kind}")),
    )
}

/// A tiny random Qwen2 (biases on Q, K and V) written as a checkpoint in `dir`.
fn qwen2(dir: &Path) -> PathBuf {
    let mut c = moekit_llama::LlamaConfig::llama(128, 32, 64, 2, 4, 2);
    c.model_type = "qwen2".into();
    let model = c.init(&device(5)).unwrap();
    moekit_llama::save_pretrained(
        &model,
        None,
        dir,
        ExportFormat::Dense,
        moekit_llama::SaveDtype::F32,
    )
    .unwrap();
    dir.to_path_buf()
}

fn load(dir: &Path) -> Llama {
    Checkpoint::open(dir)
        .unwrap()
        .load(&device(0), &mut |_, _| {})
        .unwrap()
}

/// Logits of a fixed sequence, on the host.
fn logits(model: &Llama) -> Vec<f32> {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 128).collect();
    let x = model.tokens(&[&ids], &model.device()).unwrap();
    model
        .logits(x)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn convert(
    dense: &Path,
    config: &ConvertConfig,
    format: Option<ExportFormat>,
    out: &Path,
) -> Result<(), UpcycleError> {
    let ckpt = Checkpoint::open(dense).unwrap();
    let calibration: Vec<u32> = (0..96).map(|i| (i * 13 + 5) % 128).collect();
    let settings = LayeredSettings {
        seq_len: 32,
        format,
        ..LayeredSettings::default()
    };
    convert_layered(
        &ckpt,
        None::<&Tokenizer>,
        &calibration,
        config,
        &settings,
        out,
        &out.with_extension("run"),
        &device(1),
        &mut LogObserver,
        &mut |_, _| {},
    )
    .map(|_| ())
}

#[test]
fn dense_architectures_convert_into_each_layout_that_fits() {
    let upcycle = ConvertConfig::new(Method::Upcycle { noise: 0.0 }, 4, 2);
    let every_expert = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Random,
        },
        4,
        4,
    )
    .with_router_init(RouterInit::Uniform);
    // One of four parts shared, the other three all routed.
    let with_shared = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Random,
        },
        4,
        3,
    )
    .with_shared_experts(1)
    .with_router_init(RouterInit::Uniform);
    for (kind, config, format, written) in [
        ("qwen3", &upcycle, None, "qwen3_moe"),
        ("qwen3", &every_expert, None, "qwen3_moe"),
        ("phi3", &upcycle, None, "mixtral"),
        (
            "phi3",
            &every_expert,
            Some(ExportFormat::Qwen2Moe),
            "qwen2_moe",
        ),
        ("phi3", &with_shared, None, "qwen2_moe"),
        ("qwen2", &upcycle, None, "qwen2_moe"),
        ("qwen2", &every_expert, None, "qwen2_moe"),
    ] {
        let root = tempfile::tempdir().unwrap();
        // The rebuilt fixture's folder lives as long as `_held`.
        let (_held, dense) = match kind {
            "qwen2" => (None, qwen2(&root.path().join("dense"))),
            _ => {
                let held = fixture(kind);
                let dense = held.path().to_path_buf();
                (Some(held), dense)
            }
        };
        let out = root.path().join("out");
        convert(&dense, config, format, &out).unwrap();
        let c = moekit_llama::LlamaConfig::from_file(&out.join("config.json")).unwrap();
        assert_eq!(c.model_type, written, "{kind}");
        let (dense, moe) = (logits(&load(&dense)), logits(&load(&out)));
        let diff = dense
            .iter()
            .zip(&moe)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{kind} → {written}: logits differ by {diff}");
    }
}

#[test]
fn qwen3_with_shared_experts_has_no_layout_and_says_so_before_converting() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let config = ConvertConfig::new(
        Method::Split {
            strategy: SplitStrategy::Random,
        },
        4,
        2,
    )
    .with_shared_experts(1);
    let err = convert(fixture("qwen3").path(), &config, None, &out).unwrap_err();
    assert!(
        matches!(&err, UpcycleError::Llama(LlamaError::Export { .. }))
            && err.to_string().contains("shared expert"),
        "{err}"
    );
    assert!(!out.join("config.json").exists());
}
