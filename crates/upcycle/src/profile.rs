//! Neuron statistics of a dense FFN on calibration tokens: how strongly each neuron fires and
//! which neurons fire together.

use burn::tensor::Tensor;
use moekit_moe::FeedForward;

/// Tokens evaluated at once while profiling (`[CHUNK, I]` activations).
const CHUNK: usize = 4096;

/// Activation statistics of the `I` neurons of one FFN.
#[derive(Debug, Clone)]
pub struct NeuronProfile {
    /// Mean `|aⱼ|` over the tokens, `[I]` (`a = act(x·W_in)`, the input of the down
    /// projection).
    pub importance: Vec<f32>,
    /// `C[i][j]`: the fraction of tokens on which neurons `i` and `j` both fire, row-major
    /// `[I, I]`. A neuron fires on a token when its `|a|` exceeds that token's mean `|a|`.
    /// `None` when not asked for: `I²` values, 822 MB for `I = 14,336`.
    pub coactivation: Option<Vec<f32>>,
    /// Tokens profiled.
    pub tokens: usize,
}

/// Profiles `ffn` on the tokens `x`: the importances, and the co-activations when
/// `coactivation` is set (an `[I, I]` product per chunk of tokens, which only the co-activation
/// split needs).
///
/// # Shapes
/// - x: `[T, H]`
pub fn profile(ffn: &FeedForward, x: Tensor<2>, coactivation: bool) -> NeuronProfile {
    let [t, _] = x.dims();
    let i = ffn.intermediate_size();
    let device = x.device();
    let mut importance = Tensor::<1>::zeros([i], &device);
    let mut co = coactivation.then(|| Tensor::<2>::zeros([i, i], &device));
    for start in (0..t).step_by(CHUNK) {
        let rows = CHUNK.min(t - start);
        let h = x.clone().narrow(0, start, rows).matmul(ffn.w_in.val());
        let a = ffn.activation.apply(h).abs();
        importance = importance + a.clone().sum_dim(0).squeeze_dim(0);
        co = co.map(|co| {
            let fires = (a.clone() - a.mean_dim(1)).greater_elem(0.0).float();
            co + fires.clone().transpose().matmul(fires)
        });
    }
    let n = t.max(1) as f32;
    NeuronProfile {
        importance: (importance / n)
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 data"),
        coactivation: co.map(|co| {
            (co / n)
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 data")
        }),
        tokens: t,
    }
}

impl NeuronProfile {
    /// How often each neuron fires (the diagonal of the co-activation matrix), `[I]`; `None`
    /// without co-activations.
    pub fn firing_rate(&self) -> Option<Vec<f32>> {
        let i = self.importance.len();
        let co = self.coactivation.as_ref()?;
        Some((0..i).map(|j| co[j * i + j]).collect())
    }
}
