//! Helpers shared by the upcycle integration tests: tiny random models, calibration tokens,
//! host copies and naive host arithmetic to check the crate against.
#![allow(dead_code)]

use burn::tensor::{Device, Int, Tensor};
use moekit_llama::{FfnSlot, Llama, LlamaConfig};
use moekit_moe::{FeedForward, MoeLayer};
use moekit_testing::values;
use moekit_upcycle::{ActivationStore, RecordConfig};

pub const VOCAB: usize = 50;
pub const HIDDEN: usize = 32;
pub const INTERMEDIATE: usize = 64;

/// A tiny random LLaMA: vocab 50, hidden 32, intermediate 64, 2 layers, 4 heads (2 KV).
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig::llama(VOCAB, HIDDEN, INTERMEDIATE, 2, 4, 2)
}

pub fn tiny(device: &Device) -> Llama {
    tiny_config().init(device).unwrap()
}

/// `n` pseudo-random token ids below the vocabulary (a fixed LCG, so runs repeat).
pub fn token_ids(n: usize, seed: u64) -> Vec<u32> {
    moekit_testing::token_ids(n, VOCAB, seed)
}

/// Two rows of 11 fixed tokens.
pub fn probe(model: &Llama, device: &Device) -> Tensor<2, Int> {
    let a = token_ids(11, 101);
    let b = token_ids(11, 202);
    model.tokens(&[&a, &b], device).unwrap()
}

/// Logits of [`probe`], on the host.
pub fn logits(model: &Llama, device: &Device) -> Vec<f32> {
    values(model.logits(probe(model, device)).unwrap())
}

/// Largest absolute difference.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert!(
                x.is_finite() && y.is_finite(),
                "non-finite value: {x} vs {y}"
            );
            (x - y).abs()
        })
        .fold(0.0, f32::max)
}

#[track_caller]
pub fn assert_vec_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    let d = max_diff(a, b);
    assert!(d <= tol, "{what}: max difference {d} > {tol}");
}

/// A record configuration that keeps everything in memory.
pub fn in_memory(seq_len: usize) -> RecordConfig {
    RecordConfig {
        seq_len,
        batch: 2,
        memory_budget: 1 << 30,
        fingerprint: "test".into(),
    }
}

/// Records `model`'s FFN activations on `windows` windows of 16 pseudo-random tokens.
pub fn record(model: &Llama, windows: usize) -> ActivationStore {
    let ids = token_ids(16 * windows, 7);
    ActivationStore::record(model, &ids, &in_memory(16), None, &mut |_, _| {}).unwrap()
}

/// The dense FFN of layer `l`.
pub fn dense_ffn(model: &Llama, l: usize) -> FeedForward {
    model.layers[l].ffn.dense().expect("a dense layer")
}

/// The MoE layer of layer `l`.
pub fn moe(model: &Llama, l: usize) -> &MoeLayer {
    match &model.layers[l].ffn {
        FfnSlot::Moe(m) => m,
        _ => panic!("layer {l} is not a MoE layer"),
    }
}

/// A row-major host matrix.
#[derive(Debug, Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn of(t: Tensor<2>) -> Self {
        let [rows, cols] = t.dims();
        Self {
            rows,
            cols,
            data: values(t),
        }
    }

    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn col(&self, c: usize) -> Vec<f32> {
        (0..self.rows).map(|r| self.at(r, c)).collect()
    }
}

/// Expert `e` of a stacked `[E, A, B]` bank as a host matrix.
pub fn slice(t: &Tensor<3>, e: usize) -> Mat {
    let [_, a, b] = t.dims();
    Mat::of(t.clone().narrow(0, e, 1).reshape([a, b]))
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Naive host SwiGLU neuron activations `a[t][j] = silu(x·W_gate[:, j]) · (x·W_up[:, j])`,
/// `w_in` `[H, 2I]`.
pub fn swiglu_acts(x: &Mat, w_in: &Mat) -> Vec<Vec<f32>> {
    let i = w_in.cols / 2;
    (0..x.rows)
        .map(|t| {
            (0..i)
                .map(|j| {
                    let (mut g, mut u) = (0f64, 0f64);
                    for h in 0..x.cols {
                        g += (x.at(t, h) * w_in.at(h, j)) as f64;
                        u += (x.at(t, h) * w_in.at(h, i + j)) as f64;
                    }
                    silu(g as f32) * u as f32
                })
                .collect()
        })
        .collect()
}

/// For every routed expert of a split layer, the dense neurons it holds: each expert neuron
/// is matched to the dense neuron with the identical gate, up and down weights.
pub fn expert_neurons(
    dense: &FeedForward,
    bank_w_in: &Tensor<3>,
    bank_w_out: &Tensor<3>,
) -> Vec<Vec<usize>> {
    let d_in = Mat::of(dense.w_in.val());
    let d_out = Mat::of(dense.w_out.val());
    let i = d_out.rows;
    let e = bank_w_in.dims()[0];
    (0..e)
        .map(|k| {
            let w_in = slice(bank_w_in, k);
            let w_out = slice(bank_w_out, k);
            let m = w_out.rows;
            (0..m)
                .map(|j| neuron_of(&d_in, &d_out, i, &w_in, &w_out, m, j))
                .collect()
        })
        .collect()
}

/// The dense neuron equal to neuron `j` of a sub-FFN (`w_in` `[H, 2m]`, `w_out` `[m, H]`).
pub fn neuron_of(
    d_in: &Mat,
    d_out: &Mat,
    i: usize,
    w_in: &Mat,
    w_out: &Mat,
    m: usize,
    j: usize,
) -> usize {
    let (gate, up) = (w_in.col(j), w_in.col(m + j));
    let hits: Vec<usize> = (0..i)
        .filter(|&n| d_out.row(n) == w_out.row(j) && d_in.col(n) == gate && d_in.col(i + n) == up)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expert neuron {j} matches dense neurons {hits:?}"
    );
    hits[0]
}
