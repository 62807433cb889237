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
}
