//! Writing models as Hugging Face checkpoints and reading them back: identical logits. Factored
//! routers keep their product in the model file (what transformers loads) and their factors in
//! `router_factors.safetensors` beside it.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use moekit_llama::io::host::HostTensor;
use moekit_llama::io::router_factors::ROUTER_FACTORS;
use moekit_llama::io::safetensors::{SafetensorsDir, write};
use moekit_llama::io::source::TensorSource;
use moekit_llama::{
    Checkpoint, ExportFormat, FfnSlot, Llama, LlamaConfig, LlamaError, SaveDtype, save_pretrained,
};
use moekit_testing::{device, normal, values};
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

/// `|a − b| ≤ tol·(1 + |a|)` element by element.
fn assert_near(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * (1.0 + x.abs()), "{what}: {x} vs {y}");
    }
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
fn rotary_settings_and_kv_heads_are_written_out_resolved() {
    // θ and the scaling only in transformers 5's `rope_parameters`, no KV head count: the
    // export writes them as keys every reader takes, not the target class's defaults.
    let mut c = tiny();
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(4);
    c.num_experts_per_tok = Some(2);
    c.tie_word_embeddings = false;
    c.rope_theta = None;
    c.num_key_value_heads = None;
    c.extra.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": 100000.0, "rope_type": "linear", "factor": 2.0}),
    );
    let device = device(5);
    let model = c.clone().init(&device).unwrap();
    for format in [ExportFormat::Mixtral, ExportFormat::Qwen2Moe] {
        let dir = tempfile::tempdir().unwrap();
        let written = save_pretrained(&model, None, dir.path(), format, SaveDtype::F32).unwrap();
        let back = reload(dir.path(), &device).unwrap();
        let (a, b) = (logits(&model, &device), logits(&back, &device));
        assert_near(&a, &b, 1e-5, &format!("{format:?}"));
        assert_eq!(written.rope_theta, Some(100000.0), "{format:?}");
        let scaling = written.rope_scaling.clone().expect("scaling written");
        assert_eq!(
            (scaling.rope_type.as_str(), scaling.factor),
            ("linear", Some(2.0))
        );
        assert_eq!(written.num_key_value_heads, Some(4), "{format:?}");
        assert!(!written.extra.contains_key("rope_parameters"), "{format:?}");
    }
    // A source without θ anywhere is written with the 10,000 it was run with.
    c.extra.remove("rope_parameters");
    let written = roundtrip(c, ExportFormat::Mixtral, 6);
    assert_eq!(written.rope_theta, Some(10_000.0));
    assert_eq!(written.rope_scaling, None);
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
    assert_near(&a, &b, 1e-5, "values");
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

#[test]
fn tensors_the_configuration_gives_no_place_are_reported() {
    let device = device(8);
    let model = tiny().init(&device).unwrap();
    let dir = save(&model, ExportFormat::Dense, SaveDtype::F32);
    let unused = |dir: &Path| {
        Checkpoint::open(dir)
            .unwrap()
            .load_reporting_unused(&device, &mut |_, _| {})
            .unwrap()
            .1
    };
    assert!(unused(dir.path()).is_empty());
    // An output-projection bias that config.json does not mention (no attention_bias), and a
    // rotary buffer that is recomputed anyway.
    let file = SafetensorsDir::open(dir.path()).unwrap();
    let mut tensors: Vec<(String, HostTensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.read(&n).unwrap().unwrap();
            (n, t)
        })
        .collect();
    drop(file);
    for name in [
        "model.layers.0.self_attn.o_proj.bias",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
    ] {
        tensors.push((name.into(), HostTensor::new(vec![32], vec![0.5; 32])));
    }
    write(
        &dir.path().join("model.safetensors"),
        &tensors,
        SaveDtype::F32,
    )
    .unwrap();
    assert_eq!(unused(dir.path()), ["model.layers.0.self_attn.o_proj.bias"]);
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

const RANK: usize = 3;

/// A two-layer Mixtral configuration, H = 32, 8 experts.
fn mixtral8() -> LlamaConfig {
    let mut c = LlamaConfig::llama(50, 32, 24, 2, 4, 2);
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(8);
    c.num_experts_per_tok = Some(2);
    c
}

