//! LoRA surgery on a LLaMA model: adapters on projections chosen by module path.
//!
//! Module paths are Hugging Face's (`model.layers.3.self_attn.q_proj`,
//! `model.layers.3.mlp.down_proj`), taken from the one name table, so patterns and PEFT files
//! written for `LlamaForCausalLM` apply unchanged. Adaptable: the four attention projections of
//! every layer and the three projections of every dense FFN.

use burn::module::Module;
use moekit_lora::{LinearSlot, LoraAdapter, LoraConfig, TargetModules, freeze};

use crate::ffn::FfnSlot;
use crate::io::names::{Scheme, Weight, name};
use crate::lora_ffn::{FfnProj, LoraFfn};
use crate::model::Llama;
use crate::{LlamaError, Result};

/// A projection of a decoder layer that can carry a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// A projection of a dense FFN (`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`).
    Ffn(FfnProj),
}

/// One adaptable projection of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterSite {
    /// Decoder layer.
    pub layer: usize,
    /// Which projection.
    pub proj: Projection,
}

impl AdapterSite {
    fn weight(self) -> Weight {
        let l = self.layer;
        match self.proj {
            Projection::Q => Weight::Q(l),
            Projection::K => Weight::K(l),
            Projection::V => Weight::V(l),
            Projection::O => Weight::O(l),
            Projection::Ffn(FfnProj::Gate) => Weight::Gate(l),
            Projection::Ffn(FfnProj::Up) => Weight::Up(l),
            Projection::Ffn(FfnProj::Down) => Weight::Down(l),
        }
    }

    /// The Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self) -> String {
        let weight = name(self.weight(), Scheme::Hf).expect("the HF scheme names projections");
        weight
            .strip_suffix(".weight")
            .expect("projection weights end in .weight")
            .to_string()
    }
}

const ATTENTION: [Projection; 4] = [Projection::Q, Projection::K, Projection::V, Projection::O];
const FFN: [FfnProj; 3] = [FfnProj::Gate, FfnProj::Up, FfnProj::Down];

