//! Grouped expert FFN on host slices: the numerical core of the fused CPU dispatch.
//!
//! Work is split into tasks of at most [`ROWS_PER_TASK`] assignments of one expert; each task
//! gathers its token rows into a local buffer and runs single-threaded GEMMs (`gemm` crate, as
//! burn-flex uses), while rayon spreads tasks over the cores. Tasks write disjoint row ranges of
//! the shared buffers; token-level reductions run as a separate pass over tokens, so no two
//! threads ever write the same element.

use rayon::prelude::*;

use super::scratch;
use crate::activation::Activation;

/// Assignments per task: large enough for efficient GEMMs, small enough to balance 2–16 cores
/// (256 measured ~8% faster than 128 on the E64/I24/k8 bench case, 2 threads).
pub const ROWS_PER_TASK: usize = 256;

/// Sizes and grouping of one grouped-FFN call.
#[derive(Debug, Clone, Copy)]
pub struct Problem<'a> {
    /// Tokens `T`.
    pub tokens: usize,
    /// Model width `H`.
    pub hidden: usize,
    /// Expert intermediate width `I`.
    pub inter: usize,
    /// Non-linearity.
    pub activation: Activation,
    /// Expert `e` owns assignments `offsets[e]..offsets[e+1]`.
    pub offsets: &'a [usize],
    /// Token of each assignment, `[N]`.
    pub rows: &'a [usize],
}

/// Gradients of a grouped-FFN call.
#[derive(Debug)]
pub struct Grads {
    /// `[T, H]`
    pub x: Vec<f32>,
    /// `[E, H, W]`
    pub w_in: Vec<f32>,
    /// `[E, I, H]`
    pub w_out: Vec<f32>,
    /// `[N]`
    pub weights: Vec<f32>,
}

impl Problem<'_> {
    fn experts(&self) -> usize {
        self.offsets.len() - 1
    }
    fn width(&self) -> usize {
        self.activation.in_width(self.inter)
    }
    fn assignments(&self) -> usize {
        self.offsets[self.experts()]
    }
    /// `(expert, first row, end row)` of every task.
    fn tasks(&self) -> Vec<(usize, usize, usize)> {
        let mut tasks = Vec::new();
        for e in 0..self.experts() {
            let (start, end) = (self.offsets[e], self.offsets[e + 1]);
            let mut r = start;
            while r < end {
                let r1 = (r + ROWS_PER_TASK).min(end);
                tasks.push((e, r, r1));
                r = r1;
            }
        }
        tasks
    }
    /// Assignments of each token as CSR: `(token_ptr [T+1], assignment ids)`.
    fn token_csr(&self) -> (Vec<usize>, Vec<usize>) {
        let mut ptr = vec![0usize; self.tokens + 1];
        for &t in self.rows {
            ptr[t + 1] += 1;
        }
        for t in 0..self.tokens {
            ptr[t + 1] += ptr[t];
        }
        let mut cursor = ptr.clone();
        let mut ids = vec![0usize; self.rows.len()];
        for (n, &t) in self.rows.iter().enumerate() {
            ids[cursor[t]] = n;
            cursor[t] += 1;
        }
        (ptr, ids)
    }
}

/// A raw pointer that tasks share; every use writes a range no other task touches.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks only write disjoint ranges (see the module docs).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(v: &mut [f32]) -> Self {
        Self(v.as_mut_ptr())
    }
    /// Rows `r0..r1` of a row-major matrix with `cols` columns.
    ///
    /// # Safety
    /// The caller guarantees that no other live slice overlaps these rows.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, r0: usize, r1: usize, cols: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(r0 * cols), (r1 - r0) * cols) }
    }
}

