//! Test support shared by every moekit crate.
//!
//! [`device`] picks the backend from `MOEKIT_TEST_DEVICE`, so the same tests run on every
//! backend:
//!
//! | value | device |
//! |---|---|
//! | `flex` (default) | burn's Flex CPU backend |
//!
//! The `flex` and `wgpu` features are on by default, so one test build serves both CI runs.
//! | `wgpu-cpu` | WGPU on a CPU adapter (Mesa's lavapipe in CI) |
//! | `wgpu` | WGPU on the default adapter |
//! | `vulkan` | Vulkan through WGPU (needs the `vulkan` feature) |
//! | `cuda` | CUDA device 0 (needs the `cuda` feature) |

use burn::tensor::{Device, Distribution, Tensor, TensorData};

/// Name of the environment variable that selects the test device.
pub const DEVICE_VAR: &str = "MOEKIT_TEST_DEVICE";

/// The directory of the package under test, read when the test runs (cargo sets
/// `CARGO_MANIFEST_DIR` for test processes). The compile-time `env!("CARGO_MANIFEST_DIR")`
/// would keep the path of the checkout that built the binary, which is wrong when a shared
/// target directory reuses the binary for a checkout elsewhere (CI's cache).
pub fn package_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("run the tests through cargo, which sets CARGO_MANIFEST_DIR")
        .into()
}

/// The device under test, seeded with `seed` so random tensors are reproducible.
///
/// # Panics
/// On an unknown `MOEKIT_TEST_DEVICE` value or one whose backend was not compiled in: a test
/// run on the wrong backend must fail loudly, not pass on another one.
pub fn device(seed: u64) -> Device {
    let name = std::env::var(DEVICE_VAR).unwrap_or_else(|_| "flex".into());
    let device = match name.as_str() {
        #[cfg(feature = "flex")]
        "flex" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu-cpu" => Device::wgpu(burn::tensor::DeviceKind::Cpu),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::default()),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(burn::tensor::DeviceKind::default()),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0usize),
        other => panic!(
            "{DEVICE_VAR}={other} is unknown or its backend is not compiled in \
             (use flex, wgpu-cpu, wgpu, vulkan or cuda with the matching moekit-testing feature)"
        ),
    };
    device.seed(seed);
    device
}

/// A tensor of standard-normal values scaled by `std`.
pub fn normal<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device)
}

/// `n` pseudo-random token ids below `vocab` from a fixed LCG (Knuth's MMIX constants), so
/// that runs repeat.
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    const A: u64 = 6364136223846793005;
    const C: u64 = 1442695040888963407;
    let mut s = seed.wrapping_mul(A).wrapping_add(C);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(A).wrapping_add(C);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Host copy of a tensor's values.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Naive row-major matmul `a [rows, inner] · b [inner, cols]`: the independent reference that
/// tests compare tensor code with.
pub fn matmul<T>(a: &[T], b: &[T], rows: usize, inner: usize, cols: usize) -> Vec<T>
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let mut out = vec![T::default(); rows * cols];
    for i in 0..rows {
        for k in 0..inner {
            for j in 0..cols {
                out[i * cols + j] = out[i * cols + j] + a[i * inner + k] * b[k * cols + j];
            }
        }
    }
    out
}

/// Asserts `|a - b| <= atol + rtol·|b|` elementwise, reporting the worst element.
#[track_caller]
pub fn assert_close<const D: usize>(a: Tensor<D>, b: Tensor<D>, rtol: f32, atol: f32) {
    assert_close_msg(a, b, rtol, atol, "");
}

/// [`assert_close`] with a label for the failure message.
#[track_caller]
pub fn assert_close_msg<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    rtol: f32,
    atol: f32,
    what: &str,
) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (a, b) = (values(a), values(b));
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        assert!(!x.is_nan() && !y.is_nan(), "{what}: NaN at {i}: {x} vs {y}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: element {i}: {} vs {} (rtol {rtol}, atol {atol})",
        a[i],
        b[i]
    );
}

/// A tensor from host values.
pub fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// A tensor for [`gguf_bytes`]: its name, GGML type id, shape (outermost first, as PyTorch and
/// the loaders see it) and raw stored blocks.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Tensor name.
    pub name: String,
    /// GGML type id (0 = F32, 1 = F16, 8 = Q8_0, 12 = Q4_K, ...).
    pub type_id: u32,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// The stored bytes (quantised blocks as written by llama.cpp / gguf-py).
    pub data: Vec<u8>,
}

/// A GGUF v3 file holding string metadata `kv` and `tensors`, data aligned to 32 bytes (the
/// layout llama.cpp and gguf-py write), so tests build GGUF files from test vectors instead of
/// tracking binary files.
pub fn gguf_bytes(kv: &[(&str, &str)], tensors: &[GgufTensor]) -> Vec<u8> {
    const ALIGN: usize = 32;
    const STRING: u32 = 8;
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        string(&mut out, key);
        out.extend(STRING.to_le_bytes());
        string(&mut out, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.type_id.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(ALIGN) * ALIGN;
    }
    out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    for t in tensors {
        out.extend(&t.data);
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    }
    out
}

/// Bytes from a hex string (test vectors stored as text).
///
/// # Panics
/// On an odd length or a non-hex digit.
pub fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex string");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("a hex digit pair"))
        .collect()
}

/// The GGUF file of a tensor fixture: JSON mapping each tensor name to its `type_id`, `shape`
/// and `raw` (hex) blocks, as `crates/llama/tests/fixtures/make_fixtures.py` writes
/// `quants.json`; one metadata key, `general.architecture = llama`.
///
/// # Panics
/// On JSON that is not such a map.
pub fn gguf_fixture(json: &str) -> Vec<u8> {
    let map: serde_json::Value = serde_json::from_str(json).expect("fixture JSON");
    let tensors: Vec<GgufTensor> = map
        .as_object()
        .expect("a map of tensors")
        .iter()
        .map(|(name, t)| GgufTensor {
            name: name.clone(),
            type_id: t["type_id"].as_u64().expect("type_id") as u32,
            shape: t["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("a dimension") as usize)
                .collect(),
            data: unhex(t["raw"].as_str().expect("raw")),
        })
        .collect();
    gguf_bytes(&[("general.architecture", "llama")], &tensors)
}

/// A `tokenizer.json` for a word-level tokenizer over `words` (ids in order, the first is the
/// unknown token), splitting on whitespace: a tokenizer for tests without model files.
pub fn word_tokenizer_json(words: &[&str]) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": words[0]},
    })
    .to_string()
}

/// A fixture folder as the reference tools wrote it, in a new temporary folder: its files
/// copied, and its weights file rebuilt from `tensors.json` (`{"file": NAME, "tensors": {name:
/// {"shape", "values"}}}`, exact f32 values) by the reference `safetensors` writer. Fixtures
/// keep their weights as JSON so that no model file is tracked.
///
/// # Panics
/// On a folder or `tensors.json` that is not such a fixture.
pub fn rebuild_fixture(src: &std::path::Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "tensors.json" {
            std::fs::copy(&path, dst.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let text = std::fs::read_to_string(src.join("tensors.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = json["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize);
            let bytes = t["values"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|v| (v.as_f64().unwrap() as f32).to_le_bytes())
                .collect();
            (name.clone(), shape.collect(), bytes)
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes);
            (n.as_str(), view.unwrap())
        })
        .collect();
    let file = dst.path().join(json["file"].as_str().unwrap());
    safetensors::serialize_to_file(views, None, &file).unwrap();
    dst
}
