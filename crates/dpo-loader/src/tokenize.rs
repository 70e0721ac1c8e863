//! Tokenization of preference pairs the way TRL's `DPOTrainer._prepare_dataset` does it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat::ChatTemplate;
use crate::error::{LoaderError, Result, RowRef};
use crate::row::{Message, RawRow};

/// The texts a row is tokenized from: the prompt alone and the prompt followed by each
/// completion (for text rows with the EOS text appended; for conversational rows rendered by
/// the chat template, the prompt with the generation prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedRow {
    pub prompt: String,
    pub prompt_chosen: String,
    pub prompt_rejected: String,
    /// Whether the tokenizer adds its special tokens (BOS...): true for text rows (HF
    /// `tokenizer(text)`), false for rendered conversations (`apply_chat_template` tokenizes
    /// with `add_special_tokens=False`; the template writes them).
    pub add_special_tokens: bool,
}

/// A tokenized preference pair: the shared prompt and the two completions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The chat template, or why there is none usable.
    chat_template: std::result::Result<ChatTemplate, String>,
    warned_split: AtomicBool,
}

impl PreferenceTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model folder.
    ///
    /// `eos_token` is required; `pad_token` falls back to it. Either may be a string or an
    /// `AddedToken` object (`{"content": ...}`), and must be in the vocabulary.
    ///
    /// The chat template is `chat_template.jinja` if present, else `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of `{name, template}` whose `default` is
    /// used), as transformers loads it. A missing or uncompilable template is an error only
    /// when a conversational row is tokenized.
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
        let chat_template = load_chat_template(dir, &config_file, &config);
        if let Err(problem) = &chat_template {
            tracing::debug!(dir = %dir.display(), problem, "no usable chat template");
        }
        tracing::debug!(dir = %dir.display(), eos_token, pad_token, "loaded tokenizer");
        Ok(Self { tokenizer, eos_token, eos_id, pad_id, chat_template, warned_split: AtomicBool::new(false) })
    }

    /// The files of `dir` that [`Self::from_model_dir`] reads (those that exist, in this order):
    /// what a cache of tokenized data must be keyed by.
    pub fn definition_files(dir: impl AsRef<Path>) -> Vec<PathBuf> {
        ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
            .iter()
            .map(|f| dir.as_ref().join(f))
            .filter(|p| p.is_file())
            .collect()
    }

    /// The chat template, or why there is none usable.
    pub fn chat_template(&self) -> std::result::Result<&ChatTemplate, &str> {
        self.chat_template.as_ref().map_err(String::as_str)
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

    /// Tokenizes a row like TRL: [`Self::render_row`], then each text encoded (with special
    /// tokens for text rows, without for conversations), then split at the common prefix.
    pub fn tokenize_row(&self, row: &RawRow, source: RowRef) -> Result<TokenizedPair> {
        let rendered = self.render_row(row, &source)?;
        self.tokenize_rendered(&rendered, source)
    }

    /// The texts a row is tokenized from. Text rows: `prompt`, `prompt + chosen (+ EOS)`,
    /// `prompt + rejected (+ EOS)`. Conversational rows: the chat template applied to the prompt
    /// messages with `add_generation_prompt=True`, and to prompt + chosen and prompt + rejected
    /// messages without it; no EOS is added (the template writes its own end-of-turn tokens).
    pub fn render_row(&self, row: &RawRow, source: &RowRef) -> Result<RenderedRow> {
        match row {
            RawRow::Text { prompt, chosen, rejected } => {
                let with_eos = |completion: &str| {
                    let mut text = format!("{prompt}{completion}");
                    if !completion.ends_with(&self.eos_token) {
                        text.push_str(&self.eos_token);
                    }
                    text
                };
                Ok(RenderedRow {
                    prompt: prompt.clone(),
                    prompt_chosen: with_eos(chosen),
                    prompt_rejected: with_eos(rejected),
                    add_special_tokens: true,
                })
            }
            RawRow::Conversation { prompt, chosen, rejected, tools, template_kwargs } => {
                let template = self.chat_template.as_ref().map_err(|problem| {
                    LoaderError::NoChatTemplate { at: source.clone(), problem: problem.clone() }
                })?;
                for (field, list) in [("prompt", prompt), ("chosen", chosen), ("rejected", rejected)] {
                    check_roles(template, field, list, source)?;
                }
                let render = |messages: &mut dyn Iterator<Item = &Message>, generation: bool| {
                    template
                        .render(messages, generation, tools.as_ref(), template_kwargs)
                        .map_err(|message| LoaderError::Template { at: source.clone(), message })
                };
                Ok(RenderedRow {
                    prompt: render(&mut prompt.iter(), true)?,
                    prompt_chosen: render(&mut prompt.iter().chain(chosen), false)?,
                    prompt_rejected: render(&mut prompt.iter().chain(rejected), false)?,
                    add_special_tokens: false,
                })
            }
        }
    }

    /// Encodes the three texts of a [`RenderedRow`] and splits them at the common prefix.
    pub fn tokenize_rendered(&self, rendered: &RenderedRow, source: RowRef) -> Result<TokenizedPair> {
        let encode = |text: &str| -> Result<Vec<u32>> {
            self.tokenizer
                .encode_fast(text, rendered.add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| LoaderError::Encode { at: source.clone(), message: e.to_string() })
        };
        let prompt_ids = encode(&rendered.prompt)?;
        let chosen_ids = encode(&rendered.prompt_chosen)?;
        let rejected_ids = encode(&rendered.prompt_rejected)?;
        Ok(self.split(prompt_ids, chosen_ids, rejected_ids, source))
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
        let row = RawRow::Text { prompt: prompt.into(), chosen: chosen.into(), rejected: rejected.into() };
        self.tokenize_row(&row, source)
    }

    /// TRL's split: the prompt is the shortest common prefix of the prompt's ids with either
    /// sequence, each completion the rest of its sequence.
    fn split(
        &self,
        mut prompt_ids: Vec<u32>,
        mut chosen_ids: Vec<u32>,
        mut rejected_ids: Vec<u32>,
        source: RowRef,
    ) -> TokenizedPair {
        let prompt_len = common_prefix_length(&prompt_ids, &chosen_ids)
            .min(common_prefix_length(&prompt_ids, &rejected_ids));
        if prompt_len < prompt_ids.len() && !self.warned_split.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                row = %source,
                "the tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template \
                 renders the prompt alone differently, or tokens merge across the boundary); the completion \
                 starts where they diverge. Shown once."
            );
        }
        prompt_ids.truncate(prompt_len);
        chosen_ids.drain(..prompt_len);
        rejected_ids.drain(..prompt_len);
        TokenizedPair { prompt_ids, chosen_ids, rejected_ids, source }
    }
}

