//! Factored routers through Mixtral / Qwen2-MoE checkpoints: the product in the model file
//! (what transformers loads), the factors in `router_factors.safetensors` beside it.

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
use moekit_testing::{device, normal};

const RANK: usize = 3;

fn logits(model: &Llama, device: &Device) -> Vec<f32> {
    let tokens: Vec<u32> = (0..9).map(|i| (i * 7 + 1) % 50).collect();
    let t: Tensor<3> = model
        .logits(model.tokens(&[&tokens], device).unwrap())
        .unwrap();
    HostTensor::from_tensor(t).data
}

/// A two-layer Mixtral model (H = 32, 8 experts) whose routers are factored through rank 3.
fn factored(device: &Device) -> Llama {
    let mut c = LlamaConfig::llama(50, 32, 24, 2, 4, 2);
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(8);
    c.num_experts_per_tok = Some(2);
    let mut model = c.init(device).unwrap();
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

fn save(model: &Llama, dir: &Path, format: ExportFormat) {
    save_pretrained(model, None, dir, format, SaveDtype::F32).unwrap();
}

fn reload(dir: &Path, device: &Device) -> Result<Llama, LlamaError> {
    Checkpoint::open(dir)?.load(device, &mut |_, _| {})
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
        save(&model, dir.path(), format);
        assert!(dir.path().join(ROUTER_FACTORS).exists());
        let back = reload(dir.path(), &device).unwrap();
        assert_eq!(ranks(&back), [Some(RANK); 2], "{format:?}");
        if format == ExportFormat::Mixtral {
            // (As Qwen2-MoE the model gains a zero shared expert and zero biases.)
            assert_eq!(back.num_params(), model.num_params());
        }
        let (a, b) = (logits(&model, &device), logits(&back, &device));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "{format:?}: {x} vs {y}"
            );
        }
        // The model file holds the product [E, H]: without the side file the same model loads
        // with full gates (what transformers computes), H·E − r·(H + E) more parameters each.
        let files = SafetensorsDir::open(dir.path()).unwrap();
        let name = match format {
            ExportFormat::Mixtral => "model.layers.1.block_sparse_moe.gate.weight",
            _ => "model.layers.1.mlp.gate.weight",
        };
        let gate = files.read(name).unwrap().unwrap();
        let FfnSlot::Moe(moe) = &model.layers[1].ffn else {
            unreachable!()
        };
        let product = HostTensor::from_tensor(moe.router.weight()).transpose();
        assert_eq!(gate.shape, product.shape);
        for (x, y) in gate.data.iter().zip(&product.data) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
        }
        std::fs::remove_file(dir.path().join(ROUTER_FACTORS)).unwrap();
        let full = reload(dir.path(), &device).unwrap();
        assert_eq!(ranks(&full), [None, None]);
        assert_eq!(
            full.num_params(),
            back.num_params() + 2 * (32 * 8 - RANK * (32 + 8))
        );
        for (x, y) in a.iter().zip(logits(&full, &device)) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "{format:?}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn saving_full_routers_removes_an_old_side_file() {
    let device = device(12);
    let dir = tempfile::tempdir().unwrap();
    save(&factored(&device), dir.path(), ExportFormat::Mixtral);
    assert!(dir.path().join(ROUTER_FACTORS).exists());
    let mut c = LlamaConfig::llama(50, 32, 24, 2, 4, 2);
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(8);
    c.num_experts_per_tok = Some(2);
    let plain = c.init(&device).unwrap();
    save(&plain, dir.path(), ExportFormat::Mixtral);
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
    save(&factored(&device), a.path(), ExportFormat::Mixtral);
    save(&factored(&device), b.path(), ExportFormat::Mixtral);
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
    save(&factored(&device), dir.path(), ExportFormat::Mixtral);
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
