//! Hugging Face PEFT's adapter layout: tensor names and `adapter_config.json`.
//!
//! PEFT saves a LoRA adapter of a `LlamaForCausalLM` as `adapter_model.safetensors` holding, for
//! every adapted module at path `P` (e.g. `model.layers.0.self_attn.q_proj`):
//!
//! | key | shape | moekit |
//! |---|---|---|
//! | `base_model.model.P.lora_A.weight` | `[r, in]` | `Aᵀ` ([`crate::LoraAdapter::a`] is `[in, r]`) |
//! | `base_model.model.P.lora_B.weight` | `[out, r]` | `Bᵀ` ([`crate::LoraAdapter::b`] is `[r, out]`) |
//!
//! and `adapter_config.json` ([`PeftConfig`]). The scale is `lora_alpha / r` (or `/√r` with
//! `use_rslora`), per module overridable by `rank_pattern` / `alpha_pattern`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LoraError, Result};
use crate::pattern::{PatternMap, pattern_regex};

/// Prefix PEFT puts before a module path of the wrapped model.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// File holding the adapter tensors.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File holding the adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// One of the two LoRA factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Factor {
    /// The down projection (`lora_A`).
    A,
    /// The up projection (`lora_B`).
    B,
}

/// The PEFT tensor name of `factor` of the module at `path`.
pub fn peft_key(path: &str, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    };
    format!("{PEFT_PREFIX}{path}.{f}.weight")
}

/// The module path and factor a PEFT tensor name refers to; an error for tensors of PEFT
/// features moekit does not apply (embedding LoRA, DoRA magnitudes, biases, saved modules).
pub fn parse_peft_key(key: &str) -> Result<(String, Factor)> {
    let unsupported = |what: &str| {
        LoraError::Config(format!(
            "tensor `{key}` is {what}, which moekit does not apply (only LoRA on linear layers)"
        ))
    };
    let rest = key
        .strip_prefix(PEFT_PREFIX)
        .ok_or_else(|| unsupported(&format!("not under `{PEFT_PREFIX}`")))?;
    for (suffix, factor) in [(".lora_A.weight", Factor::A), (".lora_B.weight", Factor::B)] {
        if let Some(path) = rest.strip_suffix(suffix) {
            return Ok((path.to_string(), factor));
        }
    }
    Err(if key.contains("lora_embedding") {
        unsupported("an embedding adapter")
    } else if key.contains("lora_magnitude") {
        unsupported("a DoRA magnitude")
    } else {
        unsupported("not a lora_A/lora_B weight")
    })
}

/// `target_modules` of a PEFT config: a list of names (each matching a module path or its
/// dotted ending) or one regular expression matching whole paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PeftTargets {
    /// Names, e.g. `["q_proj", "v_proj"]`.
    List(Vec<String>),
    /// One regular expression, matched against whole module paths.
    Regex(String),
}

fn none() -> String {
    "none".into()
}

/// `adapter_config.json` of a PEFT LoRA adapter (the fields moekit reads; every other key is
/// kept in [`PeftConfig::extra`] and written back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// Must be `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM` for language models.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Default rank.
    pub r: usize,
    /// Default `α`.
    pub lora_alpha: f64,
    /// Dropout on the adapter input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules were adapted.
    #[serde(default)]
    pub target_modules: Option<PeftTargets>,
    /// `α/√r` scaling (rsLoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// Weight-decomposed LoRA; not supported.
    #[serde(default)]
    pub use_dora: bool,
    /// Trained biases (`none`, `all`, `lora_only`); only `none` is supported.
    #[serde(default = "none")]
    pub bias: String,
    /// Transposed base weights (GPT-2's Conv1D); not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Fully trained extra modules; not supported.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module rank overrides: pattern → rank, the first match in file order.
    #[serde(default)]
    pub rank_pattern: PatternMap<usize>,
    /// Per-module `α` overrides: pattern → `α`, the first match in file order.
    #[serde(default)]
    pub alpha_pattern: PatternMap<f64>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Every other key.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One adapted module, as [`PeftConfig::describe`] needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptedModule {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Rank.
    pub rank: usize,
    /// `α`.
    pub alpha: f64,
}

