//! A Hugging Face model folder: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::{ModelConfig, ModelError};

/// A model folder, memory-mapped; tensors are read on demand.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The dtype the weights are stored in (of the embedding).
    pub stored_dtype: DType,
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
}

impl Checkpoint {
    /// Opens `dir`. `weights` overrides the safetensors file (fine-tuning further from a
    /// trained `model.safetensors`, or a checkpoint's policy).
    pub fn open(dir: &Path, weights: Option<&Path>) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::Missing { dir: dir.to_path_buf(), what: "config.json".into() });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let files = match weights {
            Some(w) if w.is_file() => vec![w.to_path_buf()],
            Some(w) => return Err(ModelError::io(w, std::io::Error::from(std::io::ErrorKind::NotFound))),
            None => weight_files(dir)?,
        };
        // SAFETY: the files are opened read-only; like every mmap-based loader we rely on
        // nobody truncating them while training runs.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Tensor {
            path: files[0].clone(),
            name: String::new(),
            msg: e.to_string(),
        })?;
        let mut ck = Checkpoint { dir: dir.to_path_buf(), config, stored_dtype: DType::F32, files, st };
        let embed =
            ck.st.get("model.embed_tokens.weight").map_err(|_| ck.missing("model.embed_tokens.weight"))?;
        ck.stored_dtype = match embed.dtype() {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            _ => DType::F32,
        };
        Ok(ck)
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::Tensor {
            path: self.files[0].clone(),
            name: name.into(),
            msg: "not found in the checkpoint".into(),
        }
    }

    /// Whether the checkpoint holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Loads one tensor onto `device` as `dtype`, checking its shape.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let t = self.st.load(name, device).map_err(|_| self.missing(name))?;
        if t.dims() != shape {
            return Err(ModelError::Tensor {
                path: self.files[0].clone(),
                name: name.into(),
                msg: format!("shape {:?}, config.json implies {:?}", t.dims(), shape),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> BTreeSet<String> {
        self.st.tensors().into_iter().map(|(n, _)| n).collect()
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::Missing {
            dir: dir.to_path_buf(),
            what: "model.safetensors (or model.safetensors.index.json)".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { path: index.clone(), msg: e.to_string() })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config { path: index.clone(), msg: "no `weight_map` object".into() })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
    let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
    for f in &files {
        if !f.is_file() {
            return Err(ModelError::Missing {
                dir: dir.to_path_buf(),
                what: format!("shard {}", f.display()),
            });
        }
    }
    Ok(files)
}

/// Writes tensors to `path` as safetensors through a temporary file in the same folder and a
/// rename, so a crash never leaves a half-written file under the final name.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), ModelError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("model.safetensors"),
        std::process::id()
    ));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
    Ok(())
}
