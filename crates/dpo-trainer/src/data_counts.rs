//! The epoch counts of a run's data ([`count_batches`]: every row read, rendered and tokenized
//! once before the first step; minutes for gigabytes), kept in `output_dir/data_counts.json` so
//! that a resumed run, or a later run into the same folder, skips that pass.
//!
//! The record is used only when its key matches: the bytes of the training and eval data (their
//! shard files in row order), the tokenizer's files, the settings that decide which pairs are
//! kept and how many batches they make (`max_length`, `on_bad_row`, `dataloader_drop_last`, the
//! batch sizes), and this binary (its size and modification time: the counts are those of this
//! build's loader and tokenizer code). Anything else, or an unreadable record, counts again.

use std::path::{Path, PathBuf};

use dpo_loader::{EpochStats, PreferenceDataset, PreferenceTokenizer, count_batches};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{data_fingerprint, sha256_files};
use crate::config::TrainConfig;
use crate::error::Result;
use crate::outputs::write_atomic;

/// The record's file name in `output_dir`.
pub const FILE: &str = "data_counts.json";

/// The training and eval data's epoch counts, and the data's hashes (which the checkpoint
/// fingerprint and the reference cache reuse).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataCounts {
    key: String,
    pub train: EpochStats,
    pub eval: Option<EpochStats>,
    #[serde(skip)]
    pub train_hash: String,
    #[serde(skip)]
    pub eval_hash: Option<String>,
    /// sha256 of the tokenizer's files ([`PreferenceTokenizer::definition_files`]).
    #[serde(skip)]
    pub tokenizer_hash: String,
    /// Read from `data_counts.json` rather than counted.
    #[serde(skip)]
    pub reused: bool,
}

impl DataCounts {
    /// The counts from `cfg.output_dir`'s record if its key matches, else from a pass over the data.
    pub fn load_or_count(
        cfg: &TrainConfig,
        tokenizer: &PreferenceTokenizer,
        train: &PreferenceDataset,
        eval: Option<&PreferenceDataset>,
    ) -> Result<Self> {
        let train_hash = data_fingerprint(train)?;
        let eval_hash = eval.map(data_fingerprint).transpose()?;
        let tokenizer_hash = sha256_files(&PreferenceTokenizer::definition_files(&cfg.model))?;
        let key = key(cfg, &train_hash, eval_hash.as_deref(), &tokenizer_hash);
        let path = cfg.output_dir.join(FILE);
        if let Some(saved) = read(&path).filter(|saved| key.as_ref() == Some(&saved.key)) {
            tracing::info!(path = %path.display(), "data counts reused (same data, tokenizer, settings and binary)");
            return Ok(DataCounts { train_hash, eval_hash, tokenizer_hash, reused: true, ..saved });
        }
        let train_stats = count_batches(train, tokenizer, &cfg.data_config(cfg.batch_size))?;
        let eval_batch = cfg.eval_batch_size.unwrap_or(cfg.batch_size);
        let eval_stats =
            eval.map(|ds| count_batches(ds, tokenizer, &cfg.data_config(eval_batch))).transpose()?;
        Ok(DataCounts {
            key: key.unwrap_or_default(),
            train: train_stats,
            eval: eval_stats,
            train_hash,
            eval_hash,
            tokenizer_hash,
            reused: false,
        })
    }

    /// Writes the record into `dir` (atomically), unless it was read from there or this binary
    /// could not be identified.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.reused || self.key.is_empty() {
            return Ok(());
        }
        let text = serde_json::to_string(self).expect("counts serialize");
        write_atomic(&dir.join(FILE), text.as_bytes())
    }
}

fn read(path: &Path) -> Option<DataCounts> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text)
        .inspect_err(
            |e| tracing::warn!(path = %path.display(), "unreadable data counts, counting again: {e}"),
        )
        .ok()
}

/// What the counts depend on (see the module docs); `None` when this binary cannot be identified.
fn key(cfg: &TrainConfig, train_hash: &str, eval_hash: Option<&str>, tokenizer_hash: &str) -> Option<String> {
    let binary = binary_identity()?;
    let settings = serde_json::json!({
        "max_length": cfg.max_length,
        "on_bad_row": cfg.on_bad_row,
        "drop_last": cfg.dataloader_drop_last,
        "batch_size": cfg.batch_size,
        "eval_batch_size": cfg.eval_batch_size.unwrap_or(cfg.batch_size),
    });
    let (version, settings) = (format!("v1 {} {binary}", env!("CARGO_PKG_VERSION")), settings.to_string());
    let parts =
        [version.as_str(), train_hash, eval_hash.unwrap_or_default(), tokenizer_hash, settings.as_str()];
    let mut h = Sha256::new();
    for part in parts {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Some(format!("{:x}", h.finalize()))
}

/// The running executable's path, size and modification time.
fn binary_identity() -> Option<String> {
    let exe: PathBuf = std::env::current_exe().ok()?;
    let meta = std::fs::metadata(&exe).ok()?;
    let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(format!("{} {} {}", exe.display(), meta.len(), modified.as_nanos()))
}
