//! Qwen3, Qwen3-MoE and Phi-3 against transformers: tiny random models that transformers itself
//! wrote (tests/fixtures/architectures/make.py), with its logits stored beside them.

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use moekit_llama::io::safetensors::SafetensorsDir;
use moekit_llama::{
    Checkpoint, ExportFormat, Llama, LlamaConfig, LlamaError, SaveDtype, save_pretrained,
};
use moekit_testing::device;

/// The fixture's source folder (its JSON files).
fn source(kind: &str) -> PathBuf {
    moekit_testing::package_dir().join(format!("tests/fixtures/architectures/{kind}"))
}

/// The checkpoint transformers wrote, rebuilt in a temporary folder.
fn fixture(kind: &str) -> tempfile::TempDir {
    moekit_testing::rebuild_fixture(&source(kind))
}

/// transformers' input ids and logits `[T, V]`.
fn reference(kind: &str) -> (Vec<u32>, Vec<f32>, [usize; 2]) {
    let text = std::fs::read_to_string(source(kind).join("reference_logits.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    let rows: Vec<Vec<f32>> = serde_json::from_value(json["logits"].clone()).unwrap();
    let shape = [rows.len(), rows[0].len()];
    (ids, rows.concat(), shape)
}

fn logits(model: &Llama, ids: &[u32]) -> Tensor<2> {
    let device = model.device();
    let x = model.tokens(&[ids], &device).unwrap();
    model.logits(x).unwrap().squeeze_dim::<2>(0)
}

/// `|a − b| ≤ 1e-4 · max |b|` everywhere.
fn assert_logits_close(got: Tensor<2>, want: &Tensor<2>, what: &str) {
    let scale = want.clone().abs().max().into_scalar::<f32>();
    let diff = (got - want.clone()).abs().max().into_scalar::<f32>();
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max |Δ| {diff} against max |logit| {scale}"
    );
}

fn load(dir: &std::path::Path) -> Llama {
    Checkpoint::open(dir)
        .unwrap()
        .load(&device(0), &mut |_, _| {})
        .unwrap()
}

#[test]
fn logits_equal_transformers() {
    for kind in ["qwen3", "qwen3_moe", "phi3"] {
        let model = load(fixture(kind).path());
        let (ids, want, shape) = reference(kind);
        let want = Tensor::from_data(TensorData::new(want, shape), &model.device());
        assert_logits_close(logits(&model, &ids), &want, kind);
    }
}

#[test]
fn written_models_read_back_with_the_same_logits_and_layout() {
    for (kind, format, fused) in [
        ("qwen3", ExportFormat::Dense, false),
        ("phi3", ExportFormat::Dense, true),
        ("qwen3_moe", ExportFormat::Qwen3Moe, false),
    ] {
        let model = load(fixture(kind).path());
        let dir = tempfile::tempdir().unwrap();
        let written = save_pretrained(&model, None, dir.path(), format, SaveDtype::F32).unwrap();
        assert_eq!(written.model_type, kind);
        let names = SafetensorsDir::open(dir.path()).unwrap().names();
        let theirs = SafetensorsDir::open(fixture(kind).path()).unwrap().names();
        // The names transformers wrote, no more and no fewer.
        assert_eq!(names, theirs, "{kind}");
        assert_eq!(
            names.iter().any(|n| n.contains("qkv_proj")),
            fused,
            "{kind}"
        );
        let back = load(dir.path());
        let (ids, _, _) = reference(kind);
        assert_logits_close(logits(&back, &ids), &logits(&model, &ids), kind);
    }
}

#[test]
fn qwen3_cannot_be_written_in_layouts_without_its_head_norms() {
    let model = load(fixture("qwen3_moe").path());
    let dir = tempfile::tempdir().unwrap();
    for format in [ExportFormat::Mixtral, ExportFormat::Qwen2Moe] {
        let err = save_pretrained(&model, None, dir.path(), format, SaveDtype::F32).unwrap_err();
        assert!(err.to_string().contains("qwen3_moe"), "{err}");
    }
    assert_eq!(
        ExportFormat::moe_candidates(&model.config),
        [ExportFormat::Qwen3Moe]
    );
}

#[test]
fn configurations_of_the_new_families() {
    // Qwen3 without head_dim: transformers' default of 128.
    let mut c = LlamaConfig::llama(128, 64, 96, 1, 4, 2);
    c.model_type = "qwen3".into();
    assert_eq!(c.head_width(), 128);
    // Qwen3-MoE under either name of the expert count.
    let text = std::fs::read_to_string(source("qwen3_moe").join("config.json")).unwrap();
    let c: LlamaConfig = serde_json::from_str(&text).unwrap();
    let hub = text.replace("num_local_experts", "num_experts");
    let h: LlamaConfig = serde_json::from_str(&hub).unwrap();
    assert_eq!(c.ffn_spec(0), h.ffn_spec(0));
    assert!(matches!(
        c.ffn_spec(0),
        moekit_llama::FfnSpec::Moe {
            num_experts: 4,
            top_k: 2,
            renormalize: true,
            shared_intermediate_size: None,
            ..
        }
    ));
    assert!(matches!(
        c.ffn_spec(1),
        moekit_llama::FfnSpec::Dense {
            intermediate_size: 96
        }
    ));
    // What is not implemented is refused in one line.
    for (key, value, says) in [
        (
            "partial_rotary_factor",
            serde_json::json!(0.75),
            "partial_rotary_factor",
        ),
        (
            "use_sliding_window",
            serde_json::json!(true),
            "sliding-window",
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[key] = value;
        let c: LlamaConfig = serde_json::from_value(v).unwrap();
        let err = c.validate().unwrap_err();
        assert!(
            matches!(err, LlamaError::Config(_)) && err.to_string().contains(says),
            "{err}"
        );
    }
    let err = moekit_llama::Architecture::from_model_type("gemma3").unwrap_err();
    assert!(err.to_string().contains("qwen3_moe"), "{err}");
}

/// A fused checkpoint whose fused tensor has the wrong number of rows is refused by name.
#[test]
fn a_fused_projection_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rebuilt = fixture("phi3");
    let src = rebuilt.path();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    // One query head fewer in the configuration than in the file.
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["num_key_value_heads"] = 1.into();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .load(&device(0), &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(&err, LlamaError::TensorShape { name, .. } if name.contains("qkv_proj")),
        "{err}"
    );
}