impl PeftConfig {
    /// Parses `adapter_config.json` text and checks that moekit can apply it.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| LoraError::Config(format!("not a PEFT adapter config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The config as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a PEFT config always serialises")
    }

    /// Refuses configs of PEFT features moekit does not apply.
    pub fn validate(&self) -> Result<()> {
        let refuse = |what: String| Err(LoraError::Config(what));
        if self.peft_type != "LORA" {
            return refuse(format!(
                "peft_type is `{}`; only LORA adapters are supported",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return refuse("r is 0".into());
        }
        if !self.lora_alpha.is_finite() {
            return refuse(format!("lora_alpha = {} is not finite", self.lora_alpha));
        }
        if self.use_dora {
            return refuse("use_dora is set; DoRA adapters are not supported".into());
        }
        if self.bias != "none" {
            return refuse(format!(
                "bias is `{}`; only adapters without trained biases (`none`) are supported",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return refuse("fan_in_fan_out is set (Conv1D models); not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse(
                "modules_to_save is not empty; fully saved modules are not supported".into(),
            );
        }
        for p in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            pattern_regex(p)?;
        }
        // Initialisations that change the base weights (PiSSA, OLoRA, CorDA take the principal
        // part out of W; LoftQ quantises it): saved without PEFT's conversion, such an adapter
        // only fits the modified base, and on the original one gives wrong outputs silently.
        if let Some(Value::String(init)) = self.extra.get("init_lora_weights") {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|m| lower.starts_with(m))
            {
                return refuse(format!(
                    "init_lora_weights is `{init}`: this adapter was saved against a modified base \
                     model; save it with PEFT's path_initial_model_for_weight_conversion to get one \
                     for the original model"
                ));
            }
        }
        if self
            .extra
            .get("layer_replication")
            .is_some_and(|v| !v.is_null())
        {
            return refuse(
                "layer_replication is set (a model with repeated layers); not supported".into(),
            );
        }
        Ok(())
    }

    /// The rank of the module at `path` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, path: &str) -> usize {
        self.rank_pattern.lookup(path).unwrap_or(self.r)
    }

    /// The `α` of the module at `path` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, path: &str) -> f64 {
        self.alpha_pattern.lookup(path).unwrap_or(self.lora_alpha)
    }

    /// A config describing `adapted` modules. `candidates` are every module path of the model
    /// that could carry an adapter: when the adapted set is exactly "every candidate with one of
    /// these names", `target_modules` lists the names (`["q_proj", "v_proj"]`), otherwise the
    /// full paths. Ranks and `α`s that differ from the most common ones go to `rank_pattern` /
    /// `alpha_pattern` by full path.
    pub fn describe(
        adapted: &[AdaptedModule],
        candidates: &[String],
        use_rslora: bool,
        lora_dropout: f64,
    ) -> Self {
        let leaf = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
        let mut names: Vec<String> = adapted.iter().map(|m| leaf(&m.path)).collect();
        names.sort();
        names.dedup();
        let by_name: Vec<&String> = candidates
            .iter()
            .filter(|c| names.contains(&leaf(c)))
            .collect();
        let targets = if by_name.len() == adapted.len() {
            names
        } else {
            adapted.iter().map(|m| m.path.clone()).collect()
        };
        let r = most_common(adapted.iter().map(|m| m.rank)).unwrap_or(8);
        let alpha_bits = most_common(adapted.iter().map(|m| m.alpha.to_bits()));
        let lora_alpha = alpha_bits.map_or(16.0, f64::from_bits);
        let exact = |p: &str| regex::escape(p);
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            lora_dropout,
            target_modules: Some(PeftTargets::List(targets)),
            use_rslora,
            use_dora: false,
            bias: none(),
            fan_in_fan_out: false,
            modules_to_save: None,
            rank_pattern: adapted
                .iter()
                .filter(|m| m.rank != r)
                .map(|m| (exact(&m.path), m.rank))
                .collect(),
            alpha_pattern: adapted
                .iter()
                .filter(|m| m.alpha != lora_alpha)
                .map(|m| (exact(&m.path), m.alpha))
                .collect(),
            base_model_name_or_path: None,
            extra: BTreeMap::from([
                ("inference_mode".into(), Value::Bool(true)),
                ("init_lora_weights".into(), Value::Bool(true)),
            ]),
        }
    }
}

