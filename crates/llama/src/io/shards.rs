//! A Hugging Face checkpoint written part by part: each part (a decoder layer, the embedding,
//! ...) is a safetensors file in a staging folder as soon as it is finished, and
//! [`ShardedWriter::finish`] packs the parts into shards of at most `max_shard_bytes` with
//! `model.safetensors.index.json`, as transformers' `save_pretrained` writes them.
//!
//! Memory follows one part (one tensor's row block while it is encoded); a part already in
//! the staging folder is not written again, so a rerun after a crash resumes at the first
//! missing part. Shards are copied from the parts by the kernel (`std::io::copy` uses
//! `copy_file_range` between files), and each output file is written atomically.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::atomic;
use super::safetensors::{RowSource, SaveDtype, write_rows};
use crate::{LlamaError, Result};

/// transformers' default largest shard (`max_shard_size="5GB"`).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The name transformers gives shard `i` (1-based) of `n`.
fn shard_name(stem: &str, i: usize, n: usize) -> String {
    format!("{stem}-{i:05}-of-{n:05}.safetensors")
}

/// Whether `name` is a shard name of [`shard_name`]'s form.
fn is_shard_name(stem: &str, name: &str) -> bool {
    name.strip_prefix(stem)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|x| x.len() == 5 && x.bytes().all(|c| c.is_ascii_digit()))
        })
}

/// Writes a checkpoint's tensors part by part into `staging`, then shards them into `dir`.
#[derive(Debug)]
pub struct ShardedWriter {
    dir: PathBuf,
    staging: PathBuf,
    dtype: SaveDtype,
    max_shard_bytes: u64,
    stem: String,
    parts: Vec<String>,
}

/// One part's header: `(name, dtype, shape, [start, end))` of each tensor, and where its data
/// starts.
struct PartHeader {
    tensors: Vec<(String, Value)>,
    data_start: u64,
    data_len: u64,
}

fn read_header(path: &Path) -> Result<PartHeader> {
    let mut file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| LlamaError::io(path, e))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata().map_err(|e| LlamaError::io(path, e))?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(LlamaError::corrupt(
            path,
            "safetensors header runs past the file",
        ));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| LlamaError::io(path, e))?;
    let map: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| LlamaError::corrupt(path, format!("invalid safetensors header: {e}")))?;
    let mut tensors: Vec<(String, Value)> = map
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .collect();
    let start = |v: &Value| v["data_offsets"][0].as_u64().unwrap_or(0);
    tensors.sort_by_key(|(_, v)| start(v));
    let data_len = tensors
        .iter()
        .map(|(_, v)| v["data_offsets"][1].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    if 8 + len + data_len != size {
        return Err(LlamaError::corrupt(
            path,
            "the file's size does not match its header (written partly?)",
        ));
    }
    Ok(PartHeader {
        tensors,
        data_start: 8 + len,
        data_len,
    })
}

impl ShardedWriter {
    /// A writer of the checkpoint in `dir`, staging parts in `staging` (created if needed;
    /// parts already there from an interrupted run are kept and reused).
    pub fn new(dir: &Path, staging: &Path, dtype: SaveDtype) -> Result<Self> {
        std::fs::create_dir_all(staging).map_err(|e| LlamaError::io(staging, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            staging: staging.to_path_buf(),
            dtype,
            max_shard_bytes: MAX_SHARD_BYTES,
            stem: "model".into(),
            parts: Vec::new(),
        })
    }

    /// Shards of at most `bytes` (a part larger than that is a shard of its own).
    pub fn with_max_shard_bytes(mut self, bytes: u64) -> Self {
        self.max_shard_bytes = bytes.max(1);
        self
    }

    /// Output files named `STEM.safetensors`, or `STEM-0000i-of-0000n.safetensors` with
    /// `STEM.safetensors.index.json` (default `model`).
    pub fn with_stem(mut self, stem: &str) -> Self {
        self.stem = stem.into();
        self
    }

