//! Where layer-at-a-time passes read a model from: a checkpoint on disk or a model in memory.

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{LlamaConfig, ParamCounts};
use crate::io::load::Checkpoint;
use crate::layer::DecoderLayer;
use crate::model::Llama;
use crate::{LlamaError, Result};

/// A model read piece by piece: one decoder layer, some embedding rows, some LM-head rows.
///
/// [`Checkpoint`] reads each piece from its files when asked (memory follows one layer);
/// [`Llama`] hands out its own (a clone of a layer shares the weights), so that the passes of
/// [`crate::layered`] and of the crates above run on a model in memory too (after training,
/// say) by the same code.
pub trait LayerSource {
    /// The model's configuration.
    fn config(&self) -> &LlamaConfig;

    /// The model's parameter counts.
    fn param_counts(&self) -> Result<ParamCounts>;

    /// Decoder layer `layer`, on `device`.
    fn layer(&self, layer: usize, device: &Device) -> Result<DecoderLayer>;

    /// The embedding rows of `ids`, `[ids.len(), H]`.
    fn embed_rows(&self, ids: &[u32], device: &Device) -> Result<Tensor<2>>;

    /// The final RMSNorm.
    fn final_norm(&self, device: &Device) -> Result<RmsNorm>;

    /// Rows `rows` of the output projection in PyTorch's layout, `[rows.len(), H]`: a block of
    /// the vocabulary's logits is `h · rowsᵀ`.
    fn head_rows(&self, rows: &[usize], device: &Device) -> Result<Tensor<2>>;
}

impl LayerSource for Checkpoint {
    fn config(&self) -> &LlamaConfig {
        Checkpoint::config(self)
    }

    fn param_counts(&self) -> Result<ParamCounts> {
        Checkpoint::param_counts(self)
    }

    fn layer(&self, layer: usize, device: &Device) -> Result<DecoderLayer> {
        self.load_layer(layer, device)
    }

    fn embed_rows(&self, ids: &[u32], device: &Device) -> Result<Tensor<2>> {
        Checkpoint::embed_rows(self, ids, device)
    }

    fn final_norm(&self, device: &Device) -> Result<RmsNorm> {
        Checkpoint::final_norm(self, device)
    }

    fn head_rows(&self, rows: &[usize], device: &Device) -> Result<Tensor<2>> {
        Checkpoint::head_rows(self, rows, device)
    }
}

impl LayerSource for Llama {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn param_counts(&self) -> Result<ParamCounts> {
        Ok(Llama::param_counts(self))
    }

    fn layer(&self, layer: usize, device: &Device) -> Result<DecoderLayer> {
        let n = self.layers.len();
        let block = self.layers.get(layer).ok_or_else(|| {
            LlamaError::Input(format!("layer {layer} asked for, but the model has {n}"))
        })?;
        Ok(block.clone().to_device(device))
    }

    fn embed_rows(&self, ids: &[u32], device: &Device) -> Result<Tensor<2>> {
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let table = self.embed_tokens.weight.val();
        Ok(select_rows(table, &rows, self.config.vocab_size)?.to_device(device))
    }

    fn final_norm(&self, device: &Device) -> Result<RmsNorm> {
        Ok(self.norm.clone().to_device(device))
    }

    fn head_rows(&self, rows: &[usize], device: &Device) -> Result<Tensor<2>> {
        let vocab = self.config.vocab_size;
        let w = match &self.lm_head {
            // burn's Linear holds `[H, V]`.
            Some(head) => select_rows(head.weight.val().transpose(), rows, vocab)?,
            None => select_rows(self.embed_tokens.weight.val(), rows, vocab)?,
        };
        Ok(w.to_device(device))
    }
}

/// Rows `rows` of `table` `[V, H]`, each checked to be below `vocab`.
fn select_rows(table: Tensor<2>, rows: &[usize], vocab: usize) -> Result<Tensor<2>> {
    if let Some(&bad) = rows.iter().find(|&&r| r >= vocab) {
        return Err(LlamaError::Input(format!(
            "row {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let device = table.device();
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let idx: Tensor<1, Int> = Tensor::from_data(TensorData::new(idx, [rows.len()]), &device);
    Ok(table.select(0, idx))
}
