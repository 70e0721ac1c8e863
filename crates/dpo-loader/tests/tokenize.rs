//! Tokenization conventions and tokenizer loading, on a tiny byte-level BPE tokenizer.

use std::path::PathBuf;
use std::sync::Arc;

use crate::common::{id, tokenizer, write_model};
use dpo_loader::{LoaderError, PreferenceTokenizer, RowRef, TokenizedPair};
use serde_json::json;

fn at() -> RowRef {
    RowRef { file: Arc::new(PathBuf::from("data.jsonl")), line: 1 }
}

fn ids(tok: &PreferenceTokenizer, tokens: &[&str]) -> Vec<u32> {
    tokens.iter().map(|t| id(tok, t)).collect()
}

fn split(tok: &PreferenceTokenizer, prompt: &str, chosen: &str, rejected: &str) -> [Vec<u32>; 3] {
    let TokenizedPair { prompt_ids, chosen_ids, rejected_ids, source } =
        tok.tokenize(prompt, chosen, rejected, at()).unwrap();
    assert_eq!(source, at());
    [prompt_ids, chosen_ids, rejected_ids]
}

#[test]
fn tiny_tokenizer_merges_words() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let enc = tok.inner().encode("Hello world", true).unwrap();
    assert_eq!(enc.get_ids(), ids(&tok, &["Hello", "Ġworld"]));
    assert_eq!((tok.eos_token(), tok.eos_id(), tok.pad_id()), ("<eos>", 0, 1));
}

#[test]
fn plain_split_appends_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let [p, c, r] = split(&tok, "Hello", " world", " there");
    assert_eq!(p, ids(&tok, &["Hello"]));
    assert_eq!(c, ids(&tok, &["Ġworld", "<eos>"]));
    assert_eq!(r, ids(&tok, &["Ġthere", "<eos>"]));
}

#[test]
fn trailing_prompt_space_merges_into_the_completion() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    // "Hello " alone ends with a lone space token "Ġ" that "Hello world" does not have.
    assert_eq!(tok.inner().encode("Hello ", true).unwrap().get_ids(), ids(&tok, &["Hello", "Ġ"]));
    let [p, c, r] = split(&tok, "Hello ", "world", "there");
    assert_eq!(p, ids(&tok, &["Hello"]));
    assert_eq!(c, ids(&tok, &["Ġworld", "<eos>"]));
    assert_eq!(r, ids(&tok, &["Ġthere", "<eos>"]));
}

#[test]
fn prompt_is_cut_at_the_shorter_common_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    // prompt+rejected keeps the prompt's "Ġ" token, prompt+chosen merges it: the prompt is cut
    // before it for both, and the rejected completion starts with it (TRL train row 11).
    let [p, c, r] = split(&tok, "Hello ", "world", "\nno");
    assert_eq!(p, ids(&tok, &["Hello"]));
    assert_eq!(c, ids(&tok, &["Ġworld", "<eos>"]));
    assert_eq!(r, ids(&tok, &["Ġ", "Ċ", "n", "o", "<eos>"]));
}

#[test]
fn eos_is_not_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let [_, c, r] = split(&tok, "Hello", " world<eos>", " there<eos> ");
    assert_eq!(c, ids(&tok, &["Ġworld", "<eos>"]));
    assert_eq!(r, ids(&tok, &["Ġthere", "<eos>", "Ġ", "<eos>"]));
}

fn load(config: serde_json::Value) -> Result<PreferenceTokenizer, LoaderError> {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), config);
    PreferenceTokenizer::from_model_dir(dir.path())
}

#[test]
fn special_tokens_from_config() {
    let tok = load(json!({"eos_token": {"content": "<eos>", "lstrip": false}})).unwrap();
    assert_eq!((tok.eos_token(), tok.eos_id(), tok.pad_id()), ("<eos>", 0, 0), "pad falls back to eos");
    let tok = load(json!({"eos_token": "<eos>", "pad_token": null})).unwrap();
    assert_eq!(tok.pad_id(), 0);

    for config in [json!({}), json!({"eos_token": null}), json!({"pad_token": "<pad>"})] {
        let e = load(config).unwrap_err();
        assert!(matches!(e, LoaderError::NoEos { .. }), "{e}");
        assert!(e.to_string().contains("tokenizer_config.json: no `eos_token`"), "{e}");
    }
    let e = load(json!({"eos_token": "<eos>", "pad_token": "[PAD]"})).unwrap_err();
    assert!(e.to_string().contains("pad token \"[PAD]\" is not in the tokenizer's vocabulary"), "{e}");
}

#[test]
fn missing_or_broken_tokenizer_files() {
    let dir = tempfile::tempdir().unwrap();
    let e = PreferenceTokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(e.to_string().ends_with("missing tokenizer.json in the model folder"), "{e}");
    assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}");

    write_model(dir.path(), json!({"eos_token": "<eos>"}));
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let e = PreferenceTokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(e.to_string().ends_with("missing tokenizer_config.json in the model folder"), "{e}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{oops").unwrap();
    let e = PreferenceTokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer_config.json: invalid tokenizer"), "{e}");

    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let e = PreferenceTokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json: invalid tokenizer"), "{e}");
}
