//! Which losses a distillation run combines, and with what weights.

use core::fmt;
use core::str::FromStr;

use burn::config::Config;

use crate::error::DistillError;

/// One loss of the distillation family.
///
/// Names (for [`DistillLoss`]'s `name:weight` strings; matched case-insensitively, `_` read as
/// `-`) are listed with each variant, canonical name first.
#[derive(Config, Debug, Copy, PartialEq, Eq, Hash)]
pub enum LossKind {
    /// [`crate::forward_kl`]: `kl`, `fkl`, `forward-kl`.
    ForwardKl,
    /// [`crate::reverse_kl`]: `rkl`, `reverse-kl`.
    ReverseKl,
    /// [`crate::skew_forward_kl`] with the config's `alpha`: `skew-kl`, `skew-fkl`.
    SkewForwardKl,
    /// [`crate::skew_reverse_kl`] with the config's `alpha`: `skew-rkl`.
    SkewReverseKl,
    /// [`crate::generalized_jsd`] with the config's `beta`: `jsd`, `gkd`.
    Jsd,
    /// [`crate::total_variation`]: `tv`.
    TotalVariation,
    /// [`crate::top_k_kl`] with the config's `top_k`: `topk-kl`, `topk`.
    TopKKl,
    /// [`crate::cross_entropy`] on the labels: `ce`.
    CrossEntropy,
    /// [`crate::hidden_mse`] averaged over the mapped layer pairs: `hidden-mse`, `mse`.
    HiddenMse,
    /// [`crate::hidden_cosine`] averaged over the mapped layer pairs: `hidden-cos`,
    /// `hidden-cosine`, `cos`.
    HiddenCosine,
}

impl LossKind {
    /// Every kind, in declaration order.
    pub const ALL: [LossKind; 10] = [
        LossKind::ForwardKl,
        LossKind::ReverseKl,
        LossKind::SkewForwardKl,
        LossKind::SkewReverseKl,
        LossKind::Jsd,
        LossKind::TotalVariation,
        LossKind::TopKKl,
        LossKind::CrossEntropy,
        LossKind::HiddenMse,
        LossKind::HiddenCosine,
    ];

    /// Accepted names, canonical first.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            LossKind::ForwardKl => &["kl", "fkl", "forward-kl"],
            LossKind::ReverseKl => &["rkl", "reverse-kl"],
            LossKind::SkewForwardKl => &["skew-kl", "skew-fkl"],
            LossKind::SkewReverseKl => &["skew-rkl"],
            LossKind::Jsd => &["jsd", "gkd"],
            LossKind::TotalVariation => &["tv"],
            LossKind::TopKKl => &["topk-kl", "topk"],
            LossKind::CrossEntropy => &["ce"],
            LossKind::HiddenMse => &["hidden-mse", "mse"],
            LossKind::HiddenCosine => &["hidden-cos", "hidden-cosine", "cos"],
        }
    }

    /// The canonical name, as used for the named parts of [`crate::LossParts`].
    pub fn name(self) -> &'static str {
        self.names()[0]
    }

    /// Whether the loss compares hidden states (and so needs a layer map).
    pub fn is_hidden(self) -> bool {
        matches!(self, LossKind::HiddenMse | LossKind::HiddenCosine)
    }

    /// The kind with this name.
    ///
    /// # Errors
    /// [`DistillError::UnknownLoss`] listing the accepted names.
    pub fn from_name(name: &str) -> crate::Result<Self> {
        let key = name.trim().to_ascii_lowercase().replace('_', "-");
        LossKind::ALL
            .into_iter()
            .find(|k| k.names().contains(&key.as_str()))
            .ok_or_else(|| DistillError::UnknownLoss {
                name: name.trim().to_string(),
                known: LossKind::ALL.map(LossKind::name).join(", "),
            })
    }
}

impl FromStr for LossKind {
    type Err = DistillError;

    fn from_str(s: &str) -> crate::Result<Self> {
        Self::from_name(s)
    }
}

/// One weighted term of a [`DistillLoss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTerm {
    /// The loss.
    pub kind: LossKind,
    /// Its weight in the total, finite and `>= 0`.
    pub weight: f64,
}

/// A weighted combination `Σᵢ wᵢ·Lᵢ` of distinct losses, the objective of a distillation run.
///
/// Written (and parsed, [`FromStr`]) as a comma-separated list of `name:weight` terms, such as
/// `kl:1,hidden-mse:0.5,ce:0.1` (the `--loss` flag of the command line); a term without
/// `:weight` has weight 1. Serialised (in [`crate::DistillConfig`]) as that string.
///
/// ```
/// use moekit_distill::{DistillLoss, LossKind};
/// let loss: DistillLoss = "kl:1,hidden-mse:0.5,ce:0.1".parse().unwrap();
/// assert_eq!(loss.weight(LossKind::HiddenMse), Some(0.5));
/// assert_eq!(loss.to_string(), "kl:1,hidden-mse:0.5,ce:0.1");
/// assert!("kl:1,foo:2".parse::<DistillLoss>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DistillLoss {
    terms: Vec<LossTerm>,
}

