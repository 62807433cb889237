//! LoRA on the LLaMA model: surgery by pattern, frozen base, training updates adapters only,
//! PEFT adapter directories both ways (against fixtures PEFT itself wrote).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use moekit_llama::io::host::HostTensor;
use moekit_llama::{
    AdapterSite, Checkpoint, FfnProj, FfnSlot, Llama, LlamaConfig, Projection, SaveDtype,
    load_adapter, save_adapter,
};
use moekit_lora::{LoraAdapter, LoraConfig, PeftConfig, PeftTargets};
use moekit_testing::{assert_close, device, normal, values};
use safetensors::SafeTensors;

fn tiny() -> LlamaConfig {
    LlamaConfig::llama(50, 32, 48, 3, 4, 2)
}

fn tokens(model: &Llama, device: &Device) -> Tensor<2, burn::tensor::Int> {
    let ids: Vec<u32> = (0..9).map(|i| (i * 7 + 1) % 50).collect();
    model.tokens(&[&ids], device).unwrap()
}

fn targets(patterns: &[&str]) -> LoraConfig {
    LoraConfig::new(4)
        .with_alpha(8.0)
        .with_target_modules(patterns.iter().map(|p| p.to_string()).collect())
}

/// Gives every adapter a random non-zero B, so that it changes the model.
fn perturb(model: &mut Llama, device: &Device) {
    let adapters: Vec<(AdapterSite, LoraAdapter)> = model
        .adapters()
        .into_iter()
        .map(|(s, a)| (s, a.clone()))
        .collect();
    for (site, a) in adapters {
        let b = normal(a.b.dims(), 0.2, device);
        let alpha = a.alpha;
        let new = LoraAdapter::from_factors(a.a.val(), b, alpha, a.use_rslora).unwrap();
        model.set_adapter(site, new).unwrap();
    }
}

#[test]
fn patterns_choose_the_projections() {
    let device = device(1);
    let model = tiny().init(&device).unwrap();
    let paths = |m: &Llama| -> Vec<String> { m.adapters().iter().map(|(s, _)| s.path()).collect() };

    let qv = model
        .clone()
        .with_lora(&targets(&["q_proj|v_proj"]))
        .unwrap();
    assert_eq!(qv.adapters().len(), 6);
    assert!(paths(&qv).contains(&"model.layers.2.self_attn.v_proj".to_string()));
    assert!(
        paths(&qv)
            .iter()
            .all(|p| p.ends_with("q_proj") || p.ends_with("v_proj"))
    );
    // r·(in + out) per adapter: q is 32→32, v is 32→16.
    assert_eq!(qv.adapter_params(), 3 * (4 * (32 + 32) + 4 * (32 + 16)));

    let mlp = model.clone().with_lora(&targets(&["mlp.*"])).unwrap();
    assert_eq!(mlp.adapters().len(), 9);
    assert!(mlp.layers.iter().all(|l| matches!(l.ffn, FfnSlot::Lora(_))));

    let one = model
        .clone()
        .with_lora(&targets(&["model.layers.1.mlp.down_proj"]))
        .unwrap();
    assert_eq!(
        paths(&one),
        vec!["model.layers.1.mlp.down_proj".to_string()]
    );

    let err = model.clone().with_lora(&targets(&["qproj"])).unwrap_err();
    assert!(err.to_string().contains("match no projection"), "{err}");
    let err = model.clone().with_lora(&targets(&["q_proj("])).unwrap_err();
    assert!(err.to_string().contains("regular expression"), "{err}");
    let err = model.with_lora(&LoraConfig::new(40)).unwrap_err();
    assert!(err.to_string().contains("rank 40"), "{err}");

    // MoE layers have no dense FFN projections to adapt.
    let mut moe = tiny();
    moe.model_type = "mixtral".into();
    (moe.num_local_experts, moe.num_experts_per_tok) = (Some(4), Some(2));
    let moe = moe.init(&device).unwrap();
    assert!(moe.clone().with_lora(&targets(&["mlp.*"])).is_err());
    assert_eq!(
        moe.with_lora(&targets(&["o_proj"]))
            .unwrap()
            .adapters()
            .len(),
        3
    );
}

