//! Writing models as Hugging Face checkpoints and reading them back: identical logits.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use moekit_llama::io::host::HostTensor;
use moekit_llama::{
    Checkpoint, ExportFormat, Llama, LlamaConfig, LlamaError, SaveDtype, save_pretrained,
};
use moekit_testing::device;
use safetensors::SafeTensors;

fn logits(model: &Llama, device: &Device) -> Vec<f32> {
    let tokens: Vec<u32> = (0..9).map(|i| (i * 7 + 1) % 50).collect();
    let t: Tensor<3> = model
        .logits(model.tokens(&[&tokens], device).unwrap())
        .unwrap();
    HostTensor::from_tensor(t).data
}

/// Writes `model` into a new temporary directory.
fn save(model: &Llama, format: ExportFormat, dtype: SaveDtype) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(model, None, dir.path(), format, dtype).unwrap();
    dir
}

/// Loads the checkpoint in `dir`.
fn reload(dir: &Path, device: &Device) -> Result<Llama, LlamaError> {
    Checkpoint::open(dir)?.load(device, &mut |_, _| {})
}

fn roundtrip(config: LlamaConfig, format: ExportFormat, seed: u64) -> LlamaConfig {
    let device = device(seed);
    let model = config.init(&device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = save_pretrained(&model, None, dir.path(), format, SaveDtype::F32).unwrap();
    // The file parses with the reference safetensors reader.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.len() > 10);
    let back = reload(dir.path(), &device).unwrap();
    assert_eq!(back.param_counts(), model.param_counts());
    let (a, b) = (logits(&model, &device), logits(&back, &device));
    assert_eq!(a, b, "logits changed through {format:?}");
    // No temporary files are left behind.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "left {name}");
    }
    written
}

fn tiny() -> LlamaConfig {
    let mut c = LlamaConfig::llama(50, 32, 64, 2, 4, 2);
    c.tie_word_embeddings = true;
    c
}

#[test]
fn dense_llama_roundtrips_exactly() {
    let written = roundtrip(tiny(), ExportFormat::Dense, 1);
    assert_eq!(written.model_type, "llama");
}

#[test]
fn mixtral_roundtrips_exactly() {
    let mut c = tiny();
    c.model_type = "mixtral".into();
    c.tie_word_embeddings = false;
    c.num_local_experts = Some(4);
    c.num_experts_per_tok = Some(2);
    c.intermediate_size = 24;
    let written = roundtrip(c, ExportFormat::Mixtral, 2);
    assert_eq!(written.architectures, ["MixtralForCausalLM"]);
    assert_eq!(written.num_local_experts, Some(4));
}

#[test]
fn qwen2_moe_with_shared_expert_and_dense_layer_roundtrips_exactly() {
    let mut c = tiny();
    c.model_type = "qwen2_moe".into();
    c.num_hidden_layers = 3;
    c.num_experts = Some(4);
    c.num_experts_per_tok = Some(2);
    c.moe_intermediate_size = Some(16);
    c.shared_expert_intermediate_size = Some(40);
    c.mlp_only_layers = Some(vec![1]);
    let written = roundtrip(c, ExportFormat::Qwen2Moe, 3);
    assert_eq!(written.mlp_only_layers, Some(vec![1]));
    assert_eq!(written.norm_topk_prob, Some(false));
}

#[test]
fn a_mixtral_model_also_exports_as_qwen2_moe() {
    // No shared expert and no biases: the writer adds a zero shared expert and zero biases.
    let device = device(4);
    let mut c = tiny();
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(4);
    c.num_experts_per_tok = Some(2);
    let model = c.init(&device).unwrap();
    let dir = save(&model, ExportFormat::Qwen2Moe, SaveDtype::F32);
    let back = reload(dir.path(), &device).unwrap();
    assert_eq!(back.config.model_type, "qwen2_moe");
    let (a, b) = (logits(&model, &device), logits(&back, &device));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
    }
}

#[test]
fn impossible_exports_are_refused() {
    let device = device(5);
    let dense = tiny().init(&device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = save_pretrained(
        &dense,
        None,
        dir.path(),
        ExportFormat::Mixtral,
        SaveDtype::F32,
    )
    .unwrap_err();
    assert!(matches!(err, LlamaError::Export { .. }), "{err}");
    assert!(!dir.path().join("model.safetensors").exists());
}

#[test]
fn bf16_export_rounds_weights_once() {
    let device = device(6);
    let model = tiny().init(&device).unwrap();
    let dir = save(&model, ExportFormat::Dense, SaveDtype::BF16);
    let back = reload(dir.path(), &device).unwrap();
    let a = HostTensor::from_tensor(model.embed_tokens.weight.val()).data;
    let b = HostTensor::from_tensor(back.embed_tokens.weight.val()).data;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
    }
}

fn write_config(dir: &Path, config: &LlamaConfig) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(config).unwrap(),
    )
    .unwrap();
}

#[test]
fn broken_checkpoints_give_errors_naming_the_problem() {
    let device = device(7);
    let model = tiny().init(&device).unwrap();
    let dir = save(&model, ExportFormat::Dense, SaveDtype::F32);
    let file = dir.path().join("model.safetensors");
    let good = std::fs::read(&file).unwrap();

    // Truncated data.
    std::fs::write(&file, &good[..good.len() - 5]).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, LlamaError::Corrupt { .. }), "{err}");
    // A header length far past the end.
    let mut lying = good.clone();
    lying[..8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    std::fs::write(&file, &lying).unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()).unwrap_err(),
        LlamaError::Corrupt { .. }
    ));
    std::fs::write(&file, &good).unwrap();

    // A configuration that does not match the weights.
    let mut wider = tiny();
    wider.intermediate_size = 65;
    write_config(dir.path(), &wider);
    let err = reload(dir.path(), &device).unwrap_err();
    assert!(matches!(err, LlamaError::TensorShape { .. }), "{err}");
    // Asking for an output head the file does not have.
    let mut untied = tiny();
    untied.tie_word_embeddings = false;
    write_config(dir.path(), &untied);
    let err = reload(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
    // Unknown architecture.
    let mut unknown = tiny();
    unknown.model_type = "gpt_neox".into();
    write_config(dir.path(), &unknown);
    assert!(matches!(
        Checkpoint::open(dir.path()).unwrap_err(),
        LlamaError::UnknownArchitecture(_)
    ));
    // Not a model at all.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()).unwrap_err(),
        LlamaError::NotAModel(_)
    ));
}
