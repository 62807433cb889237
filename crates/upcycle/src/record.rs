//! Recording each FFN's input and output on calibration tokens, in memory or streamed to disk.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use moekit_llama::Llama;
use serde::{Deserialize, Serialize};

use crate::error::{Result, UpcycleError};

/// How calibration tokens are run through the dense model.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// Tokens per sequence (each starts a fresh context).
    pub seq_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
    /// Activations kept in memory up to this many bytes; past it they are streamed to files
    /// in the work directory.
    pub memory_budget: usize,
    /// Identifies the model and text; a work directory recorded with another fingerprint is
    /// recorded again.
    pub fingerprint: String,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            seq_len: 512,
            batch: 4,
            memory_budget: 2 << 30,
            fingerprint: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Manifest {
    fingerprint: String,
    tokens: usize,
    hidden: usize,
    layers: usize,
}

const MANIFEST: &str = "activations.json";

#[derive(Debug)]
enum Backing {
    Memory(Vec<(Vec<f32>, Vec<f32>)>),
    Disk(PathBuf),
}

/// Each layer's FFN inputs `x` and outputs `y = FFN(x)` on the same `N` calibration tokens.
#[derive(Debug)]
pub struct ActivationStore {
    tokens: usize,
    hidden: usize,
    layers: usize,
    backing: Backing,
}

fn file(dir: &Path, layer: usize, what: &str) -> PathBuf {
    dir.join(format!("layer{layer:03}.{what}.f32"))
}

/// Every recording file in write order: layer 0's `x`, layer 0's `y`, layer 1's `x`, ...
fn recording_files(dir: &Path, layers: usize) -> Vec<PathBuf> {
    (0..layers)
        .flat_map(|l| ["x", "y"].map(|w| file(dir, l, w)))
        .collect()
}

fn to_vec(t: &Tensor<3>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// `expected` little-endian f32s from the work-directory file `path`; another size is a
/// [`UpcycleError::WorkDir`] (a file cut short).
pub(crate) fn read_f32(path: &Path, expected: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| UpcycleError::io(path, e))?;
    if bytes.len() != expected * 4 {
        return Err(UpcycleError::WorkDir {
            path: path.into(),
            reason: format!(
                "{} bytes, expected {}: the file is incomplete; delete the work directory",
                bytes.len(),
                expected * 4
            ),
        });
    }
    Ok(decode(&bytes).collect())
}

