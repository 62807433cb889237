//! Hugging Face safetensors: memory-mapped reading (single file or sharded with
//! `model.safetensors.index.json`) and atomic writing.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use serde_json::{Value, json};

use super::atomic;
use super::host::HostTensor;
use super::source::TensorSource;
use crate::{LlamaError, Result};

/// One `.safetensors` file: its header checked through a memory map, its data read with
/// positioned reads (see [`read_at`]).
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    file: std::fs::File,
    data_start: usize,
    metadata: Metadata,
}

/// The safetensors files of a model directory.
#[derive(Debug)]
pub struct SafetensorsDir {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
        // SAFETY: read-only map; the file must not be truncated while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LlamaError::io(path, e))?;
        let (header, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| LlamaError::corrupt(path, format!("invalid safetensors file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start: 8 + header,
            metadata,
        })
    }
}

impl SafetensorsDir {
    /// Opens `model.safetensors`, or every shard that `model.safetensors.index.json` lists.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| LlamaError::io(&index_path, e))?;
            let parsed: Value = serde_json::from_str(&text)
                .map_err(|e| LlamaError::corrupt(&index_path, format!("invalid JSON: {e}")))?;
            let map = parsed
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| LlamaError::corrupt(&index_path, "no `weight_map` object"))?;
            let mut files: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    LlamaError::corrupt(&index_path, format!("`{name}` maps to a non-string"))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(LlamaError::corrupt(
                        &index_path,
                        format!("shard name `{file}` leaves the model directory"),
                    ));
                }
                let next = files.len();
                let shard = *files.entry(file.to_string()).or_insert(next);
                index.insert(name.clone(), shard);
            }
            let mut ordered: Vec<_> = files.into_iter().collect();
            ordered.sort_by_key(|(_, i)| *i);
            for (file, _) in ordered {
                shards.push(Shard::open(&dir.join(file))?);
            }
            for (name, &s) in &index {
                if shards[s].metadata.info(name).is_none() {
                    return Err(LlamaError::corrupt(
                        &shards[s].path,
                        format!("the index puts `{name}` here, but the file does not hold it"),
                    ));
                }
            }
        } else {
            return Self::open_file(&dir.join("model.safetensors"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// Opens one safetensors file (e.g. PEFT's `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self> {
        let shard = Shard::open(path)?;
        let index = shard
            .metadata
            .tensors()
            .keys()
            .map(|name| (name.clone(), 0))
            .collect();
        Ok(Self {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            shards: vec![shard],
            index,
        })
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// The shape of `name` from the file's header (no data read), or `None` if it is absent.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &s = self.index.get(name)?;
        self.shards[s]
            .metadata
            .info(name)
            .map(|info| info.shape.clone())
    }

    /// The storage type of every tensor (`F32`, `BF16`, ...).
    pub fn dtypes(&self) -> Vec<String> {
        self.index
            .iter()
            .filter_map(|(name, &s)| self.shards[s].metadata.info(name))
            .map(|info| format!("{:?}", info.dtype))
            .collect()
    }
}

impl TensorSource for SafetensorsDir {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn names(&self) -> Vec<String> {
        SafetensorsDir::names(self)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        SafetensorsDir::shape(self, name)
    }

    fn read(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(shape) = self.shape(name) else {
            return Ok(None);
        };
        let rows: Vec<usize> = (0..shape.first().copied().unwrap_or(1)).collect();
        if shape.is_empty() {
            // A scalar: one "row" of one value.
            let (shard, info) = self.info(name).expect("listed");
            let data = decode_values(shard, name, info.dtype, &self.bytes(name, 0, 1)?)?;
            return Ok(Some(HostTensor::new(shape, data)));
        }
        self.read_rows(name, &rows)
    }

    fn read_rows(&self, name: &str, rows: &[usize]) -> Result<Option<HostTensor>> {
        let Some((shard, info)) = self.info(name) else {
            return Ok(None);
        };
        let shape = &info.shape;
        let len = shape.first().copied().unwrap_or(1);
        let width: usize = shape.iter().skip(1).product();
        super::source::check_rows(&shard.path, name, len, rows)?;
        let mut data = Vec::with_capacity(rows.len() * width);
        for run in super::source::consecutive_runs(rows) {
            let bytes = self.bytes(name, rows[run.start] * width, run.len() * width)?;
            data.extend(decode_values(shard, name, info.dtype, &bytes)?);
        }
        Ok(Some(HostTensor::new(
            super::source::row_shape(shape, rows.len()),
            data,
        )))
    }
}

impl SafetensorsDir {
    fn info(&self, name: &str) -> Option<(&Shard, &safetensors::tensor::TensorInfo)> {
        let &s = self.index.get(name)?;
        let shard = &self.shards[s];
        shard.metadata.info(name).map(|info| (shard, info))
    }

    /// The stored bytes of `count` values of `name` from value `start` on (within the
    /// tensor's extent, which the safetensors crate checked when the file was opened).
    fn bytes(&self, name: &str, start: usize, count: usize) -> Result<Vec<u8>> {
        let (shard, info) = self.info(name).expect("listed");
        let width = info.dtype.bitsize() / 8;
        let (a, _) = info.data_offsets;
        let from = shard.data_start + a + start * width;
        read_at(&shard.file, &shard.path, from, count * width)
    }

    /// The storage type of `name` (`F32`, `BF16`, ...), or `None` if it is absent.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.info(name).map(|(_, info)| info.dtype)
    }
}

