//! The Flex implementation: contiguous f32 views of the tensors, then [`super::kernel`].

use burn::backend::Flex;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::extension::MoeKernels;
use super::kernel::{self, Grads, Problem};
use super::scratch;
use crate::activation::Activation;

/// A contiguous copy-free (when already contiguous) f32 view.
pub(super) fn f32s(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "fused MoE dispatch runs in f32");
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

pub(super) fn indices(t: &FlexTensor) -> Vec<usize> {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::I64 => t
            .as_slice::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as usize)
            .collect(),
        DType::I32 => t
            .as_slice::<i32>()
            .unwrap()
            .iter()
            .map(|&v| v as usize)
            .collect(),
        DType::U32 => t
            .as_slice::<u32>()
            .unwrap()
            .iter()
            .map(|&v| v as usize)
            .collect(),
        other => panic!("fused MoE dispatch: unsupported index dtype {other:?}"),
    }
}

pub(super) fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// Everything a backward pass needs, kept from the forward pass.
#[derive(Debug, Clone)]
pub(super) struct Saved {
    pub x: FlexTensor,
    pub w_in: FlexTensor,
    pub w_out: FlexTensor,
    pub rows: Vec<usize>,
    pub weights: FlexTensor,
    pub offsets: Vec<usize>,
    pub activation: Activation,
    /// Pre-activations `[N, in_width(I)]`, a pooled buffer.
    pub pre: Vec<f32>,
}

fn problem<'a>(
    x: &FlexTensor,
    w_out: &FlexTensor,
    rows: &'a [usize],
    offsets: &'a [usize],
    activation: Activation,
) -> Problem<'a> {
    let xs = x.layout().shape();
    let ws = w_out.layout().shape();
    Problem {
        tokens: xs[0],
        hidden: xs[1],
        inter: ws[1],
        activation,
        offsets,
        rows,
    }
}

/// Forward on Flex, returning the output and, with `keep`, what backward needs.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    x: FlexTensor,
    w_in: FlexTensor,
    w_out: FlexTensor,
    rows: FlexTensor,
    weights: FlexTensor,
    offsets: Vec<usize>,
    activation: Activation,
    keep: bool,
) -> (FlexTensor, Option<Saved>) {
    let rows = indices(&rows);
    let p = problem(&x, &w_out, &rows, &offsets, activation);
    let shape = vec![p.tokens, p.hidden];
    let (y, pre) = kernel::forward(
        &p,
        &f32s(&x),
        &f32s(&w_in),
        &f32s(&w_out),
        &f32s(&weights),
        keep,
    );
    let saved = pre.map(|pre| Saved {
        x,
        w_in,
        w_out,
        rows,
        weights,
        offsets,
        activation,
        pre,
    });
    (tensor(y, shape), saved)
}

/// Backward on Flex: gradients of `(x, w_in, w_out, weights)`.
pub(super) fn backward(s: Saved, dy: FlexTensor) -> [FlexTensor; 4] {
    let p = problem(&s.x, &s.w_out, &s.rows, &s.offsets, s.activation);
    let Grads {
        x,
        w_in,
        w_out,
        weights,
    } = kernel::backward(
        &p,
        &f32s(&dy),
        &f32s(&s.x),
        &f32s(&s.w_in),
        &f32s(&s.w_out),
        &f32s(&s.weights),
        &s.pre,
    );
    let shape = |t: &FlexTensor| t.layout().shape().to_vec();
    let grads = [
        tensor(x, shape(&s.x)),
        tensor(w_in, shape(&s.w_in)),
        tensor(w_out, shape(&s.w_out)),
        tensor(weights, shape(&s.weights)),
    ];
    scratch::give(s.pre);
    grads
}

impl MoeKernels for Flex {
    fn grouped_ffn(
        x: FloatTensor<Self>,
        w_in: FloatTensor<Self>,
        w_out: FloatTensor<Self>,
        rows: IntTensor<Self>,
        weights: FloatTensor<Self>,
        offsets: Vec<usize>,
        activation: Activation,
    ) -> FloatTensor<Self> {
        forward(x, w_in, w_out, rows, weights, offsets, activation, false).0
    }

    fn top_k_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        let shape = scores.layout().shape().to_vec();
        let ids = kernel::top_k_indices(&f32s(&scores), shape[1], k);
        FlexTensor::from_data(TensorData::new(ids, [shape[0], k]))
    }
}
