//! The one table of checkpoint tensor names.
//!
//! Every weight of the model is a [`Weight`]; [`name`] gives its name in each file format.
//! Loaders and writers go through this table only.

/// A weight of the decoder, independent of any file format. Layer and expert indices are
/// zero-based. Shapes are PyTorch's (`[out, in]` for linear weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// Token embedding `[V, H]`.
    Embed,
    /// Final RMSNorm `[H]`.
    FinalNorm,
    /// Output projection `[V, H]` (absent when tied).
    LmHead,
    /// RMSNorm before attention `[H]`.
    AttnNorm(usize),
    /// RMSNorm before the FFN `[H]`.
    FfnNorm(usize),
    /// Query projection `[heads·D, H]`.
    Q(usize),
    /// Key projection `[kv·D, H]`.
    K(usize),
    /// Value projection `[kv·D, H]`.
    V(usize),
    /// Output projection `[H, heads·D]`.
    O(usize),
    /// Query bias (Qwen2).
    QBias(usize),
    /// Key bias (Qwen2).
    KBias(usize),
    /// Value bias (Qwen2).
    VBias(usize),
    /// Output bias (LLaMA with `attention_bias`).
    OBias(usize),
    /// RMSNorm of each query head `[D]` (Qwen3).
    QNorm(usize),
    /// RMSNorm of each key head `[D]` (Qwen3).
    KNorm(usize),
    /// Fused query/key/value projection `[(heads + 2·kv)·D, H]`, rows `[Q; K; V]` (Phi-3).
    Qkv(usize),
    /// Fused gate/up projection `[2I, H]`, rows `[gate; up]` (Phi-3).
    GateUp(usize),
    /// Dense FFN gate projection `[I, H]`.
    Gate(usize),
    /// Dense FFN up projection `[I, H]`.
    Up(usize),
    /// Dense FFN down projection `[H, I]`.
    Down(usize),
    /// Router `[E, H]`.
    Router(usize),
    /// First factor of a factored router, `[r, H]` (`router_factors.safetensors`).
    RouterDown(usize),
    /// Second factor of a factored router, `[E, r]`: `Router = RouterUp · RouterDown`.
    RouterUp(usize),
    /// Expert `e`'s gate projection `[I, H]`.
    ExpertGate(usize, usize),
    /// Expert `e`'s up projection `[I, H]`.
    ExpertUp(usize, usize),
    /// Expert `e`'s down projection `[H, I]`.
    ExpertDown(usize, usize),
    /// All experts' gate projections stacked `[E, I, H]` (GGUF).
    ExpertGates(usize),
    /// All experts' up projections stacked `[E, I, H]` (GGUF).
    ExpertUps(usize),
    /// All experts' down projections stacked `[E, H, I]` (GGUF).
    ExpertDowns(usize),
    /// Shared expert gate projection `[S, H]`.
    SharedGate(usize),
    /// Shared expert up projection `[S, H]`.
    SharedUp(usize),
    /// Shared expert down projection `[H, S]`.
    SharedDown(usize),
    /// Shared expert's sigmoid gate `[1, H]`.
    SharedScale(usize),
}

/// A checkpoint naming scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Hugging Face LLaMA / Mistral / Qwen2 (dense FFNs are `mlp.*_proj`).
    Hf,
    /// Hugging Face Mixtral (`block_sparse_moe.*`).
    Mixtral,
    /// Hugging Face Qwen2-MoE and Qwen3-MoE (`mlp.gate`, `mlp.experts.*`, Qwen2-MoE's
    /// `mlp.shared_expert*`).
    Qwen2Moe,
    /// llama.cpp GGUF (`blk.N.*`).
    Gguf,
}

