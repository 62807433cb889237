//! Layer-at-a-time passes read a checkpoint one decoder layer at a time and give what the
//! loaded model gives: the perplexity (with the LM head applied in vocabulary blocks and a
//! running log-sum-exp), the MoE usage, and a layer-by-layer export that reads back whole.

use burn::tensor::Device;
use moekit_llama::io::shards::ShardedWriter;
use moekit_llama::{
    Checkpoint, DecoderLayer, ExportFormat, FfnSlot, LayeredConfig, LayeredExport, LlamaConfig,
    LlamaError, SaveDtype, perplexity, perplexity_layered, save_pretrained,
};
use moekit_testing::device;

/// Token ids below 50 with some structure.
fn ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + i / 5) % 50) as u32).collect()
}

/// `config` with random weights written as a checkpoint in `dtype`, and its loaded model.
fn saved(
    config: LlamaConfig,
    format: ExportFormat,
    dtype: SaveDtype,
    device: &Device,
) -> (tempfile::TempDir, Checkpoint) {
    let model = config.init(device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&model, None, dir.path(), format, dtype).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    (dir, ckpt)
}

fn no_change(_: usize, layer: DecoderLayer) -> moekit_llama::Result<DecoderLayer> {
    Ok(layer)
}

fn mixtral() -> LlamaConfig {
    let mut c = LlamaConfig::llama(50, 16, 24, 3, 4, 2);
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(4);
    c.num_experts_per_tok = Some(2);
    c
}

