//! The decoder against a naive f64 implementation written from the formulas: embedding,
//! RMSNorm, rotate-half RoPE, grouped-query causal attention, SwiGLU or softmax top-k MoE,
//! tied or separate output projection. Also the KV cache against the full forward pass.

use burn::tensor::Tensor;
use moekit_llama::io::host::HostTensor;
use moekit_llama::{FfnSlot, Llama, LlamaConfig};
use moekit_lora::{LinearSlot, LoraAdapter, LoraConfig};
use moekit_testing::device;

/// Element-wise `|a - b| <= tol·(1 + |b|)`.
fn assert_near(got: &[f64], expected: &[f64], tol: f64, label: &str) {
    assert_eq!(got.len(), expected.len(), "{label}: lengths");
    for (i, (a, b)) in got.iter().zip(expected).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{label}: element {i}: {a} vs {b}"
        );
    }
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    HostTensor::from_tensor(t)
        .data
        .iter()
        .map(|&v| v as f64)
        .collect()
}

/// `x [in] · w [in, out]`.
fn matvec(x: &[f64], w: &[f64], out: usize) -> Vec<f64> {
    let mut y = vec![0.0; out];
    for (i, xi) in x.iter().enumerate() {
        for (j, yj) in y.iter_mut().enumerate() {
            *yj += xi * w[i * out + j];
        }
    }
    y
}

fn rms_norm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * r * g).collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU with moekit's fused `w_in [H, 2I] = [gate | up]` and `w_out [I, H]`.
fn swiglu(x: &[f64], w_in: &[f64], w_out: &[f64], i: usize, h: usize) -> Vec<f64> {
    let gu = matvec(x, w_in, 2 * i);
    let act: Vec<f64> = (0..i).map(|j| silu(gu[j]) * gu[i + j]).collect();
    matvec(&act, w_out, h)
}

/// Rotate-half RoPE of one head vector at position `pos`.
fn rope(x: &mut [f64], pos: usize, base: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let theta = pos as f64 * base.powf(-2.0 * i as f64 / d as f64);
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * theta.cos() - b * theta.sin();
        x[i + half] = b * theta.cos() + a * theta.sin();
    }
}

/// `W [in, out]` plus `s·A·B` of an optional LoRA adapter, in f64.
fn with_update(w: Vec<f64>, adapter: Option<&LoraAdapter>) -> Vec<f64> {
    let Some(ad) = adapter else { return w };
    let (a, b, r, out) = (host(ad.a.val()), host(ad.b.val()), ad.rank(), ad.d_out());
    let s = ad.scaling();
    let mut w = w;
    for (row, w_row) in w.chunks_mut(out).enumerate() {
        for (j, w) in w_row.iter_mut().enumerate() {
            *w += s * (0..r).map(|k| a[row * r + k] * b[k * out + j]).sum::<f64>();
        }
    }
    w
}

/// A projection with any LoRA update folded in (`W + s·A·B`).
fn linear(slot: &LinearSlot, x: &[f64], out: usize) -> Vec<f64> {
    let l = slot.base();
    let w = with_update(host(l.weight.val()), slot.adapter());
    let mut y = matvec(x, &w, out);
    if let Some(b) = &l.bias {
        y.iter_mut().zip(host(b.val())).for_each(|(y, b)| *y += b);
    }
    y
}

