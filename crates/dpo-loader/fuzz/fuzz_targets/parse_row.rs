//! The JSONL line parser on arbitrary bytes, and every row it accepts rendered and tokenized with
//! the real Llama 3.1, Qwen2.5 and Mistral v0.3 chat templates (tests/fixtures/chat): errors are
//! fine, panics and hangs are not.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use dpo_loader::{PreferenceTokenizer, RowRef, parse_row};
use libfuzzer_sys::fuzz_target;

fn tokenizers() -> &'static [PreferenceTokenizer] {
    static TOKENIZERS: OnceLock<Vec<PreferenceTokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/chat");
        ["llama3", "qwen2", "mistral"]
            .iter()
            .map(|m| PreferenceTokenizer::from_model_dir(format!("{root}/{m}")).expect("fixture tokenizer"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let at = RowRef { file: Arc::new(PathBuf::from("fuzz.jsonl")), line: 1 };
    let Ok(row) = parse_row(data, &at) else { return };
    for tok in tokenizers() {
        if let Ok(pair) = tok.tokenize_row(&row, at.clone()) {
            assert!(pair.prompt_ids.len() + pair.chosen_ids.len() > 0 || pair.rejected_ids.is_empty());
        }
    }
});
