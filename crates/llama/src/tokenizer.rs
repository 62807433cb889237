//! Tokenisation (Hugging Face `tokenizers`) and the ChatML prompt format.
//!
//! A tokenizer comes from `tokenizer.json`, or from GGUF metadata: a GPT-2 style byte-level
//! BPE (`tokenizer.ggml.model = gpt2`) whose vocabulary, merges and special tokens are in the
//! file and whose pre-tokenizer is named by `tokenizer.ggml.pre`.

use std::path::Path;

use serde_json::{Value, json};

use crate::io::gguf::{GgufFile, GgufValue};
use crate::{LlamaError, Result};

/// A tokenizer plus what generation and chat need: end-of-sequence ids and the default system
/// prompt of the chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Vec<u32>,
    bos: Option<String>,
    default_system: Option<String>,
}

/// A chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

fn tok_err(e: impl std::fmt::Display) -> LlamaError {
    LlamaError::Tokenizer(e.to_string())
}

/// The Hugging Face pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Result<Value> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "gpt2" | "default" => byte_level(true),
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-v3" | "llama-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        other => {
            return Err(LlamaError::Tokenizer(format!(
                "GGUF pre-tokenizer `{other}` is not supported (supported: gpt2, smollm, \
                 starcoder, llama-bpe, qwen2); use a Hugging Face directory with tokenizer.json"
            )));
        }
    })
}

/// The system prompt a ChatML template inserts when the conversation has none (SmolLM2's
/// "You are a helpful AI assistant named SmolLM, ..."), read from the template source.
fn default_system_prompt(template: &str) -> Option<String> {
    let start = "<|im_start|>system\n";
    let at = template.find(start)? + start.len();
    let rest = &template[at..];
    let end = rest.find("<|im_end|>")?;
    let prompt = &rest[..end];
    // Only a literal prompt counts, not `' + message['content'] + '`.
    (!prompt.contains('\'') && !prompt.contains("{{")).then(|| prompt.to_string())
}

impl Tokenizer {
    /// Reads `tokenizer.json`, and special tokens and the chat template from
    /// `tokenizer_config.json` if present.
    pub fn from_file(file: &Path, tokenizer_config: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(file)
            .map_err(|e| LlamaError::Tokenizer(format!("{}: {e}", file.display())))?;
        let mut this = Self {
            inner,
            eos: Vec::new(),
            bos: None,
            default_system: None,
        };
        if let Ok(text) = std::fs::read_to_string(tokenizer_config) {
            let config: Value = serde_json::from_str(&text)
                .map_err(|e| LlamaError::corrupt(tokenizer_config, format!("invalid JSON: {e}")))?;
            let token = |key: &str| match config.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => v.get("content").and_then(Value::as_str).map(String::from),
                None => None,
            };
            this.eos = token("eos_token")
                .and_then(|t| this.inner.token_to_id(&t))
                .into_iter()
                .collect();
            this.bos = token("bos_token");
            this.default_system = config
                .get("chat_template")
                .and_then(Value::as_str)
                .and_then(default_system_prompt);
        }
        Ok(this)
    }

    /// Builds the byte-level BPE tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let get = |key: &str| file.get(&format!("tokenizer.ggml.{key}"));
        let model = get("model").and_then(GgufValue::as_str).unwrap_or("");
        if model != "gpt2" {
            return Err(LlamaError::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (only gpt2-style byte-level BPE)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| tok_err(format!("tokenizer.ggml.{key} is missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| tok_err(format!("{key}: not a string")))
                })
                .collect()
        };
        let tokens = strings("tokens")?;
        let merges = strings("merges")?;
        let types: Vec<u64> = get("token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        if types.len() > tokens.len() {
            return Err(tok_err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        // llama.cpp token types: 3 = control, 4 = user-defined; both are matched whole.
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t == 3})
            })
            .collect();
        let pre = get("pre").and_then(GgufValue::as_str).unwrap_or("gpt2");
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre)?,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(tok_err)?;
        let id = |key: &str| get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
        let name = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        let template = file
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str);
        Ok(Self {
            inner,
            eos: id("eos_token_id").into_iter().collect(),
            bos: name(id("bos_token_id")),
            default_system: template.and_then(default_system_prompt),
        })
    }

    /// Token ids of `text`, without special tokens added (special tokens written in the text,
    /// like `<|im_start|>`, are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The token ids of the text file `path` (as [`Tokenizer::encode`] gives them), at most
    /// `max_tokens` of them (`None`: all). The file is read and tokenised in pieces of about
    /// [`TEXT_PIECE_BYTES`], so memory follows the piece and the tokens kept, not the file: a
    /// huge file with a small cap, or an endless one (`/dev/zero`), reads only what the cap
    /// needs. Pieces end at a line break between two non-blank characters, where byte-level BPE
    /// splits the text anyway (a piece with none ends at the size limit), so a file of at most
    /// one piece tokenises exactly as a whole.
    pub fn encode_file(&self, path: &Path, max_tokens: Option<usize>) -> Result<Vec<u32>> {
        use std::io::Read;
        let cap = max_tokens.unwrap_or(usize::MAX);
        let file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let mut ids = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut done = false;
        while ids.len() < cap && !(done && pending.is_empty()) {
            if !done && pending.len() < TEXT_PIECE_BYTES {
                let want = (TEXT_PIECE_BYTES - pending.len()) as u64;
                let got = reader
                    .by_ref()
                    .take(want)
                    .read_to_end(&mut pending)
                    .map_err(|e| LlamaError::io(path, e))?;
                done = got == 0;
                continue;
            }
            let cut = if done {
                pending.len()
            } else {
                piece_end(&pending)
            };
            let rest = pending.split_off(cut);
            // As `read_to_string` reports it: an I/O error of kind InvalidData on the file.
            let text = std::str::from_utf8(&pending).map_err(|e| {
                let why = format!("not UTF-8 text ({e})");
                LlamaError::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, why),
                )
            })?;
            ids.extend(self.encode(text)?);
            pending = rest;
        }
        ids.truncate(cap);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// An incremental decoder for streaming generation.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// End-of-sequence ids (generation stops at any of them).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ChatML prompt (`<|im_start|>role\ncontent<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n`), with the template's default system prompt first when the
    /// conversation has no system message.
    pub fn chat_prompt(&self, messages: &[Message]) -> String {
        let mut prompt = String::new();
        if let Some(system) = &self.default_system
            && messages.first().is_none_or(|m| m.role != "system")
        {
            prompt.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        for m in messages {
            prompt.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        prompt.push_str("<|im_start|>assistant\n");
        prompt
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens, ChatML
    /// template) into `dir`, atomically, for Hugging Face `AutoTokenizer`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(tok_err)?;
        crate::io::atomic::write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let token = |id: Option<&u32>| id.and_then(|&i| self.inner.id_to_token(i));
        let system = self.default_system.as_deref().map_or(String::new(), |s| {
            format!(
                "{{% if messages[0]['role'] != 'system' %}}{{{{ '<|im_start|>system\n{s}<|im_end|>\n' }}}}{{% endif %}}"
            )
        });
        let template = format!(
            "{system}{{% for message in messages %}}{{{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}}}{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '<|im_start|>assistant\n' }}}}{{% endif %}}"
        );
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": false,
            "add_eos_token": false,
            "bos_token": self.bos,
            "eos_token": token(self.eos.first()),
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000_u64,
            "chat_template": template,
        });
        crate::io::atomic::write(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)
                .expect("JSON value serialises")
                .as_bytes(),
        )
    }
}

