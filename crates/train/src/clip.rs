//! Clipping by the global gradient norm (Pascanu et al. 2013; PyTorch's `clip_grad_norm_`).
//!
//! burn's `GradientClipping::Norm` clips each parameter's gradient on its own; LLM recipes clip
//! the norm of all gradients together, which keeps their direction.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// The L2 norm of all of `module`'s gradients in `grads`, `sqrt(Σ‖gᵢ‖²)`.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let sq = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + sq,
                    None => sq,
                });
            }
        }
    }
    let mut v = Norm { grads, sum: None };
    module.visit(&mut v);
    v.sum
        .map_or(0.0, |s| (s.into_scalar::<f32>() as f64).sqrt())
}

/// Scales every gradient of `module` in `grads` by `factor`.
pub fn scale_grads<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}

/// Clips the global norm of `module`'s gradients to `max_norm` (no change when it is
/// smaller) and returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = grad_norm(module, grads);
    if norm.is_finite() && norm > max_norm {
        scale_grads(module, grads, max_norm / (norm + 1e-6));
    }
    norm
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;

    use super::*;

    #[test]
    fn clips_the_norm_of_all_gradients_together() {
        let device = moekit_testing::device(0).autodiff();
        let linear = LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
        let loss = linear.forward(x).sum().mul_scalar(10.0);
        let mut grads = GradientsParams::from_grads(loss.backward(), &linear);
        // d/dW of 10·Σ(xW + b) = 10·xᵀ·1 per column, d/db = 10: ‖g‖² = 100·(2·14 + 2).
        let expected = (100.0f64 * 30.0).sqrt();
        let norm = clip_grad_norm(&linear, &mut grads, 1.0);
        assert!(
            (norm - expected).abs() < 1e-3 * expected,
            "{norm} vs {expected}"
        );
        let after = grad_norm(&linear, &grads);
        assert!((after - 1.0).abs() < 1e-4, "clipped to {after}");
        // Direction is kept: the bias gradient is still 10/‖g‖ per entry.
        let b: Vec<f32> = grads
            .get::<1>(linear.bias.as_ref().unwrap().id)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        for v in b {
            assert!((v as f64 - 10.0 / expected).abs() < 1e-4);
        }
        // Below the threshold nothing changes.
        let unchanged = clip_grad_norm(&linear, &mut grads, 5.0);
        assert!((unchanged - after).abs() < 1e-6);
        assert!((grad_norm(&linear, &grads) - after).abs() < 1e-6);
    }
}
