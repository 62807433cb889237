//! Opening a checkpoint (a Hugging Face directory or a GGUF file) and building the model.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{Device, Tensor};
use moekit_moe::{
    Activation, ExpertBank, FeedForward, MoeLayer, Router, RouterConfig, Selection, SharedExpert,
};

use super::gguf::{GgufFile, unpermute_rows};
use super::host::HostTensor;
use super::names::{Scheme, Weight, fused_rows, name};
use super::quant::GgmlType;
use super::router_factors;
use super::safetensors::{SafetensorsDir, SourceRows};
use super::source::TensorSource;
use crate::config::{Architecture, FfnSpec, LlamaConfig, ParamCounts};
use crate::ffn::FfnSlot;
use crate::layer::DecoderLayer;
use crate::model::Llama;
use crate::rope::Rope;
use crate::tokenizer::Tokenizer;
use crate::{LlamaError, Result};

/// An opened checkpoint: its configuration is parsed and its tensors are mapped, nothing is
/// loaded yet.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    config: LlamaConfig,
    files: Files,
}

#[derive(Debug)]
enum Files {
    /// The model's safetensors, and the factors of factored routers if the directory holds
    /// [`router_factors::ROUTER_FACTORS`].
    Hf(SafetensorsDir, Option<SafetensorsDir>),
    Gguf(GgufFile),
}

impl Checkpoint {
    /// Opens `path`: a directory with `config.json` and safetensors, or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let config_path = path.join("config.json");
            if !config_path.exists() {
                return Err(LlamaError::NotAModel(path.to_path_buf()));
            }
            let config = LlamaConfig::from_file(&config_path)?;
            let files = Files::Hf(SafetensorsDir::open(path)?, router_factors::open(path)?);
            Ok(Self {
                path: path.to_path_buf(),
                config,
                files,
            })
        } else if path.is_file() {
            let gguf = GgufFile::open(path)?;
            Ok(Self {
                path: path.to_path_buf(),
                config: gguf.config()?,
                files: Files::Gguf(gguf),
            })
        } else if path.exists() {
            Err(LlamaError::NotAModel(path.to_path_buf()))
        } else {
            Err(LlamaError::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ))
        }
    }

    /// The model configuration (for a GGUF file, derived from its metadata).
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Parameter counts from the configuration, with the routers that
    /// [`router_factors::ROUTER_FACTORS`] factors counted as their factors (`r·(H + E)` instead
    /// of `H·E`), as the loaded model holds them; reads the factors, not the weights.
    pub fn param_counts(&self) -> Result<ParamCounts> {
        let mut counts = self.config.param_counts();
        if let Files::Hf(_, Some(factors)) = &self.files {
            let scheme = self.scheme()?;
            let h = self.config.hidden_size;
            let ranks = router_factors::ranks(factors, scheme, self.config.num_hidden_layers);
            for (l, r) in ranks.into_iter().enumerate() {
                if let (Some(r), FfnSpec::Moe { num_experts: e, .. }) = (r, self.config.ffn_spec(l))
                {
                    let saved = (h * e).saturating_sub(r * (h + e));
                    counts.total -= saved;
                    counts.active -= saved;
                }
            }
        }
        Ok(counts)
    }

    /// The naming scheme of a Hugging Face directory's tensors.
    fn scheme(&self) -> Result<Scheme> {
        Ok(match self.config.architecture()? {
            Architecture::Mixtral => Scheme::Mixtral,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => Scheme::Qwen2Moe,
            _ => Scheme::Hf,
        })
    }

    /// The checkpoint path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many tensors the file stores in each type (`Q4_1`, `BF16`, ...), most common first.
    pub fn tensor_types(&self) -> Vec<(String, usize)> {
        let names: Vec<String> = match &self.files {
            Files::Hf(dir, _) => dir.dtypes(),
            Files::Gguf(g) => g
                .tensors
                .values()
                .map(|t| GgmlType::id_name(t.type_id))
                .collect(),
        };
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for n in names {
            *counts.entry(n).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
    }

    /// The tokenizer: `tokenizer.json` beside `config.json`, or the GGUF metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.files {
            Files::Hf(..) => {
                let file = self.path.join("tokenizer.json");
                if !file.exists() {
                    return Err(LlamaError::NoTokenizer(self.path.clone()));
                }
                Tokenizer::from_file(&file, self.path.join("tokenizer_config.json").as_path())
            }
            Files::Gguf(g) => Tokenizer::from_gguf(g),
        }
    }

    /// Loads the weights onto `device`. `progress(done, total)` is called as layers load.
    /// Tensors of the file that the configuration gives no place are logged as a warning
    /// ([`Checkpoint::load_reporting_unused`] returns them).
    pub fn load(&self, device: &Device, progress: &mut dyn FnMut(usize, usize)) -> Result<Llama> {
        let (model, unused) = self.load_reporting_unused(device, progress)?;
        if !unused.is_empty() {
            tracing::warn!(
                path = %self.path.display(),
                count = unused.len(),
                first = ?&unused[..unused.len().min(5)],
                "tensors in the checkpoint were not loaded: does config.json describe this file?"
            );
        }
        Ok(model)
    }

    /// [`Checkpoint::load`], also returning the names of the file's tensors that were not
    /// read (sorted), besides buffers that are recomputed (`rotary_emb.inv_freq`, GGUF's
    /// `rope_freqs.weight`). A configuration that contradicts its file (a shared expert or
    /// biases it does not mention) shows here instead of silently dropping weights.
    pub fn load_reporting_unused(
        &self,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Llama, Vec<String>)> {
        let reader = self.reader(device)?;
        let model = build(&reader, progress)?;
        let read = reader.read.into_inner();
        let unused = reader
            .source
            .names()
            .into_iter()
            .filter(|n| !read.contains(n))
            .filter(|n| !n.ends_with("rotary_emb.inv_freq") && n != "rope_freqs.weight")
            .collect();
        Ok((model, unused))
    }
}

