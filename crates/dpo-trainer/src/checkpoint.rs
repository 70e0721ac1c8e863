//! Checkpoints for exact resume.
//!
//! `output_dir/checkpoint-<step>/` holds the policy (`model.safetensors` in f32, Hugging Face
//! names, with `config.json` and the tokenizer files so the folder loads in transformers), the
//! optimizer moments (`optimizer.safetensors`) and `trainer_state.json` (step, data position,
//! scheduler and early-stopping state, the metric window, the constraint record, fingerprints of
//! model, data and config). The reference model is not saved: it is the run's `model`.
//!
//! A checkpoint is assembled in `.checkpoint-<step>.tmp/` and renamed into place, so a crash at
//! any moment leaves the previous checkpoints whole; old ones are pruned only afterwards.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dpo_loader::{DataPosition, PreferenceDataset};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TrainConfig;
use crate::constraints::Constraints;
use crate::error::{Result, TrainError};
use crate::metrics::Window;
use crate::outputs::{Outputs, write_atomic};

/// What identifies the inputs a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// sha256 of the model's `config.json` and weight files.
    pub model: String,
    /// sha256 of the training data file(s).
    pub train_data: String,
    /// sha256 of the tokenizer's files ([`dpo_loader::PreferenceTokenizer::definition_files`]); absent in
    /// checkpoints of earlier versions, which are resumed without this check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// The config with the keys that may change on resume blanked (see [`RESUMABLE_KEYS`]).
    pub hyperparameters: String,
}

/// Keys a resumed run may change freely: budget, logging and saving, outputs, and Hub uploads.
pub const RESUMABLE_KEYS: &[&str] = &[
    "max_steps",
    "num_train_epochs",
    "output_dir",
    "overwrite_output_dir",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "early_stopping_patience",
    "progress_bar",
    "probe_largest_batch",
    "device",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "hub_revision",
    "hub_strategy",
];

/// The loop's state after an optimizer step: everything needed to continue identically.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    /// Position after the last micro-batch consumed.
    pub data_position: DataPosition,
    /// Micro-batches consumed in the current epoch (for the logged `epoch`).
    pub seen_in_epoch: usize,
    pub tokens_total: usize,
    pub optimizer_steps: u64,
    /// Metrics since the last log.
    pub window: Window,
    pub constraints: Constraints,
    /// Optimizer steps of the run (the LR schedule's horizon) when it was saved.
    pub total_steps: u64,
    pub fingerprint: Fingerprint,
    pub config: TrainConfig,
}

/// sha256 of a dataset's shard files' bytes, in row order (for one file, of the file).
pub fn data_fingerprint(data: &PreferenceDataset) -> Result<String> {
    sha256_files(&data.shard_paths().map(Path::to_path_buf).collect::<Vec<_>>())
}

/// sha256 of the files' bytes, one after the other.
pub(crate) fn sha256_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = fs::File::open(f).map_err(|e| TrainError::io(f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| TrainError::io(f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

impl Fingerprint {
    /// The model files, the tokenizer files (`tokenizer`: the sha256 of its
    /// [`dpo_loader::PreferenceTokenizer::definition_files`]), the training data (`train_data`: its
    /// [`data_fingerprint`]) and the non-resumable hyperparameters of `cfg`.
    pub fn new(cfg: &TrainConfig, train_data: String, tokenizer: String) -> Result<Self> {
        let mut model_files = vec![cfg.model.join("config.json")];
        let mut weights: Vec<PathBuf> = fs::read_dir(&cfg.model)
            .map_err(|e| TrainError::io(&cfg.model, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        weights.sort();
        model_files.extend(weights);
        Ok(Fingerprint {
            model: sha256_files(&model_files)?,
            train_data,
            tokenizer: Some(tokenizer),
            hyperparameters: hyperparameters(cfg),
        })
    }
}

/// The config as JSON with the resumable keys removed.
fn hyperparameters(cfg: &TrainConfig) -> String {
    let mut v = serde_json::to_value(cfg).expect("config serializes");
    if let Some(map) = v.as_object_mut() {
        for k in RESUMABLE_KEYS {
            map.remove(*k);
        }
    }
    v.to_string()
}

/// Why `saved` cannot be resumed under `now` (model or data differ always refuse; other
/// hyperparameters refuse unless `allow_changed`).
pub fn check_compatible(
    saved: &Fingerprint,
    now: &Fingerprint,
    allow_changed: bool,
) -> std::result::Result<(), String> {
    if saved.model != now.model {
        return Err(
            "the checkpoint was trained from a different model (config.json or weights differ)".into()
        );
    }
    if saved.train_data != now.train_data {
        return Err("the checkpoint was trained on a different train_file (contents differ)".into());
    }
    if let (Some(a), Some(b)) = (&saved.tokenizer, &now.tokenizer)
        && a != b
    {
        return Err("the checkpoint was trained with a different tokenizer or chat template \
                    (tokenizer.json, tokenizer_config.json or chat_template.jinja differ)"
            .into());
    }
    if saved.hyperparameters != now.hyperparameters && !allow_changed {
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&saved.hyperparameters).unwrap_or_default(),
            serde_json::from_str(&now.hyperparameters).unwrap_or_default(),
        );
        let changed: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| format!("{k}: {v} -> {}", b.get(k.as_str()).unwrap_or(&serde_json::Value::Null)))
            .collect();
        return Err(format!(
            "hyperparameters changed since the checkpoint ({}); pass --resume-allow-changed to continue anyway",
            changed.join(", ")
        ));
    }
    Ok(())
}

/// Writes `checkpoint-<step>` atomically, then prunes beyond `save_total_limit`.
pub fn save(
    out: &Outputs,
    source_model_dir: &Path,
    policy: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainerState,
    limit: Option<usize>,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let dir = out.save_model_with(&name, source_model_dir, policy, |tmp| {
        dpo_model::save_safetensors_atomic(optimizer, &tmp.join("optimizer.safetensors"))?;
        let text = serde_json::to_string_pretty(state).expect("state serializes");
        write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())
    })?;
    if let Some(limit) = limit {
        let mut all = list(&out.dir)?;
        while all.len() > limit.max(1) {
            let (_, old) = all.remove(0);
            fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
    }
    Ok(dir)
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return Ok(out) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok())
            && e.path().join("trainer_state.json").is_file()
        {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// `latest` (the newest complete checkpoint in `output_dir`) or a checkpoint folder.
pub fn resolve(spec: &Path, output_dir: &Path) -> Result<PathBuf> {
    if spec == Path::new("latest") {
        return list(output_dir)?.pop().map(|(_, p)| p).ok_or_else(|| {
            TrainError::Config(format!("--resume latest: no checkpoint in {}", output_dir.display()))
        });
    }
    if !spec.join("trainer_state.json").is_file() {
        return Err(TrainError::Config(format!(
            "--resume {}: not a checkpoint folder (no trainer_state.json)",
            spec.display()
        )));
    }
    Ok(spec.to_path_buf())
}

/// Named tensors, as in a safetensors file.
pub type Tensors = HashMap<String, Tensor>;

/// Reads a checkpoint: state, policy weights and optimizer moments (on `device`).
pub fn load(dir: &Path, device: &Device) -> Result<(TrainerState, Tensors, Tensors)> {
    let path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: unreadable trainer state: {e}", path.display())))?;
    let policy = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok((state, policy, optimizer))
}