#[test]
fn fresh_adapters_keep_the_function_and_merging_keeps_the_trained_one() {
    let device = device(2);
    let model = tiny().init(&device).unwrap();
    let t = tokens(&model, &device);
    let before = model.logits(t.clone()).unwrap();
    let mut adapted = model
        .with_lora(&targets(&["self_attn.*", "mlp.*"]))
        .unwrap();
    assert_eq!(
        values(adapted.logits(t.clone()).unwrap()),
        values(before.clone()),
        "B = 0 at init"
    );
    perturb(&mut adapted, &device);
    let trained = adapted.logits(t.clone()).unwrap();
    let change = values((trained.clone() - before).abs())
        .into_iter()
        .fold(0f32, f32::max);
    assert!(change > 1e-3, "the adapters do something ({change})");
    let merged = adapted.merge_lora();
    assert!(merged.adapters().is_empty());
    assert!(
        merged
            .layers
            .iter()
            .all(|l| matches!(l.ffn, FfnSlot::Dense(_)))
    );
    assert_close(merged.logits(t).unwrap(), trained, 1e-4, 1e-4);
}

#[test]
fn training_updates_the_adapters_only() {
    let device = device(3).autodiff();
    let model = tiny().init(&device).unwrap();
    let mut model = model
        .with_lora(&targets(&["q_proj|v_proj", "down_proj"]))
        .unwrap();
    let t = tokens(&model, &device);
    let frozen = |m: &Llama| {
        let l = &m.layers[0];
        let ffn = match &l.ffn {
            FfnSlot::Lora(f) => f.base.w_in.val(),
            _ => panic!("layer 0's FFN is adapted"),
        };
        [
            m.embed_tokens.weight.val(),
            l.attention.q_proj.base().weight.val(),
            l.attention.k_proj.base().weight.val(),
            ffn,
            m.norm.gamma.val().unsqueeze(),
        ]
    };
    let site = AdapterSite {
        layer: 0,
        proj: Projection::Ffn(FfnProj::Down),
    };
    let b_before = values(model.adapter(site).unwrap().b.val());
    let frozen_before: Vec<Vec<f32>> = frozen(&model).into_iter().map(values).collect();

    let loss = model.logits(t.clone()).unwrap().powi_scalar(2).mean();
    let grads = loss.backward();
    for w in frozen(&model) {
        assert!(w.grad(&grads).is_none(), "a frozen weight got a gradient");
    }
    let a = model.adapter(site).unwrap();
    assert!(a.b.val().grad(&grads).is_some() && a.a.val().grad(&grads).is_some());

    // Unadapted projections and dense FFNs are frozen too.
    let qv = tiny()
        .init(&device)
        .unwrap()
        .with_lora(&targets(&["q_proj"]))
        .unwrap();
    let grads_qv = qv
        .logits(t.clone())
        .unwrap()
        .powi_scalar(2)
        .mean()
        .backward();
    let l = &qv.layers[1];
    let FfnSlot::Dense(ffn) = &l.ffn else {
        panic!("unadapted FFNs stay dense")
    };
    for w in [
        ffn.w_in.val(),
        ffn.w_out.val(),
        l.attention.v_proj.base().weight.val(),
    ] {
        assert!(
            w.grad(&grads_qv).is_none(),
            "an unadapted weight got a gradient"
        );
    }

    let grads = GradientsParams::from_grads(grads, &model);
    let mut optim = AdamWConfig::new().init();
    model = optim.step(1e-2, model, grads);
    let after: Vec<Vec<f32>> = frozen(&model).into_iter().map(values).collect();
    assert_eq!(after, frozen_before, "frozen weights moved");
    assert_ne!(
        values(model.adapter(site).unwrap().b.val()),
        b_before,
        "B did not train"
    );
}

/// The PEFT fixture: a tiny `LlamaForCausalLM` and adapters PEFT wrote (make_peft_fixture.py),
/// with each safetensors file kept as `tensors.json` (shapes and exact f32 values).
fn fixture() -> PathBuf {
    moekit_testing::package_dir().join("tests/fixtures/peft_tiny")
}

/// Fixture directory `name` as PEFT / transformers wrote it.
fn fixture_dir(name: &str) -> tempfile::TempDir {
    moekit_testing::rebuild_fixture(&fixture().join(name))
}

fn expected(key: &str) -> (Vec<u32>, Vec<f32>) {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |k: &str| -> Vec<f32> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let tokens = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32);
    (tokens.collect(), floats(key))
}