/// Layer at a time: the pieces of the model read one by one from the memory-mapped file, for
/// pipelines whose memory follows one decoder layer rather than the model (GPTQ and
/// SparseGPT process models larger than memory the same way; see [`crate::layered`]).
impl Checkpoint {
    fn reader<'a>(&'a self, device: &'a Device) -> Result<Reader<'a>> {
        let (source, factors, scheme, qk_permuted): (&dyn TensorSource, _, Scheme, bool) =
            match &self.files {
                Files::Hf(dir, factors) => (dir, factors.as_ref(), self.scheme()?, false),
                Files::Gguf(g) => (g, None, Scheme::Gguf, g.qk_permuted()),
            };
        Ok(Reader {
            source,
            factors,
            scheme,
            qk_permuted,
            config: &self.config,
            device,
            read: Default::default(),
        })
    }

    /// Decoder layer `layer` alone, in f32 on `device` (what [`Checkpoint::load`] builds
    /// for it).
    pub fn load_layer(&self, layer: usize, device: &Device) -> Result<DecoderLayer> {
        let layers = self.config.num_hidden_layers;
        if layer >= layers {
            return Err(LlamaError::Input(format!(
                "layer {layer} asked for, but the model has {layers}"
            )));
        }
        self.reader(device)?.layer(layer)
    }

    /// The embedding rows of `ids`, `[ids.len(), H]`: the only rows of the `[V, H]` matrix
    /// that are read.
    pub fn embed_rows(&self, ids: &[u32], device: &Device) -> Result<Tensor<2>> {
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        self.reader(device)?.rows(Weight::Embed, &rows)
    }

    /// Weight `w` (not of a layer) as it is stored, to be copied by row blocks.
    pub(crate) fn rows_of(&self, w: Weight) -> Result<SourceRows<'_>> {
        let (source, scheme) = match &self.files {
            Files::Hf(dir, _) => (dir as &dyn TensorSource, self.scheme()?),
            Files::Gguf(g) => (g as &dyn TensorSource, Scheme::Gguf),
        };
        let n = name(w, scheme).unwrap_or_else(|| format!("{w:?}"));
        let shape = source.shape(&n).ok_or_else(|| LlamaError::MissingTensor {
            path: self.path.clone(),
            name: n.clone(),
        })?;
        Ok(SourceRows {
            source,
            name: n,
            shape,
        })
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, device: &Device) -> Result<RmsNorm> {
        self.reader(device)?.norm(Weight::FinalNorm)
    }

    /// Rows `rows` of the output projection in PyTorch's layout, `[rows.len(), H]` (the
    /// embedding's rows when the two are tied): a block of the vocabulary's logits is
    /// `h · rowsᵀ`.
    pub fn head_rows(&self, rows: &[usize], device: &Device) -> Result<Tensor<2>> {
        let w = if self.config.tie_word_embeddings {
            Weight::Embed
        } else {
            Weight::LmHead
        };
        self.reader(device)?.rows(w, rows)
    }
}

