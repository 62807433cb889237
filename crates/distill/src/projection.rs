//! Learned maps from the student's hidden width to the teacher's.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::error::DistillError;

/// Configuration of a [`HiddenProjection`].
#[derive(Config, Debug)]
pub struct HiddenProjectionConfig {
    /// Student hidden width `H_S`.
    pub student_width: usize,
    /// Teacher hidden width `H_T`.
    pub teacher_width: usize,
    /// Number of mapped layer pairs: one map per pair unless `shared`.
    #[config(default = 1)]
    pub pairs: usize,
    /// One map shared by every pair instead of one per pair.
    #[config(default = false)]
    pub shared: bool,
    /// Whether the maps have a bias (TinyBERT's `W_h` has none).
    #[config(default = false)]
    pub bias: bool,
    /// Initialiser of the maps' weights.
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / f64::sqrt(3.0), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// Trainable linear maps `h_S·W` (`W: [H_S, H_T]`) that lift student hidden states to the
/// teacher's width before a hidden-state loss (TinyBERT, Jiao et al. 2020), one per mapped layer
/// pair or one shared by all.
///
/// Train it together with the student: its parameters receive gradients from the hidden-state
/// losses of [`crate::Distiller`], which holds it.
#[derive(Module, Debug)]
pub struct HiddenProjection {
    /// The maps, one per pair, or a single shared one.
    pub maps: Vec<Linear>,
}

impl HiddenProjectionConfig {
    /// Builds the maps, checking that every size is positive.
    pub fn init(&self, device: &Device) -> crate::Result<HiddenProjection> {
        for (what, value) in [
            ("student_width", self.student_width),
            ("teacher_width", self.teacher_width),
            ("pairs", self.pairs),
        ] {
            if value == 0 {
                return Err(DistillError::OutOfRange {
                    what,
                    value: 0.0,
                    range: "[1, inf)",
                });
            }
        }
        let n = if self.shared { 1 } else { self.pairs };
        let linear = LinearConfig::new(self.student_width, self.teacher_width)
            .with_bias(self.bias)
            .with_initializer(self.initializer.clone());
        Ok(HiddenProjection {
            maps: (0..n).map(|_| linear.init(device)).collect(),
        })
    }
}

impl HiddenProjection {
    /// Whether one map serves every pair.
    pub fn is_shared(&self) -> bool {
        self.maps.len() == 1
    }

    /// Projects the student hidden state of layer pair `pair` (its position in the layer map).
    ///
    /// # Shapes
    /// - x: `[B, T, H_S]`
    /// - output: `[B, T, H_T]`
    ///
    /// # Errors
    /// [`DistillError::ProjectionPairs`] when there is no map for `pair`,
    /// [`DistillError::ShapeMismatch`] when `x` is not `H_S` wide.
    pub fn forward(&self, pair: usize, x: Tensor<3>) -> crate::Result<Tensor<3>> {
        let map = if self.is_shared() {
            &self.maps[0]
        } else {
            self.maps.get(pair).ok_or(DistillError::ProjectionPairs {
                expected: pair + 1,
                got: self.maps.len(),
            })?
        };
        let width = map.weight.dims()[0];
        let [b, t, h] = x.dims();
        if h != width {
            return Err(DistillError::ShapeMismatch {
                what: "student hidden state",
                expected: vec![b, t, width],
                got: vec![b, t, h],
            });
        }
        Ok(map.forward(x))
    }
}
