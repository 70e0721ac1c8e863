//! What a run writes to `output_dir`: `metrics.jsonl` as it goes, `final/` (a Hugging Face
//! model folder) and `run_summary.json` at the end. Files appear whole: each is written under a
//! temporary name and renamed into place.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// Files of a model folder besides the weights: they travel with the trained weights into
/// `final/` and checkpoints (when present), and are what a Hub download fetches.
pub const MODEL_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

pub struct Outputs {
    pub dir: PathBuf,
    metrics: File,
}

impl Outputs {
    /// Creates `dir` (refusing to mix with an earlier run's outputs unless `overwrite`).
    pub fn create(dir: &Path, overwrite: bool) -> Result<Self> {
        let earlier = ["metrics.jsonl", "run_summary.json", "final"].iter().any(|f| dir.join(f).exists());
        if earlier && !overwrite {
            return Err(TrainError::Config(format!(
                "output_dir {} already holds a run; set overwrite_output_dir = true or pick another folder",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        for f in ["run_summary.json", "final"] {
            let p = dir.join(f);
            if p.is_dir() {
                fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
            } else if p.exists() {
                fs::remove_file(&p).map_err(|e| TrainError::io(&p, e))?;
            }
        }
        let path = dir.join("metrics.jsonl");
        let metrics = File::create(&path).map_err(|e| TrainError::io(&path, e))?;
        Ok(Outputs { dir: dir.to_path_buf(), metrics })
    }

    /// Reopens `dir` to continue a run from `step`: `metrics.jsonl` keeps its records up to
    /// that step (a killed run may have logged past its last checkpoint).
    pub fn resume(dir: &Path, step: u64) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
        let metrics =
            fs::OpenOptions::new().append(true).open(&path).map_err(|e| TrainError::io(&path, e))?;
        Ok(Outputs { dir: dir.to_path_buf(), metrics })
    }

    /// Appends one record to `metrics.jsonl` and flushes it.
    pub fn log(&mut self, record: &Map<String, Value>) -> Result<()> {
        let path = self.dir.join("metrics.jsonl");
        let line = serde_json::to_string(record).expect("metrics are plain JSON");
        writeln!(self.metrics, "{line}")
            .and_then(|_| self.metrics.flush())
            .map_err(|e| TrainError::io(&path, e))
    }

    /// Writes `value` as pretty JSON to `dir/name`, atomically.
    pub fn write_json(&self, name: &str, value: &impl serde::Serialize) -> Result<()> {
        let text = serde_json::to_string_pretty(value).expect("summary is plain JSON");
        write_atomic(&self.dir.join(name), text.as_bytes())
    }

    /// Writes a Hugging Face model folder `dir/name`: the weights plus the source folder's
    /// config and tokenizer files, assembled under a temporary name then renamed.
    pub fn save_model(
        &self,
        name: &str,
        source_dir: &Path,
        tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    ) -> Result<PathBuf> {
        self.save_model_with(name, source_dir, tensors, |_| Ok(()))
    }

    /// [`Outputs::save_model`], with `extra` writing more files into the folder before it is
    /// renamed into place.
    pub fn save_model_with(
        &self,
        name: &str,
        source_dir: &Path,
        tensors: &std::collections::HashMap<String, candle_core::Tensor>,
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let target = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        dpo_model::save_safetensors_atomic(tensors, &tmp.join("model.safetensors"))?;
        for f in MODEL_SIDE_FILES {
            let src = source_dir.join(f);
            if src.is_file() {
                fs::copy(&src, tmp.join(f)).map_err(|e| TrainError::io(&src, e))?;
            }
        }
        extra(&tmp)?;
        if target.exists() {
            fs::remove_dir_all(&target).map_err(|e| TrainError::io(&target, e))?;
        }
        fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
        Ok(target)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| TrainError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
