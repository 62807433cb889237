//! Experts made of disjoint groups of a dense FFN's neurons.

use burn::tensor::{Int, Tensor, TensorData};
use moekit_moe::{Activation, ExpertBank, FeedForward};

use crate::error::{Result, UpcycleError};

fn index(ids: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let ids: Vec<i64> = ids.iter().map(|&j| j as i64).collect();
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [n]), device)
}

/// The FFN restricted to `neurons`: `act(x·W_in[:, neurons])·W_out[neurons, :]`.
pub fn sub_ffn(ffn: &FeedForward, neurons: &[usize]) -> Result<FeedForward> {
    let (w_in, w_out) = gather(ffn, neurons)?;
    Ok(FeedForward::from_weights(w_in, w_out, ffn.activation)?)
}

/// Input `[H, in_width(m)]` and output `[m, H]` weights of the neurons `ids`.
fn gather(ffn: &FeedForward, ids: &[usize]) -> Result<(Tensor<2>, Tensor<2>)> {
    let i = ffn.intermediate_size();
    if ids.is_empty() || ids.iter().any(|&j| j >= i) {
        return Err(UpcycleError::Config(format!(
            "a neuron group must be non-empty and within the FFN's {i} neurons"
        )));
    }
    let device = ffn.w_in.val().device();
    let idx = index(ids, &device);
    let w_in = ffn.w_in.val();
    let w_in = match ffn.activation {
        Activation::SwiGlu => Tensor::cat(
            vec![
                w_in.clone().narrow(1, 0, i).select(1, idx.clone()),
                w_in.narrow(1, i, i).select(1, idx.clone()),
            ],
            1,
        ),
        _ => w_in.select(1, idx.clone()),
    };
    Ok((w_in, ffn.w_out.val().select(0, idx)))
}

/// One expert per group of neurons (groups of one size). With every expert active and
/// weights of 1, `Σₑ Eₑ(x)` equals the FFN restricted to the union of the groups, since a
/// SwiGLU is a sum over its neurons.
pub fn bank(ffn: &FeedForward, groups: &[Vec<usize>]) -> Result<ExpertBank> {
    let size = groups.first().map_or(0, Vec::len);
    if groups.iter().any(|g| g.len() != size) {
        return Err(UpcycleError::Config("expert groups differ in size".into()));
    }
    let (ins, outs): (Vec<_>, Vec<_>) = groups
        .iter()
        .map(|g| gather(ffn, g).map(|(a, b)| (a.unsqueeze_dim::<3>(0), b.unsqueeze_dim::<3>(0))))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    Ok(ExpertBank::from_weights(
        Tensor::cat(ins, 0),
        Tensor::cat(outs, 0),
        ffn.activation,
    )?)
}
