//! Grouped-query self-attention with rotary embeddings and a KV cache.

use burn::module::Module;
use burn::nn::{LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

use moekit_lora::LinearSlot;

use crate::config::LlamaConfig;
use crate::rope::RopeTables;

/// Multi-head attention whose `num_heads` query heads share `num_kv_heads` key/value heads
/// (GQA, Ainslie et al. 2023); causal, through burn's fused attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection `[H, heads·D]` (with a bias in Qwen2).
    pub q_proj: LinearSlot,
    /// Key projection `[H, kv_heads·D]`.
    pub k_proj: LinearSlot,
    /// Value projection `[H, kv_heads·D]`.
    pub v_proj: LinearSlot,
    /// Output projection `[heads·D, H]`.
    pub o_proj: LinearSlot,
    /// RMSNorm of each query head over its `D` values, before the rotation (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm of each key head, before the rotation (Qwen3).
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Key/value heads.
    #[module(skip)]
    pub num_kv_heads: usize,
    /// Per-head width `D`.
    #[module(skip)]
    pub head_dim: usize,
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache {
    /// An empty cache for `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values `[B, kv_heads, T, D]` to layer `layer` and returns
    /// all of them.
    fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}

impl Attention {
    /// A randomly initialised attention block for `config`.
    pub fn init(config: &LlamaConfig, device: &Device) -> Self {
        let (h, d) = (config.hidden_size, config.head_width());
        let (q, kv) = (config.num_attention_heads * d, config.kv_heads() * d);
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device).into();
        let qk_norm = config.architecture().is_ok_and(|a| a.qk_norm());
        let norm = || {
            qk_norm.then(|| {
                RmsNormConfig::new(d)
                    .with_epsilon(config.rms_norm_eps)
                    .init(device)
            })
        };
        Self {
            q_proj: linear(h, q, config.qkv_bias()),
            k_proj: linear(h, kv, config.qkv_bias()),
            v_proj: linear(h, kv, config.qkv_bias()),
            o_proj: linear(q, h, config.o_bias()),
            q_norm: norm(),
            k_norm: norm(),
            num_heads: config.num_attention_heads,
            num_kv_heads: config.kv_heads(),
            head_dim: d,
        }
    }

    /// Causal self-attention over `x`, continuing after the positions in `cache` if given.
    ///
    /// # Shapes
    /// - x: `[B, T, H]`
    /// - output: `[B, T, H]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        // `[B, T, n·D]` → `[B, n, T, D]`, each head normed first if the model norms them.
        let heads = |x: Tensor<3>, n: usize, norm: Option<&RmsNorm>| {
            let x = x.reshape([b, t, n, self.head_dim]);
            match norm {
                Some(norm) => norm.forward(x),
                None => x,
            }
            .swap_dims(1, 2)
        };
        let q = heads(
            self.q_proj.forward(x.clone()),
            self.num_heads,
            self.q_norm.as_ref(),
        );
        let k = heads(
            self.k_proj.forward(x.clone()),
            self.num_kv_heads,
            self.k_norm.as_ref(),
        );
        let (q, k) = (rope.apply(q), rope.apply(k));
        let v = heads(self.v_proj.forward(x), self.num_kv_heads, None);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        let out = attention(q, k, v, None, None, options);
        self.o_proj.forward(
            out.swap_dims(1, 2)
                .reshape([b, t, self.num_heads * self.head_dim]),
        )
    }

    /// `[B, kv_heads, S, D]` → `[B, heads, S, D]`: query head `h` reads kv head `h / group`.
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let group = self.num_heads / self.num_kv_heads;
        if group == 1 {
            return x;
        }
        let [b, n, s, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, n, group, s, d])
            .reshape([b, n * group, s, d])
    }
}