    /// Whether any part was named.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    fn part_path(&self, part: &str) -> PathBuf {
        self.staging.join(format!("{part}.safetensors"))
    }

    /// Whether part `part` is already staged whole (from an earlier, interrupted run).
    pub fn has_part(&self, part: &str) -> bool {
        read_header(&self.part_path(part)).is_ok()
    }

    /// Stages part `part` (a file name without extension, e.g. `layer-007`) holding
    /// `tensors` in that order, unless it is already staged; parts go into the shards in the
    /// order they are first named here.
    pub fn put(&mut self, part: &str, tensors: &[(String, &dyn RowSource)]) -> Result<()> {
        if !self.has_part(part) {
            write_rows(&self.part_path(part), tensors, self.dtype)?;
        }
        self.note(part);
        Ok(())
    }

    /// Names an already staged part (see [`ShardedWriter::has_part`]) in its place in the
    /// order.
    pub fn reuse(&mut self, part: &str) -> Result<()> {
        if !self.planned(part) {
            read_header(&self.part_path(part))?;
        }
        self.note(part);
        Ok(())
    }

    fn note(&mut self, part: &str) {
        if !self.parts.iter().any(|p| p == part) {
            self.parts.push(part.to_string());
        }
    }

    /// Packs the staged parts into shards in `dir` (one `model.safetensors` when they fit in
    /// one shard), writes the index, removes shards of an earlier save that the new ones do not
    /// replace, and deletes the staged parts. Returns the shard file names.
    ///
    /// Each shard's parts are deleted as soon as it is written, so the disk holds at most one
    /// shard twice, not the model. The plan of the shards is saved first (`plan.json` in the
    /// staging folder): a finish cut short is taken up again by the next one, parts that went
    /// into a written shard included.
    pub fn finish(self) -> Result<Vec<String>> {
        std::fs::create_dir_all(&self.dir).map_err(|e| LlamaError::io(&self.dir, e))?;
        let plan = match self.read_plan()? {
            Some(plan) => plan,
            None => {
                let plan = self.plan()?;
                let text = serde_json::to_vec(&plan).expect("a plan serialises");
                atomic::write(&self.plan_path(), &text)?;
                plan
            }
        };
        for shard in &plan.shards {
            self.write_shard(shard)?;
        }
        let names: Vec<String> = plan.shards.iter().map(|s| s.file.clone()).collect();
        let n = names.len();
        let single = format!("{}.safetensors", self.stem);
        let index_name = format!("{single}.index.json");
        if n > 1 {
            let text = serde_json::to_string_pretty(&json!({
                "metadata": {"total_size": plan.total},
                "weight_map": plan.weight_map,
            }))
            .expect("JSON serialises");
            atomic::write(&self.dir.join(&index_name), text.as_bytes())?;
        }
        // Files of an earlier save that would shadow or contradict this one.
        let read = |e| LlamaError::io(&self.dir, e);
        for entry in std::fs::read_dir(&self.dir).map_err(read)? {
            let entry = entry.map_err(read)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = (is_shard_name(&self.stem, &name) && !names.contains(&name))
                || (n > 1 && name == single)
                || (n == 1 && name == index_name);
            if stale {
                std::fs::remove_file(entry.path()).map_err(|e| LlamaError::io(entry.path(), e))?;
            }
        }
        atomic::sync_dir(&self.dir)?;
        std::fs::remove_file(self.plan_path()).map_err(|e| LlamaError::io(self.plan_path(), e))?;
        if std::fs::read_dir(&self.staging).is_ok_and(|mut d| d.next().is_none()) {
            let _ = std::fs::remove_dir(&self.staging);
        }
        Ok(names)
    }

    /// Writes one shard of the plan from its parts (unless a finish cut short wrote it and
    /// deleted them), then deletes its parts.
    fn write_shard(&self, shard: &ShardPlan) -> Result<()> {
        let out = self.dir.join(&shard.file);
        let paths: Vec<PathBuf> = shard.parts.iter().map(|p| self.part_path(&p.0)).collect();
        if paths.iter().all(|p| p.exists()) {
            atomic::write_with(&out, |w| {
                w.write_all(&(shard.header.len() as u64).to_le_bytes())?;
                w.write_all(shard.header.as_bytes())?;
                w.flush()?;
                for (path, (_, start, len)) in paths.iter().zip(&shard.parts) {
                    let mut part = std::fs::File::open(path)?;
                    part.seek(SeekFrom::Start(*start))?;
                    let copied = std::io::copy(&mut part.take(*len), w.get_mut())?;
                    if copied != *len {
                        return Err(std::io::Error::other(format!(
                            "{} ended early",
                            path.display()
                        )));
                    }
                }
                Ok(())
            })?;
        } else if !out.exists() {
            return Err(LlamaError::corrupt(
                &self.staging,
                format!(
                    "parts of {} are missing and the shard was not written; delete the \
                     work directory to start over",
                    shard.file
                ),
            ));
        }
        for path in paths.iter().filter(|p| p.exists()) {
            std::fs::remove_file(path).map_err(|e| LlamaError::io(path, e))?;
        }
        Ok(())
    }

    fn plan_path(&self) -> PathBuf {
        self.staging.join("plan.json")
    }

    fn read_plan(&self) -> Result<Option<Plan>> {
        let path = self.plan_path();
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| LlamaError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| LlamaError::corrupt(&path, format!("unreadable shard plan: {e}")))
    }

    /// Whether `part` went into a shard of a finish that was cut short.
    fn planned(&self, part: &str) -> bool {
        self.read_plan()
            .ok()
            .flatten()
            .is_some_and(|p| p.shards.iter().any(|s| s.parts.iter().any(|x| x.0 == part)))
    }

    /// The shards of the named parts: consecutive parts while they fit.
    fn plan(&self) -> Result<Plan> {
        let headers: Vec<(String, PartHeader)> = self
            .parts
            .iter()
            .map(|p| read_header(&self.part_path(p)).map(|h| (p.clone(), h)))
            .collect::<Result<_>>()?;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut size = 0u64;
        for (i, (_, h)) in headers.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if size + h.data_len <= self.max_shard_bytes => {
                    g.push(i);
                    size += h.data_len;
                }
                _ => {
                    groups.push(vec![i]);
                    size = h.data_len;
                }
            }
        }
        let n = groups.len();
        let mut plan = Plan {
            shards: Vec::new(),
            weight_map: BTreeMap::new(),
            total: 0,
        };
        for (k, group) in groups.iter().enumerate() {
            let file = if n == 1 {
                format!("{}.safetensors", self.stem)
            } else {
                shard_name(&self.stem, k + 1, n)
            };
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), json!({"format": "pt"}));
            let mut offset = 0u64;
            let mut parts = Vec::new();
            for &i in group {
                let (part, h) = &headers[i];
                for (name, info) in &h.tensors {
                    let (a, b) = (
                        info["data_offsets"][0].as_u64().unwrap_or(0),
                        info["data_offsets"][1].as_u64().unwrap_or(0),
                    );
                    let mut info = info.clone();
                    info["data_offsets"] = json!([offset + a, offset + b]);
                    header.insert(name.clone(), info);
                    plan.weight_map.insert(name.clone(), file.clone());
                }
                offset += h.data_len;
                parts.push((part.clone(), h.data_start, h.data_len));
            }
            plan.total += offset;
            let mut header = serde_json::to_string(&header).expect("a JSON map serialises");
            while !header.len().is_multiple_of(8) {
                header.push(' ');
            }
            plan.shards.push(ShardPlan {
                file,
                header,
                parts,
            });
        }
        Ok(plan)
    }
}