#[test]
fn layered_perplexity_equals_the_loaded_models() {
    let device = device(3);
    let mut tied = LlamaConfig::llama(50, 16, 32, 3, 4, 2);
    tied.tie_word_embeddings = true;
    let untied = LlamaConfig::llama(50, 16, 32, 2, 4, 4);
    for (config, format) in [
        (tied, ExportFormat::Dense),
        (untied, ExportFormat::Dense),
        (mixtral(), ExportFormat::Mixtral),
    ] {
        for dtype in [SaveDtype::F32, SaveDtype::BF16] {
            let (_dir, ckpt) = saved(config.clone(), format, dtype, &device);
            let model = ckpt.load(&device, &mut |_, _| {}).unwrap();
            let ids = ids(83);
            let want = perplexity(&model, &ids, 16, &mut |_, _| {}).unwrap();
            // Several passes, batches and vocabulary blocks that do not divide the sizes.
            for settings in [
                LayeredConfig::new(),
                LayeredConfig::new()
                    .with_pass_tokens(20)
                    .with_batch(2)
                    .with_vocab_block(7),
            ] {
                let mut calls = Vec::new();
                let got = perplexity_layered(
                    &ckpt,
                    &ids,
                    16,
                    &settings,
                    &device,
                    &mut no_change,
                    &mut |done, total| calls.push((done, total)),
                )
                .unwrap();
                assert_eq!(got.tokens, want.tokens);
                assert_eq!(got.predictions, want.predictions);
                assert!(
                    (got.nll / want.nll - 1.0).abs() < 1e-5,
                    "{format:?} {dtype:?}: {} vs {}",
                    got.nll,
                    want.nll
                );
                assert_eq!(got.experts_per_token, want.experts_per_token);
                let &(done, total) = calls.last().unwrap();
                assert_eq!(done, total);
                // The model in memory, read layer by layer, gives the same.
                let mut same = no_change;
                let in_memory = perplexity_layered(
                    &model,
                    &ids,
                    16,
                    &settings,
                    &device,
                    &mut same,
                    &mut |_, _| {},
                )
                .unwrap();
                assert!((in_memory.nll / got.nll - 1.0).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn a_layer_changed_as_it_is_read_changes_the_result_as_in_the_loaded_model() {
    let device = device(5);
    let (_dir, ckpt) = saved(mixtral(), ExportFormat::Mixtral, SaveDtype::F32, &device);
    let top1 = |l: usize, mut layer: DecoderLayer| {
        if let FfnSlot::Moe(moe) = &mut layer.ffn
            && l == 1
        {
            moe.router.selection = moekit_moe::Selection::TopK {
                k: 1,
                renormalize: true,
            };
        }
        Ok(layer)
    };
    let mut model = ckpt.load(&device, &mut |_, _| {}).unwrap();
    model.layers[1] = top1(1, model.layers[1].clone()).unwrap();
    let ids = ids(40);
    let want = perplexity(&model, &ids, 40, &mut |_, _| {}).unwrap();
    let got = perplexity_layered(
        &ckpt,
        &ids,
        40,
        &LayeredConfig::new(),
        &device,
        &mut |l, layer| top1(l, layer),
        &mut |_, _| {},
    )
    .unwrap();
    assert!((got.nll / want.nll - 1.0).abs() < 1e-5);
    let k: Vec<f64> = got
        .experts_per_token
        .iter()
        .map(|u| u.experts_per_token)
        .collect();
    assert_eq!(k, [2.0, 1.0, 2.0]);
}

#[test]
fn bad_inputs_are_errors() {
    let device = device(1);
    let (_dir, ckpt) = saved(
        LlamaConfig::llama(50, 16, 32, 1, 4, 2),
        ExportFormat::Dense,
        SaveDtype::F32,
        &device,
    );
    let run = |ids: &[u32], window: usize| {
        perplexity_layered(
            &ckpt,
            ids,
            window,
            &LayeredConfig::new(),
            &device,
            &mut no_change,
            &mut |_, _| {},
        )
    };
    assert!(matches!(run(&[1], 8), Err(LlamaError::Input(_))));
    assert!(matches!(run(&[1, 2, 3], 1), Err(LlamaError::Input(_))));
    assert!(matches!(run(&[1, 50, 3], 8), Err(LlamaError::Input(_))));
    assert!(matches!(
        ckpt.load_layer(1, &device),
        Err(LlamaError::Input(_))
    ));
}

#[test]
fn a_layer_by_layer_export_reads_back_as_the_model_it_wrote() {
    let device = device(7);
    let (_src_dir, ckpt) = saved(mixtral(), ExportFormat::Mixtral, SaveDtype::F32, &device);
    let model = ckpt.load(&device, &mut |_, _| {}).unwrap();
    let root = tempfile::tempdir().unwrap();
    let (out, staging) = (root.path().join("out"), root.path().join("staging"));
    let layers = ckpt.config().num_hidden_layers;
    // Small shards: several files and an index.
    let open = || {
        LayeredExport::new(
            &out,
            &staging,
            ckpt.config(),
            &model.layers[0].ffn,
            ExportFormat::Qwen2Moe,
            SaveDtype::F32,
        )
        .unwrap()
        .with_max_shard_bytes(20_000)
    };
    let mut export = open();
    export.put_globals(&ckpt).unwrap();
    export
        .put_layer(0, &ckpt.load_layer(0, &device).unwrap())
        .unwrap();
    // An interrupted run: the next one finds layer 0 staged and writes the rest.
    drop(export);
    let mut export = open();
    export.put_globals(&ckpt).unwrap();
    assert!(export.has_layer(0) && !export.has_layer(1));
    export.reuse_layer(0).unwrap();
    for l in 1..layers {
        export
            .put_layer(l, &ckpt.load_layer(l, &device).unwrap())
            .unwrap();
    }
    let config = export.finish(None).unwrap();
    assert_eq!(config.architectures, ["Qwen2MoeForCausalLM"]);
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(!staging.join("model").exists(), "staged parts are removed");
    let back = Checkpoint::open(&out).unwrap();
    let reread = back.load(&device, &mut |_, _| {}).unwrap();
    let ids = ids(30);
    let a = perplexity(&model, &ids, 30, &mut |_, _| {}).unwrap();
    let b = perplexity(&reread, &ids, 30, &mut |_, _| {}).unwrap();
    assert!((a.nll / b.nll - 1.0).abs() < 1e-6, "{} vs {}", a.nll, b.nll);
    // A layer of another shape is refused.
    let mut other = mixtral();
    other.num_local_experts = Some(2);
    other.num_experts_per_tok = Some(1);
    let odd = other.init(&device).unwrap();
    let mut export = open();
    assert!(matches!(
        export.put_layer(0, &odd.layers[0]),
        Err(LlamaError::Export { .. })
    ));
}

#[test]
fn shards_stay_below_their_limit() {
    let device = device(2);
    let (_src, ckpt) = saved(
        LlamaConfig::llama(50, 16, 32, 4, 4, 2),
        ExportFormat::Dense,
        SaveDtype::F32,
        &device,
    );
    let model = ckpt.load(&device, &mut |_, _| {}).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let mut writer = ShardedWriter::new(&out, &root.path().join("s"), SaveDtype::F32)
        .unwrap()
        .with_max_shard_bytes(4_000);
    let table = moekit_llama::io::host::HostTensor::from_tensor(model.embed_tokens.weight.val());
    writer
        .put(
            "embed",
            &[(
                "e".into(),
                &table as &dyn moekit_llama::io::safetensors::RowSource,
            )],
        )
        .unwrap();
    for (l, layer) in model.layers.iter().enumerate() {
        let w = moekit_llama::io::host::HostTensor::from_tensor(
            layer.attention.q_proj.merged().weight.val(),
        );
        writer
            .put(
                &format!("l{l}"),
                &[(
                    format!("q{l}"),
                    &w as &dyn moekit_llama::io::safetensors::RowSource,
                )],
            )
            .unwrap();
    }
    let shards = writer.finish().unwrap();
    assert!(shards.len() > 1);
    for s in &shards {
        let len = std::fs::metadata(out.join(s)).unwrap().len();
        // Each part here is under the limit, so each shard's data is too (plus its header).
        assert!(len < 4_000 + 4096, "{s}: {len} bytes");
    }
}

/// A checkpoint file cut short after it was opened (replaced in place, a shard lost from a
/// network disk): reading a layer it no longer holds is an error naming the file, not a panic
/// or garbage.
#[test]
fn a_file_cut_short_after_opening_is_an_error_naming_it() {
    let device = device(9);
    let (dir, ckpt) = saved(mixtral(), ExportFormat::Mixtral, SaveDtype::F32, &device);
    let file = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let last = ckpt.config().num_hidden_layers - 1;
    let layers: Vec<_> = (0..=last).map(|l| ckpt.load_layer(l, &device)).collect();
    let err = layers
        .into_iter()
        .find_map(|r| r.err())
        .expect("some layer lies past the cut");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    let err = perplexity_layered(
        &ckpt,
        &ids(40),
        16,
        &LayeredConfig::new(),
        &device,
        &mut no_change,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}
