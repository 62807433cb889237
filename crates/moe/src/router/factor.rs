//! Best low-rank factors of a router gate (truncated SVD, Eckart–Young).

use burn::linalg::svd;
use burn::tensor::Tensor;

use crate::error::MoeError;

/// QR sweeps per singular value allowed to the SVD; it converges in a few.
const SVD_SWEEPS: usize = 100;

/// Factors `(W_down [H, r], W_up [r, E])` whose product is the best rank-`r` approximation of
/// `w` `[H, E]` in the Frobenius norm (Eckart–Young): with `w = U·diag(s)·Vᵀ`,
/// `W_down = U_r` and `W_up = diag(s_r)·V_rᵀ`. `W_down` has orthonormal columns whatever `w`
/// is, so a gate initialised to zero (every expert equally likely) or of rank below `r` still
/// trains: `W_up` gets a gradient through it from the first step (splitting `√s` into both
/// factors would leave them both zero, a saddle gradient descent never leaves). The factors do
/// not require gradients.
///
/// # Errors
/// A rank outside `[1, min(H, E)]`, or `w` holding NaN or infinite values.
pub fn low_rank_factors(w: Tensor<2>, rank: usize) -> crate::Result<(Tensor<2>, Tensor<2>)> {
    let [h, e] = w.dims();
    if rank == 0 || rank > h.min(e) {
        return Err(MoeError::OutOfRange {
            what: "rank of the factors",
            value: rank as f64,
            range: "[1, min(H, E)]",
        });
    }
    let w = finite(w.detach(), "router gate")?;
    let (u, s, vt) = svd::<2, 1>(w, SVD_SWEEPS);
    let down = u.narrow(1, 0, rank);
    let up = vt.narrow(0, 0, rank) * s.narrow(0, 0, rank).unsqueeze_dim::<2>(1);
    Ok((down, up))
}

/// `w` if every value is finite, else [`MoeError::NonFinite`] naming `what` (a NaN gate would
/// route every token by NaN logits).
pub(super) fn finite(w: Tensor<2>, what: &'static str) -> crate::Result<Tensor<2>> {
    if w.clone().is_finite().all().into_scalar::<bool>() {
        Ok(w)
    } else {
        Err(MoeError::NonFinite(what))
    }
}
