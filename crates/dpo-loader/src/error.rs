//! Errors and row locations.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a row comes from: a file and its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RowRef {
    /// The JSONL file.
    pub file: Arc<PathBuf>,
    /// 1-based line number in that file.
    pub line: u64,
}

impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Everything that can go wrong while loading preference data.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Reading a file failed.
    #[error("{}: I/O error: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The data file has no bytes (or only a UTF-8 BOM).
    #[error("{}: the data file is empty", file.display())]
    EmptyFile { file: PathBuf },
    /// The data file has only blank lines.
    #[error("{}: the data file has only blank lines, no rows", file.display())]
    BlankFile { file: PathBuf },
    /// A line is not valid UTF-8.
    #[error("{at}: the line is not valid UTF-8 (invalid bytes at byte {byte} of the line)")]
    NotUtf8 { at: RowRef, byte: usize },
    /// A line is not valid JSON.
    #[error("{at}: malformed JSON: {message}")]
    MalformedJson { at: RowRef, message: String },
    /// A line is valid JSON but not an object.
    #[error("{at}: a row must be a JSON object, found {found}")]
    NotAnObject { at: RowRef, found: &'static str },
    /// A required field is absent (or null).
    #[error("{at}: missing field `{field}`")]
    MissingField { at: RowRef, field: &'static str },
    /// A field has the wrong JSON type.
    #[error("{at}: field `{field}` must be a string, found {found}")]
    WrongType { at: RowRef, field: &'static str, found: &'static str },
    /// A field is the empty string.
    #[error("{at}: field `{field}` is an empty string, which makes a useless training pair")]
    EmptyField { at: RowRef, field: &'static str },
    /// `chosen` and `rejected` are the same text.
    #[error(
        "{at}: fields `chosen` and `rejected` are identical, a degenerate pair with no preference signal"
    )]
    SameCompletions { at: RowRef },
    /// A value inside a row (a message, its `role` or `content`, `tools`...) is absent.
    #[error("{at}: missing field `{path}`")]
    MissingKey { at: RowRef, path: String },
    /// A value inside a row has the wrong JSON type.
    #[error("{at}: field `{path}` must be {expected}, found {found}")]
    WrongTypeAt { at: RowRef, path: String, expected: &'static str, found: &'static str },
    /// Some of `prompt`, `chosen`, `rejected` are strings and others message lists.
    #[error(
        "{at}: field `{text}` is a string but `{messages}` is a message list: a row is either all text or all \
         messages"
    )]
    MixedFormats { at: RowRef, text: &'static str, messages: &'static str },
    /// A message list is empty.
    #[error("{at}: field `{field}` is an empty message list")]
    EmptyMessages { at: RowRef, field: &'static str },
    /// A completion message has empty content.
    #[error("{at}: field `{path}` is an empty string, which makes a useless training pair")]
    EmptyContent { at: RowRef, path: String },
    /// Without a `prompt` field, `chosen` and `rejected` share no leading part to use as the prompt.
    #[error(
        "{at}: no `prompt` field and `chosen` and `rejected` differ from their first {unit}, so the implicit \
         prompt (their shared beginning) is empty"
    )]
    NoSharedPrompt { at: RowRef, unit: &'static str },
    /// A message's role is not one the chat template knows.
    #[error("{at}: field `{path}` has role {role:?}, which the chat template does not know (known: {known})")]
    UnknownRole { at: RowRef, path: String, role: String, known: String },
    /// The chat template failed on this row (e.g. its `raise_exception`).
    #[error("{at}: the chat template failed: {message}")]
    Template { at: RowRef, message: String },
    /// A conversational row, but the model has no usable chat template.
    #[error("{at}: conversational row, but {problem}")]
    NoChatTemplate { at: RowRef, problem: String },
    /// A line is longer than [`crate::MAX_ROW_BYTES`].
    #[error("{at}: the line is longer than {limit} bytes")]
    RowTooLong { at: RowRef, limit: usize },
    /// A compressed file is corrupt or truncated.
    #[error("{}: corrupt or truncated compressed data after line {after_line}: {source}", file.display())]
    Corrupt {
        file: PathBuf,
        after_line: u64,
        #[source]
        source: std::io::Error,
    },
    /// A folder or glob pattern names no data files.
    #[error("{}: {problem}", path.display())]
    NoShards { path: PathBuf, problem: String },
    /// The model folder lacks a tokenizer file.
    #[error("{}: missing {name} in the model folder", dir.display())]
    MissingTokenizerFile { dir: PathBuf, name: &'static str },
    /// A tokenizer file could not be parsed or used.
    #[error("{}: invalid tokenizer: {message}", file.display())]
    Tokenizer { file: PathBuf, message: String },
    /// The tokenizer config defines no EOS token.
    #[error("{}: no `eos_token` defined; an EOS token is required", file.display())]
    NoEos { file: PathBuf },
    /// A special token is not in the tokenizer's vocabulary.
    #[error("{}: {role} token {token:?} is not in the tokenizer's vocabulary", file.display())]
    UnknownToken { file: PathBuf, role: &'static str, token: String },
    /// Encoding a row failed.
    #[error("{at}: tokenization failed: {message}")]
    Encode { at: RowRef, message: String },
    /// The data configuration or start position is invalid.
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// The prefetch thread could not be started.
    #[error("cannot start the prefetch thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl LoaderError {
    /// The skip-count reason when this is a bad row that [`crate::OnBadRow::Skip`] may skip,
    /// `None` for errors that always stop loading.
    pub fn skip_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::NotUtf8 { .. } => "not_utf8",
            Self::MalformedJson { .. } => "malformed_json",
            Self::NotAnObject { .. } | Self::WrongType { .. } => "wrong_type",
            Self::MissingField { .. } => "missing_field",
            Self::EmptyField { .. } => "empty_field",
            Self::SameCompletions { .. } => "chosen_equals_rejected",
            Self::MissingKey { .. } => "missing_field",
            Self::WrongTypeAt { .. } | Self::MixedFormats { .. } => "wrong_type",
            Self::EmptyMessages { .. } | Self::EmptyContent { .. } | Self::NoSharedPrompt { .. } => {
                "empty_field"
            }
            Self::UnknownRole { .. } => "unknown_role",
            Self::Template { .. } => "template_error",
            Self::RowTooLong { .. } => "row_too_long",
            _ => return None,
        })
    }
}

/// Result with [`LoaderError`].
pub type Result<T, E = LoaderError> = std::result::Result<T, E>;
