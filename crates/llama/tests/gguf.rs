//! GGUF reading: every supported type de-quantised exactly as gguf-py (llama.cpp's Python
//! package, an independent implementation) does, and corrupt files rejected with errors.

use std::path::PathBuf;

use moekit_llama::LlamaError;
use moekit_llama::io::gguf::{GgufFile, GgufValue, unpermute_rows};
use moekit_llama::io::host::HostTensor;
use moekit_llama::io::source::TensorSource;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    moekit_testing::package_dir()
        .join("tests/fixtures")
        .join(name)
}

/// The quantised-tensor GGUF, assembled from gguf-py's raw blocks in `quants.json`.
fn quants_bytes() -> Vec<u8> {
    moekit_testing::gguf_fixture(&std::fs::read_to_string(fixture("quants.json")).unwrap())
}

/// [`quants_bytes`] as a file (the returned directory holds it).
fn quants_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quants.gguf");
    std::fs::write(&path, quants_bytes()).unwrap();
    (dir, path)
}

#[test]
fn every_type_dequantises_like_gguf_py() {
    let (_dir, path) = quants_file();
    let file = GgufFile::open(&path).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quants.json")).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    assert_eq!(expected.len(), 9);
    for (name, want) in expected {
        let t = file.read(name).unwrap().unwrap();
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let values = want["values"].as_array().unwrap();
        assert_eq!(t.data.len(), values.len(), "{name}");
        for (i, (got, want)) in t.data.iter().zip(values).enumerate() {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{name}[{i}]: {got} vs gguf-py {want}"
            );
        }
    }
}

#[test]
fn rows_read_in_place_equal_the_rows_of_the_whole_tensor() {
    let (_dir, path) = quants_file();
    let file = GgufFile::open(&path).unwrap();
    for name in file.names() {
        let whole = file.read(&name).unwrap().unwrap();
        let n = whole.shape[0];
        let width = whole.data.len() / n;
        // Out of order, repeated, and every row.
        let rows: Vec<usize> = (0..n).rev().chain([0, n / 2, 0]).collect();
        let got = file.read_rows(&name, &rows).unwrap().unwrap();
        assert_eq!(got.shape[0], rows.len(), "{name}");
        assert_eq!(&got.shape[1..], &whole.shape[1..], "{name}");
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(
                &got.data[i * width..(i + 1) * width],
                &whole.data[r * width..(r + 1) * width],
                "{name} row {r}"
            );
        }
        assert!(matches!(
            file.read_rows(&name, &[n]),
            Err(LlamaError::Input(_))
        ));
    }
    assert!(file.read_rows("absent", &[0]).unwrap().is_none());
}

#[test]
fn unpermute_inverts_the_llama_cpp_permutation() {
    // llama.cpp: w.reshape(heads, 2, D/2, in).swapaxes(1, 2).reshape(w.shape)
    let (heads, d, cols) = (3, 8, 5);
    let hf = HostTensor::new(
        vec![heads * d, cols],
        (0..heads * d * cols).map(|v| v as f32).collect(),
    );
    let mut permuted = vec![0.0; hf.data.len()];
    for h in 0..heads {
        for two in 0..2 {
            for i in 0..d / 2 {
                for c in 0..cols {
                    let src = ((h * 2 + two) * (d / 2) + i) * cols + c;
                    let dst = ((h * (d / 2) + i) * 2 + two) * cols + c;
                    permuted[dst] = hf.data[src];
                }
            }
        }
    }
    let permuted = HostTensor::new(hf.shape.clone(), permuted);
    assert_ne!(permuted, hf);
    assert_eq!(unpermute_rows(&permuted, heads), hf);
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, LlamaError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path)
}

fn corrupt_reason(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Err(LlamaError::Corrupt { reason, .. }) => reason,
        other => panic!("expected a corrupt-file error, got {other:?}"),
    }
}

#[test]
fn truncation_anywhere_is_an_error_never_a_panic() {
    let (_dir, path) = quants_file();
    let good = std::fs::read(&path).unwrap();
    // The file may end in padding; cuts before the end of the last tensor must fail.
    let end = GgufFile::open(&path)
        .unwrap()
        .tensors
        .values()
        .map(|t| t.offset + t.len)
        .max()
        .unwrap();
    // Every cut inside the header, and a spread of cuts inside the data.
    let cuts = (0..end.min(2048)).chain((2048..end).step_by(97));
    for cut in cuts {
        assert!(
            open_bytes(&good[..cut]).is_err(),
            "a file cut at {cut} was accepted"
        );
    }
    assert!(corrupt_reason(&good[..end - 1]).contains("past the end"));
    assert!(open_bytes(&good[..end]).is_ok());
}

