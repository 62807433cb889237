//! LoRA adapter directories in Hugging Face PEFT's layout, both ways.
//!
//! `adapter_model.safetensors` holds `base_model.model.<path>.lora_A.weight [r, in]` and
//! `lora_B.weight [out, r]` for every adapted module (names from [`moekit_lora::peft`], module
//! paths from the one name table); `adapter_config.json` is PEFT's `LoraConfig`.

use std::collections::BTreeMap;
use std::path::Path;

use moekit_lora::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, Factor, parse_peft_key, peft_key};
use moekit_lora::{AdaptedModule, LoraAdapter, PeftConfig};

use super::atomic;
use super::host::HostTensor;
use super::safetensors::{SafetensorsDir, SaveDtype, write};
use super::source::TensorSource;
use crate::lora::AdapterSite;
use crate::model::Llama;
use crate::{LlamaError, Result};

/// Writes `model`'s adapters into `dir` (created if needed) as PEFT does: `adapter_config.json`
/// and `adapter_model.safetensors`, each written atomically. `base_model` goes into
/// `base_model_name_or_path`. Returns the written config.
///
/// # Errors
/// A model without adapters, adapters that disagree on rsLoRA or dropout (PEFT has one setting
/// per adapter), or an I/O error.
pub fn save_adapter(
    model: &Llama,
    dir: &Path,
    base_model: Option<&str>,
    dtype: SaveDtype,
) -> Result<PeftConfig> {
    let adapters = model.adapters();
    let fail = |reason: String| LlamaError::Adapter {
        path: dir.to_path_buf(),
        reason,
    };
    let Some((_, first)) = adapters.first() else {
        return Err(fail("the model has no LoRA adapters to save".into()));
    };
    let (rslora, dropout) = (first.use_rslora, first.dropout.prob);
    if adapters
        .iter()
        .any(|(_, a)| a.use_rslora != rslora || a.dropout.prob != dropout)
    {
        return Err(fail(
            "adapters mix rsLoRA settings or dropout rates; PEFT stores one of each".into(),
        ));
    }
    let described: Vec<AdaptedModule> = adapters
        .iter()
        .map(|(site, a)| AdaptedModule {
            path: site.path(),
            rank: a.rank(),
            alpha: a.alpha,
        })
        .collect();
    let candidates: Vec<String> = model.adapter_sites().iter().map(|s| s.path()).collect();
    let mut config = PeftConfig::describe(&described, &candidates, rslora, dropout);
    config.base_model_name_or_path = base_model.map(str::to_string);

    let mut tensors = Vec::with_capacity(2 * adapters.len());
    for (site, a) in &adapters {
        let path = site.path();
        // PEFT stores nn.Linear weights, [out, in]: A [in, r] → [r, in], B [r, out] → [out, r].
        let a_t = HostTensor::from_tensor(a.a.val()).transpose();
        let b_t = HostTensor::from_tensor(a.b.val()).transpose();
        tensors.push((peft_key(&path, Factor::A), a_t));
        tensors.push((peft_key(&path, Factor::B), b_t));
    }
    std::fs::create_dir_all(dir).map_err(|e| LlamaError::io(dir, e))?;
    write(&dir.join(ADAPTER_WEIGHTS), &tensors, dtype)?;
    atomic::write(&dir.join(ADAPTER_CONFIG), config.to_json().as_bytes())?;
    Ok(config)
}

/// Reads a PEFT LoRA adapter directory and puts its adapters on `model` (freezing every other
/// parameter, as [`Llama::with_lora`] does). Ranks come from the tensors, `α` from
/// `lora_alpha` / `alpha_pattern`, the scale rule from `use_rslora`.
///
/// # Errors
/// A missing or malformed file, a config moekit cannot apply (DoRA, trained biases, saved
/// modules, non-LoRA PEFT types), tensors for modules the model does not have, a missing
/// `lora_A` / `lora_B` half, or shapes that do not fit the model.
pub fn load_adapter(model: Llama, dir: &Path) -> Result<(Llama, PeftConfig)> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let fail = |path: &Path, reason: String| LlamaError::Adapter {
        path: path.to_path_buf(),
        reason,
    };
    if !config_path.exists() {
        return Err(fail(
            dir,
            format!("not a PEFT adapter directory (no {ADAPTER_CONFIG})"),
        ));
    }
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| LlamaError::io(&config_path, e))?;
    let config = PeftConfig::from_json(&text).map_err(|e| fail(&config_path, e.to_string()))?;
    if !weights_path.exists() {
        return Err(fail(
            dir,
            format!(
                "no {ADAPTER_WEIGHTS} (adapter_model.bin is not read; re-save with safe_serialization=True)"
            ),
        ));
    }
    let file = SafetensorsDir::open_file(&weights_path)?;

    let mut factors: BTreeMap<String, [Option<HostTensor>; 2]> = BTreeMap::new();
    for key in file.names() {
        let (path, factor) =
            parse_peft_key(&key).map_err(|e| fail(&weights_path, e.to_string()))?;
        let tensor = file.read(&key)?.expect("listed names are readable");
        if tensor.shape.len() != 2 {
            return Err(fail(
                &weights_path,
                format!(
                    "`{key}` has shape {:?}; LoRA factors are matrices",
                    tensor.shape
                ),
            ));
        }
        factors.entry(path).or_default()[factor as usize] = Some(tensor);
    }
    if factors.is_empty() {
        return Err(fail(&weights_path, "holds no LoRA tensors".into()));
    }

    let device = model.device();
    let mut model = moekit_lora::freeze(model);
    for (path, [a, b]) in factors {
        let site: AdapterSite = model.site_at(&path).ok_or_else(|| {
            fail(
                &weights_path,
                format!("adapts `{path}`, which this model does not have (wrong base model?)"),
            )
        })?;
        let (Some(a), Some(b)) = (a, b) else {
            return Err(fail(
                &weights_path,
                format!("`{path}` has only one of lora_A / lora_B"),
            ));
        };
        let (d_in, d_out) = model.site_dims(site)?;
        let r = a.shape[0];
        if a.shape != [r, d_in] || b.shape != [d_out, r] {
            return Err(fail(
                &weights_path,
                format!(
                    "`{path}`: lora_A {:?} and lora_B {:?} do not fit a {d_in}→{d_out} projection (expected [r, {d_in}] and [{d_out}, r])",
                    a.shape, b.shape
                ),
            ));
        }
        let rank = config.rank_for(&path);
        if r != rank {
            return Err(fail(
                &weights_path,
                format!(
                    "`{path}` has factors of rank {r}, but adapter_config.json gives it rank {rank} \
                     (r / rank_pattern): the config does not belong to these weights"
                ),
            ));
        }
        let adapter = LoraAdapter::from_factors(
            a.transpose().to_tensor(&device),
            b.transpose().to_tensor(&device),
            config.alpha_for(&path),
            config.use_rslora,
        )?
        .with_dropout(config.lora_dropout)?;
        model.set_adapter(site, adapter)?;
    }
    Ok((model, config))
}