fn most_common<T: Ord + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts = BTreeMap::new();
    for i in items {
        *counts.entry(i).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by_key(|&(_, n)| n).map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `adapter_config.json` as PEFT 0.17 writes it for `LoraConfig(r=8, lora_alpha=16,
    /// target_modules=["q_proj", "v_proj"])`.
    const PEFT_JSON: &str = r#"{
      "alpha_pattern": {}, "auto_mapping": null,
      "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "bias": "none",
      "corda_config": null, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false,
      "inference_mode": true, "init_lora_weights": true, "layer_replication": null,
      "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
      "lora_alpha": 16, "lora_bias": false, "lora_dropout": 0.05, "megatron_config": null,
      "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA",
      "qalora_group_size": 16, "r": 8, "rank_pattern": {"layers.3.self_attn.q_proj": 4},
      "revision": null, "target_modules": ["v_proj", "q_proj"], "target_parameters": null,
      "task_type": "CAUSAL_LM", "trainable_token_indices": null, "use_dora": false,
      "use_qalora": false, "use_rslora": false
    }"#;

    #[test]
    fn reads_peft_config_and_keeps_unknown_keys() {
        let c = PeftConfig::from_json(PEFT_JSON).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 16.0, 0.05));
        assert_eq!(c.rank_for("model.layers.3.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.13.self_attn.q_proj"), 8);
        assert_eq!(c.alpha_for("model.layers.3.self_attn.q_proj"), 16.0);
        // Numbers compare as f64 (`16` is read as α = 16.0 and written back as `16.0`).
        fn norm(v: Value) -> Value {
            match v {
                Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
                Value::Object(m) => {
                    Value::Object(m.into_iter().map(|(k, v)| (k, norm(v))).collect())
                }
                Value::Array(a) => Value::Array(a.into_iter().map(norm).collect()),
                other => other,
            }
        }
        let back: Value = serde_json::from_str(&c.to_json()).unwrap();
        let orig: Value = serde_json::from_str(PEFT_JSON).unwrap();
        assert_eq!(norm(back), norm(orig), "written back unchanged");
    }

    #[test]
    fn refuses_unsupported_features() {
        for (from, to, needle) in [
            (r#""peft_type": "LORA""#, r#""peft_type": "IA3""#, "IA3"),
            (r#""use_dora": false"#, r#""use_dora": true"#, "DoRA"),
            (r#""bias": "none""#, r#""bias": "all""#, "bias"),
            (
                r#""modules_to_save": null"#,
                r#""modules_to_save": ["lm_head"]"#,
                "modules_to_save",
            ),
            (r#""r": 8"#, r#""r": 0"#, "r is 0"),
            (
                r#""init_lora_weights": true"#,
                r#""init_lora_weights": "pissa_niter_4""#,
                "path_initial_model_for_weight_conversion",
            ),
            (
                r#""init_lora_weights": true"#,
                r#""init_lora_weights": "olora""#,
                "olora",
            ),
            (
                r#""layer_replication": null"#,
                r#""layer_replication": [[0, 2], [1, 3]]"#,
                "layer_replication",
            ),
        ] {
            let err = PeftConfig::from_json(&PEFT_JSON.replace(from, to)).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        assert!(PeftConfig::from_json("{").is_err());
        // Initialisations that leave the base alone are fine.
        for init in [r#""gaussian""#, "false", r#""eva""#] {
            let json = PEFT_JSON.replace(
                r#""init_lora_weights": true"#,
                &format!(r#""init_lora_weights": {init}"#),
            );
            assert!(PeftConfig::from_json(&json).is_ok(), "{init}");
        }
    }

    #[test]
    fn keys_round_trip() {
        let p = "model.layers.7.mlp.down_proj";
        for f in [Factor::A, Factor::B] {
            assert_eq!(parse_peft_key(&peft_key(p, f)).unwrap(), (p.to_string(), f));
        }
        assert_eq!(
            peft_key(p, Factor::A),
            "base_model.model.model.layers.7.mlp.down_proj.lora_A.weight"
        );
        for bad in [
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            assert!(parse_peft_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn describe_lists_names_or_paths() {
        let paths: Vec<String> = (0..2)
            .flat_map(|l| ["q_proj", "v_proj"].map(|n| format!("model.layers.{l}.self_attn.{n}")))
            .collect();
        let module = |p: &String, rank| AdaptedModule {
            path: p.clone(),
            rank,
            alpha: 16.0,
        };
        let all: Vec<_> = paths.iter().map(|p| module(p, 8)).collect();
        let c = PeftConfig::describe(&all, &paths, false, 0.0);
        let names = vec!["q_proj".to_string(), "v_proj".to_string()];
        assert_eq!(c.target_modules, Some(PeftTargets::List(names)));
        assert!(c.rank_pattern.is_empty());

        let some = vec![
            module(&paths[0], 8),
            module(&paths[1], 8),
            module(&paths[2], 4),
        ];
        let c = PeftConfig::describe(&some, &paths, false, 0.0);
        let listed: Vec<String> = some.iter().map(|m| m.path.clone()).collect();
        assert_eq!(c.target_modules, Some(PeftTargets::List(listed)));
        assert_eq!(c.rank_for(&paths[2]), 4);
        assert_eq!(c.rank_for(&paths[0]), 8);
        // The escaped full-path pattern must not leak onto layer 11.
        assert_eq!(c.rank_for("model.layers.11.self_attn.q_proj"), 8);
    }
}
