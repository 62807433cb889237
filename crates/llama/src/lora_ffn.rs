//! A frozen dense SwiGLU FFN with LoRA updates on its gate, up and down projections.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use moekit_lora::{LoraAdapter, freeze};
use moekit_moe::FeedForward;

use crate::{LlamaError, Result};

/// One of the three projections of a dense SwiGLU FFN (Hugging Face: `mlp.gate_proj`,
/// `mlp.up_proj`, `mlp.down_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnProj {
    /// `gate_proj`, `H → I`.
    Gate,
    /// `up_proj`, `H → I`.
    Up,
    /// `down_proj`, `I → H`.
    Down,
}

/// A dense FFN `SwiGLU(x·W_gate, x·W_up)·W_down` whose frozen weights keep moekit-moe's fused
/// `[gate | up]` layout (one GEMM), plus optional LoRA updates per projection:
/// `g = x·W_gate + Δ_gate(x)`, `u = x·W_up + Δ_up(x)`, `a = SiLU(g)⊙u`,
/// `y = a·W_down + Δ_down(a)`. Only the adapters train.
#[derive(Module, Debug)]
pub struct LoraFfn {
    /// The frozen FFN.
    pub base: FeedForward,
    /// Update of `gate_proj`.
    pub gate: Option<LoraAdapter>,
    /// Update of `up_proj`.
    pub up: Option<LoraAdapter>,
    /// Update of `down_proj`.
    pub down: Option<LoraAdapter>,
}

impl LoraFfn {
    /// Wraps `base` (frozen) with no adapters yet. Only gated FFNs (SwiGLU) have separate gate
    /// and up projections.
    pub fn new(base: FeedForward) -> Result<Self> {
        let i = base.intermediate_size();
        if base.activation.in_width(i) != 2 * i {
            return Err(LlamaError::Config(
                "LoRA on an FFN needs a gated activation (SwiGLU)".into(),
            ));
        }
        Ok(Self {
            base: freeze(base),
            gate: None,
            up: None,
            down: None,
        })
    }

    /// `(in, out)` widths of a projection.
    pub fn dims(base: &FeedForward, proj: FfnProj) -> (usize, usize) {
        let (h, i) = (base.hidden_size(), base.intermediate_size());
        match proj {
            FfnProj::Gate | FfnProj::Up => (h, i),
            FfnProj::Down => (i, h),
        }
    }

    /// The adapter slot of a projection.
    pub fn adapter_mut(&mut self, proj: FfnProj) -> &mut Option<LoraAdapter> {
        match proj {
            FfnProj::Gate => &mut self.gate,
            FfnProj::Up => &mut self.up,
            FfnProj::Down => &mut self.down,
        }
    }

    /// The adapter of a projection, if any.
    pub fn adapter(&self, proj: FfnProj) -> Option<&LoraAdapter> {
        match proj {
            FfnProj::Gate => self.gate.as_ref(),
            FfnProj::Up => self.up.as_ref(),
            FfnProj::Down => self.down.as_ref(),
        }
    }

    /// Applies the FFN with its updates.
    ///
    /// # Shapes
    /// - x: `[..., H]`
    /// - output: `[..., H]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let i = self.base.intermediate_size();
        let mut h = x.clone().matmul(self.base.w_in.val().unsqueeze());
        if self.gate.is_some() || self.up.is_some() {
            let update = |part: Tensor<D>, adapter: &Option<LoraAdapter>| match adapter {
                Some(a) => part + a.forward(x.clone()),
                None => part,
            };
            let g = update(h.clone().narrow(D - 1, 0, i), &self.gate);
            let u = update(h.narrow(D - 1, i, i), &self.up);
            h = Tensor::cat(vec![g, u], D - 1);
        }
        let a = self.base.activation.apply(h);
        let y = a.clone().matmul(self.base.w_out.val().unsqueeze());
        match &self.down {
            Some(adapter) => y + adapter.forward(a),
            None => y,
        }
    }

    /// A plain FFN computing the same function: each update folded into its weight.
    pub fn merged(&self) -> FeedForward {
        let mut ffn = self.base.clone();
        let i = ffn.intermediate_size();
        if self.gate.is_some() || self.up.is_some() {
            let w_in = ffn.w_in.val();
            let fold = |part: Tensor<2>, adapter: &Option<LoraAdapter>| match adapter {
                Some(a) => part + a.delta(),
                None => part,
            };
            let g = fold(w_in.clone().narrow(1, 0, i), &self.gate);
            let u = fold(w_in.narrow(1, i, i), &self.up);
            ffn.w_in = Param::from_tensor(Tensor::cat(vec![g, u], 1));
        }
        if let Some(d) = &self.down {
            ffn.w_out = Param::from_tensor(ffn.w_out.val() + d.delta());
        }
        ffn
    }
}
