//! Oracle routing of a whole model: the bound on what any router can reach with its experts.
//!
//! Under oracle routing each MoE layer sends every token to the `k` experts whose outputs
//! `‖Eᵢ(x)‖` are largest on it ([`moekit_moe::MoeLayer::with_oracle`]); the router only gives
//! the combine weights. The perplexity of the oracle-routed model at the same `k` therefore
//! splits a converted model's loss into two parts: what a better router could win back
//! (learned minus oracle) and what the partition into experts itself costs (oracle minus
//! dense). It is a diagnostic: every expert runs on every token.

use moekit_llama::{FfnSlot, Llama};

use crate::error::{Result, RouterError};
use crate::policy::moe_layers;

/// Routes every MoE layer of `model` by the oracle to `k` experts per token (`None`: back to
/// its router). Fails, changing nothing, if the model has no MoE layer or a layer has fewer
/// than `k` experts.
pub fn route_by_oracle(model: &mut Llama, k: Option<usize>) -> Result<()> {
    let layers = moe_layers(model);
    if layers.is_empty() {
        return Err(RouterError::NoMoeLayers);
    }
    for (layer, moe) in layers {
        moe.check_oracle(k)
            .map_err(|e| RouterError::Policy(format!("layer {layer}: {e}")))?;
    }
    for layer in &mut model.layers {
        if let FfnSlot::Moe(moe) = &mut layer.ffn {
            moe.oracle = k;
        }
    }
    Ok(())
}
