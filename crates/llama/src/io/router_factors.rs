//! Factored router gates beside a Hugging Face checkpoint.
//!
//! Mixtral and Qwen2-MoE files hold one `[E, H]` gate per MoE layer. A factored router
//! (`W_g = W_down·W_up`, [`moekit_moe::RouterConfig::rank`]) is written there as the product,
//! so that transformers loads the directory as it is (and computes the full gate), and its
//! factors go into [`ROUTER_FACTORS`] in the same directory ([`Weight::RouterDown`] `[r, H]`,
//! [`Weight::RouterUp`] `[E, r]`, named as PyTorch names `nn.Sequential(Linear(H, r),
//! Linear(r, E))`). Loading a directory that holds the file gives the factored routers back,
//! after checking that each product is the gate in the main file: a side file left from another
//! save is an error, not a silently different model.

use std::path::Path;

use burn::tensor::Device;
use moekit_moe::Router;

use super::host::HostTensor;
use super::names::{Scheme, Weight, name};
use super::safetensors::{SafetensorsDir, SaveDtype, write};
use super::source::TensorSource;
use crate::ffn::FfnSlot;
use crate::model::Llama;
use crate::{LlamaError, Result};

/// The side file of factored router gates.
pub const ROUTER_FACTORS: &str = "router_factors.safetensors";

/// How far (relative Frobenius norm) a product of stored factors may be from the stored gate:
/// loose enough for factors and gate each rounded to bf16, far below what another model's
/// factors give.
const MATCH_TOLERANCE: f32 = 0.02;

/// Writes the factors of `model`'s factored routers (of their gates as the model file holds
/// them, divided by the combine temperature) into `dir/`[`ROUTER_FACTORS`]
/// (atomically), or removes a file left there by an earlier save when no router is factored.
pub(crate) fn save(model: &Llama, dir: &Path, scheme: Scheme, dtype: SaveDtype) -> Result<()> {
    let path = dir.join(ROUTER_FACTORS);
    let mut tensors = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        tensors.extend(layer_factors(l, &layer.ffn, scheme)?);
    }
    if tensors.is_empty() {
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| LlamaError::io(&path, e))?;
        }
        return Ok(());
    }
    write(&path, &tensors, dtype)
}

/// The factors of layer `l`'s router, if it is factored (of the gate the model file holds,
/// `W_g / τ`), named in `scheme`; none for a full gate or a dense layer.
pub(crate) fn layer_factors(
    l: usize,
    ffn: &FfnSlot,
    scheme: Scheme,
) -> Result<Vec<(String, HostTensor)>> {
    let FfnSlot::Moe(moe) = ffn else {
        return Ok(Vec::new());
    };
    let Some(up) = &moe.router.gate_up else {
        return Ok(Vec::new());
    };
    // Factors of the gate the model file holds, `W_g / τ` (`W_up / τ` here).
    let up = up.val() / moe.router.combine_temperature;
    [
        (Weight::RouterDown(l), moe.router.gate.val()),
        (Weight::RouterUp(l), up),
    ]
    .into_iter()
    .map(|(w, t)| {
        let n = name(w, scheme).ok_or_else(|| LlamaError::Export {
            format: "a checkpoint without MoE layers",
            reason: format!("layer {l} has a factored router"),
        })?;
        Ok((n, HostTensor::from_tensor(t).transpose()))
    })
    .collect()
}

/// Opens `dir/`[`ROUTER_FACTORS`] if there is one.
pub(crate) fn open(dir: &Path) -> Result<Option<SafetensorsDir>> {
    let path = dir.join(ROUTER_FACTORS);
    path.exists()
        .then(|| SafetensorsDir::open_file(&path))
        .transpose()
}

/// The rank of each layer's factored router that `factors` holds (`None`: a full gate), for
/// `layers` layers; from the stored factors' shapes (headers only, no data read).
pub(crate) fn ranks(factors: &SafetensorsDir, scheme: Scheme, layers: usize) -> Vec<Option<usize>> {
    (0..layers)
        .map(|l| {
            let n = name(Weight::RouterDown(l), scheme)?;
            factors.shape(&n)?.first().copied()
        })
        .collect()
}

/// `router` (layer `l`, its full gate read from the main file) with the factors `factors`
/// holds for it; unchanged if it holds none.
pub(crate) fn apply(
    router: Router,
    factors: &SafetensorsDir,
    scheme: Scheme,
    l: usize,
    device: &Device,
) -> Result<Router> {
    let path = factors.path().join(ROUTER_FACTORS);
    let read = |w: Weight| match name(w, scheme) {
        Some(n) => factors.read(&n).map(|t| t.map(|t| (n, t))),
        None => Ok(None),
    };
    let (down, up) = match (read(Weight::RouterDown(l))?, read(Weight::RouterUp(l))?) {
        (None, None) => return Ok(router),
        (Some(down), Some(up)) => (down, up),
        (Some((n, _)), None) | (None, Some((n, _))) => {
            return Err(LlamaError::corrupt(
                &path,
                format!("layer {l}: `{n}` is there without the other factor of the router"),
            ));
        }
    };
    let (h, e) = (router.hidden_size(), router.num_experts());
    let r = down.1.shape.first().copied().unwrap_or(0);
    if r == 0 {
        return Err(LlamaError::corrupt(
            &path,
            format!("layer {l}: `{}` has rank 0", down.0),
        ));
    }
    for ((n, t), expected) in [(&down, [r, h]), (&up, [e, r])] {
        if t.shape != expected {
            return Err(LlamaError::TensorShape {
                name: n.clone(),
                expected: expected.to_vec(),
                got: t.shape.clone(),
            });
        }
    }
    let full = router.weight();
    let factored = router
        .with_factors(
            down.1.transpose().to_tensor(device),
            up.1.transpose().to_tensor(device),
        )
        .map_err(|e| LlamaError::corrupt(&path, format!("layer {l}: {e}")))?;
    let gap = (factored.weight() - full.clone()).square().sum().sqrt();
    let (gap, norm) = (
        gap.into_scalar::<f32>(),
        full.square().sum().sqrt().into_scalar::<f32>(),
    );
    // A NaN gap (non-finite factors) fails too.
    if gap.is_nan() || gap > MATCH_TOLERANCE * norm {
        return Err(LlamaError::corrupt(
            &path,
            format!(
                "layer {l}: the product of the router factors differs from the gate in the \
                 model file (relative difference {:.3}): the file is left from another save; \
                 delete it to load the full gates",
                gap / norm.max(f32::MIN_POSITIVE)
            ),
        ));
    }
    Ok(factored)
}