/// Logits `[T, V]` of one sequence, computed naively.
fn reference(model: &Llama, tokens: &[u32]) -> Vec<f64> {
    let c = &model.config;
    let (h, v, d) = (c.hidden_size, c.vocab_size, c.head_width());
    let (nh, nkv) = (c.num_attention_heads, c.kv_heads());
    let base = c.rope_base();
    let embed = host(model.embed_tokens.weight.val());
    let mut hs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for layer in &model.layers {
        let a = &layer.attention;
        let g1 = host(layer.input_norm.gamma.val());
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in hs.iter().enumerate() {
            let xn = rms_norm(x, &g1, c.rms_norm_eps);
            let mut q = linear(&a.q_proj, &xn, nh * d);
            let mut k = linear(&a.k_proj, &xn, nkv * d);
            q.chunks_mut(d).for_each(|head| rope(head, pos, base));
            k.chunks_mut(d).for_each(|head| rope(head, pos, base));
            qs.push(q);
            ks.push(k);
            vs.push(linear(&a.v_proj, &xn, nkv * d));
        }
        let g2 = host(layer.post_attention_norm.gamma.val());
        for t in 0..hs.len() {
            let mut attn = vec![0.0; nh * d];
            for head in 0..nh {
                let kv = head / (nh / nkv);
                let q = &qs[t][head * d..(head + 1) * d];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        let k = &ks[s][kv * d..(kv + 1) * d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (s, score) in scores.iter().enumerate() {
                    let p = (score - max).exp() / z;
                    for j in 0..d {
                        attn[head * d + j] += p * vs[s][kv * d + j];
                    }
                }
            }
            let o = linear(&a.o_proj, &attn, h);
            hs[t].iter_mut().zip(o).for_each(|(x, o)| *x += o);
            let xn = rms_norm(&hs[t], &g2, c.rms_norm_eps);
            let y = match &layer.ffn {
                FfnSlot::Dense(f) => swiglu(
                    &xn,
                    &host(f.w_in.val()),
                    &host(f.w_out.val()),
                    f.intermediate_size(),
                    h,
                ),
                FfnSlot::Lora(f) => {
                    let i = f.base.intermediate_size();
                    let w_in = host(f.base.w_in.val());
                    let cols = |c0: usize| -> Vec<f64> {
                        w_in.chunks(2 * i)
                            .flat_map(|r| r[c0..c0 + i].to_vec())
                            .collect()
                    };
                    let gate = with_update(cols(0), f.gate.as_ref());
                    let up = with_update(cols(i), f.up.as_ref());
                    let fused: Vec<f64> = gate
                        .chunks(i)
                        .zip(up.chunks(i))
                        .flat_map(|(g, u)| g.iter().chain(u).copied().collect::<Vec<_>>())
                        .collect();
                    let w_out = with_update(host(f.base.w_out.val()), f.down.as_ref());
                    swiglu(&xn, &fused, &w_out, i, h)
                }
                FfnSlot::Moe(m) => {
                    let e = m.experts.num_experts();
                    let i = m.experts.intermediate_size();
                    let logits = matvec(&xn, &host(m.router.gate.val()), e);
                    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                    let probs: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
                    let mut order: Vec<usize> = (0..e).collect();
                    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                    let k = m.router.slots();
                    let kept: f64 = order[..k].iter().map(|&x| probs[x]).sum();
                    let (w_in, w_out) = {
                        let w = m.experts.weights();
                        (host(w.w_in), host(w.w_out))
                    };
                    let mut y = vec![0.0; h];
                    for &x in &order[..k] {
                        let w = probs[x] / kept;
                        let ye = swiglu(
                            &xn,
                            &w_in[x * h * 2 * i..(x + 1) * h * 2 * i],
                            &w_out[x * i * h..(x + 1) * i * h],
                            i,
                            h,
                        );
                        y.iter_mut().zip(ye).for_each(|(y, v)| *y += w * v);
                    }
                    y
                }
            };
            hs[t].iter_mut().zip(y).for_each(|(x, y)| *x += y);
        }
    }
    let g = host(model.norm.gamma.val());
    let head: Vec<f64> = match &model.lm_head {
        Some(l) => host(l.weight.val()),
        None => HostTensor::from_tensor(model.embed_tokens.weight.val())
            .transpose()
            .data
            .iter()
            .map(|&x| x as f64)
            .collect(),
    };
    hs.iter()
        .flat_map(|x| matvec(&rms_norm(x, &g, c.rms_norm_eps), &head, v))
        .collect()
}

fn tiny(model_type: &str, tied: bool) -> LlamaConfig {
    let mut c = LlamaConfig::llama(61, 32, 48, 2, 4, 2);
    c.model_type = model_type.into();
    c.tie_word_embeddings = tied;
    c.rope_theta = Some(500.0);
    if model_type == "mixtral" {
        c.num_local_experts = Some(4);
        c.num_experts_per_tok = Some(2);
    }
    c
}

fn check(config: LlamaConfig, seed: u64) {
    let device = device(seed);
    check_model(config.init(&device).unwrap());
}

fn check_model(model: Llama) {
    let device = model.device();
    let config = model.config.clone();
    let tokens: Vec<u32> = (0..11).map(|i| (i * 17 + 3) % 61).collect();
    let logits = model
        .logits(model.tokens(&[&tokens], &device).unwrap())
        .unwrap();
    let expected = reference(&model, &tokens);
    let got = host(logits);
    let label = format!("{} tied={}", config.model_type, config.tie_word_embeddings);
    assert_near(&got, &expected, 1e-4, &label);
}

#[test]
fn llama_with_separate_head_matches_the_naive_reference() {
    check(tiny("llama", false), 1);
}

#[test]
fn tied_embeddings_and_qkv_biases_match_the_naive_reference() {
    // Qwen2 carries Q/K/V biases; random init gives them non-zero values.
    check(tiny("qwen2", true), 2);
}

#[test]
fn lora_adapted_projections_match_the_naive_reference() {
    // Every attention projection and the gate/down projections of the FFN, with non-zero B so
    // the updates count; the reference folds s·A·B into the weights in f64.
    let device = device(4);
    let targets = ["self_attn.*", "gate_proj", "down_proj"]
        .map(String::from)
        .to_vec();
    let config = LoraConfig::new(3)
        .with_alpha(5.0)
        .with_target_modules(targets);
    let mut model = tiny("qwen2", false)
        .init(&device)
        .unwrap()
        .with_lora(&config)
        .unwrap();
    assert_eq!(model.adapters().len(), 2 * 6);
    for (site, adapter) in model
        .adapters()
        .into_iter()
        .map(|(s, a)| (s, a.clone()))
        .collect::<Vec<_>>()
    {
        let b = moekit_testing::normal(adapter.b.dims(), 0.3, &device);
        let adapter = LoraAdapter::from_factors(adapter.a.val(), b, 5.0, site.layer == 1).unwrap();
        model.set_adapter(site, adapter).unwrap();
    }
    check_model(model);
}

#[test]
fn mixtral_moe_layers_match_the_naive_reference() {
    check(tiny("mixtral", false), 3);
}

#[test]
fn kv_cache_decoding_equals_the_full_forward_pass() {
    let device = device(4);
    let model = tiny("llama", true).init(&device).unwrap();
    let tokens: Vec<u32> = vec![5, 9, 60, 0, 33, 12, 7];
    let full = model
        .logits(model.tokens(&[&tokens], &device).unwrap())
        .unwrap();
    let mut cache = model.new_cache();
    // A 3-token prefill, then one token at a time.
    let mut steps = vec![
        model
            .forward(
                model.tokens(&[&tokens[..3]], &device).unwrap(),
                false,
                Some(&mut cache),
            )
            .unwrap()
            .logits,
    ];
    for t in 3..tokens.len() {
        let step = model.tokens(&[&tokens[t..t + 1]], &device).unwrap();
        steps.push(model.forward(step, false, Some(&mut cache)).unwrap().logits);
    }
    assert_eq!(cache.len(), tokens.len());
    let incremental = Tensor::cat(steps, 1);
    assert_near(&host(incremental), &host(full), 1e-4, "cached vs full");
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let device = device(5);
    let model = tiny("llama", true).init(&device).unwrap();
    let err = model.tokens(&[&[1, 61]], &device).unwrap_err();
    assert!(err.to_string().contains("61"), "{err}");
    assert!(model.tokens(&[&[1, 2], &[3]], &device).is_err());
}

#[test]
fn perplexity_equals_the_mean_nll_of_the_full_logits() {
    // 700 tokens in windows of 650: the first window spans two logit slices of the evaluator.
    let device = device(6);
    let model = tiny("llama", true).init(&device).unwrap();
    let tokens: Vec<u32> = (0..700u32).map(|i| (i * 37 + i / 7) % 61).collect();
    let got = moekit_llama::perplexity(&model, &tokens, 650, &mut |_, _| {}).unwrap();
    let (mut nll, mut n) = (0.0, 0);
    for window in tokens.chunks(650) {
        let logits = host(
            model
                .logits(model.tokens(&[window], &device).unwrap())
                .unwrap(),
        );
        let v = model.config.vocab_size;
        for (t, &next) in window.iter().enumerate().skip(1) {
            let row = &logits[(t - 1) * v..t * v];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            nll += lse - row[next as usize];
            n += 1;
        }
    }
    assert_eq!(got.predictions, n);
    assert!(
        ((nll / n as f64) - got.nll).abs() < 1e-4,
        "{} vs {}",
        nll / n as f64,
        got.nll
    );
}