/// Reads weights by [`Weight`] and checks their shapes.
struct Reader<'a> {
    source: &'a dyn TensorSource,
    /// The side file of factored routers, if any.
    factors: Option<&'a SafetensorsDir>,
    scheme: Scheme,
    qk_permuted: bool,
    config: &'a LlamaConfig,
    device: &'a Device,
    /// Names asked of `source` so far.
    read: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Reader<'_> {
    fn name(&self, w: Weight) -> String {
        name(w, self.scheme).unwrap_or_else(|| format!("{w:?}"))
    }

    fn maybe(&self, w: Weight, shape: &[usize]) -> Result<Option<HostTensor>> {
        if let Some(t) = self.fused_part(w, shape)? {
            return Ok(Some(t));
        }
        let n = self.name(w);
        self.read.borrow_mut().insert(n.clone());
        let Some(t) = self.source.read(&n)? else {
            return Ok(None);
        };
        // A [n] vector may be stored as [1, n] or [n, 1]; accept the same values.
        let squeezed: Vec<usize> = t.shape.iter().copied().filter(|&d| d != 1).collect();
        let expected: Vec<usize> = shape.iter().copied().filter(|&d| d != 1).collect();
        if t.shape != shape && squeezed != expected {
            return Err(LlamaError::TensorShape {
                name: n,
                expected: shape.to_vec(),
                got: t.shape,
            });
        }
        let t = HostTensor::new(shape.to_vec(), t.data);
        Ok(Some(match w {
            Weight::Q(_) | Weight::QBias(_) if self.qk_permuted => {
                unpermute_rows(&t, self.config.num_attention_heads)
            }
            Weight::K(_) | Weight::KBias(_) if self.qk_permuted => {
                unpermute_rows(&t, self.config.kv_heads())
            }
            _ => t,
        }))
    }

    /// `w`'s rows of the fused weight that holds it, in a checkpoint whose projections are
    /// fused (Phi-3); `None` otherwise.
    fn fused_part(&self, w: Weight, shape: &[usize]) -> Result<Option<HostTensor>> {
        let Some((whole, total, rows)) = self.config.fused_dims().and_then(|d| fused_rows(w, d))
        else {
            return Ok(None);
        };
        let n = self.name(whole);
        self.read.borrow_mut().insert(n.clone());
        let missing = || LlamaError::MissingTensor {
            path: self.source.path().to_path_buf(),
            name: n.clone(),
        };
        let stored = self.source.shape(&n).ok_or_else(missing)?;
        let expected = [total, shape[1]];
        if stored != expected {
            return Err(LlamaError::TensorShape {
                name: n,
                expected: expected.to_vec(),
                got: stored,
            });
        }
        let t = self
            .source
            .read_rows(&n, &rows.collect::<Vec<_>>())?
            .ok_or_else(missing)?;
        Ok(Some(HostTensor::new(shape.to_vec(), t.data)))
    }

    /// Rows `rows` of the `[V, H]` matrix `w` (the embedding or the LM head).
    fn rows(&self, w: Weight, rows: &[usize]) -> Result<Tensor<2>> {
        let (v, h) = (self.config.vocab_size, self.config.hidden_size);
        let n = self.name(w);
        let t = self
            .source
            .read_rows(&n, rows)?
            .ok_or_else(|| LlamaError::MissingTensor {
                path: self.source.path().to_path_buf(),
                name: n.clone(),
            })?;
        let width: usize = t.shape[1..].iter().product();
        if width != h || t.shape.len() != 2 {
            let mut got = t.shape.clone();
            got[0] = v;
            return Err(LlamaError::TensorShape {
                name: n,
                expected: vec![v, h],
                got,
            });
        }
        Ok(HostTensor::new(vec![rows.len(), h], t.data).to_tensor(self.device))
    }

    fn take(&self, w: Weight, shape: &[usize]) -> Result<HostTensor> {
        self.maybe(w, shape)?
            .ok_or_else(|| LlamaError::MissingTensor {
                path: self.source.path().to_path_buf(),
                name: self.name(w),
            })
    }

    fn norm(&self, w: Weight) -> Result<RmsNorm> {
        self.norm_of(w, self.config.hidden_size)
    }

    /// An RMSNorm of `width` values.
    fn norm_of(&self, w: Weight, width: usize) -> Result<RmsNorm> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.take(w, &[width])?.to_tensor(self.device)),
            epsilon: self.config.rms_norm_eps,
        })
    }

    /// A linear layer from a PyTorch `[out, in]` weight (stored transposed, `[in, out]`).
    fn linear(&self, w: Weight, bias: Option<Weight>, out: usize, inp: usize) -> Result<Linear> {
        let weight = self
            .take(w, &[out, inp])?
            .transpose()
            .to_tensor(self.device);
        let bias = bias
            .map(|b| self.take(b, &[out]))
            .transpose()?
            .map(|b| Param::from_tensor(b.to_tensor(self.device)));
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// SwiGLU weights `(w_in [H, 2I], w_out [I, H])` from gate/up `[I, H]` and down `[H, I]`.
    fn swiglu(&self, gate: Weight, up: Weight, down: Weight, i: usize) -> Result<[HostTensor; 2]> {
        let h = self.config.hidden_size;
        let gate = self.take(gate, &[i, h])?.transpose();
        let up = self.take(up, &[i, h])?.transpose();
        let down = self.take(down, &[h, i])?.transpose();
        Ok([HostTensor::concat_cols(&[&gate, &up]), down])
    }

    fn dense(&self, gate: Weight, up: Weight, down: Weight, i: usize) -> Result<FeedForward> {
        let [w_in, w_out] = self.swiglu(gate, up, down, i)?;
        Ok(FeedForward::from_weights(
            w_in.to_tensor(self.device),
            w_out.to_tensor(self.device),
            Activation::SwiGlu,
        )?)
    }

    fn experts(&self, l: usize, e: usize, i: usize) -> Result<ExpertBank> {
        let h = self.config.hidden_size;
        let (w_in, w_out): (Vec<_>, Vec<_>) = if self.scheme == Scheme::Gguf {
            let gates = self.take(Weight::ExpertGates(l), &[e, i, h])?;
            let ups = self.take(Weight::ExpertUps(l), &[e, i, h])?;
            let downs = self.take(Weight::ExpertDowns(l), &[e, h, i])?;
            (0..e)
                .map(|x| {
                    let (g, u) = (gates.index(x).transpose(), ups.index(x).transpose());
                    (
                        HostTensor::concat_cols(&[&g, &u]),
                        downs.index(x).transpose(),
                    )
                })
                .unzip()
        } else {
            (0..e)
                .map(|x| {
                    self.swiglu(
                        Weight::ExpertGate(l, x),
                        Weight::ExpertUp(l, x),
                        Weight::ExpertDown(l, x),
                        i,
                    )
                    .map(|[a, b]| (a, b))
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip()
        };
        Ok(ExpertBank::from_weights(
            HostTensor::stack(&w_in).to_tensor(self.device),
            HostTensor::stack(&w_out).to_tensor(self.device),
            Activation::SwiGlu,
        )?)
    }

    fn ffn(&self, l: usize) -> Result<FfnSlot> {
        let h = self.config.hidden_size;
        Ok(match self.config.ffn_spec(l) {
            FfnSpec::Dense { intermediate_size } => FfnSlot::Dense(self.dense(
                Weight::Gate(l),
                Weight::Up(l),
                Weight::Down(l),
                intermediate_size,
            )?),
            FfnSpec::Moe {
                num_experts,
                top_k,
                intermediate_size,
                renormalize,
                shared_intermediate_size,
                combine_temperature,
            } => {
                let gate = self.take(Weight::Router(l), &[num_experts, h])?.transpose();
                let mut router = RouterConfig::new(h, num_experts)
                    .with_selection(Selection::TopK {
                        k: top_k,
                        renormalize,
                    })
                    .init(self.device)?
                    .with_weight(gate.to_tensor(self.device))?;
                if let Some(factors) = self.factors {
                    router = router_factors::apply(router, factors, self.scheme, l, self.device)?;
                }
                let router = unfold_temperature(router, combine_temperature)?;
                let experts = self.experts(l, num_experts, intermediate_size)?;
                let shared = match shared_intermediate_size {
                    Some(s) => Some(SharedExpert {
                        ffn: self.dense(
                            Weight::SharedGate(l),
                            Weight::SharedUp(l),
                            Weight::SharedDown(l),
                            s,
                        )?,
                        gate: Some(Param::from_tensor(
                            self.take(Weight::SharedScale(l), &[1, h])?
                                .transpose()
                                .to_tensor(self.device),
                        )),
                    }),
                    None => None,
                };
                FfnSlot::Moe(MoeLayer::from_parts(router, experts, shared)?)
            }
        })
    }

    fn layer(&self, l: usize) -> Result<DecoderLayer> {
        let c = self.config;
        let (h, d) = (c.hidden_size, c.head_width());
        let (q, kv) = (c.num_attention_heads * d, c.kv_heads() * d);
        let bias = |b: Weight| c.qkv_bias().then_some(b);
        let qk_norm = c.architecture()?.qk_norm();
        Ok(DecoderLayer {
            input_norm: self.norm(Weight::AttnNorm(l))?,
            attention: crate::attention::Attention {
                q_proj: self
                    .linear(Weight::Q(l), bias(Weight::QBias(l)), q, h)?
                    .into(),
                k_proj: self
                    .linear(Weight::K(l), bias(Weight::KBias(l)), kv, h)?
                    .into(),
                v_proj: self
                    .linear(Weight::V(l), bias(Weight::VBias(l)), kv, h)?
                    .into(),
                o_proj: self
                    .linear(Weight::O(l), c.o_bias().then_some(Weight::OBias(l)), h, q)?
                    .into(),
                q_norm: qk_norm
                    .then(|| self.norm_of(Weight::QNorm(l), d))
                    .transpose()?,
                k_norm: qk_norm
                    .then(|| self.norm_of(Weight::KNorm(l), d))
                    .transpose()?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.kv_heads(),
                head_dim: d,
            },
            post_attention_norm: self.norm(Weight::FfnNorm(l))?,
            ffn: self.ffn(l)?,
        })
    }
}

fn build(r: &Reader<'_>, progress: &mut dyn FnMut(usize, usize)) -> Result<Llama> {
    let c = r.config;
    let total = c.num_hidden_layers + 2;
    let (v, h) = (c.vocab_size, c.hidden_size);
    let embed: Tensor<2> = r.take(Weight::Embed, &[v, h])?.to_tensor(r.device);
    progress(1, total);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        layers.push(r.layer(l)?);
        progress(l + 2, total);
    }
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(r.linear(Weight::LmHead, None, v, h)?)
    };
    let model = Llama {
        embed_tokens: Embedding {
            weight: Param::from_tensor(embed),
        },
        layers,
        norm: r.norm(Weight::FinalNorm)?,
        lm_head,
        config: c.clone(),
        rope: Rope::new(c)?,
    };
    progress(total, total);
    tracing::info!(
        path = %r.source.path().display(),
        params = model.param_counts().total,
        "loaded model"
    );
    Ok(model)
}

/// The router whose gate `W_g / τ` (and its factors) came from a file, with its gate `W_g` and
/// combine temperature `τ` back ([`crate::LlamaConfig::combine_temperature`]): the same
/// routing, and logits at the scale they were trained at.
fn unfold_temperature(router: Router, temperature: f64) -> Result<Router> {
    if temperature == 1.0 {
        return Ok(router);
    }
    let router = match &router.gate_up {
        Some(up) => {
            let (down, up) = (router.gate.val(), up.val() * temperature);
            router.with_factors(down, up)?
        }
        None => {
            let w = router.weight() * temperature;
            router.with_weight(w)?
        }
    };
    Ok(router.with_combine_temperature(temperature)?)
}
