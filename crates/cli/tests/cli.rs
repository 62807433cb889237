//! The `moekit` binary on good and bad input: bad input gives one `error:` line and a non-zero
//! exit status, never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn moekit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moekit"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn assert_clean_failure(out: &Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(mentions), "`{mentions}` not in: {stderr}");
}

/// A valid GGUF holding tensors but no model metadata, assembled from the GGUF test vectors of
/// crates/llama (gguf-py's raw blocks).
fn fixture_bytes() -> Vec<u8> {
    let json = moekit_testing::package_dir().join("../llama/tests/fixtures/quants.json");
    moekit_testing::gguf_fixture(&std::fs::read_to_string(json).unwrap())
}

#[test]
fn missing_and_non_model_paths() {
    assert_clean_failure(
        &moekit(&["info", "/nonexistent/model.gguf"]),
        "/nonexistent",
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    assert_clean_failure(&moekit(&["info", &d]), "not a model");
}

#[test]
fn models_too_large_for_memory_are_refused_before_loading() {
    let root = tempfile::tempdir().unwrap();
    let (model, text) = dense_model_and_text(root.path());
    let text = format!("{text}/0.txt");
    // The configuration of a model far larger than any test machine (one layer alone is
    // 3·65536·262144 parameters, ~200 GB in f32); the weights are never read.
    let path = Path::new(&model).join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["hidden_size"] = 65536.into();
    config["intermediate_size"] = 262144.into();
    config["num_attention_heads"] = 512.into();
    config["num_key_value_heads"] = 512.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let out = root.path().join("o").display().to_string();
    for (args, what) in [
        (
            vec!["generate", &model, "--prompt", "hi"],
            "generation needs about",
        ),
        (
            vec!["eval", &model, "--text", &text],
            "evaluating one layer at a time needs about",
        ),
        (
            vec!["profile", &model, "--calib", &text, "--out", &out],
            "profiling one layer at a time needs about",
        ),
        (
            vec![
                "convert",
                &model,
                "--method",
                "upcycle",
                "--experts",
                "2",
                "--top-k",
                "1",
                "--out",
                &out,
            ],
            "converting one layer at a time needs about",
        ),
        (
            vec![
                "distill",
                "--teacher",
                &model,
                "--student",
                &model,
                "--data",
                &text,
                "--steps",
                "1",
                "--out",
                &out,
            ],
            "distillation needs about",
        ),
    ] {
        assert_clean_failure(&moekit(&args), what);
    }
}

#[test]
fn corrupt_gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixture_bytes();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let cut = cut.display().to_string();
    assert_clean_failure(&moekit(&["info", &cut]), "cut.gguf");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "some text").unwrap();
    assert_clean_failure(
        &moekit(&["eval", &cut, "--text", &text.display().to_string()]),
        "past the end",
    );
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    assert_clean_failure(&moekit(&["info", &junk.display().to_string()]), "magic");
}

#[test]
fn gguf_without_model_metadata() {
    // A valid GGUF that holds tensors but no llama.* metadata.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quants.gguf");
    std::fs::write(&path, fixture_bytes()).unwrap();
    assert_clean_failure(&moekit(&["info", &path.display().to_string()]), "metadata");
}

#[test]
fn bad_config_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\"").unwrap();
    let d = dir.path().display().to_string();
    assert_clean_failure(&moekit(&["info", &d]), "config.json");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "bloom", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#,
    )
    .unwrap();
    assert_clean_failure(&moekit(&["info", &d]), "unsupported architecture `bloom`");
}

