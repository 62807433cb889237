//! A Hugging Face checkpoint written one decoder layer at a time, as layer-at-a-time
//! conversion finishes them: memory follows one layer, and a rerun after a crash finds the
//! finished layers staged and writes only the rest.

use std::path::{Path, PathBuf};

use super::export::{Collector, ExportFormat, export_config_of};
use super::load::Checkpoint;
use super::names::{Weight, name};
use super::router_factors::{self, ROUTER_FACTORS};
use super::safetensors::{RowSource, SaveDtype};
use super::shards::ShardedWriter;
use crate::config::LlamaConfig;
use crate::ffn::FfnSlot;
use crate::layer::DecoderLayer;
use crate::tokenizer::Tokenizer;
use crate::{LlamaError, Result};

/// Writes a model layer by layer into a Hugging Face directory (see [`ShardedWriter`]):
/// [`LayeredExport::put_globals`] copies the embedding, final norm and LM head from the source
/// checkpoint by row blocks, [`LayeredExport::put_layer`] writes each finished layer, and
/// [`LayeredExport::finish`] shards the parts, then writes the tokenizer and `config.json`
/// last: a folder with `config.json` is a finished checkpoint.
#[derive(Debug)]
pub struct LayeredExport {
    dir: PathBuf,
    base: LlamaConfig,
    config: LlamaConfig,
    format: ExportFormat,
    dtype: SaveDtype,
    model: ShardedWriter,
    factors: ShardedWriter,
}

/// The staged part of layer `l`.
fn layer_part(l: usize) -> String {
    format!("layer-{l:05}")
}

impl LayeredExport {
    /// An export into `dir` of a model of configuration `base` whose every layer's FFN is
    /// like `ffn` (the first converted layer's), in `format` and `dtype`, staging parts in
    /// `staging` (parts there from an interrupted run of the same export are reused). Fails at
    /// once if such a model cannot be written in `format`.
    pub fn new(
        dir: &Path,
        staging: &Path,
        base: &LlamaConfig,
        ffn: &FfnSlot,
        format: ExportFormat,
        dtype: SaveDtype,
    ) -> Result<Self> {
        let ffns = vec![ffn; base.num_hidden_layers];
        let config = export_config_of(base, &ffns, format, dtype)?;
        Self::new_with(dir, staging, base, config, format, dtype)
    }

    /// An export whose configuration `config` an interrupted run of [`LayeredExport::new`]
    /// computed (and saved): its staged parts in `staging` are reused.
    pub fn resume(
        dir: &Path,
        staging: &Path,
        base: &LlamaConfig,
        config: &LlamaConfig,
        format: ExportFormat,
        dtype: SaveDtype,
    ) -> Result<Self> {
        let mut export = Self::new_with(dir, staging, base, config.clone(), format, dtype)?;
        export.model.reuse("embed")?;
        export.model.reuse("head")?;
        Ok(export)
    }

    fn new_with(
        dir: &Path,
        staging: &Path,
        base: &LlamaConfig,
        config: LlamaConfig,
        format: ExportFormat,
        dtype: SaveDtype,
    ) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            base: base.clone(),
            config,
            format,
            dtype,
            model: ShardedWriter::new(dir, &staging.join("model"), dtype)?,
            factors: ShardedWriter::new(dir, &staging.join("factors"), dtype)?
                .with_stem(ROUTER_FACTORS.trim_end_matches(".safetensors")),
        })
    }

    /// Shards of at most `bytes` (transformers' default 5 GB otherwise).
    pub fn with_max_shard_bytes(mut self, bytes: u64) -> Self {
        self.model = self.model.with_max_shard_bytes(bytes);
        self
    }

    /// The configuration that will be written.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The embedding, the final norm and the LM head (unless tied), copied from `source` in
    /// row blocks and converted to the export's type.
    pub fn put_globals(&mut self, source: &Checkpoint) -> Result<()> {
        let scheme = self.format.scheme();
        let out = |w: Weight| name(w, scheme).expect("global weights have names in every scheme");
        let embed = source.rows_of(Weight::Embed)?;
        self.model
            .put("embed", &[(out(Weight::Embed), &embed as &dyn RowSource)])?;
        let norm = source.rows_of(Weight::FinalNorm)?;
        let mut head: Vec<(String, &dyn RowSource)> =
            vec![(out(Weight::FinalNorm), &norm as &dyn RowSource)];
        let lm_head = (!self.base.tie_word_embeddings)
            .then(|| source.rows_of(Weight::LmHead))
            .transpose()?;
        if let Some(lm) = &lm_head {
            head.push((out(Weight::LmHead), lm as &dyn RowSource));
        }
        self.model.put("head", &head)
    }

    /// Whether layer `l` is already staged (by an interrupted run of this export).
    pub fn has_layer(&self, l: usize) -> bool {
        self.model.has_part(&layer_part(l))
    }

    /// Takes layer `l` as staged by an interrupted run (see [`LayeredExport::has_layer`]).
    pub fn reuse_layer(&mut self, l: usize) -> Result<()> {
        self.model.reuse(&layer_part(l))?;
        let factors = layer_part(l);
        if self.factors.has_part(&factors) {
            self.factors.reuse(&factors)?;
        }
        Ok(())
    }

    /// Writes layer `l`, which must have the FFN shape the export was made for.
    pub fn put_layer(&mut self, l: usize, layer: &DecoderLayer) -> Result<()> {
        let ffns = vec![&layer.ffn; self.base.num_hidden_layers];
        let config = export_config_of(&self.base, &ffns, self.format, self.dtype)?;
        if config != self.config {
            return Err(LlamaError::Export {
                format: self.format.label(),
                reason: format!("layer {l}'s FFN differs from the first layer's"),
            });
        }
        let scheme = self.format.scheme();
        let mut collector = Collector::new(scheme);
        collector.layer(l, layer, &self.config);
        let tensors = collector.into_tensors();
        let refs: Vec<(String, &dyn RowSource)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t as &dyn RowSource))
            .collect();
        self.model.put(&layer_part(l), &refs)?;
        let factors = router_factors::layer_factors(l, &layer.ffn, scheme)?;
        if !factors.is_empty() {
            let refs: Vec<(String, &dyn RowSource)> = factors
                .iter()
                .map(|(n, t)| (n.clone(), t as &dyn RowSource))
                .collect();
            self.factors.put(&layer_part(l), &refs)?;
        }
        Ok(())
    }

    /// Shards the staged parts into the directory, writes the router factors (or removes an
    /// earlier save's), the tokenizer, and `config.json` last. Returns the configuration.
    pub fn finish(self, tokenizer: Option<&Tokenizer>) -> Result<LlamaConfig> {
        // An earlier model's config.json would mark the folder finished while its weights are
        // being replaced: it goes first, and the new one is written last.
        let config_path = self.dir.join("config.json");
        if config_path.exists() {
            std::fs::remove_file(&config_path).map_err(|e| LlamaError::io(&config_path, e))?;
            super::atomic::sync_dir(&self.dir)?;
        }
        let shards = self.model.finish()?;
        tracing::info!(dir = %self.dir.display(), shards = shards.len(), "wrote checkpoint");
        if self.factors.is_empty() {
            let stale = self.dir.join(ROUTER_FACTORS);
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(|e| LlamaError::io(&stale, e))?;
            }
        } else {
            self.factors.finish()?;
        }
        if let Some(t) = tokenizer {
            t.save(&self.dir)?;
        }
        self.config.save(&self.dir)?;
        super::atomic::sync_dir(&self.dir)?;
        Ok(self.config)
    }
}