#[test]
fn lying_headers_are_rejected_before_allocating() {
    let good = quants_bytes();
    assert!(corrupt_reason(b"GGML\x03\0\0\0").contains("magic"));
    let mut v1 = good.clone();
    v1[4] = 1;
    assert!(corrupt_reason(&v1).contains("version 1"));
    // Tensor count of 2^60.
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(corrupt_reason(&huge).contains("cannot fit"));
    // The first key's string length claims 2^40 bytes.
    let mut long = good.clone();
    long[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(corrupt_reason(&long).contains("cannot fit"));
    // Random bytes after a valid magic and version.
    let mut noise = b"GGUF\x03\0\0\0".to_vec();
    noise.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    assert!(open_bytes(&noise).is_err());
}

/// A GGUF v3 file with one metadata key (`extra`: its type id and value bytes, or none) and
/// tensors `(name, dims innermost first, type id, offset)` over `data` bytes of zeros.
fn gguf(extra: Option<(u32, &[u8])>, tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(u64::from(extra.is_some()).to_le_bytes());
    if let Some((type_id, value)) = extra {
        string(&mut out, "extra");
        out.extend(type_id.to_le_bytes());
        out.extend(value);
    }
    for (name, dims, type_id, offset) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(type_id.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32 + data, 0);
    out
}

#[test]
fn tensor_layouts_that_llama_cpp_refuses_are_refused() {
    const F32: u32 = 0;
    const Q8_0: u32 = 8;
    // The control: two f32 vectors of 8 values back to back, a Q8_0 matrix of 2 rows of 32.
    let good = gguf(
        None,
        &[
            ("a", &[8], F32, 0),
            ("b", &[8], F32, 32),
            ("q", &[32, 2], Q8_0, 64),
        ],
        64 + 68,
    );
    assert_eq!(open_bytes(&good).unwrap().tensors.len(), 3);
    let overlap = gguf(None, &[("a", &[8], F32, 0), ("b", &[8], F32, 0)], 64);
    assert!(corrupt_reason(&overlap).contains("overlap"));
    let unaligned = gguf(None, &[("a", &[8], F32, 4)], 64);
    assert!(corrupt_reason(&unaligned).contains("alignment"));
    // 96 values are 3 whole Q8_0 blocks, but rows of 48 are not.
    let straddling = gguf(None, &[("q", &[48, 2], Q8_0, 0)], 3 * 34);
    assert!(corrupt_reason(&straddling).contains("rows of 48"));
}

#[test]
fn array_counts_are_checked_against_their_item_size() {
    // An array of u32 (type 4) claiming as many items as there are bytes left: they would fit
    // as bytes but not as u32s.
    let mut value = 4u32.to_le_bytes().to_vec();
    value.extend(64u64.to_le_bytes());
    let lying = gguf(Some((9, &value)), &[], 64);
    assert!(corrupt_reason(&lying).contains("cannot fit"));
    value[4..12].copy_from_slice(&4u64.to_le_bytes());
    value.extend([0; 16]);
    let honest = gguf(Some((9, &value)), &[], 0);
    let file = open_bytes(&honest).unwrap();
    assert_eq!(
        file.metadata["extra"],
        GgufValue::Array(vec![GgufValue::UInt(0); 4])
    );
}

/// Metadata of one-byte values that parse into ~32 bytes each: a 9 MB file may not ask for
/// hundreds of MB (all arrays together hold at most 2^23 values).
#[test]
fn metadata_arrays_are_held_to_a_bounded_number_of_values() {
    let n: u64 = (1 << 23) + 1;
    let mut value = 0u32.to_le_bytes().to_vec(); // u8 items
    value.extend(n.to_le_bytes());
    value.resize(value.len() + n as usize, 7);
    let big = gguf(Some((9, &value)), &[], 0);
    assert!(
        corrupt_reason(&big).contains("more than"),
        "{}",
        corrupt_reason(&big)
    );
}

/// A token-type list longer than the token list is an error naming it, not an index panic.
#[test]
fn token_types_beyond_the_tokens_are_an_error() {
    let (_dir, path) = quants_file();
    let mut file = GgufFile::open(&path).unwrap();
    let s = |v: &str| GgufValue::Str(v.into());
    for (key, value) in [
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(vec![s("a"), s("b")]),
        ),
        ("tokenizer.ggml.merges", GgufValue::Array(vec![])),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(vec![
                GgufValue::UInt(1),
                GgufValue::UInt(1),
                GgufValue::UInt(3),
            ]),
        ),
    ] {
        file.metadata.insert(key.into(), value);
    }
    let err = moekit_llama::Tokenizer::from_gguf(&file).unwrap_err();
    assert!(
        err.to_string()
            .contains("token_type has 3 entries for 2 tokens"),
        "{err}"
    );
}

#[test]
fn absurd_head_widths_are_an_error_not_an_overflow() {
    let (_dir, path) = quants_file();
    let mut file = GgufFile::open(&path).unwrap();
    let u = GgufValue::UInt;
    for (key, value) in [
        ("general.architecture", GgufValue::Str("llama".into())),
        ("llama.vocab_size", u(32)),
        ("llama.embedding_length", u(64)),
        ("llama.attention.head_count", u(2)),
        ("llama.feed_forward_length", u(128)),
        ("llama.block_count", u(1)),
        ("llama.attention.key_length", u(1 << 63)),
    ] {
        file.metadata.insert(key.into(), value);
    }
    let err = file.config().unwrap_err();
    assert!(
        matches!(err, LlamaError::Config(_) | LlamaError::Corrupt { .. }),
        "{err}"
    );
}

#[test]
fn metadata_without_an_architecture_is_an_error() {
    // The fixture has no llama.* keys: asking for a model configuration must fail cleanly.
    let (_dir, path) = quants_file();
    let file = GgufFile::open(&path).unwrap();
    let err = file.config().unwrap_err();
    assert!(matches!(err, LlamaError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("llama."), "{err}");
}