#[test]
fn info_describes_a_written_model() {
    // The smallest real round trip through the binary: a config plus safetensors written by
    // the library.
    use moekit::llama::{ExportFormat, LlamaConfig, SaveDtype, save_pretrained};
    let mut c = LlamaConfig::llama(40, 16, 32, 2, 2, 1);
    c.model_type = "mixtral".into();
    c.num_local_experts = Some(4);
    c.num_experts_per_tok = Some(2);
    let model = c.init(&moekit::burn::tensor::Device::flex()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(
        &model,
        None,
        dir.path(),
        ExportFormat::Mixtral,
        SaveDtype::BF16,
    )
    .unwrap();
    let out = moekit(&["info", &dir.path().display().to_string(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "mixtral");
    assert_eq!(info["params"]["total"], model.param_counts().total);
    assert_eq!(info["params"]["active"], model.param_counts().active);
    assert!(
        info["layer_kinds"][0]["kind"]
            .as_str()
            .unwrap()
            .contains("4 experts")
    );
    assert_eq!(info["tensor_types"][0]["type"], "BF16");
    // No tokenizer was written: eval says so in one line.
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello").unwrap();
    assert_clean_failure(
        &moekit(&[
            "eval",
            &dir.path().display().to_string(),
            "--text",
            &text.display().to_string(),
        ]),
        "no tokenizer",
    );
}

#[test]
fn bad_adapter_directories() {
    // Needs a model with a tokenizer: the cached SmolLM2 GGUF (scripts/fetch-smollm2.sh).
    let cache = std::env::var_os("MOEKIT_CACHE").map_or_else(
        || Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/moekit"),
        Into::into,
    );
    let gguf = cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-smollm2.sh",
            gguf.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog.").unwrap();
    let eval = |adapter: &Path| {
        moekit(&[
            "eval",
            &gguf.display().to_string(),
            "--text",
            &text.display().to_string(),
            "--adapter",
            &adapter.display().to_string(),
        ])
    };
    assert_clean_failure(&eval(dir.path()), "not a PEFT adapter directory");
    // An adapter saved for a different (tiny) base model.
    use moekit::llama::{LlamaConfig, SaveDtype, save_adapter};
    let tiny = LlamaConfig::llama(40, 16, 32, 2, 2, 1)
        .init(&moekit::burn::tensor::Device::flex())
        .unwrap()
        .with_lora(&moekit::lora::LoraConfig::new(2))
        .unwrap();
    let other = dir.path().join("tiny-adapter");
    save_adapter(&tiny, &other, None, SaveDtype::F32).unwrap();
    assert_clean_failure(&eval(&other), "do not fit");
}

/// A tiny dense model with a word-level tokenizer, and a directory of calibration text.
fn dense_model_and_text(root: &Path) -> (String, String) {
    use moekit::llama::{ExportFormat, LlamaConfig, SaveDtype, Tokenizer, save_pretrained};
    let words = ["[UNK]", "a", "b", "c", "d", "e", "f", "g"];
    let model_dir = root.join("dense");
    std::fs::create_dir_all(&model_dir).unwrap();
    let file = model_dir.join("tokenizer.json");
    std::fs::write(&file, moekit_testing::word_tokenizer_json(&words)).unwrap();
    let tokenizer = Tokenizer::from_file(&file, &model_dir.join("tokenizer_config.json")).unwrap();
    let device = moekit::burn::tensor::Device::flex();
    device.seed(3);
    let model = LlamaConfig::llama(16, 16, 32, 2, 2, 1)
        .init(&device)
        .unwrap();
    save_pretrained(
        &model,
        Some(&tokenizer),
        &model_dir,
        ExportFormat::Dense,
        SaveDtype::F32,
    )
    .unwrap();
    let text = root.join("text");
    std::fs::create_dir_all(&text).unwrap();
    let line = |i: usize| words[1 + (i * 7 + i / 3) % 7];
    for f in 0..3 {
        let body: Vec<&str> = (0..120).map(|i| line(i + 31 * f)).collect();
        std::fs::write(text.join(format!("{f}.txt")), body.join(" ")).unwrap();
    }
    (model_dir.display().to_string(), text.display().to_string())
}

fn perplexity(model: &str, text: &str) -> f64 {
    success_json(moekit(&["eval", model, "--text", text, "--json"]))["perplexity"]
        .as_f64()
        .unwrap()
}

/// `moekit convert DENSE --method split-random --experts 4 --out OUT` with `extra` settings.
fn convert_random_split(dense: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "convert",
        dense,
        "--method",
        "split-random",
        "--experts",
        "4",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    moekit(&args)
}

/// `dense` split at random into 4 experts, top-2, calibrated on `text` (batches of 64 tokens),
/// with `extra` settings (e.g. `--layerwise-steps 3`), written to `out`; the printed JSON.
fn trained_split(dense: &str, text: &str, out: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--top-k",
        "2",
        "--calib",
        text,
        "--seq-len",
        "32",
        "--batch-tokens",
        "64",
        "--json",
    ];
    args.extend_from_slice(extra);
    success_json(convert_random_split(dense, out, &args))
}

#[test]
fn convert_writes_models_that_evaluate_like_the_dense_one() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let eval_text = format!("{text}/0.txt");
    let want = perplexity(&dense, &eval_text);
    // Every expert active with weights 1: exactly the dense model.
    let out_dir = root.path().join("split").display().to_string();
    let out = moekit(&[
        "convert",
        &dense,
        "--method",
        "split-coactivation",
        "--experts",
        "4",
        "--top-k",
        "4",
        "--router-init",
        "uniform",
        "--calib",
        &text,
        "--seq-len",
        "32",
        "--json",
        "--out",
        &out_dir,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["architecture"], "mixtral");
    assert!(summary["calibration_tokens"].as_u64().unwrap() > 300);
    let got = perplexity(&out_dir, &eval_text);
    assert!((got / want - 1.0).abs() < 1e-4, "{got} vs {want}");
    // Layer-wise construction: one report per layer, the work directory cleaned up.
    let lw_dir = root.path().join("lw");
    let out = moekit(&[
        "convert",
        &dense,
        "--method",
        "lora-experts",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--rank",
        "2",
        "--calib",
        &text,
        "--seq-len",
        "32",
        "--layerwise-steps",
        "5",
        "--batch-tokens",
        "64",
        "--json",
        "--out",
        &lw_dir.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["architecture"], "qwen2_moe");
    assert_eq!(summary["layers"].as_array().unwrap().len(), 2);
    assert!(!lw_dir.join(".moekit-work").exists());
    assert!(perplexity(&lw_dir.display().to_string(), &eval_text).is_finite());
    // A trained split with router-only steps reports each router's recall of the oracle; a
    // rerun with other router settings reuses the kept work directory's trained blocks.
    let fit_dir = root.path().join("fit").display().to_string();
    let work = root.path().join("work").display().to_string();
    let fit = |router: &[&str]| {
        let mut extra = vec!["--layerwise-steps", "3", "--work-dir", &work, "--keep-work"];
        extra.extend_from_slice(router);
        trained_split(&dense, &text, &fit_dir, &extra)["layers"]
            .as_array()
            .unwrap()
            .clone()
    };
    for (router, resumed) in [
        (&["--router-steps", "5"][..], false),
        (
            &[
                "--router-steps",
                "7",
                "--router-lr",
                "0.01",
                "--refine-steps",
                "2",
            ][..],
            true,
        ),
    ] {
        for layer in fit(router) {
            let recall = layer["oracle_recall"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&recall), "{layer}");
            assert_eq!(layer["resumed"], resumed, "{router:?}: {layer}");
        }
    }
}

/// A disk that fills up while a conversion writes (a file-size limit makes every write past it
/// fail, wherever it falls: hidden states, a staged layer, a shard, the index): one error line,
/// no `config.json` (nothing that looks finished), and the same command without the limit
/// resumes to the model a conversion never interrupted writes.
#[test]
fn a_disk_that_fills_up_mid_conversion_fails_in_one_line_and_the_rerun_resumes() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let args = |out: &str| -> Vec<String> {
        [
            "convert",
            &dense,
            "--method",
            "split-importance",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--calib",
            &text,
            "--seq-len",
            "32",
            "--out",
            out,
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let reference = root.path().join("reference").display().to_string();
    success_json(moekit(
        &args(&reference)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    let held_out = format!("{text}/0.txt");
    let want_ppl = perplexity(&reference, &held_out);
    let mut failures = 0;
    // Limits in 512-byte blocks, from below the smallest file the run writes to above them all.
    for blocks in [1, 4, 16, 24, 32, 48, 64, 128] {
        let out = root
            .path()
            .join(format!("out-{blocks}"))
            .display()
            .to_string();
        let quoted: Vec<String> = args(&out).iter().map(|a| format!("'{a}'")).collect();
        // SIGXFSZ ignored, so that a write past the limit fails with EFBIG, as a full disk
        // fails with ENOSPC, instead of killing the process.
        let limited = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f {blocks}; exec '{}' {}",
                env!("CARGO_BIN_EXE_moekit"),
                quoted.join(" ")
            ))
            .output()
            .unwrap();
        if limited.status.success() {
            continue;
        }
        failures += 1;
        assert_clean_failure(&limited, "run the same command again: it resumes");
        assert!(
            !Path::new(&out).join("config.json").exists(),
            "a cut-short conversion left a config.json ({blocks} blocks)"
        );
        success_json(moekit(
            &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let ppl = perplexity(&out, &held_out);
        assert!(
            (ppl - want_ppl).abs() < 1e-6 * want_ppl,
            "{blocks} blocks: {ppl} vs {want_ppl}"
        );
    }
    assert!(failures >= 4, "the limits cut short only {failures} runs");
}

/// Output into a pipe that is already closed (`moekit info MODEL | head -1` once `head` has
/// gone) ends the process as it ends other tools, without a panic message.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let root = tempfile::tempdir().unwrap();
    let (model, _) = dense_model_and_text(root.path());
    for args in [format!("info '{model}'"), format!("info '{model}' --json")] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("'{}' {args} | true", env!("CARGO_BIN_EXE_moekit")))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args}: {stderr}");
        assert!(stderr.is_empty(), "{args}: {stderr}");
    }
}

/// Two runs writing one output folder: the second is refused at once, in one line, while the
/// first holds the folder; once it is released the same command runs.
#[test]
fn a_folder_another_run_is_writing_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (dense, _) = dense_model_and_text(root.path());
    let out = root.path().join("out");
    let args = |out: &str| {
        moekit(&[
            "convert",
            &dense,
            "--method",
            "upcycle",
            "--experts",
            "2",
            "--top-k",
            "1",
            "--out",
            out,
        ])
    };
    let held = moekit::llama::FolderLock::acquire(&out).unwrap();
    let o = out.display().to_string();
    assert_clean_failure(&args(&o), "another moekit run is writing");
    assert!(!out.join("config.json").exists());
    drop(held);
    assert_success(args(&o));
    assert!(out.join("config.json").exists());
}

