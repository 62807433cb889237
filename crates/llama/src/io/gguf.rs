//! GGUF v2/v3 reader (llama.cpp's checkpoint format), memory-mapped.
//!
//! Layout: magic `GGUF`, version, tensor count, metadata count, the metadata key/values, the
//! tensor infos (name, dims innermost first, GGML type, offset), then the tensor data from the
//! next `general.alignment` boundary. Every length, count and offset is checked against the
//! file size before it is used, so a corrupt header gives an error, not an allocation of what
//! it claims.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::host::HostTensor;
use super::quant::GgmlType;
use super::safetensors::read_at;
use super::source::TensorSource;
use crate::config::{LlamaConfig, TokenIds};
use crate::{LlamaError, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned integer (u8, u16, u32, u64).
    UInt(u64),
    /// Signed integer (i8, i16, i32, i64).
    Int(i64),
    /// Float (f32, f64).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::UInt(v) => Some(v),
            Self::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::Float(v) => Some(v),
            Self::UInt(v) => Some(v as f64),
            Self::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor's data lies and how it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// Shape in PyTorch order (outermost first; GGUF stores it innermost first).
    pub shape: Vec<usize>,
    /// GGML type id.
    pub type_id: u32,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Byte length of the data (0 for an unsupported type).
    pub len: usize,
}

/// A parsed, memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    /// Tensor data is read with positioned reads ([`read_at`]); the header is parsed through a
    /// memory map that is dropped once open.
    file: std::fs::File,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
}

/// Values all metadata arrays may hold together: the largest tokenizers' vocabularies, merges
/// and token types come to about a million. Each parsed value takes ~32 bytes (a string more),
/// so this holds metadata to a few hundred MB whatever the file says; at 2^26 a 64 MB file of
/// one-byte items took 2 GB.
const MAX_ARRAY_ITEMS: usize = 1 << 23;

