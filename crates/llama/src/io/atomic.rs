//! Atomic file writes: a temporary file in the same directory, then a rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{LlamaError, Result};

/// The temporary name `path` is written under before it is renamed into place.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_os_string());
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(tmp)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
/// partial file.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |file| file.write_all(bytes))
}

/// Like [`write`], with the content produced by `fill` into a temporary file, which is
/// synced and renamed to `path` only if `fill` succeeds.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut writer = std::io::BufWriter::new(file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        LlamaError::io(path, e)
    })
}
