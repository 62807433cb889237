//! Tensors on the host, in row-major f32, as files hold them.

use burn::tensor::{Device, Tensor, TensorData};

/// A row-major f32 tensor read from or written to a checkpoint.
///
/// Shapes follow PyTorch: a linear weight is `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`. `data.len()` must equal the shape's product.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Zeros of `shape`.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self::new(shape, vec![0.0; n])
    }

    /// Copies a device tensor to the host.
    pub fn from_tensor<const D: usize>(tensor: Tensor<D>) -> Self {
        let shape = tensor.dims().to_vec();
        let data = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("converted to f32");
        Self::new(shape, data)
    }

    /// Moves the tensor to `device`. `D` must equal the rank.
    pub fn to_tensor<const D: usize>(self, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.data, self.shape), device)
    }

    /// The transpose of a matrix (`[r, c]` → `[c, r]`), in cache-friendly tiles.
    pub fn transpose(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0f32; r * c];
        const TILE: usize = 32;
        for i0 in (0..r).step_by(TILE) {
            for j0 in (0..c).step_by(TILE) {
                for i in i0..(i0 + TILE).min(r) {
                    for j in j0..(j0 + TILE).min(c) {
                        out[j * r + i] = self.data[i * c + j];
                    }
                }
            }
        }
        Self::new(vec![c, r], out)
    }

    /// Row-wise concatenation of matrices with equal row counts: `[r, a] ++ [r, b]` → `[r, a+b]`.
    pub fn concat_cols(parts: &[&HostTensor]) -> Self {
        let r = parts[0].shape[0];
        let width: usize = parts.iter().map(|p| p.shape[1]).sum();
        let mut data = Vec::with_capacity(r * width);
        for i in 0..r {
            for p in parts {
                let c = p.shape[1];
                data.extend_from_slice(&p.data[i * c..(i + 1) * c]);
            }
        }
        Self::new(vec![r, width], data)
    }

    /// Columns `start..start + len` of a matrix.
    pub fn cols(&self, start: usize, len: usize) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = Vec::with_capacity(r * len);
        for i in 0..r {
            data.extend_from_slice(&self.data[i * c + start..i * c + start + len]);
        }
        Self::new(vec![r, len], data)
    }

    /// Stacks tensors of one shape along a new leading dimension.
    pub fn stack(parts: &[HostTensor]) -> Self {
        let mut shape = vec![parts.len()];
        shape.extend_from_slice(&parts[0].shape);
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Self::new(shape, data)
    }

    /// Slice `i` along the leading dimension.
    pub fn index(&self, i: usize) -> Self {
        let inner: usize = self.shape[1..].iter().product();
        Self::new(
            self.shape[1..].to_vec(),
            self.data[i * inner..(i + 1) * inner].to_vec(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_concat_and_slices_agree_with_index_arithmetic() {
        let a = HostTensor::new(vec![3, 37], (0..111).map(|v| v as f32).collect());
        let t = a.transpose();
        assert_eq!(t.shape, vec![37, 3]);
        for i in 0..3 {
            for j in 0..37 {
                assert_eq!(t.data[j * 3 + i], a.data[i * 37 + j]);
            }
        }
        assert_eq!(t.transpose(), a);
        let b = HostTensor::new(vec![3, 2], vec![-1.0; 6]);
        let ab = HostTensor::concat_cols(&[&a, &b]);
        assert_eq!(ab.cols(0, 37), a);
        assert_eq!(ab.cols(37, 2), b);
        let s = HostTensor::stack(&[a.clone(), a.clone()]);
        assert_eq!(s.index(1), a);
    }
}