/// How staged parts become shards (saved while a finish runs, so that it can be resumed).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Plan {
    shards: Vec<ShardPlan>,
    weight_map: BTreeMap<String, String>,
    total: u64,
}

/// One shard: its file name, its header, and its parts' `(name, data start, data length)`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ShardPlan {
    file: String,
    header: String,
    parts: Vec<(String, u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::host::HostTensor;
    use crate::io::safetensors::SafetensorsDir;
    use crate::io::source::TensorSource;

    fn tensor(n: usize, seed: f32) -> HostTensor {
        HostTensor::new(vec![n, 3], (0..n * 3).map(|i| seed + i as f32).collect())
    }

    #[test]
    fn parts_pack_into_shards_that_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        let staging = dir.path().join("parts");
        let parts: Vec<Vec<(String, HostTensor)>> = (0..5)
            .map(|p| {
                (0..2)
                    .map(|t| {
                        (
                            format!("p{p}.t{t}"),
                            tensor(4 + p + t, (p * 100 + t) as f32),
                        )
                    })
                    .collect()
            })
            .collect();
        let part_bytes = |p: &Vec<(String, HostTensor)>| {
            p.iter().map(|(_, t)| 4 * t.data.len() as u64).sum::<u64>()
        };
        // Room for two of the small parts per shard.
        let max = part_bytes(&parts[0]) + part_bytes(&parts[1]);
        let mut writer = ShardedWriter::new(&out, &staging, SaveDtype::F32)
            .unwrap()
            .with_max_shard_bytes(max);
        for (p, tensors) in parts.iter().enumerate() {
            let refs: Vec<(String, &dyn RowSource)> = tensors
                .iter()
                .map(|(n, t)| (n.clone(), t as &dyn RowSource))
                .collect();
            writer.put(&format!("part-{p}"), &refs).unwrap();
        }
        let shards = writer.finish().unwrap();
        assert!(shards.len() >= 3, "{shards:?}");
        assert!(shards.iter().all(|s| is_shard_name("model", s)));
        assert!(!staging.exists(), "staged parts are removed");
        let read = SafetensorsDir::open(&out).unwrap();
        for (name, t) in parts.iter().flatten() {
            assert_eq!(read.read(name).unwrap().as_ref(), Some(t), "{name}");
        }
        // A second save that fits one file replaces the shards and the index.
        let mut writer = ShardedWriter::new(&out, &staging, SaveDtype::F32).unwrap();
        let t = tensor(2, 7.0);
        writer
            .put("only", &[("x".into(), &t as &dyn RowSource)])
            .unwrap();
        assert_eq!(writer.finish().unwrap(), ["model.safetensors"]);
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["model.safetensors"]);
        assert_eq!(
            SafetensorsDir::open(&out).unwrap().read("x").unwrap(),
            Some(t)
        );
    }

    #[test]
    fn a_finish_cut_short_is_taken_up_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (out, staging) = (dir.path().join("m"), dir.path().join("s"));
        let tensors: Vec<HostTensor> = (0..3).map(|p| tensor(4, p as f32 * 10.0)).collect();
        let mut writer = ShardedWriter::new(&out, &staging, SaveDtype::F32)
            .unwrap()
            .with_max_shard_bytes(48);
        for (p, t) in tensors.iter().enumerate() {
            writer
                .put(&format!("p{p}"), &[(format!("t{p}"), t as &dyn RowSource)])
                .unwrap();
        }
        // The first shard is written and its part deleted; then the process dies.
        let plan = writer.plan().unwrap();
        assert_eq!(plan.shards.len(), 3);
        atomic::write(&writer.plan_path(), &serde_json::to_vec(&plan).unwrap()).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        writer.write_shard(&plan.shards[0]).unwrap();
        assert!(!staging.join("p0.safetensors").exists());
        // A rerun names every part again, as its pipeline does, and finishes.
        let mut again = ShardedWriter::new(&out, &staging, SaveDtype::F32).unwrap();
        for p in 0..3 {
            again.reuse(&format!("p{p}")).unwrap();
        }
        assert_eq!(again.finish().unwrap().len(), 3);
        let read = SafetensorsDir::open(&out).unwrap();
        for (p, t) in tensors.iter().enumerate() {
            assert_eq!(read.read(&format!("t{p}")).unwrap().as_ref(), Some(t));
        }
        assert!(!staging.exists());
    }

    #[test]
    fn a_staged_part_is_reused_and_a_truncated_one_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (out, staging) = (dir.path().join("m"), dir.path().join("s"));
        let t = tensor(3, 1.0);
        let mut writer = ShardedWriter::new(&out, &staging, SaveDtype::BF16).unwrap();
        writer
            .put("a", &[("a".into(), &t as &dyn RowSource)])
            .unwrap();
        let path = staging.join("a.safetensors");
        let written = std::fs::metadata(&path).unwrap().modified().unwrap();
        // A rerun keeps the staged part as it is.
        let mut again = ShardedWriter::new(&out, &staging, SaveDtype::BF16).unwrap();
        assert!(again.has_part("a"));
        again
            .put("a", &[("a".into(), &t as &dyn RowSource)])
            .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            written
        );
        // A part cut short (a crash outside the atomic writer, a full disk) is not reused.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(!again.has_part("a"));
        assert!(again.reuse("a").is_err());
        again
            .put("a", &[("a".into(), &t as &dyn RowSource)])
            .unwrap();
        again.finish().unwrap();
        let read = SafetensorsDir::open(&out)
            .unwrap()
            .read("a")
            .unwrap()
            .unwrap();
        assert_eq!(read, t, "small integers are exact in bf16");
    }
}