fn assert_success(out: Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn work_directories_follow_their_model_and_keep_other_files() {
    use moekit::llama::{ExportFormat, LlamaConfig, SaveDtype, save_pretrained};
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let out = root.path().join("out").display().to_string();
    let work = root.path().join("work");
    let work_arg = work.display().to_string();
    let resumed = |keep: bool| -> Vec<bool> {
        let mut extra = vec!["--layerwise-steps", "2"];
        extra.extend(["--work-dir", &work_arg]);
        if keep {
            extra.push("--keep-work");
        }
        trained_split(&dense, &text, &out, &extra)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["resumed"].as_bool().unwrap())
            .collect()
    };
    assert_eq!(resumed(true), [false, false]);
    assert_eq!(resumed(true), [true, true]);
    // Another model written over the dense one's weights in place (the folder's own time
    // does not change): its layers are trained, not those of the first model reused.
    let other = root.path().join("other");
    let device = moekit::burn::tensor::Device::flex();
    device.seed(4);
    let model = LlamaConfig::llama(16, 16, 32, 2, 2, 1)
        .init(&device)
        .unwrap();
    save_pretrained(&model, None, &other, ExportFormat::Dense, SaveDtype::F32).unwrap();
    std::fs::copy(
        other.join("model.safetensors"),
        Path::new(&dense).join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(work.join("mine.txt"), b"not moekit's").unwrap();
    assert_eq!(resumed(false), [false, false]);
    // The clean-up removed the recording and every configuration's layers, and kept the
    // user's file (and so the folder).
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["mine.txt"]);
    // A work directory that is the output folder loses the recording, not the checkpoint.
    let both = root.path().join("both").display().to_string();
    trained_split(
        &dense,
        &text,
        &both,
        &["--layerwise-steps", "1", "--work-dir", &both],
    );
    assert!(Path::new(&both).join("config.json").exists());
    assert!(!Path::new(&both).join("activations.json").exists());
    assert!(perplexity(&both, &format!("{text}/0.txt")).is_finite());
}

