use std::path::PathBuf;

/// Why a run could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] dpo_loader::LoaderError),
    #[error(transparent)]
    Model(#[from] dpo_model::ModelError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Numerics(String),
    #[error(
        "the largest batch of the data ({rows} rows x {seq} tokens), run before the first step, failed: \
         {source}; lower batch_size or max_length, or turn on gradient_checkpointing, prefix_sharing or \
         precompute_ref_log_probs"
    )]
    LargestBatch { rows: usize, seq: usize, source: Box<TrainError> },
}

impl TrainError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