/// The name of `weight` in `scheme`, or `None` if the scheme has no such tensor.
pub fn name(weight: Weight, scheme: Scheme) -> Option<String> {
    use Scheme::{Gguf, Hf, Mixtral, Qwen2Moe};
    use Weight::*;
    let hf = !matches!(scheme, Gguf);
    let l = |i: usize, rest: &str| {
        if hf {
            format!("model.layers.{i}.{rest}")
        } else {
            format!("blk.{i}.{rest}")
        }
    };
    Some(match (weight, scheme) {
        (Embed, Gguf) => "token_embd.weight".into(),
        (Embed, _) => "model.embed_tokens.weight".into(),
        (FinalNorm, Gguf) => "output_norm.weight".into(),
        (FinalNorm, _) => "model.norm.weight".into(),
        (LmHead, Gguf) => "output.weight".into(),
        (LmHead, _) => "lm_head.weight".into(),
        (AttnNorm(i), Gguf) => l(i, "attn_norm.weight"),
        (AttnNorm(i), _) => l(i, "input_layernorm.weight"),
        (FfnNorm(i), Gguf) => l(i, "ffn_norm.weight"),
        (FfnNorm(i), _) => l(i, "post_attention_layernorm.weight"),
        (Q(i), Gguf) => l(i, "attn_q.weight"),
        (Q(i), _) => l(i, "self_attn.q_proj.weight"),
        (K(i), Gguf) => l(i, "attn_k.weight"),
        (K(i), _) => l(i, "self_attn.k_proj.weight"),
        (V(i), Gguf) => l(i, "attn_v.weight"),
        (V(i), _) => l(i, "self_attn.v_proj.weight"),
        (O(i), Gguf) => l(i, "attn_output.weight"),
        (O(i), _) => l(i, "self_attn.o_proj.weight"),
        (QBias(i), Gguf) => l(i, "attn_q.bias"),
        (QBias(i), _) => l(i, "self_attn.q_proj.bias"),
        (KBias(i), Gguf) => l(i, "attn_k.bias"),
        (KBias(i), _) => l(i, "self_attn.k_proj.bias"),
        (VBias(i), Gguf) => l(i, "attn_v.bias"),
        (VBias(i), _) => l(i, "self_attn.v_proj.bias"),
        (OBias(i), Gguf) => l(i, "attn_output.bias"),
        (OBias(i), _) => l(i, "self_attn.o_proj.bias"),
        (QNorm(i), Gguf) => l(i, "attn_q_norm.weight"),
        (QNorm(i), _) => l(i, "self_attn.q_norm.weight"),
        (KNorm(i), Gguf) => l(i, "attn_k_norm.weight"),
        (KNorm(i), _) => l(i, "self_attn.k_norm.weight"),
        (Qkv(i), Gguf) => l(i, "attn_qkv.weight"),
        (Qkv(i), _) => l(i, "self_attn.qkv_proj.weight"),
        (GateUp(_), Gguf) => return None,
        (GateUp(i), _) => l(i, "mlp.gate_up_proj.weight"),
        (Gate(i), Gguf) => l(i, "ffn_gate.weight"),
        (Gate(i), _) => l(i, "mlp.gate_proj.weight"),
        (Up(i), Gguf) => l(i, "ffn_up.weight"),
        (Up(i), _) => l(i, "mlp.up_proj.weight"),
        (Down(i), Gguf) => l(i, "ffn_down.weight"),
        (Down(i), _) => l(i, "mlp.down_proj.weight"),
        (Router(i), Gguf) => l(i, "ffn_gate_inp.weight"),
        (Router(i), Mixtral) => l(i, "block_sparse_moe.gate.weight"),
        (Router(i), Qwen2Moe) => l(i, "mlp.gate.weight"),
        // The factors as PyTorch's `nn.Sequential(Linear(H, r), Linear(r, E))` names them in
        // place of the gate's single `Linear(H, E)`.
        (RouterDown(i), Mixtral) => l(i, "block_sparse_moe.gate.0.weight"),
        (RouterUp(i), Mixtral) => l(i, "block_sparse_moe.gate.1.weight"),
        (RouterDown(i), Qwen2Moe) => l(i, "mlp.gate.0.weight"),
        (RouterUp(i), Qwen2Moe) => l(i, "mlp.gate.1.weight"),
        (ExpertGate(i, e), Mixtral) => l(i, &format!("block_sparse_moe.experts.{e}.w1.weight")),
        (ExpertDown(i, e), Mixtral) => l(i, &format!("block_sparse_moe.experts.{e}.w2.weight")),
        (ExpertUp(i, e), Mixtral) => l(i, &format!("block_sparse_moe.experts.{e}.w3.weight")),
        (ExpertGate(i, e), Qwen2Moe) => l(i, &format!("mlp.experts.{e}.gate_proj.weight")),
        (ExpertUp(i, e), Qwen2Moe) => l(i, &format!("mlp.experts.{e}.up_proj.weight")),
        (ExpertDown(i, e), Qwen2Moe) => l(i, &format!("mlp.experts.{e}.down_proj.weight")),
        (ExpertGates(i), Gguf) => l(i, "ffn_gate_exps.weight"),
        (ExpertUps(i), Gguf) => l(i, "ffn_up_exps.weight"),
        (ExpertDowns(i), Gguf) => l(i, "ffn_down_exps.weight"),
        (SharedGate(i), Gguf) => l(i, "ffn_gate_shexp.weight"),
        (SharedGate(i), Qwen2Moe) => l(i, "mlp.shared_expert.gate_proj.weight"),
        (SharedUp(i), Gguf) => l(i, "ffn_up_shexp.weight"),
        (SharedUp(i), Qwen2Moe) => l(i, "mlp.shared_expert.up_proj.weight"),
        (SharedDown(i), Gguf) => l(i, "ffn_down_shexp.weight"),
        (SharedDown(i), Qwen2Moe) => l(i, "mlp.shared_expert.down_proj.weight"),
        (SharedScale(i), Gguf) => l(i, "ffn_gate_inp_shexp.weight"),
        (SharedScale(i), Qwen2Moe) => l(i, "mlp.shared_expert_gate.weight"),
        (Router(_) | ExpertGate(..) | ExpertUp(..) | ExpertDown(..), Hf)
        | (RouterDown(_) | RouterUp(_), Hf | Gguf)
        | (ExpertGates(_) | ExpertUps(_) | ExpertDowns(_), Hf | Mixtral | Qwen2Moe)
        | (ExpertGate(..) | ExpertUp(..) | ExpertDown(..), Gguf)
        | (SharedGate(_) | SharedUp(_) | SharedDown(_) | SharedScale(_), Hf | Mixtral) => {
            return None;
        }
    })
}

