//! Which modules of a model get adapters: name patterns.

use regex::Regex;

use crate::error::{LoraError, Result};

/// Compiled target-module patterns.
///
/// Each pattern is a regular expression that must match a module path *whole* or a dotted
/// suffix of it whole. So `q_proj` matches `model.layers.0.self_attn.q_proj` (PEFT's list
/// semantics: the name or a `.`-separated ending), `q_proj|v_proj` matches either,
/// `mlp.*` matches every projection under an `mlp`, and a full path such as
/// `model.layers.0.self_attn.q_proj` (or PEFT's single-regex form,
/// `.*\.layers\.[0-3]\..*q_proj`) matches exactly what it says.
#[derive(Debug, Clone)]
pub struct TargetModules {
    patterns: Vec<(String, Regex)>,
}

impl TargetModules {
    /// Compiles `patterns`.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                Regex::new(&format!("^(?:{p})$"))
                    .map(|re| (p.to_string(), re))
                    .map_err(|e| LoraError::Pattern {
                        pattern: p.to_string(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { patterns })
    }

    /// The patterns as given.
    pub fn patterns(&self) -> Vec<&str> {
        self.patterns.iter().map(|(p, _)| p.as_str()).collect()
    }

    /// Whether `path` is a target.
    pub fn matches(&self, path: &str) -> bool {
        let suffixes =
            std::iter::once(path).chain(path.match_indices('.').map(|(i, _)| &path[i + 1..]));
        suffixes
            .into_iter()
            .any(|s| self.patterns.iter().any(|(_, re)| re.is_match(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "model.layers.0.self_attn.q_proj";
    const GATE: &str = "model.layers.12.mlp.gate_proj";

    #[test]
    fn suffix_and_regex_semantics() {
        let t = TargetModules::new(&["q_proj|v_proj"]).unwrap();
        assert!(t.matches(Q));
        assert!(t.matches("model.layers.3.self_attn.v_proj"));
        assert!(!t.matches("model.layers.3.self_attn.k_proj"));
        assert!(!t.matches(GATE));

        let mlp = TargetModules::new(&["mlp.*"]).unwrap();
        assert!(mlp.matches(GATE));
        assert!(!mlp.matches(Q));

        // A pattern must match a whole dotted suffix, not a substring.
        let part = TargetModules::new(&["proj", "q_pro"]).unwrap();
        assert!(!part.matches(Q));

        let exact = TargetModules::new(&[Q]).unwrap();
        assert!(exact.matches(Q));
        assert!(!exact.matches("model.layers.10.self_attn.q_proj"));

        let layers = TargetModules::new(&[r".*\.layers\.1[0-9]\..*_proj"]).unwrap();
        assert!(layers.matches(GATE));
        assert!(!layers.matches(Q));
    }

    #[test]
    fn bad_regex_is_an_error() {
        let err = TargetModules::new(&["q_proj("]).unwrap_err();
        assert!(err.to_string().contains("q_proj("), "{err}");
    }
}
