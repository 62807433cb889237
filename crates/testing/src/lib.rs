//! Test support shared by every moekit crate.
//!
//! [`device`] picks the backend from `MOEKIT_TEST_DEVICE`, so the same tests run on every
//! backend:
//!
//! | value | device |
//! |---|---|
//! | `flex` (default) | burn's Flex CPU backend |
//!
//! The `flex` and `wgpu` features are on by default, so one test build serves both CI runs.
//! | `wgpu-cpu` | WGPU on a CPU adapter (Mesa's lavapipe in CI) |
//! | `wgpu` | WGPU on the default adapter |
//! | `vulkan` | Vulkan through WGPU (needs the `vulkan` feature) |
//! | `cuda` | CUDA device 0 (needs the `cuda` feature) |

use burn::tensor::{Device, Distribution, Tensor, TensorData};

/// Name of the environment variable that selects the test device.
pub const DEVICE_VAR: &str = "MOEKIT_TEST_DEVICE";

/// The device under test, seeded with `seed` so random tensors are reproducible.
///
/// # Panics
/// On an unknown `MOEKIT_TEST_DEVICE` value or one whose backend was not compiled in: a test
/// run on the wrong backend must fail loudly, not pass on another one.
pub fn device(seed: u64) -> Device {
    let name = std::env::var(DEVICE_VAR).unwrap_or_else(|_| "flex".into());
    let device = match name.as_str() {
        #[cfg(feature = "flex")]
        "flex" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu-cpu" => Device::wgpu(burn::tensor::DeviceKind::Cpu),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::default()),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(burn::tensor::DeviceKind::default()),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0usize),
        other => panic!(
            "{DEVICE_VAR}={other} is unknown or its backend is not compiled in \
             (use flex, wgpu-cpu, wgpu, vulkan or cuda with the matching moekit-testing feature)"
        ),
    };
    device.seed(seed);
    device
}

/// A tensor of standard-normal values scaled by `std`.
pub fn normal<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device)
}

/// Host copy of a tensor's values.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Asserts `|a - b| <= atol + rtol·|b|` elementwise, reporting the worst element.
#[track_caller]
pub fn assert_close<const D: usize>(a: Tensor<D>, b: Tensor<D>, rtol: f32, atol: f32) {
    assert_close_msg(a, b, rtol, atol, "");
}

/// [`assert_close`] with a label for the failure message.
#[track_caller]
pub fn assert_close_msg<const D: usize>(
    a: Tensor<D>,
    b: Tensor<D>,
    rtol: f32,
    atol: f32,
    what: &str,
) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (a, b) = (values(a), values(b));
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        assert!(!x.is_nan() && !y.is_nan(), "{what}: NaN at {i}: {x} vs {y}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: element {i}: {} vs {} (rtol {rtol}, atol {atol})",
        a[i],
        b[i]
    );
}

/// A tensor from host values.
pub fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
