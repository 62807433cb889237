//! Which parameters a run trains, selected by their module paths.

use core::fmt;
use core::str::FromStr;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::tensor::Tensor;
use moekit_llama::Llama;

use crate::error::{Result, TrainError};

/// A named set of a LLaMA / MoE model's parameters.
///
/// | name | parameters (module path) |
/// |---|---|
/// | `router` | MoE router gates (and noise gates): `….router.…` |
/// | `experts` | routed experts: `….experts.…`. For PESC and LoRA-experts models these *are* the adapters; their shared dense FFN is `shared` |
/// | `shared` | shared experts: `….shared.…` |
/// | `adapters` | LoRA factors `A`, `B` of adapted projections (`with_lora`) |
/// | `attention` | attention projections (with their adapters) |
/// | `norms` | RMSNorm weights |
/// | `embeddings` | token embedding and output projection |
/// | `all` | everything |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trainable {
    /// MoE routers.
    Router,
    /// Routed experts.
    Experts,
    /// Shared experts.
    Shared,
    /// LoRA adapters.
    Adapters,
    /// Attention projections.
    Attention,
    /// RMSNorm weights.
    Norms,
    /// Embedding and output projection.
    Embeddings,
    /// Every parameter.
    All,
}

impl Trainable {
    /// Every set, in declaration order.
    pub const ALL: [Trainable; 8] = [
        Trainable::Router,
        Trainable::Experts,
        Trainable::Shared,
        Trainable::Adapters,
        Trainable::Attention,
        Trainable::Norms,
        Trainable::Embeddings,
        Trainable::All,
    ];

    /// The name used in `--trainable` lists.
    pub fn name(self) -> &'static str {
        match self {
            Trainable::Router => "router",
            Trainable::Experts => "experts",
            Trainable::Shared => "shared",
            Trainable::Adapters => "adapters",
            Trainable::Attention => "attention",
            Trainable::Norms => "norms",
            Trainable::Embeddings => "embeddings",
            Trainable::All => "all",
        }
    }

    /// The regular expression on module paths (`layers.3.ffn.Moe.router.gate`).
    fn pattern(self) -> &'static str {
        match self {
            Trainable::Router => r"\.router\.",
            Trainable::Experts => r"\.experts\.",
            Trainable::Shared => r"\.shared\.",
            Trainable::Adapters => r"\.(a|b)$",
            Trainable::Attention => r"\.attention\.",
            Trainable::Norms => r"(^|\.)[a-z_]*norm\.",
            Trainable::Embeddings => r"^(embed_tokens|lm_head)\.",
            Trainable::All => r".",
        }
    }
}

impl FromStr for Trainable {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase();
        Trainable::ALL
            .into_iter()
            .find(|t| t.name() == key)
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "unknown trainable set `{}` (known: {})",
                    s.trim(),
                    Trainable::ALL.map(Trainable::name).join(", ")
                ))
            })
    }
}

/// A union of [`Trainable`] sets, written `router,adapters`; everything else is frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainableSet(Vec<Trainable>);

impl TrainableSet {
    /// The union of `sets`.
    ///
    /// # Errors
    /// [`TrainError::Config`] for an empty list.
    pub fn new(sets: Vec<Trainable>) -> Result<Self> {
        if sets.is_empty() {
            return Err(TrainError::Config(
                "no trainable parameter set (expected e.g. router,adapters)".into(),
            ));
        }
        let mut unique: Vec<Trainable> = Vec::new();
        for s in sets {
            if !unique.contains(&s) {
                unique.push(s);
            }
        }
        Ok(Self(unique))
    }

    /// The sets.
    pub fn sets(&self) -> &[Trainable] {
        &self.0
    }

    /// The parameters of the union, as a burn parameter group.
    pub fn group(&self) -> ParamGroup {
        ParamGroup::from_any_regexes(self.0.iter().map(|t| t.pattern()).collect())
            .expect("the patterns are valid regular expressions")
    }

    /// `model` with exactly this union trainable: every float parameter is frozen (lazy ones
    /// initialised first), then the matching ones require gradients again. Call it on a model
    /// on an autodiff device.
    ///
    /// # Errors
    /// [`TrainError::Config`] when nothing in `model` matches (e.g. `router` on a dense model).
    pub fn apply(&self, model: Llama) -> Result<Llama> {
        let count = self.count(&model);
        if count == 0 {
            return Err(TrainError::Config(format!(
                "the model has no `{self}` parameters (a dense model has no router or experts; LoRA adapters need --lora-rank)"
            )));
        }
        Ok(moekit_lora::freeze(model).set_require_grad_group(self.group(), true))
    }

    /// How many scalar parameters of `module` the union selects.
    pub fn count<M: Module>(&self, module: &M) -> usize {
        struct Count {
            group: ParamGroup,
            path: Vec<String>,
            total: usize,
        }
        impl ModuleVisitor for Count {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if self.group.matches(&param.id, Some(&self.path.join("."))) {
                    self.total += param.lazy_shape().num_elements();
                }
            }
        }
        let mut v = Count {
            group: self.group(),
            path: Vec::new(),
            total: 0,
        };
        module.visit(&mut v);
        v.total
    }
}

impl FromStr for TrainableSet {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        let sets = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Trainable::from_str)
            .collect::<Result<Vec<_>>>()?;
        Self::new(sets)
    }
}

impl fmt::Display for TrainableSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|t| t.name()).collect();
        f.write_str(&names.join(","))
    }
}