/// Bytes the current user may still write on the file system holding `dir`; `None` where
/// it cannot be asked.
fn available_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::fs::statvfs(dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Refuses a recording of `need` bytes in `dir` when only `free` bytes can be written there,
/// before any of the model has run (a full disk mid-recording wastes the run).
fn check_space(dir: &Path, need: u64, free: u64) -> Result<()> {
    if need > free {
        return Err(UpcycleError::WorkDir {
            path: dir.into(),
            reason: format!(
                "the recording needs {} MiB but only {} MiB are free there; give a work \
                 directory on a larger disk, or fewer calibration tokens",
                need.div_ceil(1 << 20),
                free >> 20
            ),
        });
    }
    Ok(())
}

/// Whether `name` is one this module writes into a work directory: the manifest or a
/// layer's `layerNNN.x.f32` / `layerNNN.y.f32`.
fn is_recording_file(name: &str) -> bool {
    name == MANIFEST
        || name
            .strip_prefix("layer")
            .and_then(|rest| rest.strip_suffix(".x.f32").or(rest.strip_suffix(".y.f32")))
            .is_some_and(|n| n.len() >= 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The little-endian `f32`s of a recording file's bytes.
fn decode(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl ActivationStore {
    /// Runs `model` over `tokens` (cut into `config.seq_len` windows; a last window of fewer
    /// than 2 tokens is dropped) and records every layer's FFN input and output. When they
    /// exceed `config.memory_budget` they are written to `work_dir` (required then), with a
    /// manifest; [`ActivationStore::open`] reuses them. A recording larger than the space
    /// left on `work_dir`'s file system is an [`UpcycleError::WorkDir`] before the model runs.
    /// `progress(done, total)` reports tokens.
    pub fn record(
        model: &Llama,
        tokens: &[u32],
        config: &RecordConfig,
        work_dir: Option<&Path>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let seq = config.seq_len.max(2);
        let windows: Vec<&[u32]> = tokens.chunks(seq).filter(|w| w.len() >= 2).collect();
        let n: usize = windows.iter().map(|w| w.len()).sum();
        if n == 0 {
            return Err(UpcycleError::Calibration(
                "no calibration tokens to record".into(),
            ));
        }
        let (hidden, layers) = (model.config.hidden_size, model.layers.len());
        let bytes = n * hidden * layers * 2 * 4;
        // The files written, in `writers`' order (none in memory).
        let mut paths = Vec::new();
        let backing = if bytes <= config.memory_budget {
            Backing::Memory(vec![(Vec::new(), Vec::new()); layers])
        } else {
            let dir = work_dir.ok_or_else(|| {
                UpcycleError::Config(format!(
                    "{} MiB of activations exceed the memory budget; give a work directory",
                    bytes >> 20
                ))
            })?;
            std::fs::create_dir_all(dir).map_err(|e| UpcycleError::io(dir, e))?;
            let _ = std::fs::remove_file(dir.join(MANIFEST));
            paths = recording_files(dir, layers);
            if let Some(free) = available_bytes(dir) {
                // Files of an earlier, unusable recording are truncated and count as free.
                let stale: u64 = paths
                    .iter()
                    .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
                    .sum();
                check_space(dir, bytes as u64, free + stale)?;
            }
            Backing::Disk(dir.to_path_buf())
        };
        let mut writers = paths
            .iter()
            .map(|p| {
                std::fs::File::create(p)
                    .map(std::io::BufWriter::new)
                    .map_err(|e| UpcycleError::io(p, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut backing = backing;
        tracing::info!(
            tokens = n,
            layers,
            mib = bytes >> 20,
            disk = matches!(backing, Backing::Disk(_)),
            "recording FFN activations"
        );
        let device = model.device();
        let mut done = 0;
        // Windows of one length go together; the last, shorter window runs alone.
        let mut start = 0;
        while start < windows.len() {
            let len = windows[start].len();
            let mut end = start + 1;
            while end < windows.len() && end - start < config.batch && windows[end].len() == len {
                end += 1;
            }
            let batch = &windows[start..end];
            let ids: Vec<i64> = batch
                .iter()
                .flat_map(|w| w.iter().map(|&t| t as i64))
                .collect();
            let toks: Tensor<2, Int> =
                Tensor::from_data(TensorData::new(ids, [batch.len(), len]), &device);
            let mut failure = None;
            model.forward_ffn_io(toks, &mut |l, x, y| {
                let (xs, ys) = (to_vec(x), to_vec(y));
                match &mut backing {
                    Backing::Memory(layers) => {
                        layers[l].0.extend(xs);
                        layers[l].1.extend(ys);
                    }
                    Backing::Disk(_) => {
                        for (k, v) in [(2 * l, xs), (2 * l + 1, ys)] {
                            let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                            if let Err(e) = writers[k].write_all(&bytes) {
                                failure.get_or_insert(UpcycleError::io(&paths[k], e));
                            }
                        }
                    }
                }
                Ok(())
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            done += batch.len() * len;
            progress(done, n);
            start = end;
        }
        if let Backing::Disk(dir) = &backing {
            for (w, path) in writers.into_iter().zip(&paths) {
                w.into_inner()
                    .map_err(|e| UpcycleError::io(path, e.into_error()))?
                    .sync_all()
                    .map_err(|e| UpcycleError::io(path, e))?;
            }
            let manifest = Manifest {
                fingerprint: config.fingerprint.clone(),
                tokens: n,
                hidden,
                layers,
            };
            let json = serde_json::to_vec_pretty(&manifest).expect("serialisable");
            moekit_llama::io::atomic::write(&dir.join(MANIFEST), &json)?;
        }
        Ok(Self {
            tokens: n,
            hidden,
            layers,
            backing,
        })
    }

    /// Reopens activations recorded to `dir` with the same `fingerprint`; `None` when there
    /// are none or they were recorded for something else.
    pub fn open(dir: &Path, fingerprint: &str) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| UpcycleError::WorkDir {
            path: path.clone(),
            reason: format!("unreadable manifest ({e}); delete the work directory"),
        })?;
        if m.fingerprint != fingerprint {
            return Ok(None);
        }
        // A missing or cut file is an incomplete recording: record again.
        let want = (m.tokens * m.hidden * 4) as u64;
        if recording_files(dir, m.layers)
            .iter()
            .any(|p| std::fs::metadata(p).map_or(0, |m| m.len()) != want)
        {
            return Ok(None);
        }
        Ok(Some(Self {
            tokens: m.tokens,
            hidden: m.hidden,
            layers: m.layers,
            backing: Backing::Disk(dir.to_path_buf()),
        }))
    }

    /// Deletes a recording from `dir`: its manifest and every `layerNNN.{x,y}.f32` file
    /// (a cut-off recording's too), and nothing else; returns how many files went. A missing
    /// directory holds nothing to delete.
    pub fn remove(dir: &Path) -> Result<usize> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(UpcycleError::io(dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| UpcycleError::io(dir, e))?;
            let name = entry.file_name();
            if is_recording_file(&name.to_string_lossy()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| UpcycleError::io(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Tokens recorded `N`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Layers recorded.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Whether the activations live in files rather than memory.
    pub fn on_disk(&self) -> bool {
        matches!(self.backing, Backing::Disk(_))
    }

    /// Layer `layer`'s FFN inputs and outputs as host rows, `N·H` values each.
    pub fn layer_host(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.host(layer, 0)?, self.host(layer, 1)?))
    }

    /// Model width `H`.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    fn host(&self, layer: usize, which: usize) -> Result<Vec<f32>> {
        if layer >= self.layers {
            return Err(UpcycleError::Config(format!(
                "layer {layer} was not recorded ({} layers)",
                self.layers
            )));
        }
        match &self.backing {
            Backing::Memory(l) => Ok(if which == 0 {
                l[layer].0.clone()
            } else {
                l[layer].1.clone()
            }),
            Backing::Disk(dir) => read_f32(
                &file(dir, layer, if which == 0 { "x" } else { "y" }),
                self.tokens * self.hidden,
            ),
        }
    }

    /// Layer `layer`'s FFN inputs and outputs, `[N, H]` each, on `device`.
    pub fn layer(&self, layer: usize, device: &Device) -> Result<(Tensor<2>, Tensor<2>)> {
        let shape = [self.tokens, self.hidden];
        let x = Tensor::from_data(TensorData::new(self.host(layer, 0)?, shape), device);
        let y = Tensor::from_data(TensorData::new(self.host(layer, 1)?, shape), device);
        Ok((x, y))
    }

    /// At most `max_tokens` of layer `layer`'s FFN inputs, evenly spaced over the recording,
    /// `[min(N, max_tokens), H]`.
    pub fn inputs(&self, layer: usize, max_tokens: usize, device: &Device) -> Result<Tensor<2>> {
        let h = self.hidden;
        let m = self.tokens.min(max_tokens.max(1));
        let picked = (0..m).map(|r| r * self.tokens / m);
        let rows: Vec<f32> = match &self.backing {
            // Only the picked rows are read from disk, not the whole layer.
            Backing::Disk(dir) if layer < self.layers => {
                use std::io::{Read, Seek, SeekFrom};
                let path = file(dir, layer, "x");
                let io = |e| UpcycleError::io(&path, e);
                let mut f = std::fs::File::open(&path).map_err(io)?;
                let mut row = vec![0u8; h * 4];
                let mut rows = Vec::with_capacity(m * h);
                for t in picked {
                    f.seek(SeekFrom::Start((t * h * 4) as u64)).map_err(io)?;
                    f.read_exact(&mut row).map_err(io)?;
                    rows.extend(decode(&row));
                }
                rows
            }
            _ => {
                let x = self.host(layer, 0)?;
                picked
                    .flat_map(|t| x[t * h..(t + 1) * h].iter().copied())
                    .collect()
            }
        };
        Ok(Tensor::from_data(TensorData::new(rows, [m, h]), device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_larger_than_the_free_space_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_space(dir.path(), 5 << 20, 5 << 20).is_ok());
        let err = check_space(dir.path(), (5 << 20) + 1, 5 << 20).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, UpcycleError::WorkDir { .. }), "{msg}");
        assert!(msg.contains("needs 6 MiB but only 5 MiB are free"), "{msg}");
        #[cfg(unix)]
        {
            // The real file system answers.
            let free = available_bytes(dir.path()).expect("statvfs on a temp dir");
            assert!(free > 0);
        }
    }
}