impl DistillLoss {
    /// A combination of these terms.
    ///
    /// # Errors
    /// [`DistillError::InvalidSpec`] for no terms or only zero weights,
    /// [`DistillError::DuplicateLoss`] for a kind
    /// listed twice, [`DistillError::InvalidWeight`] for a negative or non-finite weight.
    pub fn new(terms: Vec<LossTerm>) -> crate::Result<Self> {
        if terms.is_empty() {
            return Err(DistillError::InvalidSpec {
                spec: String::new(),
                reason: "no loss terms".into(),
            });
        }
        for (i, term) in terms.iter().enumerate() {
            if !(term.weight.is_finite() && term.weight >= 0.0) {
                return Err(DistillError::InvalidWeight {
                    name: term.kind.name().into(),
                    weight: term.weight.to_string(),
                });
            }
            if terms[..i].iter().any(|t| t.kind == term.kind) {
                return Err(DistillError::DuplicateLoss {
                    name: term.kind.name().into(),
                });
            }
        }
        if terms.iter().all(|t| t.weight == 0.0) {
            return Err(DistillError::InvalidSpec {
                spec: String::new(),
                reason: "every weight is 0: nothing would be learnt".into(),
            });
        }
        Ok(Self { terms })
    }

    /// A single loss of weight 1.
    pub fn single(kind: LossKind) -> Self {
        Self {
            terms: vec![LossTerm { kind, weight: 1.0 }],
        }
    }

    /// The terms, in the order given.
    pub fn terms(&self) -> &[LossTerm] {
        &self.terms
    }

    /// The weight of `kind`, if it is a term.
    pub fn weight(&self, kind: LossKind) -> Option<f64> {
        self.terms.iter().find(|t| t.kind == kind).map(|t| t.weight)
    }

    /// The terms that count: those of weight > 0. A term of weight 0 is accepted in a spec
    /// (`kl:0,ce:1`) but never computed, so it costs nothing and cannot fail a step.
    pub fn active_terms(&self) -> impl Iterator<Item = &LossTerm> {
        self.terms.iter().filter(|t| t.weight > 0.0)
    }

    /// Whether any term of weight > 0 compares hidden states.
    pub fn wants_hidden(&self) -> bool {
        self.active_terms().any(|t| t.kind.is_hidden())
    }

    /// Whether any term of weight > 0 needs the teacher (all but `ce`, which uses the labels
    /// only).
    pub fn needs_teacher(&self) -> bool {
        self.active_terms()
            .any(|t| t.kind != LossKind::CrossEntropy)
    }
}

impl FromStr for DistillLoss {
    type Err = DistillError;

    fn from_str(spec: &str) -> crate::Result<Self> {
        let invalid = |reason: &str| DistillError::InvalidSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if spec.trim().is_empty() {
            return Err(invalid("no loss terms (expected e.g. kl:1,ce:0.1)"));
        }
        let mut terms = Vec::new();
        for item in spec.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(invalid("empty term (stray comma?)"));
            }
            let (name, weight) = match item.split_once(':') {
                Some((name, weight)) => (name.trim(), Some(weight.trim())),
                None => (item, None),
            };
            let kind = LossKind::from_name(name)?;
            let weight = match weight {
                None => 1.0,
                Some(w) => match w.parse::<f64>() {
                    Ok(v) if v.is_finite() && v >= 0.0 => v,
                    _ => {
                        return Err(DistillError::InvalidWeight {
                            name: name.to_string(),
                            weight: w.to_string(),
                        });
                    }
                },
            };
            terms.push(LossTerm { kind, weight });
        }
        Self::new(terms).map_err(|e| match e {
            DistillError::InvalidSpec { reason, .. } => invalid(&reason),
            e => e,
        })
    }
}

impl fmt::Display for DistillLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}", t.kind.name(), t.weight)?;
        }
        Ok(())
    }
}

impl burn::serde::Serialize for DistillLoss {
    fn serialize<S: burn::serde::Serializer>(
        &self,
        serializer: S,
    ) -> core::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> burn::serde::Deserialize<'de> for DistillLoss {
    fn deserialize<D: burn::serde::Deserializer<'de>>(
        deserializer: D,
    ) -> core::result::Result<Self, D::Error> {
        let spec = String::deserialize(deserializer)?;
        spec.parse().map_err(burn::serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for kind in LossKind::ALL {
            for name in kind.names() {
                assert_eq!(LossKind::from_name(name).unwrap(), kind);
                assert_eq!(LossKind::from_name(&name.to_uppercase()).unwrap(), kind);
            }
        }
        assert_eq!(
            LossKind::from_name("hidden_mse").unwrap(),
            LossKind::HiddenMse
        );
    }

    #[test]
    fn parses_weights_defaults_and_whitespace() {
        let l: DistillLoss = " kl : 1 , hidden-mse:0.5,ce ".parse().unwrap();
        assert_eq!(
            l.terms(),
            &[
                LossTerm {
                    kind: LossKind::ForwardKl,
                    weight: 1.0
                },
                LossTerm {
                    kind: LossKind::HiddenMse,
                    weight: 0.5
                },
                LossTerm {
                    kind: LossKind::CrossEntropy,
                    weight: 1.0
                },
            ]
        );
        assert!(l.wants_hidden());
        assert!(l.needs_teacher());
        assert!(!"ce".parse::<DistillLoss>().unwrap().needs_teacher());
        assert_eq!(l.to_string().parse::<DistillLoss>().unwrap(), l);
    }
}
