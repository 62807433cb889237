//! Atomic file writes: a temporary file in the same directory, then a rename.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{LlamaError, Result};

/// Temporary files made by this process so far.
static MADE: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name beside `path`: `.NAME.PID.NANOS.N.tmp`, unique within the process
/// and, through the time, across processes that share a directory but not a PID namespace
/// (containers on one volume). The file is opened with `create_new`, so a name already taken
/// is never truncated.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_os_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = MADE.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.{nanos:x}.{n}.tmp", std::process::id()));
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
    // A name someone else holds is theirs: the error leaves it alone.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| LlamaError::io(&tmp, e))?;
    let result = (|| {
        let mut writer = std::io::BufWriter::new(file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the folder is synced.
        sync_dir_io(path.parent().unwrap_or(Path::new(".")))
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        LlamaError::io(path, e)
    })
}

/// Syncs the folder `dir`, so that renames and removals in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    sync_dir_io(dir).map_err(|e| LlamaError::io(dir, e))
}

fn sync_dir_io(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // Folders can be opened and synced on Unix; elsewhere this is not possible and not needed.
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert_ne!(temp_path(&path), temp_path(&path));
        write(&path, b"old").unwrap();
        write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // A failing writer keeps the old file and removes its temporary one.
        let err = write_with(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config.json"]);
    }
}
