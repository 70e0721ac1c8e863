use std::path::{Path, PathBuf};

/// Errors of model loading and the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid model config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("model folder {dir}: missing {what}")]
    Missing { dir: PathBuf, what: String },
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor { path: PathBuf, name: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}