/// A [`mixtral8`] model whose routers are factored through rank 3.
fn factored(device: &Device) -> Llama {
    let mut model = mixtral8().init(device).unwrap();
    for layer in &mut model.layers {
        let FfnSlot::Moe(moe) = &mut layer.ffn else {
            unreachable!("every Mixtral layer is a MoE layer")
        };
        moe.router = moe
            .router
            .clone()
            .with_factors(
                normal([32, RANK], 0.3, device),
                normal([RANK, 8], 0.3, device),
            )
            .unwrap();
    }
    model
}

/// Writes `model` into `dir` as f32.
fn save_into(model: &Llama, dir: &Path, format: ExportFormat) {
    save_pretrained(model, None, dir, format, SaveDtype::F32).unwrap();
}

/// Layer 1's router gate `[E, H]` as the model file in `dir` holds it.
fn written_gate(dir: &Path, format: ExportFormat) -> HostTensor {
    let name = match format {
        ExportFormat::Mixtral => "model.layers.1.block_sparse_moe.gate.weight",
        _ => "model.layers.1.mlp.gate.weight",
    };
    SafetensorsDir::open(dir)
        .unwrap()
        .read(name)
        .unwrap()
        .unwrap()
}

fn ranks(model: &Llama) -> Vec<Option<usize>> {
    model
        .layers
        .iter()
        .map(|l| match &l.ffn {
            FfnSlot::Moe(moe) => moe.router.rank(),
            _ => None,
        })
        .collect()
}

#[test]
fn factored_routers_roundtrip_through_both_formats() {
    let device = device(11);
    let model = factored(&device);
    for format in [ExportFormat::Mixtral, ExportFormat::Qwen2Moe] {
        let dir = tempfile::tempdir().unwrap();
        save_into(&model, dir.path(), format);
        assert!(dir.path().join(ROUTER_FACTORS).exists());
        let back = reload(dir.path(), &device).unwrap();
        assert_eq!(ranks(&back), [Some(RANK); 2], "{format:?}");
        if format == ExportFormat::Mixtral {
            // (As Qwen2-MoE the model gains a zero shared expert and zero biases.)
            assert_eq!(back.num_params(), model.num_params());
        }
        // What `moekit info` counts without loading weights: the factors, not the product.
        let counted = |dir: &Path| Checkpoint::open(dir).unwrap().param_counts().unwrap();
        let factored_counts = counted(dir.path());
        assert_eq!(factored_counts.total, back.num_params(), "{format:?}");
        let (a, b) = (logits(&model, &device), logits(&back, &device));
        assert_near(&a, &b, 1e-5, &format!("{format:?}"));
        // The model file holds the product [E, H]: without the side file the same model loads
        // with full gates (what transformers computes), H·E − r·(H + E) more parameters each.
        let gate = written_gate(dir.path(), format);
        let FfnSlot::Moe(moe) = &model.layers[1].ffn else {
            unreachable!()
        };
        let product = HostTensor::from_tensor(moe.router.weight()).transpose();
        assert_eq!(gate.shape, product.shape);
        assert_near(&product.data, &gate.data, 1e-6, "values");
        std::fs::remove_file(dir.path().join(ROUTER_FACTORS)).unwrap();
        let full = reload(dir.path(), &device).unwrap();
        assert_eq!(ranks(&full), [None, None]);
        let saved = 2 * (32 * 8 - RANK * (32 + 8));
        assert_eq!(full.num_params(), back.num_params() + saved);
        let full_counts = counted(dir.path());
        assert_eq!(full_counts.total, factored_counts.total + saved);
        assert_eq!(full_counts.active, factored_counts.active + saved);
        assert_near(&a, &logits(&full, &device), 1e-4, &format!("{format:?}"));
    }
}

#[test]
fn saving_full_routers_removes_an_old_side_file() {
    let device = device(12);
    let dir = tempfile::tempdir().unwrap();
    save_into(&factored(&device), dir.path(), ExportFormat::Mixtral);
    assert!(dir.path().join(ROUTER_FACTORS).exists());
    let plain = mixtral8().init(&device).unwrap();
    save_into(&plain, dir.path(), ExportFormat::Mixtral);
    assert!(!dir.path().join(ROUTER_FACTORS).exists());
    assert_eq!(ranks(&reload(dir.path(), &device).unwrap()), [None, None]);
}

