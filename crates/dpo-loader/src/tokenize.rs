//! Tokenization of preference pairs the way TRL's `DPOTrainer._prepare_dataset` does it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{LoaderError, Result, RowRef};
use crate::jsonl::RawRow;

/// A tokenized preference pair: the shared prompt and the two completions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub source: RowRef,
}

/// A Hugging Face tokenizer with its EOS and padding tokens.
#[derive(Debug)]
pub struct PreferenceTokenizer {
    tokenizer: Tokenizer,
    eos_token: String,
    eos_id: u32,
    pad_id: u32,
    warned_split: AtomicBool,
}

impl PreferenceTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model folder.
    ///
    /// `eos_token` is required; `pad_token` falls back to it. Either may be a string or an
    /// `AddedToken` object (`{"content": ...}`), and must be in the vocabulary.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_file = existing(dir, "tokenizer.json")?;
        let config_file = existing(dir, "tokenizer_config.json")?;
        let invalid =
            |file: &Path, message: String| LoaderError::Tokenizer { file: file.to_path_buf(), message };

        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_file).map_err(|e| invalid(&tokenizer_file, e.to_string()))?;
        // HF `tokenizer(text)` encodes without truncation or padding whatever tokenizer.json says.
        tokenizer.with_truncation(None).map_err(|e| invalid(&tokenizer_file, e.to_string()))?;
        tokenizer.with_padding(None);

        let config_text = fs::read_to_string(&config_file)
            .map_err(|source| LoaderError::Io { file: config_file.clone(), source })?;
        let config: Value =
            serde_json::from_str(&config_text).map_err(|e| invalid(&config_file, e.to_string()))?;
        let eos_token = special_token(&config, "eos_token")
            .ok_or_else(|| LoaderError::NoEos { file: config_file.clone() })?;
        let pad_token = special_token(&config, "pad_token").unwrap_or_else(|| eos_token.clone());
        let id_of = |role, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| LoaderError::UnknownToken {
                file: tokenizer_file.clone(),
                role,
                token: token.to_owned(),
            })
        };
        let eos_id = id_of("eos", &eos_token)?;
        let pad_id = id_of("pad", &pad_token)?;
        tracing::debug!(dir = %dir.display(), eos_token, pad_token, "loaded tokenizer");
        Ok(Self { tokenizer, eos_token, eos_id, pad_id, warned_split: AtomicBool::new(false) })
    }

    /// The EOS token's text, appended to completions.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The EOS token's id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding token's id (the EOS id when the config defines no `pad_token`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenizes a row; see [`Self::tokenize`].
    pub fn tokenize_row(&self, row: &RawRow, source: RowRef) -> Result<TokenizedPair> {
        match row {
            RawRow::Text { prompt, chosen, rejected } => self.tokenize(prompt, chosen, rejected, source),
        }
    }

    /// Tokenizes a plain-text pair like TRL: EOS text appended to each completion unless
    /// present, `prompt`, `prompt+chosen` and `prompt+rejected` encoded with special tokens,
    /// and the prompt cut at the shortest common token prefix of the three.
    pub fn tokenize(
        &self,
        prompt: &str,
        chosen: &str,
        rejected: &str,
        source: RowRef,
    ) -> Result<TokenizedPair> {
        let encode = |text: &str| -> Result<Vec<u32>> {
            self.tokenizer
                .encode_fast(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| LoaderError::Encode { at: source.clone(), message: e.to_string() })
        };
        let with_eos = |completion: &str| {
            let mut text = format!("{prompt}{completion}");
            if !completion.ends_with(&self.eos_token) {
                text.push_str(&self.eos_token);
            }
            text
        };
        let mut prompt_ids = encode(prompt)?;
        let mut chosen_ids = encode(&with_eos(chosen))?;
        let mut rejected_ids = encode(&with_eos(rejected))?;
        let prompt_len = common_prefix_length(&prompt_ids, &chosen_ids)
            .min(common_prefix_length(&prompt_ids, &rejected_ids));
        if prompt_len < prompt_ids.len() && !self.warned_split.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                row = %source,
                "the tokenized prompt is not a prefix of the tokenized prompt+completion (tokens merge \
                 across the boundary); the completion starts where they diverge. End prompts on a token \
                 boundary to avoid it. Shown once."
            );
        }
        prompt_ids.truncate(prompt_len);
        chosen_ids.drain(..prompt_len);
        rejected_ids.drain(..prompt_len);
        Ok(TokenizedPair { prompt_ids, chosen_ids, rejected_ids, source })
    }
}

/// Number of leading tokens two sequences have in common.
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn existing(dir: &Path, name: &'static str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LoaderError::MissingTokenizerFile { dir: dir.to_path_buf(), name })
    }
}

/// A special token from tokenizer_config.json: a string or an `AddedToken` object.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}
