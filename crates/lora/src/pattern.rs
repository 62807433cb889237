//! PEFT's per-module overrides (`rank_pattern`, `alpha_pattern`): pattern → value, in the
//! order `adapter_config.json` lists them, because PEFT's `get_pattern_key` takes the FIRST key
//! (in that order) that matches a module.

use std::fmt;
use std::marker::PhantomData;
use std::sync::OnceLock;

use regex::Regex;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::error::{LoraError, Result};

/// Pattern → value overrides, kept in file order (a JSON object read and written in order).
#[derive(Debug, Clone)]
pub struct PatternMap<T> {
    entries: Vec<(String, T)>,
    /// Each pattern's regular expression (`None`: invalid), compiled on the first lookup.
    compiled: OnceLock<Vec<Option<Regex>>>,
}

impl<T> Default for PatternMap<T> {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl<T: PartialEq> PartialEq for PatternMap<T> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<T> PatternMap<T> {
    /// The overrides `entries`, in the order given (the first match wins).
    pub fn new(entries: Vec<(String, T)>) -> Self {
        Self {
            entries,
            compiled: OnceLock::new(),
        }
    }

    /// The `(pattern, value)` entries, in order.
    pub fn entries(&self) -> &[(String, T)] {
        &self.entries
    }
}

impl<T: Copy> PatternMap<T> {
    /// The value of the first pattern matching `path` (PEFT's rule, [`pattern_regex`]); a
    /// pattern that is not a valid regular expression matches nothing (`validate` refuses it).
    pub fn lookup(&self, path: &str) -> Option<T> {
        let compiled = self.compiled.get_or_init(|| {
            self.entries
                .iter()
                .map(|(k, _)| pattern_regex(k).ok())
                .collect()
        });
        self.entries
            .iter()
            .zip(compiled)
            .find(|(_, re)| re.as_ref().is_some_and(|re| re.is_match(path)))
            .map(|((_, v), _)| *v)
    }

    /// Whether there are no overrides.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The patterns, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
}

impl<T> FromIterator<(String, T)> for PatternMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, T)>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

/// PEFT's pattern rule (`get_pattern_key`): `key` matches a path that equals it or ends in
/// `.key`, `key` read as a regular expression.
pub(crate) fn pattern_regex(key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| LoraError::Pattern {
        pattern: key.to_string(),
        reason: e.to_string(),
    })
}

impl<T: Serialize> Serialize for PatternMap<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for PatternMap<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct InOrder<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for InOrder<T> {
            type Value = PatternMap<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of pattern → value")
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut access: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, T)> = Vec::new();
                while let Some((k, v)) = access.next_entry::<String, T>()? {
                    if entries.iter().any(|(e, _)| *e == k) {
                        return Err(serde::de::Error::custom(format!("pattern `{k}` twice")));
                    }
                    entries.push((k, v));
                }
                Ok(PatternMap::new(entries))
            }
        }

        deserializer.deserialize_map(InOrder(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_pattern_in_file_order_wins_as_in_peft() {
        // Alphabetically `layers.0…` sorts first; PEFT takes `q_proj`, the first in the file.
        let text = r#"{"q_proj": 32.0, "layers.0.self_attn.q_proj": 8.0}"#;
        let m: PatternMap<f64> = serde_json::from_str(text).unwrap();
        assert_eq!(m.lookup("model.layers.0.self_attn.q_proj"), Some(32.0));
        let text = r#"{"layers.0.self_attn.q_proj": 8.0, "q_proj": 32.0}"#;
        let m: PatternMap<f64> = serde_json::from_str(text).unwrap();
        assert_eq!(m.lookup("model.layers.0.self_attn.q_proj"), Some(8.0));
        assert_eq!(m.lookup("model.layers.1.self_attn.q_proj"), Some(32.0));
        assert_eq!(m.lookup("model.layers.1.self_attn.v_proj"), None);
        let compact = text.replace(", ", ",").replace(": ", ":");
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            compact,
            "written in file order"
        );
        assert!(serde_json::from_str::<PatternMap<f64>>(r#"{"a": 1, "a": 2}"#).is_err());
    }
}
