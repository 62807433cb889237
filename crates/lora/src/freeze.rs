//! Freezing a module's parameters for adapter training.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

/// Makes every float parameter of `module` stop requiring gradients, initialising lazily
/// initialised ones first.
///
/// burn's `Module::no_grad` only records the setting on a parameter that has not been
/// initialised yet (a freshly built model's weights are lazy until first used). Measured on a
/// 30-layer SmolLM2-sized stack (`examples/bench_lora.rs`), such weights then cost the LoRA
/// training step about 8.6 MB more per layer than initialised frozen ones; initialising before
/// freezing avoids that.
pub fn freeze<M: Module>(module: M) -> M {
    struct Freeze;
    impl ModuleMapper for Freeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !param.is_initialized() {
                let _ = param.val();
            }
            param.set_require_grad(false)
        }
    }
    module.map(&mut Freeze)
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;

    use super::*;

    #[test]
    fn initialises_lazy_weights_and_stops_their_gradients() {
        let device = moekit_testing::device(0).autodiff();
        let linear = LinearConfig::new(4, 3).init(&device);
        let frozen = freeze(linear);
        assert!(frozen.weight.is_initialized());
        assert!(!frozen.weight.val().is_require_grad());
        let x = Tensor::<2>::ones([2, 4], &device).require_grad();
        let grads = frozen.forward(x.clone()).sum().backward();
        assert!(frozen.weight.val().grad(&grads).is_none());
        assert!(x.grad(&grads).is_some());
    }
}
