//! Where the loader reads weights from.

use std::path::Path;

use super::host::HostTensor;
use crate::Result;

/// A checkpoint that yields tensors by name, de-quantised or converted to f32.
pub trait TensorSource {
    /// The file or directory, for messages.
    fn path(&self) -> &Path;

    /// Reads `name`, or `None` if the checkpoint does not hold it.
    fn read(&self, name: &str) -> Result<Option<HostTensor>>;

    /// Every tensor name the checkpoint holds, sorted.
    fn names(&self) -> Vec<String>;

    /// The shape of `name` (PyTorch order), or `None` if the checkpoint does not hold it;
    /// no data is read.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;

    /// Reads the rows `rows` (indices into the first dimension, in the order given) of `name`
    /// as a `[rows.len(), ...]` tensor, or `None` if the checkpoint does not hold it. What
    /// layer-at-a-time work reads of the embedding and the LM head: a few rows, or a block of
    /// the vocabulary, never the whole matrix in f32. Sources that can address rows in place
    /// (memory-mapped safetensors, GGUF) override the default, which reads the whole tensor.
    fn read_rows(&self, name: &str, rows: &[usize]) -> Result<Option<HostTensor>> {
        let Some(t) = self.read(name)? else {
            return Ok(None);
        };
        let width: usize = t.shape[1..].iter().product();
        check_rows(self.path(), name, t.shape[0], rows)?;
        let data = rows
            .iter()
            .flat_map(|&r| t.data[r * width..(r + 1) * width].iter().copied())
            .collect();
        Ok(Some(HostTensor::new(row_shape(&t.shape, rows.len()), data)))
    }
}

/// The shape of `count` rows of a tensor of `shape`.
pub(crate) fn row_shape(shape: &[usize], count: usize) -> Vec<usize> {
    let mut out = shape.to_vec();
    out[0] = count;
    out
}

/// Refuses a row index past `len`, naming the tensor.
pub(crate) fn check_rows(path: &Path, name: &str, len: usize, rows: &[usize]) -> Result<()> {
    match rows.iter().find(|&&r| r >= len) {
        Some(r) => Err(crate::LlamaError::Input(format!(
            "{}: row {r} of `{name}` asked for, but it has {len} rows",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Refuses values that are not finite (NaN or ±inf, from a damaged or badly converted file):
/// they would turn every later result into NaN, or into a number that looks like an answer.
/// Every reader of weights calls it on what it decodes.
pub(crate) fn check_finite(path: &Path, name: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(crate::LlamaError::corrupt(
            path,
            format!(
                "`{name}` holds a non-finite value ({}) at element {i}",
                values[i]
            ),
        )),
        None => Ok(()),
    }
}

/// `rows` cut into runs of consecutive rows, as index ranges into `rows`: what row readers read
/// and decode at once (a block of the vocabulary is one run).
pub(crate) fn consecutive_runs(rows: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && rows[j] == rows[j - 1] + 1 {
            j += 1;
        }
        runs.push(i..j);
        i = j;
    }
    runs
}
