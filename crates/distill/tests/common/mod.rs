//! Shared test support: seeded host inputs, naive f64 references of every loss, and a dispatch
//! from a loss kind to the crate's function.
#![allow(dead_code)]

use burn::tensor::{Device, Int, Tensor, TensorData};
use moekit_distill::{
    DistillError, TokenMask, cross_entropy, forward_kl, generalized_jsd, hidden_cosine, hidden_mse,
    reverse_kl, skew_forward_kl, skew_reverse_kl, top_k_kl, total_variation,
};
use moekit_testing::tensor;

/// SplitMix64: a tiny seeded generator, so inputs do not depend on the backend's RNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A batch of teacher and student logits `[B, T, V]` with a padding mask `[B, T]`.
#[derive(Clone, Debug)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub v: usize,
    pub teacher: Vec<f32>,
    pub student: Vec<f32>,
    /// `true` at real tokens; sequence `i` has `i` padding positions at its end (at most
    /// `t - 1`), so every batch mixes full and padded sequences.
    pub valid: Vec<bool>,
}

impl Batch {
    pub fn random(b: usize, t: usize, v: usize, std: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let teacher = rng.normals(b * t * v, std);
        let student = rng.normals(b * t * v, std);
        let valid = (0..b * t)
            .map(|i| (i % t) < t - (i / t).min(t - 1))
            .collect();
        Self {
            b,
            t,
            v,
            teacher,
            student,
            valid,
        }
    }

    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    pub fn teacher_t(&self, device: &Device) -> Tensor<3> {
        tensor(self.teacher.clone(), [self.b, self.t, self.v], device)
    }

    pub fn student_t(&self, device: &Device) -> Tensor<3> {
        tensor(self.student.clone(), [self.b, self.t, self.v], device)
    }

    pub fn mask(&self, device: &Device) -> TokenMask {
        mask(&self.valid, [self.b, self.t], device)
    }

    /// Row `r` of the teacher / student as f64.
    pub fn row<F: Copy + Into<f64>>(data: &[F], v: usize, r: usize) -> Vec<f64> {
        data[r * v..(r + 1) * v].iter().map(|&x| x.into()).collect()
    }
}

pub fn mask(valid: &[bool], shape: [usize; 2], device: &Device) -> TokenMask {
    TokenMask::new(Tensor::from_data(
        TensorData::new(valid.to_vec(), shape),
        device,
    ))
}

pub fn ints(values: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

pub fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

/// Asserts `|got - want| <= atol + rtol·|want|`.
#[track_caller]
pub fn assert_near(got: f64, want: f64, rtol: f64, atol: f64, what: &str) {
    assert!(
        got.is_finite() && (got - want).abs() <= atol + rtol * want.abs(),
        "{what}: {got} vs {want} (rtol {rtol}, atol {atol})"
    );
}

// ---------------------------------------------------------------------------------------------
// Naive f64 references.

pub fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = x.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|v| v - lse).collect()
}

/// `KL(a ‖ b) = Σ exp(a)(a − b)` from log-probabilities.
pub fn kl(la: &[f64], lb: &[f64]) -> f64 {
    la.iter().zip(lb).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// `log(w·exp(a) + (1 − w)·exp(b))`, stable.
pub fn log_mix(la: &[f64], lb: &[f64], w: f64) -> Vec<f64> {
    la.iter()
        .zip(lb)
        .map(|(&a, &b)| {
            let (x, y) = (a + w.ln(), b + (1.0 - w).ln());
            let m = x.max(y);
            m + ((x - m).exp() + (y - m).exp()).ln()
        })
        .collect()
}

/// The logit divergences under test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Fkl,
    Rkl,
    SkewF(f64),
    SkewR(f64),
    Jsd(f64),
    Tv,
    TopK(usize),
}

pub fn kinds(v: usize) -> Vec<Kind> {
    vec![
        Kind::Fkl,
        Kind::Rkl,
        Kind::SkewF(0.1),
        Kind::SkewR(0.1),
        Kind::SkewR(0.7),
        Kind::Jsd(0.5),
        Kind::Jsd(0.1),
        Kind::Jsd(0.9),
        Kind::Jsd(0.0),
        Kind::Jsd(1.0),
        Kind::Tv,
        Kind::TopK(3.min(v)),
    ]
}