/// A strided matrix view for `gemm`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    fn row_major(data: &[f32], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, `dst` row-major with `n` columns.
fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, a: View, b: View, accumulate: bool) {
    debug_assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: `a` and `b` point into live slices that hold `m x k` and `k x n` elements at the
    // given strides (every caller builds them from slices of exactly those sizes), and `dst` holds
    // `m x n` elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn gather(dst: &mut [f32], src: &[f32], rows: &[usize], cols: usize) {
    for (d, &r) in dst.chunks_exact_mut(cols).zip(rows) {
        d.copy_from_slice(&src[r * cols..(r + 1) * cols]);
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `a = act(h)` row by row; `h` has `in_width(I)` columns, `a` has `I`.
fn activate(act: Activation, h: &[f32], a: &mut [f32], inter: usize) {
    let width = act.in_width(inter);
    for (hr, ar) in h.chunks_exact(width).zip(a.chunks_exact_mut(inter)) {
        match act {
            Activation::SwiGlu => {
                let (g, u) = hr.split_at(inter);
                for ((o, &g), &u) in ar.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            }
            Activation::Gelu => {
                for (o, &x) in ar.iter_mut().zip(hr) {
                    *o = 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
                }
            }
            Activation::Relu => {
                for (o, &x) in ar.iter_mut().zip(hr) {
                    *o = x.max(0.0);
                }
            }
            Activation::Identity => ar.copy_from_slice(hr),
        }
    }
}

/// `dh = ∂act(h)ᵀ · da`.
fn activate_backward(act: Activation, h: &[f32], da: &[f32], dh: &mut [f32], inter: usize) {
    let width = act.in_width(inter);
    for ((hr, dar), dhr) in h
        .chunks_exact(width)
        .zip(da.chunks_exact(inter))
        .zip(dh.chunks_exact_mut(width))
    {
        match act {
            Activation::SwiGlu => {
                let (g, u) = hr.split_at(inter);
                let (dg, du) = dhr.split_at_mut(inter);
                for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dar) {
                    let s = sigmoid(g);
                    *du = d * g * s;
                    *dg = d * u * s * (1.0 + g * (1.0 - s));
                }
            }
            Activation::Gelu => {
                for ((o, &x), &d) in dhr.iter_mut().zip(hr).zip(dar) {
                    let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
                    let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
                    *o = d * (cdf + x * pdf);
                }
            }
            Activation::Relu => {
                for ((o, &x), &d) in dhr.iter_mut().zip(hr).zip(dar) {
                    *o = if x > 0.0 { d } else { 0.0 };
                }
            }
            Activation::Identity => dhr.copy_from_slice(dar),
        }
    }
}

/// `out[t] = Σ_{n ∈ token t} scale(n) · src[n]`, parallel over tokens.
fn combine(p: &Problem, src: &[f32], scale: Option<&[f32]>) -> Vec<f32> {
    let h = p.hidden;
    let (ptr, ids) = p.token_csr();
    let mut out = vec![0f32; p.tokens * h];
    out.par_chunks_mut(h).enumerate().for_each(|(t, o)| {
        for &n in &ids[ptr[t]..ptr[t + 1]] {
            let w = scale.map_or(1.0, |s| s[n]);
            for (o, &v) in o.iter_mut().zip(&src[n * h..(n + 1) * h]) {
                *o += w * v;
            }
        }
    });
    out
}

/// Forward pass. Returns `y [T, H]` and, with `keep_pre`, the pre-activations
/// `[N, in_width(I)]` that the backward pass needs (a pooled buffer: hand it back to
/// [`scratch::give`] when done).
pub fn forward(
    p: &Problem,
    x: &[f32],
    w_in: &[f32],
    w_out: &[f32],
    weights: &[f32],
    keep_pre: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (h, i, w, n) = (p.hidden, p.inter, p.width(), p.assignments());
    let mut pre = keep_pre.then(|| scratch::take(n * w));
    let mut z = scratch::take(n * h);
    let pre_s = pre.as_mut().map(|v| Shared::new(v));
    let z_s = Shared::new(&mut z);
    p.tasks().into_par_iter().for_each(|(e, r0, r1)| {
        let m = r1 - r0;
        let local_pre = if pre_s.is_some() { 0 } else { m * w };
        scratch::with_local([m * h, local_pre, m * i], |[xs, local_pre, a]| {
            gather(xs, x, &p.rows[r0..r1], h);
            // SAFETY: task row ranges are disjoint.
            let pre_t = match &pre_s {
                Some(s) => unsafe { s.rows(r0, r1, w) },
                None => local_pre,
            };
            let z_t = unsafe { z_s.rows(r0, r1, h) };
            let wi = View::row_major(&w_in[e * h * w..(e + 1) * h * w], w);
            matmul(pre_t, m, w, h, View::row_major(xs, h), wi, false);
            activate(p.activation, pre_t, a, i);
            let wo = View::row_major(&w_out[e * i * h..(e + 1) * i * h], h);
            matmul(z_t, m, h, i, View::row_major(a, i), wo, false);
        })
    });
    let y = combine(p, &z, Some(weights));
    scratch::give(z);
    (y, pre)
}

/// Backward pass from `dy [T, H]` and the forward's pre-activations.
pub fn backward(
    p: &Problem,
    dy: &[f32],
    x: &[f32],
    w_in: &[f32],
    w_out: &[f32],
    weights: &[f32],
    pre: &[f32],
) -> Grads {
    let (h, i, w, n, e_count) = (p.hidden, p.inter, p.width(), p.assignments(), p.experts());
    // Per-assignment buffers, filled by row tasks.
    let mut xs = scratch::take(n * h); // gathered inputs
    let mut dz = scratch::take(n * h); // weights[n] · dy[token]
    let mut dxs = scratch::take(n * h); // gradient of the gathered inputs
    let mut act = scratch::take(n * i); // activations
    let mut dpre = scratch::take(n * w); // gradient of the pre-activations
    let mut dweights = vec![0f32; n];
    {
        let s = [&mut xs, &mut dz, &mut dxs].map(|v| Shared::new(v));
        let (act_s, dpre_s, dw_s) = (
            Shared::new(&mut act),
            Shared::new(&mut dpre),
            Shared::new(&mut dweights),
        );
        p.tasks().into_par_iter().for_each(|(e, r0, r1)| {
            let m = r1 - r0;
            // SAFETY: task row ranges are disjoint.
            let (xs_t, dz_t, dxs_t) = unsafe {
                (
                    s[0].rows(r0, r1, h),
                    s[1].rows(r0, r1, h),
                    s[2].rows(r0, r1, h),
                )
            };
            let (act_t, dpre_t, dw_t) = unsafe {
                (
                    act_s.rows(r0, r1, i),
                    dpre_s.rows(r0, r1, w),
                    dw_s.rows(r0, r1, 1),
                )
            };
            let rows = &p.rows[r0..r1];
            gather(xs_t, x, rows, h);
            gather(dz_t, dy, rows, h);
            scratch::with_local([m * i], |[da]| {
                // ∂L/∂a before weighting: dy[token] · W_outᵀ.
                let wo = View::row_major(&w_out[e * i * h..(e + 1) * i * h], h);
                matmul(da, m, i, h, View::row_major(dz_t, h), wo.t(), false);
                let pre_t = &pre[r0 * w..r1 * w];
                activate(p.activation, pre_t, act_t, i);
                for r in 0..m {
                    let wr = weights[r0 + r];
                    let (a_r, da_r) = (&act_t[r * i..(r + 1) * i], &mut da[r * i..(r + 1) * i]);
                    dw_t[r] = a_r.iter().zip(da_r.iter()).map(|(a, d)| a * d).sum();
                    da_r.iter_mut().for_each(|d| *d *= wr);
                    dz_t[r * h..(r + 1) * h].iter_mut().for_each(|d| *d *= wr);
                }
                activate_backward(p.activation, pre_t, da, dpre_t, i);
            });
            let wi = View::row_major(&w_in[e * h * w..(e + 1) * h * w], w);
            matmul(dxs_t, m, h, w, View::row_major(dpre_t, w), wi.t(), false);
        });
    }
    // Weight gradients dW[e][r0..r1, :] = A_e[:, r0..r1]ᵀ · B_e, one task per (product, expert,
    // block of output rows): dW_in from (xs, dpre), dW_out from (act, dz).
    let mut dw_in = vec![0f32; e_count * h * w];
    let mut dw_out = vec![0f32; e_count * i * h];
    {
        let products = [
            (&xs[..], h, &dpre[..], w, Shared::new(&mut dw_in)),
            (&act[..], i, &dz[..], h, Shared::new(&mut dw_out)),
        ];
        let mut tasks = Vec::new();
        for e in (0..e_count).filter(|&e| p.offsets[e + 1] > p.offsets[e]) {
            for (which, &(_, rows, ..)) in products.iter().enumerate() {
                let blocks = (0..rows).step_by(ROWS_PER_TASK);
                tasks.extend(blocks.map(|r| (which, e, r, (r + ROWS_PER_TASK).min(rows))));
            }
        }
        tasks.into_par_iter().for_each(|(which, e, r0, r1)| {
            let (a, a_cols, b, b_cols, dst) = products[which];
            let (start, end) = (p.offsets[e], p.offsets[e + 1]);
            let lhs = View {
                ptr: a[start * a_cols + r0..].as_ptr(),
                rs: 1,
                cs: a_cols as isize,
            };
            let rhs = View::row_major(&b[start * b_cols..end * b_cols], b_cols);
            // SAFETY: (product, expert, row block) triples are disjoint.
            let dst = unsafe { dst.rows(e * a_cols + r0, e * a_cols + r1, b_cols) };
            matmul(dst, r1 - r0, b_cols, end - start, lhs, rhs, false);
        });
    }
    let dx = combine(p, &dxs, None);
    for buf in [xs, dz, dxs, act, dpre] {
        scratch::give(buf);
    }
    Grads {
        x: dx,
        w_in: dw_in,
        w_out: dw_out,
        weights: dweights,
    }
}

/// Indices of the `k` largest values of each row of `scores [T, E]`, decreasing, ties broken
/// towards the lower index; NaNs are ordered by `f32::total_cmp` (a positive NaN above every
/// number, a negative one, the usual result of invalid arithmetic on x86, below).
pub fn top_k_indices(scores: &[f32], experts: usize, k: usize) -> Vec<i64> {
    let rows = scores.len() / experts.max(1);
    let mut out = vec![0i64; rows * k];
    let order = |s: &[f32], a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(a.cmp(b));
    out.par_chunks_mut(k.max(1))
        .zip(scores.par_chunks(experts.max(1)))
        .for_each_init(
            || Vec::with_capacity(experts),
            |idx, (o, s)| {
                idx.clear();
                idx.extend(0..experts);
                if k < experts {
                    idx.select_nth_unstable_by(k, |a, b| order(s, a, b));
                }
                idx[..k].sort_unstable_by(|a, b| order(s, a, b));
                for (o, &i) in o.iter_mut().zip(idx.iter()) {
                    *o = i as i64;
                }
            },
        );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive per-assignment reference: loops, no GEMM, no grouping tricks.
    fn naive(p: &Problem, x: &[f32], w_in: &[f32], w_out: &[f32], weights: &[f32]) -> Vec<f32> {
        let (h, i, w) = (p.hidden, p.inter, p.width());
        let mut y = vec![0f32; p.tokens * h];
        for e in 0..p.experts() {
            let (start, end) = (p.offsets[e], p.offsets[e + 1]);
            for (&t, &weight) in p.rows[start..end].iter().zip(&weights[start..end]) {
                let pre: Vec<f32> = (0..w)
                    .map(|c| {
                        (0..h)
                            .map(|k| x[t * h + k] * w_in[e * h * w + k * w + c])
                            .sum()
                    })
                    .collect();
                let mut a = vec![0f32; i];
                activate(p.activation, &pre, &mut a, i);
                for (c, out) in y[t * h..(t + 1) * h].iter_mut().enumerate() {
                    let v: f32 = (0..i).map(|k| a[k] * w_out[e * i * h + k * h + c]).sum();
                    *out += weight * v;
                }
            }
        }
        y
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        let mut seed = 3;
        for (e, k) in [(1, 1), (5, 2), (8, 8), (64, 8), (7, 6)] {
            let mut s: Vec<f32> = (0..11 * e).map(|_| lcg(&mut seed)).collect();
            s[0] = s[e - 1]; // a tie in the first row
            let got = top_k_indices(&s, e, k);
            for (r, row) in s.chunks(e).enumerate() {
                let mut idx: Vec<usize> = (0..e).collect();
                idx.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
                let want: Vec<i64> = idx[..k].iter().map(|&i| i as i64).collect();
                assert_eq!(&got[r * k..(r + 1) * k], &want[..], "E{e} k{k} row {r}");
            }
        }
    }

    #[test]
    fn forward_matches_naive_loops_for_every_activation() {
        let mut seed = 7;
        let (t, h, i, e) = (37, 9, 5, 4);
        // 600 > 2 · ROWS_PER_TASK rows for expert 1 exercises task splitting; expert 2 is empty.
        let offsets = [0, 3, 603, 603, 610];
        let rows: Vec<usize> = (0..610).map(|n| (n * 7) % t).collect();
        for act in [
            Activation::SwiGlu,
            Activation::Gelu,
            Activation::Relu,
            Activation::Identity,
        ] {
            let w = act.in_width(i);
            let x: Vec<f32> = (0..t * h).map(|_| lcg(&mut seed)).collect();
            let w_in: Vec<f32> = (0..e * h * w).map(|_| lcg(&mut seed)).collect();
            let w_out: Vec<f32> = (0..e * i * h).map(|_| lcg(&mut seed)).collect();
            let weights: Vec<f32> = (0..610).map(|_| lcg(&mut seed)).collect();
            let p = Problem {
                tokens: t,
                hidden: h,
                inter: i,
                activation: act,
                offsets: &offsets,
                rows: &rows,
            };
            let (y, _) = forward(&p, &x, &w_in, &w_out, &weights, false);
            let want = naive(&p, &x, &w_in, &w_out, &weights);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{act:?}: {a} vs {b}"
                );
            }
        }
    }
}