/// The fewest bytes a metadata value of type `type_id` takes in the file (strings: their
/// 8-byte length; arrays: item type and count; unknown types: 1, refused when parsed).
fn min_value_bytes(type_id: u32) -> usize {
    match type_id {
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// Bounds-checked little-endian reads over the header.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
    /// Metadata array values so far.
    items: usize,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, what: impl std::fmt::Display) -> LlamaError {
        LlamaError::corrupt(
            self.path,
            format!("corrupt GGUF header at byte {}: {what}", self.at),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "needs {n} more bytes, the file has {} (truncated?)",
                    self.bytes.len() - self.at
                ))
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items that each take at least `min_bytes`, bounded by the bytes left.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            return Err(self.corrupt(format!(
                "{what} count {n} cannot fit in the {left} bytes left"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt("string is not UTF-8"))
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<GgufValue> {
        use GgufValue::*;
        Ok(match type_id {
            0 => UInt(self.array::<1>()?[0] as u64),
            1 => Int(self.array::<1>()?[0] as i8 as i64),
            2 => UInt(u16::from_le_bytes(self.array()?) as u64),
            3 => Int(i16::from_le_bytes(self.array()?) as i64),
            4 => UInt(self.u32()? as u64),
            5 => Int(i32::from_le_bytes(self.array()?) as i64),
            6 => Float(f32::from_le_bytes(self.array()?) as f64),
            7 => Bool(self.array::<1>()?[0] != 0),
            8 => Str(self.string()?),
            9 => {
                if depth >= 4 {
                    return Err(self.corrupt("arrays nested deeper than 4"));
                }
                let item = self.u32()?;
                let n = self.count(min_value_bytes(item), "array")?;
                // Parsed values take more room than their bytes: the capacity grows with
                // what parses, and all arrays together are held to MAX_ARRAY_ITEMS.
                self.items = self.items.saturating_add(n);
                if self.items > MAX_ARRAY_ITEMS {
                    return Err(self.corrupt(format!(
                        "metadata arrays hold more than {MAX_ARRAY_ITEMS} values"
                    )));
                }
                let mut items = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Array(items)
            }
            10 => UInt(self.u64()?),
            11 => Int(i64::from_le_bytes(self.array()?)),
            12 => Float(f64::from_le_bytes(self.array()?)),
            other => return Err(self.corrupt(format!("unknown metadata type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and parses `path`, checking every tensor's extent against the file size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
        // SAFETY: the map is read-only; like every reader of model files we assume the file
        // is not truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LlamaError::io(path, e))?;
        let mut c = Cursor {
            bytes: &mmap,
            at: 0,
            path,
            items: 0,
        };
        if c.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(LlamaError::corrupt(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(LlamaError::corrupt(
                path,
                format!("GGUF version {version} is not supported (only 2 and 3)"),
            ));
        }
        let n_tensors = c.count(24, "tensor")?;
        let n_kv = c.count(12, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let type_id = c.u32()?;
            metadata.insert(key, c.value(type_id, 0)?);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.corrupt(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                shape.push(c.u64()?);
            }
            shape.reverse();
            let type_id = c.u32()?;
            let offset = c.u64()?;
            infos.push((name, shape, type_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(LlamaError::corrupt(
                path,
                format!("general.alignment {alignment} is not a power of two"),
            ));
        }
        let data_start = (c.at as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = BTreeMap::new();
        for (name, shape, type_id, offset) in infos {
            let elements = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= file_len.saturating_mul(8))
                .ok_or_else(|| {
                    LlamaError::corrupt(
                        path,
                        format!("tensor `{name}` has an absurd shape {shape:?}"),
                    )
                })? as usize;
            let row = shape.last().copied().unwrap_or(0);
            let len = match GgmlType::from_id(type_id) {
                // Blocks never straddle rows (ggml quantises row by row).
                Some(t) => row
                    .is_multiple_of(t.block().0 as u64)
                    .then(|| t.bytes_for(elements))
                    .flatten()
                    .ok_or_else(|| {
                        LlamaError::corrupt(
                            path,
                            format!(
                                "tensor `{name}`: rows of {row} values are not whole {t:?} blocks"
                            ),
                        )
                    })?,
                None => 0,
            };
            if offset % alignment != 0 {
                return Err(LlamaError::corrupt(
                    path,
                    format!(
                        "tensor `{name}` starts at offset {offset}, not a multiple of the \
                         alignment {alignment}"
                    ),
                ));
            }
            let start = data_start.checked_add(offset);
            if start
                .and_then(|s| s.checked_add(len as u64))
                .is_none_or(|e| e > file_len)
            {
                return Err(LlamaError::corrupt(
                    path,
                    format!(
                        "tensor `{name}` ({len} bytes at offset {offset}) runs past the end of the \
                         {file_len}-byte file (truncated?)"
                    ),
                ));
            }
            let info = GgufTensorInfo {
                shape: shape.iter().map(|&d| d as usize).collect(),
                type_id,
                offset: start.expect("checked") as usize,
                len,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(LlamaError::corrupt(
                    path,
                    format!("tensor `{name}` appears twice"),
                ));
            }
        }
        // Tensors must not share bytes: two at one offset would load as the same weights.
        let mut extents: Vec<(usize, usize, &String)> = tensors
            .iter()
            .filter(|(_, t)| t.len > 0)
            .map(|(name, t)| (t.offset, t.offset + t.len, name))
            .collect();
        extents.sort_unstable();
        if let Some(w) = extents.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(LlamaError::corrupt(
                path,
                format!("tensors `{}` and `{}` overlap in the file", w[0].2, w[1].2),
            ));
        }
        // Data is read from `file`; the map's pages leave the resident set with it.
        drop(mmap);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            version,
            metadata,
            tensors,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn arch(&self) -> Result<String> {
        let arch = self
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| LlamaError::corrupt(&self.path, "general.architecture is missing"))?;
        match arch {
            "llama" | "qwen2" => Ok(arch.to_string()),
            other => Err(LlamaError::Config(format!(
                "GGUF architecture `{other}` is not supported (GGUF files: llama, qwen2); load \
                 the model's Hugging Face safetensors instead (supported there: {})",
                crate::config::SUPPORTED_MODEL_TYPES
            ))),
        }
    }

    /// Whether the Q and K rows were permuted by llama.cpp's converter (LLaMA architecture:
    /// GGML's rotary embedding rotates adjacent pairs, Hugging Face's rotates halves).
    pub fn qk_permuted(&self) -> bool {
        self.arch().is_ok_and(|a| a == "llama")
    }

    fn usize_key(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    LlamaError::corrupt(&self.path, format!("{key} is not an unsigned integer"))
                })
            })
            .transpose()
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize_key(key)?
            .ok_or_else(|| LlamaError::corrupt(&self.path, format!("metadata `{key}` is missing")))
    }

    /// The Hugging Face configuration equivalent to this file's metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.arch()?;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.required(&k("embedding_length"))?;
        let heads = self.required(&k("attention.head_count"))?;
        let vocab = match self.usize_key(&k("vocab_size"))? {
            Some(v) => v,
            None => self
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(<[_]>::len)
                .or_else(|| self.tensors.get("token_embd.weight").map(|t| t.shape[0]))
                .ok_or_else(|| LlamaError::corrupt(&self.path, "vocabulary size is unknown"))?,
        };
        let mut config = LlamaConfig::llama(
            vocab,
            hidden,
            self.required(&k("feed_forward_length"))?,
            self.required(&k("block_count"))?,
            heads,
            self.usize_key(&k("attention.head_count_kv"))?
                .unwrap_or(heads),
        );
        if arch == "qwen2" {
            config.model_type = "qwen2".into();
            config.architectures = vec!["Qwen2ForCausalLM".into()];
        }
        config.head_dim = self
            .usize_key(&k("attention.key_length"))?
            .filter(|&d| d.checked_mul(heads) != Some(hidden));
        if let Some(eps) = self.get(&k("attention.layer_norm_rms_epsilon")) {
            config.rms_norm_eps = eps.as_f64().unwrap_or(config.rms_norm_eps);
        }
        if let Some(base) = self.get(&k("rope.freq_base")).and_then(GgufValue::as_f64) {
            config.rope_theta = Some(base);
        }
        if let Some(n) = self.usize_key(&k("context_length"))? {
            config.max_position_embeddings = n;
        }
        if self.tensors.contains_key("rope_freqs.weight") {
            return Err(LlamaError::Config(
                "GGUF rope_freqs (Llama-3.1 rope scaling baked into a tensor) is not supported; \
                 load the Hugging Face safetensors checkpoint instead"
                    .into(),
            ));
        }
        config.tie_word_embeddings = !self.tensors.contains_key("output.weight");
        let token = |key: &str| -> Result<Option<TokenIds>> {
            Ok(self
                .usize_key(&format!("tokenizer.ggml.{key}"))?
                .map(|id| TokenIds::One(id as u32)))
        };
        config.bos_token_id = token("bos_token_id")?;
        config.eos_token_id = token("eos_token_id")?;
        if let Some(experts) = self.usize_key(&k("expert_count"))?.filter(|&e| e > 0) {
            config.model_type = "mixtral".into();
            config.architectures = vec!["MixtralForCausalLM".into()];
            config.num_local_experts = Some(experts);
            config.num_experts_per_tok = Some(self.required(&k("expert_used_count"))?);
        }
        config.validate()?;
        Ok(config)
    }
}

impl GgufFile {
    fn ggml_type(&self, name: &str, info: &GgufTensorInfo) -> Result<GgmlType> {
        GgmlType::from_id(info.type_id).ok_or_else(|| LlamaError::UnsupportedDtype {
            path: self.path.clone(),
            name: name.into(),
            dtype: GgmlType::id_name(info.type_id),
        })
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }

    fn read(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let ty = self.ggml_type(name, info)?;
        let n = info.shape.iter().product();
        let mut data = vec![0.0f32; n];
        let bytes = read_at(&self.file, &self.path, info.offset, info.len)?;
        ty.dequantize(&bytes, &mut data);
        super::source::check_finite(&self.path, name, &data)?;
        Ok(Some(HostTensor::new(info.shape.clone(), data)))
    }

    /// Rows de-quantised in place: the parser checked that each row is whole blocks.
    fn read_rows(&self, name: &str, rows: &[usize]) -> Result<Option<HostTensor>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        if info.shape.len() < 2 {
            // A vector's blocks run across its "rows": read it whole.
            let t = self.read(name)?.expect("listed");
            super::source::check_rows(&self.path, name, t.shape[0], rows)?;
            return Ok(Some(HostTensor::new(
                vec![rows.len()],
                rows.iter().map(|&r| t.data[r]).collect(),
            )));
        }
        let ty = self.ggml_type(name, info)?;
        super::source::check_rows(&self.path, name, info.shape[0], rows)?;
        let width: usize = info.shape[1..].iter().product();
        let row_bytes = info.len / info.shape[0].max(1);
        let mut data = vec![0.0f32; rows.len() * width];
        // One read per run of consecutive rows; each row is whole blocks, de-quantised alone.
        for run in super::source::consecutive_runs(rows) {
            let at = info.offset + rows[run.start] * row_bytes;
            let bytes = read_at(&self.file, &self.path, at, run.len() * row_bytes)?;
            let out = &mut data[run.start * width..run.end * width];
            for (row, out) in bytes
                .chunks_exact(row_bytes.max(1))
                .zip(out.chunks_exact_mut(width.max(1)))
            {
                ty.dequantize(row, out);
            }
        }
        super::source::check_finite(&self.path, name, &data)?;
        Ok(Some(HostTensor::new(
            super::source::row_shape(&info.shape, rows.len()),
            data,
        )))
    }
}

/// Undoes llama.cpp's row permutation of a Q or K weight `[heads·D, in]` (or bias).
///
/// The converter reorders each head's rows from `[half₀ | half₁]` to interleaved pairs
/// (`w.reshape(heads, 2, D/2, in).swapaxes(1, 2)`); this applies the inverse.
pub fn unpermute_rows(t: &HostTensor, heads: usize) -> HostTensor {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    let d = rows / heads;
    let half = d / 2;
    let mut data = vec![0.0f32; t.data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) holds HF row (h, j, i).
                let src = (h * d + 2 * i + j) * cols;
                let dst = (h * d + j * half + i) * cols;
                data[dst..dst + cols].copy_from_slice(&t.data[src..src + cols]);
            }
        }
    }
    HostTensor::new(t.shape.clone(), data)
}