/// The divergence of one position (before the `τ²` factor), from raw logit rows.
pub fn reference_row(kind: Kind, teacher: &[f64], student: &[f64], tau: f64) -> f64 {
    let t: Vec<f64> = teacher.iter().map(|x| x / tau).collect();
    let s: Vec<f64> = student.iter().map(|x| x / tau).collect();
    let (lp, lq) = (log_softmax(&t), log_softmax(&s));
    match kind {
        Kind::Fkl => kl(&lp, &lq),
        Kind::Rkl => kl(&lq, &lp),
        Kind::SkewF(a) => kl(&lp, &log_mix(&lp, &lq, a)),
        Kind::SkewR(a) => kl(&lq, &log_mix(&lq, &lp, a)),
        Kind::Jsd(0.0) => kl(&lp, &lq),
        Kind::Jsd(1.0) => kl(&lq, &lp),
        Kind::Jsd(b) => {
            let lm = log_mix(&lp, &lq, b);
            b * kl(&lp, &lm) + (1.0 - b) * kl(&lq, &lm)
        }
        Kind::Tv => {
            0.5 * lp
                .iter()
                .zip(&lq)
                .map(|(a, b)| (a.exp() - b.exp()).abs())
                .sum::<f64>()
        }
        Kind::TopK(k) => {
            let mut idx: Vec<usize> = (0..t.len()).collect();
            idx.sort_by(|&i, &j| t[j].total_cmp(&t[i]));
            let top: Vec<f64> = idx[..k].iter().map(|&i| t[i]).collect();
            let lp_k = log_softmax(&top);
            let lq_k: Vec<f64> = idx[..k].iter().map(|&i| lq[i]).collect();
            kl(&lp_k, &lq_k)
        }
    }
}

/// `τ² ·` the masked mean over positions of [`reference_row`]; 0 when nothing is valid.
pub fn reference<F: Copy + Into<f64>>(
    kind: Kind,
    teacher: &[f32],
    student: &[F],
    v: usize,
    valid: Option<&[bool]>,
    tau: f64,
) -> f64 {
    let rows = teacher.len() / v;
    let (mut sum, mut n) = (0.0, 0usize);
    for r in 0..rows {
        if valid.is_some_and(|m| !m[r]) {
            continue;
        }
        let (t, s) = (Batch::row(teacher, v, r), Batch::row(student, v, r));
        sum += reference_row(kind, &t, &s, tau);
        n += 1;
    }
    tau * tau * sum / n.max(1) as f64
}

/// Cross-entropy reference: mean over valid positions with a label other than `ignore`.
pub fn reference_ce<F: Copy + Into<f64>>(
    student: &[F],
    v: usize,
    labels: &[i64],
    valid: Option<&[bool]>,
) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (r, &y) in labels.iter().enumerate() {
        if y == -100 || valid.is_some_and(|m| !m[r]) {
            continue;
        }
        sum -= log_softmax(&Batch::row(student, v, r))[y as usize];
        n += 1;
    }
    sum / n.max(1) as f64
}

/// Hidden MSE / cosine references: masked means over positions of `‖s − t‖²/H` and
/// `1 − cos(s, t)`.
pub fn reference_hidden<F: Copy + Into<f64>>(
    cosine: bool,
    student: &[F],
    teacher: &[f32],
    h: usize,
    valid: Option<&[bool]>,
) -> f64 {
    let rows = student.len() / h;
    let (mut sum, mut n) = (0.0, 0usize);
    for r in 0..rows {
        if valid.is_some_and(|m| !m[r]) {
            continue;
        }
        let (s, t) = (Batch::row(student, h, r), Batch::row(teacher, h, r));
        sum += if cosine {
            let dot: f64 = s.iter().zip(&t).map(|(a, b)| a * b).sum();
            let ns: f64 = s.iter().map(|a| a * a).sum();
            let nt: f64 = t.iter().map(|a| a * a).sum();
            1.0 - dot / (ns * nt).max(1e-16).sqrt()
        } else {
            s.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / h as f64
        };
        n += 1;
    }
    sum / n.max(1) as f64
}

