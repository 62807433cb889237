//! JSON files of profiles and policies, written atomically.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, RouterError};

/// Writes `value` as pretty JSON to `path` (temporary file + rename: a crash leaves the old
/// file or the new one).
pub fn save_json<T: Serialize>(value: &T, path: &Path) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| RouterError::Parse {
        path: path.into(),
        reason: e.to_string(),
    })?;
    moekit_llama::io::atomic::write(path, &bytes).map_err(Into::into)
}

/// Reads JSON of type `T` from `path`.
pub fn load_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| RouterError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| RouterError::Parse {
        path: path.into(),
        reason: e.to_string(),
    })
}