#[test]
fn factored_routers_train_export_and_count() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let convert = |name: &str, rank: &[&str]| {
        let out = root.path().join(name).display().to_string();
        let mut extra = vec!["--layerwise-steps", "3", "--router-steps", "3"];
        extra.extend_from_slice(rank);
        trained_split(&dense, &text, &out, &extra);
        out
    };
    let (full, factored) = (
        convert("full", &[]),
        convert("factored", &["--router-rank", "2"]),
    );
    assert!(!Path::new(&full).join("router_factors.safetensors").exists());
    assert!(
        Path::new(&factored)
            .join("router_factors.safetensors")
            .exists()
    );
    let eval_text = format!("{text}/0.txt");
    let eval = |model: &str| {
        success_json(moekit(&["eval", model, "--text", &eval_text, "--json"]))["activated_params"]
            .as_f64()
            .unwrap()
    };
    // Two layers, H = 16, 4 routed experts: each router 16·4 full, 2·(16 + 4) factored.
    assert_eq!(
        eval(&full) - eval(&factored),
        (2 * (16 * 4 - 2 * (16 + 4))) as f64
    );
}

#[test]
fn router_steps_alone_fit_routers_to_the_converted_experts() {
    use moekit::llama::io::safetensors::SafetensorsDir;
    use moekit::llama::io::source::TensorSource;
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let convert = |name: &str, extra: &[&str]| {
        let out = root.path().join(name).display().to_string();
        let summary = trained_split(&dense, &text, &out, extra);
        (summary, SafetensorsDir::open(Path::new(&out)).unwrap())
    };
    let (_, plain) = convert("plain", &[]);
    let (summary, fitted) = convert("fitted", &["--router-steps", "5", "--router-lr", "0.05"]);
    // One report per layer, with the fitted router's recall.
    let layers = summary["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for layer in layers {
        let recall = layer["oracle_recall"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&recall), "{layer}");
    }
    // The experts are the converted ones, bit for bit; the routers moved.
    let read = |dir: &SafetensorsDir, name: &str| dir.read(name).unwrap().unwrap().data;
    for l in 0..2 {
        for e in 0..4 {
            for w in ["w1", "w2", "w3"] {
                let name = format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight");
                assert_eq!(read(&plain, &name), read(&fitted, &name), "{name}");
            }
        }
        let gate = format!("model.layers.{l}.block_sparse_moe.gate.weight");
        assert_ne!(read(&plain, &gate), read(&fitted, &gate), "{gate}");
    }
}

#[test]
fn convert_refuses_bad_settings_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let out = root.path().join("o").display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["convert", &dense, "--out", &out];
        args.extend_from_slice(extra);
        moekit(&args)
    };
    // A random split into 4 experts, top-2, with `extra` settings.
    let split = |extra: &[&str]| {
        let mut args = vec!["--method", "split-random", "--experts", "4", "--top-k", "2"];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_clean_failure(
        &run(&[
            "--method",
            "split-importance",
            "--experts",
            "4",
            "--top-k",
            "2",
        ]),
        "--calib",
    );
    assert_clean_failure(
        &run(&["--method", "split-random", "--experts", "3", "--top-k", "2"]),
        "do not split",
    );
    assert_clean_failure(
        &run(&["--method", "upcycle", "--experts", "4", "--top-k", "5"]),
        "top-k",
    );
    // Upcycling with what only splits have, named before the calibration text it would need.
    for extra in [
        ["--router-init", "hidden-states"],
        ["--shared-experts", "1"],
    ] {
        let mut args = vec!["--method", "upcycle", "--experts", "4", "--top-k", "2"];
        args.extend(extra);
        assert_clean_failure(&run(&args), "use the split method");
    }
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_failure(
        &split(&[
            "--layerwise-steps",
            "3",
            "--calib",
            &empty.display().to_string(),
        ]),
        "calibration",
    );
    // Layer-wise settings of a split that would otherwise train.
    let layerwise = |extra: &[&str]| {
        let mut args = vec!["--layerwise-steps", "3", "--calib", &text];
        args.extend_from_slice(extra);
        split(&args)
    };
    assert_clean_failure(&layerwise(&["--router-loss=-1"]), "router supervision");
    assert_clean_failure(
        &layerwise(&["--router-steps", "3", "--router-lr=0"]),
        "router learning rate",
    );
    assert_clean_failure(&split(&["--router-rank", "4"]), "router rank 4");
    assert_clean_failure(
        &run(&[
            "--method",
            "pesc",
            "--adapter-activation",
            "gelu",
            "--experts",
            "4",
            "--top-k",
            "2",
        ]),
        "merged",
    );
}

