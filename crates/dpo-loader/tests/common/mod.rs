//! Test helpers: a tiny byte-level BPE tokenizer and JSONL files in a temporary folder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dpo_loader::{PreferenceDataset, PreferenceTokenizer};
use serde_json::{Value, json};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// Whole words (byte-level form, `Ġ` = leading space) that the tiny tokenizer merges into one token.
pub const WORDS: &[&str] = &["Hello", "Ġworld", "Ġthere", "Ġgood", "Ġbad", "Ġanswer"];

/// Writes `tokenizer.json` (GPT-2 style byte-level BPE: `<eos>` = 0, `<pad>` = 1, the 256 byte
/// symbols, then one token per prefix of each of [`WORDS`]) and `tokenizer_config.json`.
pub fn write_model(dir: &Path, tokenizer_config: Value) {
    let mut vocab = serde_json::Map::new();
    let add = |vocab: &mut serde_json::Map<String, Value>, token: &str| {
        let id = vocab.len();
        vocab.entry(token.to_owned()).or_insert(json!(id));
    };
    add(&mut vocab, "<eos>");
    add(&mut vocab, "<pad>");
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    for c in alphabet {
        add(&mut vocab, &c.to_string());
    }
    let mut merges = Vec::new();
    for word in WORDS {
        let chars: Vec<char> = word.chars().collect();
        for k in 1..chars.len() {
            let left: String = chars[..k].iter().collect();
            let merged: String = chars[..=k].iter().collect();
            if !vocab.contains_key(&merged) {
                merges.push(format!("{left} {}", chars[k]));
                add(&mut vocab, &merged);
            }
        }
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<eos>"), special(1, "<pad>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
}

/// The standard test tokenizer: eos `<eos>`, pad `<pad>` given as an AddedToken object.
pub fn tokenizer(dir: &Path) -> Arc<PreferenceTokenizer> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_model(&model, json!({"eos_token": "<eos>", "pad_token": {"content": "<pad>", "special": true}}));
    Arc::new(PreferenceTokenizer::from_model_dir(&model).unwrap())
}

/// Token id of `token` in the tiny tokenizer.
pub fn id(tok: &PreferenceTokenizer, token: &str) -> u32 {
    tok.inner().token_to_id(token).unwrap_or_else(|| panic!("no token {token:?}"))
}

/// Writes `bytes` to `dir/name`.
pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// One JSONL line for a text row.
pub fn row(prompt: &str, chosen: &str, rejected: &str) -> String {
    json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}).to_string() + "\n"
}

/// A file of `n` distinct valid rows, prompt lengths varying with the row number.
pub fn dataset(dir: &Path, name: &str, n: usize) -> Arc<PreferenceDataset> {
    let text: String =
        (0..n).map(|i| row(&format!("Q{i}{}", "?".repeat(i % 4)), &format!(" good {i}"), " bad")).collect();
    Arc::new(PreferenceDataset::open(write(dir, name, text)).unwrap())
}

/// Every batch from `start` to the end of its epoch, each with the position after it.
pub fn all(
    data: &Arc<PreferenceDataset>,
    tok: &Arc<PreferenceTokenizer>,
    cfg: &dpo_loader::DataConfig,
    start: dpo_loader::DataPosition,
) -> Vec<(dpo_loader::Batch, dpo_loader::DataPosition)> {
    let mut iter = dpo_loader::batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
    let mut out = Vec::new();
    while let Some(batch) = iter.next() {
        out.push((batch.unwrap(), iter.position()));
    }
    out
}
