//! Calibration text: walking files and directories, and tokenising them into one stream.

use std::path::{Path, PathBuf};

use moekit_llama::Tokenizer;
use moekit_upcycle::UpcycleError;
use moekit_upcycle::calibration::{files, tokens};

fn write(path: &Path, text: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn rel(root: &Path, found: &[PathBuf]) -> Vec<String> {
    found
        .iter()
        .map(|p| {
            p.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect()
}

#[test]
fn directories_are_walked_in_name_order_without_hidden_entries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in [
        "b.txt",
        "a.txt",
        "sub/z.txt",
        "sub/c.txt",
        "sub/deeper/d.txt",
        "sub/.secret",
        ".hidden.txt",
        ".git/config",
        "c/e.txt",
    ] {
        write(&root.join(name), b"text");
    }
    let found = files(&[root.to_path_buf()]).unwrap();
    assert_eq!(
        rel(root, &found),
        [
            "a.txt",
            "b.txt",
            "c/e.txt",
            "sub/c.txt",
            "sub/deeper/d.txt",
            "sub/z.txt"
        ]
    );
    // Paths keep the order given; a file named directly is taken as is.
    let found = files(&[
        root.join("sub"),
        root.join("b.txt"),
        root.join(".hidden.txt"),
    ])
    .unwrap();
    assert_eq!(
        rel(root, &found),
        [
            "sub/c.txt",
            "sub/deeper/d.txt",
            "sub/z.txt",
            "b.txt",
            ".hidden.txt"
        ]
    );
    // An empty directory gives nothing; a missing path is an I/O error naming it.
    std::fs::create_dir(root.join("empty")).unwrap();
    assert!(files(&[root.join("empty")]).unwrap().is_empty());
    let missing = root.join("missing.txt");
    match files(std::slice::from_ref(&missing)) {
        Err(UpcycleError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
}

/// A word-level tokenizer over a few words, split on whitespace.
fn tokenizer(dir: &Path) -> Tokenizer {
    let words = [
        "[UNK]", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
    ];
    let file = dir.join("tokenizer.json");
    std::fs::write(&file, moekit_testing::word_tokenizer_json(&words)).unwrap();
    Tokenizer::from_file(&file, &dir.join("tokenizer_config.json")).unwrap()
}

#[test]
fn files_are_tokenised_in_order_into_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let text = dir.path().join("text");
    write(&text.join("1.txt"), b"the quick brown fox");
    write(&text.join("2.txt"), b"jumps over the lazy dog");
    write(&text.join("3.txt"), b"the cat");
    let list = files(std::slice::from_ref(&text)).unwrap();
    assert_eq!(
        tokens(&tok, &list, 100).unwrap(),
        [1, 2, 3, 4, 5, 6, 1, 7, 8, 1, 0]
    );
    // Cut at max_tokens, inside a file.
    assert_eq!(tokens(&tok, &list, 6).unwrap(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(tokens(&tok, &list, 4).unwrap(), [1, 2, 3, 4]);
    // Later files are not read once enough tokens are collected.
    let broken = vec![text.join("1.txt"), dir.path().join("missing.txt")];
    assert_eq!(tokens(&tok, &broken, 3).unwrap(), [1, 2, 3]);
}

#[test]
fn too_little_text_or_binary_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let empty = dir.path().join("empty.txt");
    write(&empty, b"");
    let one = dir.path().join("one.txt");
    write(&one, b"  fox \n");
    for (list, max) in [
        (vec![empty.clone()], 100),
        (vec![empty.clone(), one.clone()], 100),
        (vec![one.clone(), one.clone()], 1),
        (vec![], 100),
    ] {
        let err = tokens(&tok, &list, max).unwrap_err();
        assert!(
            matches!(err, UpcycleError::Calibration(_)),
            "{list:?}: {err}"
        );
    }
    assert_eq!(
        tokens(&tok, &[one.clone(), one.clone()], 100).unwrap(),
        [4, 4]
    );
    let binary = dir.path().join("blob.bin");
    write(&binary, &[0xff, 0xfe, 0x00, 0x80]);
    match tokens(&tok, std::slice::from_ref(&binary), 100) {
        Err(UpcycleError::Llama(moekit_llama::LlamaError::Io { path, source })) => {
            assert_eq!(path, binary);
            assert_eq!(source.kind(), std::io::ErrorKind::InvalidData);
        }
        other => panic!("{other:?}"),
    }
}
