//! Calibration text: files and directories of text, tokenised into one token stream.

use std::path::{Path, PathBuf};

use moekit_llama::Tokenizer;

use crate::error::{Result, UpcycleError};

/// Every regular file under `paths` (directories are walked recursively, in name order), in
/// the order given. Hidden files and directories (names starting with `.`) are skipped.
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let meta = std::fs::metadata(path).map_err(|e| UpcycleError::io(path, e))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| UpcycleError::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    !p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
                })
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else {
            out.push(path.to_path_buf());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    Ok(out)
}

/// Tokenises the files in order and concatenates their ids, stopping once `max_tokens` are
/// collected (the last file is cut; [`Tokenizer::encode_file`] reads no more of it than the
/// cap needs). Files that are not UTF-8 text are an error.
pub fn tokens(tokenizer: &Tokenizer, files: &[PathBuf], max_tokens: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for f in files {
        if ids.len() >= max_tokens {
            break;
        }
        ids.extend(tokenizer.encode_file(f, Some(max_tokens - ids.len()))?);
    }
    ids.truncate(max_tokens);
    if ids.len() < 2 {
        return Err(UpcycleError::Calibration(format!(
            "{} calibration tokens from {} files; give more text",
            ids.len(),
            files.len()
        )));
    }
    Ok(ids)
}
