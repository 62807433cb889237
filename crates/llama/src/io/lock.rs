//! One writer per folder: an exclusive advisory lock held while a run writes into it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::{LlamaError, Result};

/// The lock file a [`FolderLock`] holds in its folder.
pub const LOCK_FILE: &str = ".moekit.lock";

/// An exclusive lock on a folder (an output or work folder), released when dropped or when
/// the process ends, however it ends (the operating system drops advisory locks with the
/// process, `kill -9` included). Dropped, it leaves its lock file; a run that finished its
/// work calls [`FolderLock::release`], which removes it (a run starting in that instant would
/// lock a new file: harmless, as nothing is left to write).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    folder: PathBuf,
}

impl FolderLock {
    /// Locks `folder` (created if needed), or fails with [`LlamaError::Busy`] at once if another
    /// process holds it.
    pub fn acquire(folder: &Path) -> Result<Self> {
        std::fs::create_dir_all(folder).map_err(|e| LlamaError::io(folder, e))?;
        let path = folder.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LlamaError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                _file: file,
                folder: folder.to_path_buf(),
            }),
            Err(TryLockError::WouldBlock) => Err(LlamaError::Busy {
                path: folder.to_path_buf(),
            }),
            Err(TryLockError::Error(e)) => Err(LlamaError::io(&path, e)),
        }
    }

    /// The locked folder.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Removes the lock file, then releases the lock: for a run whose work in the folder is
    /// done, so that a finished model folder holds only the model.
    pub fn release(self) -> Result<()> {
        let path = self.folder.join(LOCK_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LlamaError::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_is_busy_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let lock = FolderLock::acquire(&out).unwrap();
        assert_eq!(lock.folder(), out);
        let err = FolderLock::acquire(&out).unwrap_err();
        assert!(matches!(err, LlamaError::Busy { .. }), "{err}");
        drop(lock);
        let lock = FolderLock::acquire(&out).unwrap();
        lock.release().unwrap();
        assert!(!out.join(LOCK_FILE).exists());
    }
}