/// `len` bytes of `file` from `offset`, read with a positioned read. Reading through the
/// memory map instead would leave every page of the checkpoint that was ever read in the
/// process's resident set (file-backed pages count there), so that a layer-at-a-time pass over
/// a 16 GB model would end with a 16 GB resident set; read like this, the pages stay in the
/// page cache, which the kernel gives back under pressure, and the resident set follows the
/// layer.
pub(crate) fn read_at(
    file: &std::fs::File,
    path: &Path,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, offset as u64)
            .map_err(|e| LlamaError::io(path, e))?;
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset as u64))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| LlamaError::io(path, e))?;
    }
    Ok(buf)
}

/// Stored values in `dtype` as f32.
fn decode_values(shard: &Shard, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let values = decode_raw(shard, name, dtype, bytes)?;
    super::source::check_finite(&shard.path, name, &values)?;
    Ok(values)
}

fn decode_raw(shard: &Shard, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(LlamaError::UnsupportedDtype {
                path: shard.path.clone(),
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// Storage type of written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    /// 32-bit float: lossless for moekit's f32 weights.
    #[default]
    F32,
    /// bfloat16 (round to nearest even).
    BF16,
    /// IEEE half.
    F16,
}

impl SaveDtype {
    /// The `torch_dtype` string for `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::BF16 => "BF16",
            Self::F16 => "F16",
        }
    }

    fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            Self::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Self::BF16 => values
                .iter()
                .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// A tensor to write, produced a block of rows at a time, so that a large tensor (an
/// embedding read from a checkpoint, say) never needs to be in memory whole.
pub trait RowSource {
    /// The tensor's shape, outermost first.
    fn shape(&self) -> Vec<usize>;
    /// `count` rows (of the first dimension) from row `start`, row-major.
    fn rows(&self, start: usize, count: usize) -> Result<Vec<f32>>;
}

impl RowSource for HostTensor {
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    fn rows(&self, start: usize, count: usize) -> Result<Vec<f32>> {
        let width: usize = self.shape.iter().skip(1).product();
        Ok(self.data[start * width..(start + count) * width].to_vec())
    }
}

/// A tensor of a checkpoint, copied row block by row block.
pub struct SourceRows<'a> {
    /// Where it is read from.
    pub source: &'a dyn TensorSource,
    /// Its name there.
    pub name: String,
    /// Its shape there.
    pub shape: Vec<usize>,
}

impl RowSource for SourceRows<'_> {
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    fn rows(&self, start: usize, count: usize) -> Result<Vec<f32>> {
        let rows: Vec<usize> = (start..start + count).collect();
        let t =
            self.source
                .read_rows(&self.name, &rows)?
                .ok_or_else(|| LlamaError::MissingTensor {
                    path: self.source.path().to_path_buf(),
                    name: self.name.clone(),
                })?;
        Ok(t.data)
    }
}

/// Values encoded per block of rows while writing (16 Mi values: 64 MiB of f32).
const WRITE_BLOCK_VALUES: usize = 16 << 20;

/// Writes `tensors` as one safetensors file at `path`, atomically, with the
/// `{"format": "pt"}` metadata transformers expects.
pub fn write(path: &Path, tensors: &[(String, HostTensor)], dtype: SaveDtype) -> Result<()> {
    let refs: Vec<(String, &dyn RowSource)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t as &dyn RowSource))
        .collect();
    write_rows(path, &refs, dtype)
}

/// [`write`] from tensors produced a block of rows at a time: memory follows the block, not
/// the file.
pub fn write_rows(
    path: &Path,
    tensors: &[(String, &dyn RowSource)],
    dtype: SaveDtype,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, t) in tensors {
        let shape = t.shape();
        let len = shape.iter().product::<usize>() * dtype.width();
        header.insert(
            name.clone(),
            json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("a JSON map serialises");
    // The data must start 8-byte aligned; pad the header with spaces.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    atomic::write_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        let mut buf = Vec::new();
        for (_, t) in tensors {
            let shape = t.shape();
            let (rows, width) = match shape.split_first() {
                Some((&r, rest)) => (r, rest.iter().product::<usize>()),
                None => (1, 1),
            };
            let block = (WRITE_BLOCK_VALUES / width.max(1)).max(1);
            for start in (0..rows).step_by(block) {
                let values = t
                    .rows(start, block.min(rows - start))
                    .map_err(std::io::Error::other)?;
                dtype.encode(&values, &mut buf);
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}