/// The crate's implementation of `kind`.
pub fn run(
    kind: Kind,
    teacher: Tensor<3>,
    student: Tensor<3>,
    mask: Option<&TokenMask>,
    tau: f64,
) -> Result<Tensor<1>, DistillError> {
    match kind {
        Kind::Fkl => forward_kl(teacher, student, mask, tau),
        Kind::Rkl => reverse_kl(teacher, student, mask, tau),
        Kind::SkewF(a) => skew_forward_kl(teacher, student, mask, tau, a),
        Kind::SkewR(a) => skew_reverse_kl(teacher, student, mask, tau, a),
        Kind::Jsd(b) => generalized_jsd(teacher, student, mask, tau, b),
        Kind::Tv => total_variation(teacher, student, mask, tau),
        Kind::TopK(k) => top_k_kl(teacher, student, mask, tau, k),
    }
}

/// A loss as a function of the student tensor.
pub type LossFn = Box<dyn Fn(Tensor<3>) -> Tensor<1>>;

/// A reference as a function of the student's host values.
pub type ReferenceFn = Box<dyn Fn(&[f64]) -> f64>;

/// Every differentiable loss of the crate as a function of the student tensor, with its f64
/// reference as a function of the student's host values: the pairs the gradient tests check.
pub struct Case {
    pub name: String,
    pub shape: [usize; 3],
    pub student: Vec<f32>,
    pub loss: LossFn,
    pub reference: ReferenceFn,
}

pub fn cases(batch: &Batch, tau: f64, masked: bool, device: &Device) -> Vec<Case> {
    let [b, t, v] = [batch.b, batch.t, batch.v];
    let valid = masked.then(|| batch.valid.clone());
    let mut out = Vec::new();
    for kind in kinds(v) {
        let (teacher, valid, device) = (batch.teacher.clone(), valid.clone(), device.clone());
        let (teacher_r, valid_r) = (teacher.clone(), valid.clone());
        out.push(Case {
            name: format!("{kind:?} tau {tau} masked {masked}"),
            shape: [b, t, v],
            student: batch.student.clone(),
            loss: Box::new(move |s| {
                let m = valid.as_ref().map(|m| mask(m, [b, t], &device));
                run(
                    kind,
                    tensor(teacher.clone(), [b, t, v], &device),
                    s,
                    m.as_ref(),
                    tau,
                )
                .unwrap()
            }),
            reference: Box::new(move |s: &[f64]| {
                reference(kind, &teacher_r, s, v, valid_r.as_deref(), tau)
            }),
        });
    }
    // Cross-entropy, with some ignored labels.
    let mut rng = Rng::new(99);
    let labels: Vec<i64> = (0..b * t)
        .map(|i| {
            if i % 4 == 1 {
                -100
            } else {
                rng.below(v) as i64
            }
        })
        .collect();
    {
        let (labels, valid, device) = (labels.clone(), valid.clone(), device.clone());
        let (labels_r, valid_r) = (labels.clone(), valid.clone());
        out.push(Case {
            name: format!("ce masked {masked}"),
            shape: [b, t, v],
            student: batch.student.clone(),
            loss: Box::new(move |s| {
                let m = valid.as_ref().map(|m| mask(m, [b, t], &device));
                cross_entropy(s, ints(labels.clone(), [b, t], &device), m.as_ref(), -100).unwrap()
            }),
            reference: Box::new(move |s: &[f64]| reference_ce(s, v, &labels_r, valid_r.as_deref())),
        });
    }
    // Hidden states: the logits reused as `[B, T, H]` activations.
    for cosine in [false, true] {
        let (teacher, valid, device) = (batch.teacher.clone(), valid.clone(), device.clone());
        let (teacher_r, valid_r) = (teacher.clone(), valid.clone());
        out.push(Case {
            name: format!("hidden cosine {cosine} masked {masked}"),
            shape: [b, t, v],
            student: batch.student.clone(),
            loss: Box::new(move |s| {
                let m = valid.as_ref().map(|m| mask(m, [b, t], &device));
                let th = tensor(teacher.clone(), [b, t, v], &device);
                if cosine {
                    hidden_cosine(s, th, m.as_ref()).unwrap()
                } else {
                    hidden_mse(s, th, m.as_ref()).unwrap()
                }
            }),
            reference: Box::new(move |s: &[f64]| {
                reference_hidden(cosine, s, &teacher_r, v, valid_r.as_deref())
            }),
        });
    }
    out
}