/// Where a weight lives in a checkpoint whose projections are fused: the fused weight, its
/// number of rows, and the rows of it that are `weight` (Phi-3: Q, K and V in `qkv_proj`, gate
/// and up in `gate_up_proj`), for a model of `heads` query heads, `kv` key/value heads of width
/// `d` and FFN width `i`; `None` for a weight stored alone.
pub fn fused_rows(
    weight: Weight,
    [heads, kv, d, i]: [usize; 4],
) -> Option<(Weight, usize, std::ops::Range<usize>)> {
    let (q, k) = (heads * d, kv * d);
    Some(match weight {
        Weight::Q(l) => (Weight::Qkv(l), q + 2 * k, 0..q),
        Weight::K(l) => (Weight::Qkv(l), q + 2 * k, q..q + k),
        Weight::V(l) => (Weight::Qkv(l), q + 2 * k, q + k..q + 2 * k),
        Weight::Gate(l) => (Weight::GateUp(l), 2 * i, 0..i),
        Weight::Up(l) => (Weight::GateUp(l), 2 * i, i..2 * i),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_format() {
        assert_eq!(
            name(Weight::Q(3), Scheme::Hf).unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            name(Weight::Q(3), Scheme::Gguf).unwrap(),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            name(Weight::ExpertUp(1, 7), Scheme::Mixtral).unwrap(),
            "model.layers.1.block_sparse_moe.experts.7.w3.weight"
        );
        assert_eq!(
            name(Weight::SharedScale(0), Scheme::Qwen2Moe).unwrap(),
            "model.layers.0.mlp.shared_expert_gate.weight"
        );
        assert_eq!(name(Weight::Router(0), Scheme::Hf), None);
    }
}