impl Llama {
    /// Every projection that can carry an adapter, in layer order.
    pub fn adapter_sites(&self) -> Vec<AdapterSite> {
        let mut sites = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            let dense = !matches!(l.ffn, FfnSlot::Moe(_));
            let ffn = FFN.iter().filter(|_| dense).map(|&p| Projection::Ffn(p));
            for proj in ATTENTION.into_iter().chain(ffn) {
                sites.push(AdapterSite { layer, proj });
            }
        }
        sites
    }

    /// The site at a Hugging Face module path, if the model has it.
    pub fn site_at(&self, path: &str) -> Option<AdapterSite> {
        self.adapter_sites().into_iter().find(|s| s.path() == path)
    }

    fn attention_slot(&mut self, site: AdapterSite) -> &mut LinearSlot {
        let a = &mut self.layers[site.layer].attention;
        match site.proj {
            Projection::Q => &mut a.q_proj,
            Projection::K => &mut a.k_proj,
            Projection::V => &mut a.v_proj,
            _ => &mut a.o_proj,
        }
    }

    /// `(in, out)` widths of a site's projection.
    pub fn site_dims(&self, site: AdapterSite) -> Result<(usize, usize)> {
        let layer = self.layer_at(site)?;
        let a = &layer.attention;
        Ok(match (site.proj, &layer.ffn) {
            (Projection::Q, _) => a.q_proj.dims(),
            (Projection::K, _) => a.k_proj.dims(),
            (Projection::V, _) => a.v_proj.dims(),
            (Projection::O, _) => a.o_proj.dims(),
            (Projection::Ffn(p), FfnSlot::Dense(ffn)) => LoraFfn::dims(ffn, p),
            (Projection::Ffn(p), FfnSlot::Lora(ffn)) => LoraFfn::dims(&ffn.base, p),
            (Projection::Ffn(_), FfnSlot::Moe(_)) => {
                return Err(LlamaError::Config(format!(
                    "{}: layer {} is a MoE layer; LoRA applies to dense FFNs only",
                    site.path(),
                    site.layer
                )));
            }
        })
    }

    fn layer_at(&self, site: AdapterSite) -> Result<&crate::layer::DecoderLayer> {
        self.layers.get(site.layer).ok_or_else(|| {
            LlamaError::Config(format!(
                "layer {} does not exist (the model has {})",
                site.layer,
                self.layers.len()
            ))
        })
    }

    /// The adapter at `site`, if any.
    pub fn adapter(&self, site: AdapterSite) -> Option<&LoraAdapter> {
        let layer = self.layers.get(site.layer)?;
        let a = &layer.attention;
        match (site.proj, &layer.ffn) {
            (Projection::Q, _) => a.q_proj.adapter(),
            (Projection::K, _) => a.k_proj.adapter(),
            (Projection::V, _) => a.v_proj.adapter(),
            (Projection::O, _) => a.o_proj.adapter(),
            (Projection::Ffn(p), FfnSlot::Lora(ffn)) => ffn.adapter(p),
            (Projection::Ffn(_), _) => None,
        }
    }

    /// Every adapter with its site, in layer order.
    pub fn adapters(&self) -> Vec<(AdapterSite, &LoraAdapter)> {
        self.adapter_sites()
            .into_iter()
            .filter_map(|s| self.adapter(s).map(|a| (s, a)))
            .collect()
    }

    /// Puts `adapter` at `site` (replacing one already there). The site's base weights are
    /// frozen; nothing else changes.
    pub fn set_adapter(&mut self, site: AdapterSite, adapter: LoraAdapter) -> Result<()> {
        let (d_in, d_out) = self.site_dims(site)?;
        if (adapter.d_in(), adapter.d_out()) != (d_in, d_out) {
            return Err(LlamaError::Config(format!(
                "{}: an adapter for {}→{} does not fit this {d_in}→{d_out} projection",
                site.path(),
                adapter.d_in(),
                adapter.d_out()
            )));
        }
        match site.proj {
            Projection::Ffn(p) => {
                let slot = &mut self.layers[site.layer].ffn;
                if let FfnSlot::Dense(ffn) = slot {
                    *slot = FfnSlot::Lora(LoraFfn::new(ffn.clone())?);
                }
                if let FfnSlot::Lora(ffn) = slot {
                    *ffn.adapter_mut(p) = Some(adapter);
                }
            }
            _ => self.attention_slot(site).attach(adapter)?,
        }
        Ok(())
    }

    /// LoRA fine-tuning setup: freezes every parameter, then puts a fresh adapter
    /// ([`LoraConfig::init`]: `B = 0`, so the model's function is unchanged) on every
    /// projection whose module path matches `config.target_modules`. Afterwards only adapter
    /// parameters require gradients.
    ///
    /// # Errors
    /// An invalid configuration or pattern, a rank too large for a projection, or patterns
    /// that match no projection of this model.
    pub fn with_lora(self, config: &LoraConfig) -> Result<Self> {
        let targets = TargetModules::new(&config.target_modules)?;
        let sites: Vec<AdapterSite> = self
            .adapter_sites()
            .into_iter()
            .filter(|s| targets.matches(&s.path()))
            .collect();
        if sites.is_empty() {
            return Err(LlamaError::Config(format!(
                "target modules {:?} match no projection (paths look like {})",
                config.target_modules,
                AdapterSite {
                    layer: 0,
                    proj: Projection::Q
                }
                .path()
            )));
        }
        let device = self.device();
        let mut model = freeze(self);
        for site in sites {
            let (d_in, d_out) = model.site_dims(site)?;
            let adapter = config.init(d_in, d_out, &device)?;
            model.set_adapter(site, adapter)?;
        }
        Ok(model)
    }

    /// Folds every adapter into its weights: the result has only plain projections and dense
    /// FFNs and computes the same function.
    pub fn merge_lora(mut self) -> Self {
        for layer in &mut self.layers {
            let a = &mut layer.attention;
            for slot in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                slot.merge_into_plain();
            }
            if let FfnSlot::Lora(ffn) = &layer.ffn {
                layer.ffn = FfnSlot::Dense(ffn.merged());
            }
        }
        self
    }

    /// Number of adapter parameters (what LoRA training updates).
    pub fn adapter_params(&self) -> usize {
        self.adapters().iter().map(|(_, a)| a.num_params()).sum()
    }
}