fn fixture_logits(model: &Llama, tokens: &[u32], device: &Device) -> Tensor<3> {
    model
        .logits(model.tokens(&[tokens], device).unwrap())
        .unwrap()
}

#[test]
fn adapters_that_peft_saved_give_peft_s_logits() {
    let device = device(4);
    let base = Checkpoint::open(fixture_dir("base").path())
        .unwrap()
        .load(&device, &mut |_, _| {})
        .unwrap();
    let (tokens, base_logits) = expected("base");
    let shape = [1, tokens.len(), 64];
    let as_tensor = |v: Vec<f32>| HostTensor::new(shape.to_vec(), v).to_tensor::<3>(&device);
    assert_close(
        fixture_logits(&base, &tokens, &device),
        as_tensor(base_logits.clone()),
        1e-4,
        1e-5,
    );
    for (name, count) in [("adapter", 8), ("rslora", 14)] {
        let (model, config) = load_adapter(base.clone(), fixture_dir(name).path()).unwrap();
        assert_eq!(model.adapters().len(), count, "{name}");
        let (_, want) = expected(name);
        let got = fixture_logits(&model, &tokens, &device);
        assert_close(got.clone(), as_tensor(want.clone()), 1e-4, 1e-5);
        let moved = want
            .iter()
            .zip(&base_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-2,
            "{name}: the adapter changes the logits ({moved})"
        );
        if name == "adapter" {
            // rank_pattern and alpha_pattern took effect.
            let q1 = model.site_at("model.layers.1.self_attn.q_proj").unwrap();
            assert_eq!(model.adapter(q1).unwrap().rank(), 2);
            let d0 = model.site_at("model.layers.0.mlp.down_proj").unwrap();
            assert_eq!(model.adapter(d0).unwrap().alpha, 3.0);
            assert_eq!(config.r, 4);
        }
        // Merged for inference: same logits.
        assert_close(
            fixture_logits(&model.merge_lora(), &tokens, &device),
            got,
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn saved_adapters_use_peft_names_and_load_back_identically() {
    let device = device(5);
    let model = tiny().init(&device).unwrap();
    let mut adapted = model
        .clone()
        .with_lora(&targets(&["q_proj|v_proj", "gate_proj"]))
        .unwrap();
    perturb(&mut adapted, &device);
    let dir = tempfile::tempdir().unwrap();
    let written = save_adapter(&adapted, dir.path(), Some("tiny"), SaveDtype::F32).unwrap();
    assert_eq!(
        written.target_modules,
        Some(PeftTargets::List(vec![
            "gate_proj".into(),
            "q_proj".into(),
            "v_proj".into()
        ]))
    );
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let config = PeftConfig::from_json(&text).unwrap();
    assert_eq!(
        (config.r, config.lora_alpha, config.use_rslora),
        (4, 8.0, false)
    );
    assert_eq!(config.base_model_name_or_path.as_deref(), Some("tiny"));

    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 * 9);
    let a = st
        .tensor("base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[4, 32], "lora_A is [r, in]");
    let b = st
        .tensor("base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[16, 4], "lora_B is [out, r]");

    let (back, _) = load_adapter(model, dir.path()).unwrap();
    let t = tokens(&back, &device);
    assert_eq!(
        values(back.logits(t.clone()).unwrap()),
        values(adapted.logits(t).unwrap())
    );
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "left {name}");
    }
}

#[test]
fn bad_adapter_directories_are_clear_errors() {
    let device = device(6);
    let model = tiny().init(&device).unwrap();
    let mut adapted = model.clone().with_lora(&targets(&["q_proj"])).unwrap();
    perturb(&mut adapted, &device);
    let good = tempfile::tempdir().unwrap();
    save_adapter(&adapted, good.path(), None, SaveDtype::F32).unwrap();
    let err_of = |dir: &Path| load_adapter(model.clone(), dir).unwrap_err().to_string();

    let empty = tempfile::tempdir().unwrap();
    assert!(err_of(empty.path()).contains("no adapter_config.json"));
    assert!(err_of(&empty.path().join("missing")).contains("adapter_config.json"));

    let copy = |edit: &dyn Fn(&Path)| {
        let d = tempfile::tempdir().unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(good.path().join(f), d.path().join(f)).unwrap();
        }
        edit(d.path());
        d
    };
    let cfg = |d: &Path, from: &str, to: &str| {
        let p = d.join("adapter_config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{from}");
        std::fs::write(&p, text.replace(from, to)).unwrap();
    };
    let d = copy(&|d| cfg(d, "\"use_dora\": false", "\"use_dora\": true"));
    assert!(err_of(d.path()).contains("DoRA"));
    let d = copy(&|d| {
        cfg(
            d,
            "\"peft_type\": \"LORA\"",
            "\"peft_type\": \"PREFIX_TUNING\"",
        )
    });
    assert!(err_of(d.path()).contains("PREFIX_TUNING"));
    // A config whose rank is not the factors' (PEFT refuses it as a size mismatch; the scale
    // α / r would be wrong).
    let d = copy(&|d| cfg(d, "\"r\": 4", "\"r\": 8"));
    let err = err_of(d.path());
    assert!(err.contains("rank 4") && err.contains("rank 8"), "{err}");
    let d = copy(&|d| std::fs::write(d.join("adapter_config.json"), "{\"r\": ").unwrap());
    assert!(err_of(d.path()).contains("not a PEFT adapter config"));
    let d = copy(&|d| std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap());
    assert!(err_of(d.path()).contains("no adapter_model.safetensors"));
    let d = copy(&|d| {
        let p = d.join("adapter_model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    let err = err_of(d.path());
    assert!(err.contains("adapter_model.safetensors"), "{err}");

    // A model with fewer layers than the adapter, or narrower projections.
    let mut small = tiny();
    small.num_hidden_layers = 2;
    let err = load_adapter(small.init(&device).unwrap(), good.path()).unwrap_err();
    assert!(err.to_string().contains("does not have"), "{err}");
    let mut narrow = tiny();
    (narrow.hidden_size, narrow.num_attention_heads) = (24, 3);
    narrow.num_key_value_heads = Some(3);
    let err = load_adapter(narrow.init(&device).unwrap(), good.path()).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}

#[test]
fn lora_survives_the_model_forward_with_kv_cache() {
    // Incremental decoding goes through the same slots.
    let device = device(7);
    let mut model = tiny()
        .init(&device)
        .unwrap()
        .with_lora(&targets(&["k_proj|o_proj", "up_proj"]))
        .unwrap();
    perturb(&mut model, &device);
    let t = tokens(&model, &device);
    let full = model.logits(t.clone()).unwrap();
    let mut cache = model.new_cache();
    let n = t.dims()[1];
    let mut steps = Vec::new();
    for i in 0..n {
        let out = model
            .forward(t.clone().narrow(1, i, 1), false, Some(&mut cache))
            .unwrap();
        steps.push(out.logits);
    }
    assert_close(Tensor::cat(steps, 1), full, 1e-4, 1e-4);
}

#[test]
fn distilling_into_a_lora_student_trains_only_its_adapters() {
    use moekit_distill::{DistillConfig, DistillModel};
    let device = device(8);
    let train = device.clone().autodiff();
    let teacher = tiny().init(&device).unwrap();
    // The student starts as the teacher plus fresh adapters (B = 0): identical function.
    let student = teacher
        .clone()
        .train() // onto the autodiff device
        .with_lora(&targets(&["q_proj|v_proj", "mlp.*"]))
        .unwrap();
    let distiller = DistillConfig::new("kl:1,hidden-mse:0.5".parse().unwrap())
        .with_layers(vec![(3, 3)])
        .init(&train)
        .unwrap();
    let ids = tokens(&teacher, &device);
    let parts = distiller
        .step(&teacher, &student, ids.clone(), None, None)
        .unwrap();
    assert!(parts.value.abs() < 1e-6, "{parts}");
    let out = student.distill_forward(ids.clone(), true).unwrap();
    assert_eq!(out.hidden.len(), 4, "embeddings + one per layer");

    let mut student = student;
    perturb(&mut student, &train);
    let parts = distiller.step(&teacher, &student, ids, None, None).unwrap();
    assert!(parts.get("kl").unwrap() > 1e-4 && parts.get("hidden-mse").unwrap() > 1e-6);
    assert!(student.device().is_autodiff());
    let grads = parts.total.backward();
    let site = student.site_at("model.layers.0.mlp.up_proj").unwrap();
    assert!(
        student
            .adapter(site)
            .unwrap()
            .a
            .val()
            .grad(&grads)
            .is_some()
    );
    assert!(student.embed_tokens.weight.val().grad(&grads).is_none());
}