/// Turns generated ids into text as they come, holding back incomplete UTF-8.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl TokenStream<'_> {
    /// Adds `id`; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed {
            return Ok(None);
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(Some(new))
    }
}

/// Bytes of text [`Tokenizer::encode_file`] tokenises at a time.
pub const TEXT_PIECE_BYTES: usize = 1 << 20;

/// Where a piece of `text` (a full buffer) ends: after its last line break that has a non-blank
/// character on both sides, else at the last UTF-8 character boundary (an invalid sequence is
/// left for the UTF-8 check to name).
fn piece_end(text: &[u8]) -> usize {
    let blank = |b: u8| b.is_ascii_whitespace();
    let at_break = (1..text.len().saturating_sub(1))
        .rev()
        .find(|&i| text[i] == b'\n' && !blank(text[i - 1]) && !blank(text[i + 1]));
    match at_break {
        Some(i) => i + 1,
        // Before the last character, which may continue past the buffer.
        None => (1..text.len())
            .rev()
            .find(|&i| text[i] & 0xC0 != 0x80)
            .unwrap_or(text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokenizer.json");
        let json = moekit_testing::word_tokenizer_json(&["[UNK]", "a", "bb", "é"]);
        std::fs::write(&file, json).unwrap();
        let t = Tokenizer::from_file(&file, &dir.path().join("none.json")).unwrap();
        (dir, t)
    }

    #[test]
    fn files_tokenise_in_pieces_as_a_whole_and_stop_at_the_cap() {
        let (dir, t) = words();
        // Three pieces' worth of lines, with multi-byte characters around the piece ends.
        let line = "a bb é\nbb é a\n";
        let text = line.repeat(3 * TEXT_PIECE_BYTES / line.len() + 7);
        let path = dir.path().join("text.txt");
        std::fs::write(&path, &text).unwrap();
        let whole = t.encode(&text).unwrap();
        assert_eq!(t.encode_file(&path, None).unwrap(), whole);
        assert_eq!(t.encode_file(&path, Some(10)).unwrap(), whole[..10]);
        // A line longer than a piece (one unknown word per piece), cut inside no character.
        let long = "é".repeat(TEXT_PIECE_BYTES);
        std::fs::write(&path, &long).unwrap();
        let ids = t.encode_file(&path, None).unwrap();
        assert!(ids.iter().all(|&i| i == 0) && ids.len() >= 2, "{ids:?}");
        // Not UTF-8: an error naming the file.
        std::fs::write(&path, [b'a', b' ', 0xff, 0xfe]).unwrap();
        let err = t.encode_file(&path, None).unwrap_err();
        assert!(err.to_string().contains("text.txt"), "{err}");
    }

    /// An endless file is read only as far as the cap needs.
    #[cfg(unix)]
    #[test]
    fn an_endless_file_stops_at_the_cap() {
        let (_dir, t) = words();
        let ids = t.encode_file(Path::new("/dev/zero"), Some(3)).unwrap();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn default_system_prompt_is_read_from_a_chatml_template() {
        let smollm = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(
            default_system_prompt(smollm).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let plain =
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}";
        assert_eq!(default_system_prompt(plain), None);
    }
}
