//! Knowledge distillation in a hand-written training loop.
//!
//! A fixed, randomly initialised teacher (embedding → two 96-wide GELU layers → logits over a
//! vocabulary of 64) generates token sequences; a smaller student (one 32-wide layer) learns
//! from it with `kl:1,hidden-mse:0.5,ce:0.1`: the forward KL to the teacher's next-token
//! distributions, the MSE between the student's last hidden state (lifted to the teacher's
//! width by a learned projection) and the teacher's, and the cross-entropy on the sampled next
//! tokens. Sequences have random lengths, padded at the end and masked out. The student and the
//! projection are trained with AdamW; the teacher runs without autodiff.
//!
//! ```text
//! cargo run --release --example distill_custom_loop
//! ```

use moekit::burn;
use moekit::burn::module::Module;
use moekit::burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use moekit::burn::optim::{AdamWConfig, GradientsParams};
use moekit::burn::tensor::activation::gelu;
use moekit::burn::tensor::{Device, Int, Tensor, TensorData};
use moekit::distill::{
    DistillConfig, DistillModel, DistillOutput, HiddenProjectionConfig, TokenMask,
};

const VOCAB: usize = 64;
const BATCH: usize = 16;
const SEQ: usize = 24;
const STEPS: usize = 300;

/// Embedding, GELU layers with residual connections, output projection: a "language model"
/// whose next-token distribution depends on the current token only.
#[derive(Module, Debug)]
struct Mlp {
    embed: Embedding,
    layers: Vec<Linear>,
    head: Linear,
    /// Sharpens the logits of the random teacher so that its distributions are far from
    /// uniform.
    #[module(skip)]
    logit_scale: f64,
}

fn mlp(width: usize, depth: usize, logit_scale: f64, device: &Device) -> Mlp {
    Mlp {
        embed: EmbeddingConfig::new(VOCAB, width).init(device),
        layers: (0..depth)
            .map(|_| LinearConfig::new(width, width).init(device))
            .collect(),
        head: LinearConfig::new(width, VOCAB).init(device),
        logit_scale,
    }
}

impl Mlp {
    /// Logits `[B, T, V]` and the hidden states (embedding, then each layer's output).
    fn forward(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Vec<Tensor<3>>) {
        let mut h = self.embed.forward(tokens);
        let mut hidden = vec![h.clone()];
        for layer in &self.layers {
            h = h.clone() + gelu(layer.forward(h));
            hidden.push(h.clone());
        }
        (self.head.forward(h) * self.logit_scale, hidden)
    }
}

impl DistillModel for Mlp {
    fn distill_forward(
        &self,
        tokens: Tensor<2, Int>,
        want_hidden: bool,
    ) -> moekit::distill::Result<DistillOutput> {
        let (logits, hidden) = self.forward(tokens.to_device(&self.embed.weight.device()));
        let out = DistillOutput::new(logits);
        Ok(if want_hidden {
            out.with_hidden(hidden)
        } else {
            out
        })
    }
}

/// A small seeded generator (SplitMix64) for the host-side sampling.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The teacher's next-token distribution after each token, `[V][V]` on the host.
fn bigram_table(teacher: &Mlp, device: &Device) -> Vec<Vec<f64>> {
    let ids: Vec<i64> = (0..VOCAB as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, VOCAB]), device);
    let logits: Vec<f32> = teacher
        .forward(tokens)
        .0
        .into_data()
        .iter::<f32>()
        .collect();
    logits
        .chunks(VOCAB)
        .map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let exp: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.into_iter().map(|e| e / sum).collect()
        })
        .collect()
}

/// A batch sampled from the teacher: tokens, next-token labels (`-100` at the last real
/// position and at padding) and the padding mask (each sequence has 8 to `SEQ` real tokens).
fn sample(
    table: &[Vec<f64>],
    rng: &mut Rng,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>, TokenMask) {
    let (mut tokens, mut labels, mut valid) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..BATCH {
        let len = 8 + (rng.uniform() * (SEQ - 7) as f64) as usize;
        let mut seq = vec![(rng.uniform() * VOCAB as f64) as usize];
        while seq.len() < len {
            let (u, probs) = (rng.uniform(), &table[*seq.last().unwrap()]);
            let mut acc = 0.0;
            let next = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc > u
                })
                .unwrap_or(VOCAB - 1);
            seq.push(next);
        }
        for t in 0..SEQ {
            tokens.push(seq.get(t).copied().unwrap_or(0) as i64);
            labels.push(seq.get(t + 1).map_or(-100, |&x| x as i64));
            valid.push(t < len);
        }
    }
    let ints = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [BATCH, SEQ]), device);
    let mask = TokenMask::new(Tensor::from_data(
        TensorData::new(valid, [BATCH, SEQ]),
        device,
    ));
    (ints(tokens), ints(labels), mask)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = moekit::default_device();
    device.seed(7);
    let train = device.clone().autodiff();

    let teacher = mlp(96, 2, 4.0, &device);
    let mut student = mlp(32, 1, 1.0, &train);
    // Student hidden state 1 (after its only layer) ↔ teacher hidden state 2 (its last).
    let mut distiller = DistillConfig::new("kl:1,hidden-mse:0.5,ce:0.1".parse()?)
        .with_layers(vec![(1, 2)])
        .with_projection(Some(HiddenProjectionConfig::new(32, 96)))
        .init(&train)?;
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let table = bigram_table(&teacher, &device);
    let mut rng = Rng(42);

    let start = std::time::Instant::now();
    let (mut first, mut last) = (None, None);
    for step in 1..=STEPS {
        let (tokens, labels, mask) = sample(&table, &mut rng, &train);
        let parts = distiller.step(&teacher, &student, tokens, Some(labels), Some(&mask))?;
        if step == 1 || step % 50 == 0 {
            println!("step {step:>4}  {parts}");
        }
        let kl = parts.get("kl").expect("a kl term");
        first.get_or_insert(kl);
        last = Some(kl);

        let mut grads = parts.total.backward();
        let student_grads = GradientsParams::from_module(&mut grads, &student);
        let projection_grads = GradientsParams::from_module(&mut grads, &distiller);
        student = optim.step(1e-2, student, student_grads);
        distiller = optim.step(1e-2, distiller, projection_grads);
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    println!(
        "forward KL to the teacher: {first:.4} -> {last:.4} in {STEPS} steps ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    assert!(
        last < 0.5 * first,
        "the student did not learn: KL {first} -> {last}"
    );
    Ok(())
}