/// The JSON a successful command printed.
fn success_json(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `dense` split at random into 4 experts, `top_k` per token, with `extra` convert
/// arguments, written to `out`.
fn split_random(dense: &str, out: &Path, top_k: usize, extra: &[&str]) -> String {
    let moe = out.display().to_string();
    let k = top_k.to_string();
    let mut args = vec!["--top-k", k.as_str()];
    args.extend_from_slice(extra);
    let out = convert_random_split(dense, &moe, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    moe
}

/// `moekit profile MOE --calib TEXT --seq-len 32 --out POLICY` with `extra` arguments.
fn profile_of(moe: &str, text: &str, policy: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "profile",
        moe,
        "--calib",
        text,
        "--seq-len",
        "32",
        "--out",
        policy,
    ];
    args.extend_from_slice(extra);
    moekit(&args)
}

#[test]
fn profile_measures_a_grid_of_k_in_layers_of_many_experts() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let moe = root.path().join("moe8").display().to_string();
    let out = moekit(&[
        "convert",
        &dense,
        "--method",
        "split-random",
        "--experts",
        "8",
        "--top-k",
        "5",
        "--out",
        &moe,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = root.path().join("policy.json").display().to_string();
    let candidates = root.path().join("candidates.json").display().to_string();
    let profile = |extra: &[&str]| {
        let args = [
            &["--select-tokens", "64", "--top-p", "0.9", "--json"],
            extra,
        ]
        .concat();
        profile_of(&moe, &text, &policy, &args)
    };
    success_json(profile(&[
        "--top-k-rules",
        "4",
        "--candidates-out",
        &candidates,
    ]));
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&candidates).unwrap()).unwrap();
    for layer in c["layers"].as_array().unwrap() {
        let ks: Vec<u64> = layer["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["rule"]["k"].as_u64())
            .collect();
        // Two values around the own top-5 and both ends.
        assert_eq!(ks, vec![1, 4, 5, 8], "{layer}");
    }
    // The grid is part of what the candidates were measured with.
    success_json(profile(&[
        "--top-k-rules",
        "4",
        "--candidates-in",
        &candidates,
    ]));
    assert_clean_failure(
        &profile(&["--top-k-rules", "8", "--candidates-in", &candidates]),
        "top-k-rules=4",
    );
}

#[test]
fn profile_chooses_a_policy_that_eval_applies() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let moe = split_random(&dense, &root.path().join("moe"), 4, &[]);
    let policy = root.path().join("policy.json").display().to_string();
    let plot = root.path().join("routing.svg");
    let candidates = root.path().join("candidates.json").display().to_string();
    let profile = |extra: &[&str]| profile_of(&moe, &text, &policy, extra);
    let summary_09 = success_json(profile(&[
        "--target-active-params",
        "0.9",
        "--plot",
        &plot.display().to_string(),
        "--candidates-out",
        &candidates,
        "--json",
    ]));
    let predicted = summary_09["predicted_fraction"].as_f64().unwrap();
    assert!(predicted <= 0.9, "{summary_09}");
    assert!(summary_09["kl"].as_f64().unwrap() >= 0.0);
    let proposals = summary_09["proposals"].as_array().unwrap();
    let nll = summary_09["nll"].as_f64().unwrap();
    // The selected policy has the least NLL of the proposals that keep to the budget on the
    // selection tokens.
    let within = |p: &&serde_json::Value| p["measured_fraction"].as_f64().unwrap() <= 0.9 * 1.0025;
    assert!(
        proposals
            .iter()
            .filter(within)
            .all(|p| p["nll"].as_f64().unwrap() >= nll)
    );
    assert_eq!(summary_09["layers"].as_array().unwrap().len(), 2);
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    // Evaluating on the calibration text activates what the policy predicted.
    let calib = format!("{text}/0.txt");
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", &moe, "--text", &calib, "--window", "32", "--json"];
        args.extend_from_slice(extra);
        success_json(moekit(&args))
    };
    let full = eval(&[]);
    assert!((full["activated_fraction"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    let reduced = eval(&["--policy", &policy]);
    let f = reduced["activated_fraction"].as_f64().unwrap();
    assert!(f <= 0.9, "{reduced}");
    let top1 = eval(&["--top-k", "1"]);
    for layer in top1["experts_per_token"].as_array().unwrap() {
        assert_eq!(layer["experts_per_token"].as_f64().unwrap(), 1.0);
    }
    // Oracle routing to one expert costs what top-1 costs; more experts than a layer has is
    // refused in one line.
    let oracle = eval(&["--oracle", "1"]);
    assert_eq!(oracle["activated_fraction"], top1["activated_fraction"]);
    assert_ne!(oracle["perplexity"], top1["perplexity"]);
    assert_clean_failure(
        &moekit(&["eval", &moe, "--text", &calib, "--oracle", "99"]),
        "oracle routing to 99 experts",
    );
    // Reusing the measured candidates for another target.
    let summary = success_json(profile(&[
        "--target-active-params",
        "0.7",
        "--candidates-in",
        &candidates,
        "--select-tokens",
        "64",
        "--json",
    ]));
    assert!(summary["predicted_fraction"].as_f64().unwrap() <= 0.7);
    assert!(summary["measured_fraction"].as_f64().unwrap() <= 0.7 + 1e-9);
    // Candidates measured on other inputs, or holding impossible values, are refused.
    assert_clean_failure(
        &profile(&["--calib-tokens", "100", "--candidates-in", &candidates]),
        "measured on other inputs (was `tokens=",
    );
    // Files written beside the model and another spelling of its path change nothing.
    let policy_beside = format!("{moe}/policy.json");
    success_json(moekit(&[
        "profile",
        &format!("{moe}/."),
        "--calib",
        &text,
        "--seq-len",
        "32",
        "--candidates-in",
        &candidates,
        "--select-tokens",
        "64",
        "--json",
        "--out",
        &policy_beside,
    ]));
    // A top-k limit that every layer's 4 experts fit changes nothing measured: reused.
    success_json(profile(&[
        "--top-k-rules",
        "4",
        "--candidates-in",
        &candidates,
        "--select-tokens",
        "64",
        "--json",
    ]));
    let edited = root.path().join("edited.json");
    let text_c = std::fs::read_to_string(&candidates).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&text_c).unwrap();
    c["layers"][0]["candidates"][0]["error"] = serde_json::json!(-1.0);
    std::fs::write(&edited, c.to_string()).unwrap();
    assert_clean_failure(
        &profile(&["--candidates-in", &edited.display().to_string()]),
        "is not possible",
    );

    // Budgets against the dense model (--reference) and as a count (--max-active-params). The
    // split's all-experts model is the dense one plus two routers of 16 x 4.
    let against_dense = eval(&["--reference", &dense]);
    let dense_params = against_dense["reference_params"].as_f64().unwrap();
    let all_experts = against_dense["activated_params"].as_f64().unwrap();
    assert_eq!(all_experts, dense_params + 2.0 * 16.0 * 4.0);
    let f = against_dense["reference_fraction"].as_f64().unwrap();
    assert!(
        (f - all_experts / dense_params).abs() < 1e-12,
        "{against_dense}"
    );
    let reused = [
        "--candidates-in",
        candidates.as_str(),
        "--select-tokens",
        "64",
        "--json",
    ];
    let of_dense = success_json(profile(
        &[
            &["--reference", &dense, "--target-active-params", "0.9"],
            &reused[..],
        ]
        .concat(),
    ));
    assert_eq!(of_dense["reference_params"].as_f64().unwrap(), dense_params);
    assert!((of_dense["target_params"].as_f64().unwrap() - 0.9 * dense_params).abs() <= 1.0);
    let predicted = of_dense["predicted_params"].as_f64().unwrap();
    assert!(predicted <= 0.9 * dense_params + 0.5, "{of_dense}");
    let f = of_dense["reference_fraction"].as_f64().unwrap();
    assert!((f - predicted / dense_params).abs() < 1e-9, "{of_dense}");
    // The same fraction of the all-experts model allows more.
    assert!(summary_09["target_params"].as_f64().unwrap() > 0.9 * dense_params);
    let n = predicted.to_string();
    let counted = success_json(profile(
        &[&["--max-active-params", &n], &reused[..]].concat(),
    ));
    assert_eq!(counted["target_params"].as_f64().unwrap(), predicted);
    assert!(counted["predicted_params"].as_f64().unwrap() <= predicted);
    assert!(counted["reference_params"].is_null());
    // The text outputs say the same.
    let out = profile(
        &[
            &["--reference", &dense, "--target-active-params", "0.9"],
            &reused[..4],
        ]
        .concat(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{predicted:.0} per token"))
            && stdout.contains("of the reference"),
        "{stdout}"
    );
    let out = moekit(&[
        "eval",
        &moe,
        "--text",
        &calib,
        "--window",
        "32",
        "--reference",
        &dense,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = format!(
        "{all_experts:.0} (100.0% of the model with every expert, {:.2}% of the reference)",
        100.0 * all_experts / dense_params
    );
    assert!(stdout.contains(&line), "{stdout}");
    // More than the model has: the whole model is the budget, and every expert is proposed.
    let all = success_json(profile(
        &[&["--max-active-params", "1e12"], &reused[..]].concat(),
    ));
    assert_eq!(all["target_fraction"].as_f64().unwrap(), 1.0);
    let offered = all["proposals"].as_array().unwrap();
    assert!(
        offered
            .iter()
            .any(|p| p["fraction"].as_f64().unwrap() == 1.0),
        "{all}"
    );

    // Bad input: one error line each.
    let other = root.path().join("other.json");
    std::fs::write(
        &other,
        r#"{"layers": [{"layer": 5, "rule": "top-k", "k": 1}]}"#,
    )
    .unwrap();
    let other = other.display().to_string();
    assert_clean_failure(
        &moekit(&["eval", &moe, "--text", &calib, "--policy", &other]),
        "layer 5",
    );
    assert_clean_failure(
        &moekit(&["eval", &moe, "--text", &calib, "--top-k", "9"]),
        "does not fit",
    );
    assert_clean_failure(
        &moekit(&["profile", &dense, "--calib", &text, "--out", &policy]),
        "no MoE layers",
    );
    assert_clean_failure(&profile(&["--plot", "routing.png"]), "name the file .svg");
    assert_clean_failure(&profile(&["--select-tokens", "1"]), "at least 2");
    assert_clean_failure(
        &profile(&["--top-k-rules", "3"]),
        "--top-k-rules 3: at least 4",
    );
    assert_clean_failure(
        &profile(&["--target-active-params", "0.01"]),
        "below the least",
    );
    assert_clean_failure(
        &profile(&["--max-active-params", "10"]),
        "--max-active-params 10: ",
    );
    assert_clean_failure(&profile(&["--target-active-params", "1.5"]), "at most 1");
    assert_clean_failure(
        &moekit(&["eval", &moe, "--text", &calib, "--reference", &calib]),
        "--reference ",
    );
    let both = profile(&[
        "--max-active-params",
        "100",
        "--target-active-params",
        "0.5",
    ]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    assert_clean_failure(
        &profile(&["--max-active-params", "0"]),
        "--max-active-params: the budget must be a positive number",
    );
    assert_clean_failure(
        &profile(&["--reference", &calib, "--target-active-params", "0.5"]),
        "0.txt",
    );
}

#[test]
fn distill_trains_resumes_and_exports() {
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let moe = split_random(&dense, &root.path().join("moe"), 1, &[]);
    let out_dir = root.path().join("distilled");
    let out_s = out_dir.display().to_string();
    let distill = |student: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "--teacher",
            &dense,
            "--student",
            student,
            "--data",
            &text,
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--eval-tokens",
            "64",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "1",
            "--json",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        moekit(&args)
    };
    let first = success_json(distill(
        &moe,
        &out_s,
        &[
            "--steps",
            "6",
            "--checkpoint-every",
            "3",
            "--loss",
            "kl:1,ce:0.1",
        ],
    ));
    assert_eq!(first["steps"], 6);
    assert_eq!(first["tokens"], 6 * 2 * 16);
    assert_eq!(first["before"]["step"], 0);
    assert_eq!(first["after"]["step"], 6);
    assert!(first["after"]["kl"].as_f64().unwrap().is_finite());
    // The trained model is a Mixtral checkpoint that `eval` reads.
    let model = out_dir.join("model").display().to_string();
    assert!(perplexity(&model, &format!("{text}/0.txt")).is_finite());
    let log = std::fs::read_to_string(out_dir.join("train.jsonl")).unwrap();
    let events = |kind: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("\"event\":\"{kind}\"")))
            .count()
    };
    assert_eq!((events("step"), events("eval")), (6, 2));
    assert!(out_dir.join("checkpoints/latest").exists());
    // The same command with more steps resumes after the last checkpoint.
    let more = success_json(distill(
        &moe,
        &out_s,
        &["--steps", "8", "--loss", "kl:1,ce:0.1"],
    ));
    assert_eq!(
        (more["first_step"].as_u64(), more["steps"].as_u64()),
        (Some(7), Some(8))
    );
    assert_eq!(more["tokens"], 8 * 2 * 16);
    // The longer run stretched the schedule from step 7 on, and says so.
    assert_eq!(more["schedule"], serde_json::json!([[1, 6], [7, 8]]));
    assert_eq!(first["schedule"], serde_json::json!([[1, 6]]));
    // The student named another way (a trailing slash), with a file written beside its
    // weights: the same inputs, so the run resumes.
    std::fs::write(Path::new(&moe).join("notes.txt"), b"mine").unwrap();
    let slashed = format!("{moe}/");
    let again = success_json(distill(
        &slashed,
        &out_s,
        &["--steps", "9", "--loss", "kl:1,ce:0.1"],
    ));
    assert_eq!(again["first_step"].as_u64(), Some(9));
    // Another weight decay from the middle of the run is refused, naming what differs.
    let other = [
        "--steps",
        "9",
        "--loss",
        "kl:1,ce:0.1",
        "--weight-decay",
        "0.5",
    ];
    assert_clean_failure(&distill(&moe, &out_s, &other), "optimiser settings");
    // Another student of the same shape (the split with another seed) does not resume the
    // first one's checkpoints.
    let other = split_random(&dense, &root.path().join("moe-seed-5"), 1, &["--seed", "5"]);
    assert_clean_failure(
        &distill(&other, &out_s, &["--steps", "9", "--loss", "kl:1,ce:0.1"]),
        "(its models differ)",
    );
    // Training under a per-layer routing policy: the policy is written beside the model,
    // whose checkpoint keeps its own top-1.
    let policy = root.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"layers":[{"layer":0,"rule":"top-k","k":2},{"layer":1,"rule":"top-p","p":0.9}]}"#,
    )
    .unwrap();
    let routed_dir = root.path().join("routed");
    // 48 tokens make 2 windows of 16 (each window also needs its next token) for 2 steps of
    // 32: the run says it trains on the same text again.
    let out = distill(
        &moe,
        &routed_dir.display().to_string(),
        &[
            "--steps",
            "2",
            "--max-tokens",
            "48",
            "--policy",
            &policy.display().to_string(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let routed = success_json(out);
    assert!(
        stderr.contains("pass 2.0 times over the 32 training tokens"),
        "{stderr}"
    );
    assert_eq!(routed["steps"], 2);
    let config = std::fs::read_to_string(routed_dir.join("model/config.json")).unwrap();
    assert!(config.contains("\"num_experts_per_tok\": 1"), "{config}");
    assert!(routed_dir.join("model/policy.json").exists());
    // Another configuration in the same directory is refused in one line.
    assert_clean_failure(
        &distill(&moe, &out_s, &["--steps", "8", "--loss", "kl:1"]),
        "different run",
    );

    // LoRA on the dense model, plain cross-entropy: a PEFT adapter and a merged model.
    let lora_dir = root.path().join("lora");
    let lora = success_json(distill(
        &dense,
        &lora_dir.display().to_string(),
        &[
            "--steps",
            "2",
            "--loss",
            "ce",
            "--lora-rank",
            "2",
            "--trainable",
            "adapters",
        ],
    ));
    assert!(lora["trainable_params"].as_u64().unwrap() > 0);
    assert!(lora_dir.join("adapter/adapter_config.json").exists());
    assert!(
        perplexity(
            &lora_dir.join("model").display().to_string(),
            &format!("{text}/0.txt")
        )
        .is_finite()
    );

    // Bad input: one line each.
    let bad = root.path().join("bad").display().to_string();
    assert_clean_failure(
        &distill(&moe, &bad, &["--steps", "2", "--trainable", "foo"]),
        "foo",
    );
    assert_clean_failure(
        &distill(&moe, &bad, &["--steps", "2", "--loss", "bogus:1"]),
        "bogus",
    );
    assert_clean_failure(
        &distill(&dense, &bad, &["--steps", "2", "--trainable", "router"]),
        "router",
    );
    assert_clean_failure(&distill(&moe, &bad, &["--steps", "0"]), "steps");
    assert_clean_failure(
        &distill(&moe, &bad, &["--steps", "2", "--max-grad-norm", "-1"]),
        "max_grad_norm",
    );
    assert_clean_failure(
        &distill(&moe, &bad, &["--steps", "2", "--loss", "kl:0"]),
        "every weight is 0",
    );
    assert_clean_failure(
        &distill(&moe, &bad, &["--steps", "2", "--max-tokens", "10"]),
        "give more text",
    );
}

#[test]
fn a_combine_temperature_is_written_into_the_gates_and_the_config() {
    use moekit::llama::io::safetensors::SafetensorsDir;
    use moekit::llama::io::source::TensorSource;
    let root = tempfile::tempdir().unwrap();
    let (dense, text) = dense_model_and_text(root.path());
    let convert =
        |name: &str, extra: &[&str]| split_random(&dense, &root.path().join(name), 2, extra);
    let (plain, flat) = (
        convert("plain", &[]),
        convert("flat", &["--combine-temperature", "1000"]),
    );
    // The same seed gives the same router; the file holds it divided by the temperature.
    let read = |dir: &str, name: &str| {
        SafetensorsDir::open(Path::new(dir))
            .unwrap()
            .read(name)
            .unwrap()
            .unwrap()
            .data
    };
    for l in 0..2 {
        let gate = format!("model.layers.{l}.block_sparse_moe.gate.weight");
        for (a, b) in read(&plain, &gate).iter().zip(read(&flat, &gate)) {
            assert!(
                (a / 1000.0 - b).abs() <= 1e-6 * (a / 1000.0).abs().max(1e-12),
                "{a} {b}"
            );
        }
    }
    let config = std::fs::read_to_string(Path::new(&flat).join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["moekit_combine_temperature"], 1000.0);
    let info = moekit(&["info", &flat]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("combine temperature 1000"),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    let eval_text = format!("{text}/0.txt");
    let ppl = success_json(moekit(&["eval", &flat, "--text", &eval_text, "--json"]));
    assert!(ppl["perplexity"].as_f64().unwrap().is_finite(), "{ppl}");
    for bad in ["0", "-2", "inf"] {
        let out = root.path().join("bad").display().to_string();
        let arg = format!("--combine-temperature={bad}");
        assert_clean_failure(
            &convert_random_split(&dense, &out, &["--top-k", "2", arg.as_str()]),
            "combine temperature",
        );
    }
}