fn check_roles(template: &ChatTemplate, field: &str, messages: &[Message], at: &RowRef) -> Result<()> {
    for (k, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !template.knows_role(role) {
            let known: Vec<&str> = template.known_roles().iter().map(String::as_str).collect();
            return Err(LoaderError::UnknownRole {
                at: at.clone(),
                path: format!("{field}[{k}].role"),
                role: role.to_owned(),
                known: known.join(", "),
            });
        }
    }
    Ok(())
}

/// The chat template as transformers finds it: `chat_template.jinja`, else the config's
/// `chat_template` (a string or a list of named templates, `default` used).
fn load_chat_template(
    dir: &Path,
    config_file: &Path,
    config: &Value,
) -> std::result::Result<ChatTemplate, String> {
    let jinja = dir.join("chat_template.jinja");
    let (source, from) = if jinja.is_file() {
        let text = fs::read_to_string(&jinja).map_err(|e| format!("{}: {e}", jinja.display()))?;
        (text, jinja)
    } else {
        let source = match config.get("chat_template") {
            None | Some(Value::Null) => {
                return Err(format!(
                    "the model has no chat template (no chat_template.jinja in {} and no `chat_template` in {})",
                    dir.display(),
                    config_file.display()
                ));
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!("{}: `chat_template` has no template named \"default\"", config_file.display())
                })?,
            Some(_) => return Err(format!("{}: `chat_template` must be a string", config_file.display())),
        };
        (source, config_file.to_path_buf())
    };
    let mut special = BTreeMap::new();
    for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
        if let Some(token) = special_token(config, key) {
            special.insert(key.to_owned(), token);
        }
    }
    // TRL sets a missing pad token to the EOS token before preparing the data.
    if let (None, Some(eos)) = (special.get("pad_token"), special.get("eos_token").cloned()) {
        special.insert("pad_token".into(), eos);
    }
    ChatTemplate::new(&source, special)
        .map_err(|e| format!("the chat template of {} cannot be compiled: {e}", from.display()))
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