fn corrupt_reason(err: LlamaError) -> String {
    match err {
        LlamaError::Corrupt { path, reason } => {
            assert!(path.ends_with(ROUTER_FACTORS), "{}", path.display());
            reason
        }
        other => panic!("expected a corrupt side file, got {other}"),
    }
}

#[test]
fn a_side_file_from_another_save_is_an_error() {
    let device = device(13);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    save_into(&factored(&device), a.path(), ExportFormat::Mixtral);
    save_into(&factored(&device), b.path(), ExportFormat::Mixtral);
    std::fs::copy(b.path().join(ROUTER_FACTORS), a.path().join(ROUTER_FACTORS)).unwrap();
    let reason = corrupt_reason(reload(a.path(), &device).unwrap_err());
    assert!(
        reason.contains("layer 0") && reason.contains("another save"),
        "{reason}"
    );
}

#[test]
fn a_missing_or_misshapen_factor_is_an_error() {
    let device = device(14);
    let dir = tempfile::tempdir().unwrap();
    save_into(&factored(&device), dir.path(), ExportFormat::Mixtral);
    let side = dir.path().join(ROUTER_FACTORS);
    let down = |l: usize| format!("model.layers.{l}.block_sparse_moe.gate.0.weight");
    let up = |l: usize| format!("model.layers.{l}.block_sparse_moe.gate.1.weight");
    let stored = SafetensorsDir::open_file(&side).unwrap();
    let read = |n: &str| stored.read(n).unwrap().unwrap();
    // Layer 1's up factor dropped.
    let tensors = vec![
        (down(0), read(&down(0))),
        (up(0), read(&up(0))),
        (down(1), read(&down(1))),
    ];
    write(&side, &tensors, SaveDtype::F32).unwrap();
    let reason = corrupt_reason(reload(dir.path(), &device).unwrap_err());
    assert!(
        reason.contains("layer 1") && reason.contains(&down(1)),
        "{reason}"
    );
    // Layer 0's up factor with a column too few: [E, r − 1] for a [r, H] down factor.
    let short = read(&up(0));
    let cols = HostTensor::new(
        vec![8, RANK - 1],
        (0..8)
            .flat_map(|e| short.data[e * RANK..e * RANK + RANK - 1].to_vec())
            .collect(),
    );
    write(
        &side,
        &[(down(0), read(&down(0))), (up(0), cols)],
        SaveDtype::F32,
    )
    .unwrap();
    match reload(dir.path(), &device).unwrap_err() {
        LlamaError::TensorShape {
            name,
            expected,
            got,
        } => {
            assert_eq!(
                (name, expected, got),
                (up(0), vec![8, RANK], vec![8, RANK - 1])
            );
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

/// Sets every router of `model` to the combine temperature `t`.
fn with_temperature(mut model: Llama, t: f64) -> Llama {
    for layer in &mut model.layers {
        if let FfnSlot::Moe(moe) = &mut layer.ffn {
            moe.router = moe.router.clone().with_combine_temperature(t).unwrap();
        }
    }
    model
}

#[test]
fn a_combine_temperature_is_folded_into_the_written_gates() {
    let device = device(12);
    let tau = 50.0;
    for (format, model) in [
        (ExportFormat::Mixtral, mixtral8().init(&device).unwrap()),
        (ExportFormat::Qwen2Moe, factored(&device)),
    ] {
        let model = with_temperature(model, tau);
        let dir = tempfile::tempdir().unwrap();
        save_into(&model, dir.path(), format);
        let back = reload(dir.path(), &device).unwrap();
        assert_eq!(back.config.combine_temperature, Some(tau), "{format:?}");
        let FfnSlot::Moe(moe) = &model.layers[1].ffn else {
            unreachable!()
        };
        let FfnSlot::Moe(loaded) = &back.layers[1].ffn else {
            unreachable!()
        };
        // moekit gets the gate at its own scale back, with the temperature.
        assert_eq!(loaded.router.combine_temperature, tau);
        assert_eq!(loaded.router.rank(), moe.router.rank());
        let (w, v) = (values(moe.router.weight()), values(loaded.router.weight()));
        assert_near(&w, &v, 1e-6, &format!("{format:?}"));
        // The model file holds W_g / τ: what transformers reads.
        let gate = written_gate(dir.path(), format);
        let folded = HostTensor::from_tensor(moe.router.weight() / tau).transpose();
        assert_near(&folded.data, &gate.data, 1e-6, "values");
        let a = logits(&model, &device);
        assert_near(&a, &logits(&back, &device), 1e-5, &format!("{format:?}"));
        // Without the key and the side file (what transformers sees) the folded gates route
        // and weigh the same: the same logits.
        let mut plain = back.config.clone();
        plain.combine_temperature = None;
        write_config(dir.path(), &plain);
        let _ = std::fs::remove_file(dir.path().join(ROUTER_FACTORS));
        let folded_model = reload(dir.path(), &device).unwrap();
        assert_near(
            &a,
            &logits(&folded_model, &device),
            1e-4,
            &format!("{format:?}"),
        );
    }
    // Layers at different temperatures have no one config.json key, and f16 cannot hold
    // gates divided by τ > 1: both exports are refused before anything is written.
    let mut mixed = mixtral8().init(&device).unwrap();
    if let FfnSlot::Moe(moe) = &mut mixed.layers[0].ffn {
        moe.router = moe.router.clone().with_combine_temperature(tau).unwrap();
    }
    let refused = |model: &Llama, dtype: SaveDtype| {
        let dir = tempfile::tempdir().unwrap();
        let err = save_pretrained(model, None, dir.path(), ExportFormat::Mixtral, dtype)
            .expect_err("refused");
        assert!(!dir.path().join("model.safetensors").exists());
        err.to_string()
    };
    assert!(refused(&mixed, SaveDtype::F32).contains("differs"));
    let warm = with_temperature(mixtral8().init(&device).unwrap(), tau);
    assert!(refused(&warm, SaveDtype::F16).contains("f16"));
    // Temperature 1 writes no key; a bad one in a config.json is refused.
    let dir = tempfile::tempdir().unwrap();
    save_into(
        &mixtral8().init(&device).unwrap(),
        dir.path(),
        ExportFormat::Mixtral,
    );
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(!text.contains("moekit_combine_temperature"), "{text}");
    let mut bad = Checkpoint::open(dir.path()).unwrap().config().clone();
    bad.combine_temperature = Some(0.0);
    write_config(dir.path(), &bad);
    let Err(err) = Checkpoint::open(dir.path()) else {
        panic!("a zero temperature was accepted")
    };
    assert!(
        err.to_string().contains("moekit_combine_temperature"),
        "{err}"
    );
}

/// A non-finite weight (a damaged block, a bad conversion) is refused where it is read, naming
/// the tensor, instead of turning into a perplexity; so is a model whose perplexity overflows.
#[test]
fn non_finite_weights_and_overflowing_perplexities_are_errors() {
    use burn::module::Param;
    let device = moekit_testing::device(21);
    let mut model = tiny().init(&device).unwrap();
    let w = model.layers[1].attention.q_proj.merged().weight.val();
    let dims = w.dims();
    let nan = w.slice_assign([0..1, 3..4], Tensor::full([1, 1], f32::NAN, &device));
    assert_eq!(nan.dims(), dims);
    let mut bad = model.clone();
    bad.layers[1].attention.q_proj = burn::nn::Linear {
        weight: Param::from_tensor(nan),
        bias: None,
    }
    .into();
    let dir = save(&bad, ExportFormat::Dense, SaveDtype::BF16);
    let err = reload(dir.path(), &device).unwrap_err();
    assert!(
        matches!(&err, LlamaError::Corrupt { reason, .. } if reason.contains("model.layers.1.self_attn.q_proj.weight")),
        "{err}"
    );
    // Finite weights whose logits are so sharp that exp(mean NLL) overflows f64.
    let head = model.embed_tokens.weight.val() * 1e5;
    model.embed_tokens.weight = Param::from_tensor(head);
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 50).collect();
    let err = moekit_llama::perplexity(&model, &ids, 20, &mut |_, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("predicts nothing") || err.to_string().contains("non-finite"),
        "{err}"
    );
}
