//! PEFT's per-module overrides (`rank_pattern`, `alpha_pattern`): pattern → value, in the
//! order `adapter_config.json` lists them, because PEFT's `get_pattern_key` takes the FIRST key
//! (in that order) that matches a module.

use std::fmt;
use std::marker::PhantomData;

use regex::Regex;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::error::{LoraError, Result};

/// Pattern → value overrides, kept in file order (a JSON object read and written in order).
#[derive(Debug, Clone, PartialEq)]
pub struct PatternMap<T>(pub Vec<(String, T)>);

impl<T> Default for PatternMap<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Copy> PatternMap<T> {
    /// The value of the first pattern matching `path` (PEFT's rule, [`pattern_regex`]); a
    /// pattern that is not a valid regular expression matches nothing (`validate` refuses it).
    pub fn lookup(&self, path: &str) -> Option<T> {
        self.0
            .iter()
            .find(|(k, _)| pattern_regex(k).is_ok_and(|re| re.is_match(path)))
            .map(|(_, v)| *v)
    }

    /// Whether there are no overrides.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The patterns, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

impl<T> FromIterator<(String, T)> for PatternMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, T)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
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
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
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
                Ok(PatternMap(entries))
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
