//! Precomputed reference log-probs (`precompute_ref_log_probs = true`).
//!
//! The reference is frozen, so its log-probs of every pair are fixed: one pass computes them,
//! a file keeps them (keyed by the model, the tokenizer, the data and `max_length`), and
//! training steps then run the policy only. The file is reused by later runs and on resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dpo_loader::{Batch, DataConfig, DataPosition, PreferenceDataset, PreferenceTokenizer, batches};
use dpo_model::CausalLm;
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};
use crate::step::with_layout;

/// A pair's identity across runs: its file (by name) and line, as one integer.
fn row_key(src: &dpo_loader::RowRef) -> i64 {
    let name = src.file.to_string_lossy();
    let h = Sha256::digest(name.as_bytes());
    let file = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as i64 & 0x7fff_ffff;
    (file << 32) | (src.line as i64 & 0xffff_ffff)
}

/// Reference log-probs `(chosen, rejected)` of every pair, by source file and line.
pub struct RefCache {
    by_row: HashMap<i64, (f32, f32)>,
    pub path: PathBuf,
    pub computed: bool,
}

/// What the cached numbers of `data` depend on: the model, the data's bytes
/// (`data_fingerprint`) and its shard paths (pairs are looked up by file and line), the
/// tokenizer, `max_length` and the precision: the compute dtype, the LM head's and its matmul
/// operands' (`CausalLm::head_dtype`, `head_operands`).
pub fn cache_key(
    model_fingerprint: &str,
    data_fingerprint: &str,
    data: &PreferenceDataset,
    model_dir: &Path,
    max_length: Option<usize>,
    (compute, head, operands): (DType, DType, DType),
) -> Result<String> {
    let mut h = Sha256::new();
    // "v4": v1 caches lack the pairs `dataloader_drop_last` leaves out, v2 ones were keyed by
    // the training data for the eval set too, v3 ones not by the head's precision: none is reused.
    let shards = data.shard_paths().map(|p| p.to_string_lossy().into_owned());
    let precision = format!("{compute:?}/head {head:?} from {operands:?}");
    let parts =
        [model_fingerprint.to_owned(), data_fingerprint.to_owned(), format!("v4/{max_length:?}/{precision}")];
    for part in parts.into_iter().chain(shards) {
        h.update(part.as_bytes());
        h.update([0]);
    }
    // The files tokenization reads (keys of models without chat_template.jinja as before).
    for p in PreferenceTokenizer::definition_files(model_dir) {
        h.update(std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?);
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

impl RefCache {
    /// Loads `path` if it exists, else computes the log-probs of every pair of `dataset` with
    /// `reference` and writes them there.
    #[allow(clippy::too_many_arguments)]
    pub fn load_or_compute(
        path: PathBuf,
        dataset: &Arc<PreferenceDataset>,
        tokenizer: &Arc<PreferenceTokenizer>,
        data_cfg: DataConfig,
        reference: &CausalLm,
        prefix_sharing: bool,
        chunk: usize,
        device: &Device,
    ) -> Result<Self> {
        if path.is_file() {
            let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
            let get = |k: &str| {
                t.get(k).cloned().ok_or_else(|| TrainError::Config(format!("{}: no `{k}`", path.display())))
            };
            let lines: Vec<i64> = get("row")?.to_vec1()?;
            let chosen: Vec<f32> = get("chosen")?.to_vec1()?;
            let rejected: Vec<f32> = get("rejected")?.to_vec1()?;
            let by_row =
                lines.iter().zip(chosen.iter().zip(&rejected)).map(|(&l, (&c, &r))| (l, (c, r))).collect();
            tracing::info!(path = %path.display(), pairs = lines.len(), "reference log-probs loaded");
            return Ok(RefCache { by_row, path, computed: false });
        }
        let started = std::time::Instant::now();
        // Every kept pair, the last short batch included: a shuffled epoch may use any of them.
        let cfg = DataConfig { shuffle: false, drop_last: false, ..data_cfg };
        let (mut lines, mut chosen, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
        let layout = with_layout(prefix_sharing, reference.config.sliding_window);
        for item in batches(dataset.clone(), tokenizer.clone(), cfg, DataPosition::start_of(0))?
            .prefetch_with(2, layout)?
        {
            let ((batch, host), _) = item?;
            let db = host.upload(device)?;
            let logps: Vec<f32> = db.logps(reference, chunk)?.to_dtype(DType::F32)?.to_vec1()?;
            for (i, src) in batch.sources.iter().enumerate() {
                lines.push(row_key(src));
                chosen.push(logps[i]);
                rejected.push(logps[batch.n_pairs + i]);
            }
        }
        let n = lines.len();
        let by_row =
            lines.iter().zip(chosen.iter().zip(&rejected)).map(|(&l, (&c, &r))| (l, (c, r))).collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        let tensors: HashMap<String, Tensor> = [
            ("row".to_string(), Tensor::from_vec(lines, n, &Device::Cpu)?),
            ("chosen".to_string(), Tensor::from_vec(chosen, n, &Device::Cpu)?),
            ("rejected".to_string(), Tensor::from_vec(rejected, n, &Device::Cpu)?),
        ]
        .into();
        dpo_model::save_safetensors_atomic(&tensors, &path)?;
        tracing::info!(path = %path.display(), pairs = n, seconds = started.elapsed().as_secs_f64(), "reference log-probs computed");
        Ok(RefCache { by_row, path, computed: true })
    }

    /// The reference log-probs of `batch`, `[chosen..., rejected...]`.
    pub fn lookup(&self, batch: &Batch, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; 2 * batch.n_pairs];
        for (i, src) in batch.sources.iter().enumerate() {
            let (c, r) = self.by_row.get(&row_key(src)).ok_or_else(|| {
                TrainError::Config(format!(
                    "{}: no precomputed reference log-probs for {src}",
                    self.path.display()
                ))
            })?;
            (v[i], v[batch.n_pairs + i]) = (*c, *r);
        }
        Ok(Tensor::from_vec(v, 2 * batch.n_pairs, device)?)
    }
}
