//! Every knob of a run, in one struct. Where TRL's `DPOConfig` has a knob, it has its name and
//! default; unknown keys are an error naming the key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::schedule::LrSchedule;
use dpo_loader::OnBadRow;

/// The DPO loss family (see [`crate::loss`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Eq. (6): `-log sigmoid(r_w - r_l)`.
    Sigmoid,
    /// Eq. (26)-(27): `log(u + gamma)`, the Gaussian form; equals `sigmoid + log gamma`.
    Gaussian,
    /// TRL `ipo`: `(per-token-averaged log-ratio margin - 1/(2 beta))^2`.
    Ipo,
    /// TRL `hinge`: `relu(1 - (r_w - r_l))`.
    Hinge,
    /// TRL `robust`: the unbiased label-noise correction of `sigmoid` (uses `label_smoothing`).
    Robust,
}

/// Where the model runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 weights and compute.
    F32,
    /// f32 master weights and AdamW moments, bf16 matmuls.
    Bf16,
}

/// When `push_to_hub` uploads to the Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HubStrategy {
    /// `final/` once, at the end of the run.
    End,
    /// Each checkpoint as it is saved (into `checkpoint-<step>/` of the repo), and `final/`.
    EverySave,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// A local Hugging Face model folder (config.json, safetensors, tokenizer.json); the CLI
    /// also takes a Hub id (`org/name`, `hub:org/name[@revision]`), downloaded into the cache.
    pub model: PathBuf,
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    pub output_dir: PathBuf,
    /// Replace the outputs of an earlier run in `output_dir`.
    pub overwrite_output_dir: bool,
    /// Start from these weights instead of the model folder's (e.g. a trained
    /// `final/model.safetensors`); they are the reference too.
    pub model_weights: Option<PathBuf>,
    /// Write `checkpoint-<step>/` every this many steps.
    pub save_steps: Option<u64>,
    /// Keep at most this many checkpoints (oldest removed once a new one is complete).
    pub save_total_limit: Option<usize>,
    /// Upload `final/` with a model card to the Hugging Face Hub repo `hub_model_id` (the CLI).
    pub push_to_hub: bool,
    /// `org/name` of the Hub repo to push to; created if needed.
    pub hub_model_id: Option<String>,
    /// Create the Hub repo private (an existing repo keeps its visibility).
    pub hub_private: bool,
    /// The branch to push to (default `main`).
    pub hub_revision: Option<String>,
    pub hub_strategy: HubStrategy,

    /// The paper's lambda: strength of the tie to the reference.
    pub beta: f64,
    pub loss_type: LossType,
    /// Assumed label-flip rate of `loss_type = "robust"` (TRL): `0 <= label_smoothing < 0.5`.
    pub label_smoothing: f64,
    /// Weight `w` of an SFT term on the chosen responses: `loss = mean(per_pair) + w * sft`,
    /// `sft` = minus the mean log-prob per chosen completion token of the micro-batch (TRL's
    /// `loss_type = ["<type>", "sft"]`, `loss_weights = [1, w]`). 0 turns it off.
    pub sft_weight: f64,

    pub learning_rate: f64,
    pub lr_scheduler_type: LrSchedule,
    /// Steps of linear warmup; a value below 1 is a fraction of the total steps (HF).
    pub warmup_steps: f64,
    /// Decoupled weight decay (AdamW); biases and norm weights are exempt.
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this; 0 or less disables clipping.
    pub max_grad_norm: f64,

    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Pairs per eval batch (defaults to `batch_size`).
    pub eval_batch_size: Option<usize>,
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps; overrides `num_train_epochs` when set.
    pub max_steps: Option<u64>,
    pub num_train_epochs: f64,
    /// Tokens per row (prompt + completion), truncating the end; pairs whose prompt alone
    /// reaches it are dropped.
    pub max_length: Option<usize>,
    pub pad_to_multiple_of: Option<usize>,
    pub shuffle: bool,
    pub dataloader_drop_last: bool,
    pub seed: u64,
    pub on_bad_row: OnBadRow,
    /// Rows in the seeded shuffle buffer used for compressed (streamed) data.
    pub shuffle_buffer: usize,
    /// Threads that parse and tokenize rows; 0 = one per core, at most 8.
    pub tokenizer_threads: usize,
    /// Length-grouped batching (HF name): each window of `batch_size * length_group_batches`
    /// pairs is sorted by length (the longer row of the pair after `max_length` truncation, then
    /// the pair's `[prompt, chosen, rejected]` length) and cut into batches, emitted in a seeded
    /// random order: less padding, same pairs and batch count per epoch. Eval stays ungrouped.
    pub group_by_length: bool,
    /// Batches per length-grouping window (HF `LengthGroupedSampler`'s mega-batch factor, 50).
    pub length_group_batches: usize,

    pub logging_steps: u64,
    /// Evaluate every this many steps (and at the last step); needs `eval_file`.
    pub eval_steps: Option<u64>,
    /// Evaluate before the first step too.
    pub eval_on_start: bool,
    /// Stop after this many evaluations without an improvement of `eval_loss`.
    pub early_stopping_patience: Option<u64>,
    pub early_stopping_threshold: f64,

    /// Compute the reference's log-probs of every pair once, before training, and keep them on
    /// disk (keyed by model, tokenizer, data, `max_length`); steps then run the policy only.
    pub precompute_ref_log_probs: bool,
    /// Where precomputed reference log-probs are kept (default `output_dir/ref_logps`).
    pub ref_cache_dir: Option<PathBuf>,
    /// Keep only each block's input during the forward and recompute the block in the
    /// backward (activation checkpointing): about one more forward, far less memory.
    pub gradient_checkpointing: bool,
    /// Backward the decoder blocks by hand (`dpo_model::CausalLm::manual_grads`): the forward
    /// keeps only the tensors each block's backward needs (candle's autograd keeps every
    /// intermediate); with `gradient_checkpointing`, only each block's input, and the backward
    /// recomputes a block's tensors without a graph. Needs `fused_ops`; with `recompute_attention`
    /// off the forward keeps the attention probabilities too.
    pub manual_backward: bool,
    /// Put each pair on one row, `[prompt, chosen, rejected]`, so the prompt is computed once.
    pub prefix_sharing: bool,
    /// In a bf16 run, compute the LM head's logits and log-softmax in f32.
    pub lm_head_f32: bool,
    /// With `lm_head_f32` in a bf16 run: the head's matmuls take bf16 operands (the hidden states
    /// as the blocks leave them, the weight rounded as every block's is) and sum their products
    /// in f32 into f32 logits, on bf16 tensor cores on CUDA. Off: f32 operands, TF32 on CUDA (half
    /// bf16's tensor-core rate, 3 more bits of each operand kept).
    pub lm_head_bf16_operands: bool,
    /// Use the fused ops with a hand-written backward (RMSNorm, RoPE, masked softmax, SiLU*up).
    pub fused_ops: bool,
    /// With `fused_ops`: recompute attention probabilities in the backward instead of keeping
    /// them (`rows x heads x seq^2` per layer); off keeps them (one matmul and one softmax less
    /// per layer), for autograd or, with `manual_backward`, for the hand-written backward.
    pub recompute_attention: bool,
    /// Before the first step, run the largest batch the data can make (its longest pair
    /// `batch_size` times; the eval data's through the eval forward) and discard the result,
    /// so that a batch too large for the device fails at once instead of hours into the run.
    pub probe_largest_batch: bool,

    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    pub dtype: Precision,
    /// LM-head rows computed at once when scoring completions: `logprob_chunk x vocab` logits
    /// exist at a time (the backward computes as many, by slices of the vocabulary). Where one
    /// chunk holds a batch's every scored position, the backward reuses the forward's logits
    /// instead (one matmul less a step, those logits kept until the head's backward).
    pub logprob_chunk: usize,
    /// Show a progress bar on a terminal.
    pub progress_bar: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            eval_file: None,
            output_dir: PathBuf::from("runs/dpo"),
            overwrite_output_dir: false,
            model_weights: None,
            save_steps: None,
            save_total_limit: None,
            push_to_hub: false,
            hub_model_id: None,
            hub_private: false,
            hub_revision: None,
            hub_strategy: HubStrategy::End,
            beta: 0.1,
            loss_type: LossType::Sigmoid,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            learning_rate: 1e-6,
            lr_scheduler_type: LrSchedule::Linear,
            warmup_steps: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            batch_size: 8,
            eval_batch_size: None,
            gradient_accumulation_steps: 1,
            max_steps: None,
            num_train_epochs: 3.0,
            max_length: Some(1024),
            pad_to_multiple_of: None,
            shuffle: true,
            dataloader_drop_last: false,
            seed: 42,
            on_bad_row: OnBadRow::Error,
            shuffle_buffer: 10_000,
            tokenizer_threads: 0,
            group_by_length: false,
            length_group_batches: 50,
            logging_steps: 10,
            eval_steps: None,
            eval_on_start: false,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            precompute_ref_log_probs: false,
            ref_cache_dir: None,
            gradient_checkpointing: false,
            manual_backward: false,
            prefix_sharing: false,
            fused_ops: true,
            recompute_attention: true,
            probe_largest_batch: true,
            lm_head_f32: true,
            lm_head_bf16_operands: true,
            device: "cpu".into(),
            dtype: Precision::F32,
            logprob_chunk: crate::logprobs::DEFAULT_CHUNK,
            progress_bar: true,
        }
    }
}

impl TrainConfig {
    /// Checks values no type can express; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("batch_size", self.batch_size as f64),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps as f64),
            ("logging_steps", self.logging_steps as f64),
            ("logprob_chunk", self.logprob_chunk as f64),
            ("length_group_batches", self.length_group_batches as f64),
            ("beta", self.beta),
        ];
        for (key, v) in positive {
            if v.is_nan() || v <= 0.0 {
                return Err(format!("`{key}` must be positive (got {v})"));
            }
        }
        if self.model.as_os_str().is_empty() {
            return Err("`model` is required (a local model folder)".into());
        }
        if self.train_file.as_os_str().is_empty() {
            return Err("`train_file` is required".into());
        }
        if self.learning_rate < 0.0 || self.weight_decay < 0.0 || self.warmup_steps < 0.0 {
            return Err("`learning_rate`, `weight_decay` and `warmup_steps` must not be negative".into());
        }
        if self.max_steps == Some(0) {
            return Err("`max_steps` must be at least 1 (or left out to use `num_train_epochs`)".into());
        }
        if self.max_steps.is_none() && self.num_train_epochs <= 0.0 {
            return Err("`num_train_epochs` must be positive when `max_steps` is not set".into());
        }
        if self.save_steps == Some(0) || self.save_total_limit == Some(0) {
            return Err("`save_steps` and `save_total_limit` must be at least 1".into());
        }
        if self.manual_backward && !self.fused_ops {
            return Err("`manual_backward` needs `fused_ops = true` (it uses their backward kernels)".into());
        }
        if self.push_to_hub && self.hub_model_id.is_none() {
            return Err("`push_to_hub` needs `hub_model_id` (the Hub repo, `org/name`)".into());
        }
        if let Some(id) = &self.hub_model_id {
            let parts: Vec<&str> = id.split('/').collect();
            let ok =
                |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if parts.len() != 2 || !parts.iter().all(|p| ok(p)) {
                return Err(format!("`hub_model_id` must look like `org/name` (got `{id}`)"));
            }
        }
        if self.hub_revision.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err("`hub_revision` must not be empty (leave it out for `main`)".into());
        }
        if self.push_to_hub && self.hub_strategy == HubStrategy::EverySave && self.save_steps.is_none() {
            return Err(
                "`hub_strategy = \"every_save\"` needs `save_steps` (it uploads each checkpoint)".into()
            );
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!("`label_smoothing` must be in [0, 0.5) (got {})", self.label_smoothing));
        }
        if self.label_smoothing != 0.0 && self.loss_type != LossType::Robust {
            return Err("`label_smoothing` is used only by `loss_type = \"robust\"`".into());
        }
        if !(self.sft_weight >= 0.0 && self.sft_weight.is_finite()) {
            return Err(format!("`sft_weight` must be finite and not negative (got {})", self.sft_weight));
        }
        if self.eval_steps == Some(0) {
            return Err("`eval_steps` must be at least 1".into());
        }
        if (self.eval_steps.is_some() || self.eval_on_start) && self.eval_file.is_none() {
            return Err("`eval_steps`/`eval_on_start` need an `eval_file`".into());
        }
        if self.early_stopping_patience.is_some() && self.eval_steps.is_none() {
            return Err("`early_stopping_patience` needs `eval_steps` (it watches eval_loss)".into());
        }
        Ok(())
    }

    /// Warmup steps for a run of `total` steps (HF: `< 1` is a ratio).
    pub fn warmup_for(&self, total: u64) -> u64 {
        if self.warmup_steps >= 1.0 {
            self.warmup_steps as u64
        } else {
            (self.warmup_steps * total as f64).ceil() as u64
        }
    }

    pub fn data_config(&self, batch_size: usize) -> dpo_loader::DataConfig {
        dpo_loader::DataConfig {
            max_length: self.max_length,
            batch_size,
            shuffle: self.shuffle,
            seed: self.seed,
            on_bad_row: self.on_bad_row,
            pad_to_multiple_of: self.pad_to_multiple_of,
            drop_last: self.dataloader_drop_last,
            shuffle_buffer: self.shuffle_buffer,
            tokenizer_threads: self.tokenizer_threads,
            group_by_length: self.group_by_length,
            length_group_batches: self.length_group_batches,
        }
    }

    /// The data config of evaluation passes: file order, no length grouping (so eval metrics,
    /// some of which are means over batches, do not depend on it).
    pub fn eval_data_config(&self) -> dpo_loader::DataConfig {
        dpo_loader::DataConfig {
            shuffle: false,
            group_by_length: false,
            ..self.data_config(self.eval_batch_size.unwrap_or(self.batch_size))
        }
    }
}

#[cfg(test)]
mod loss_key_tests {
    use super::*;

    fn with(loss_type: &str, extra: &str) -> Result<TrainConfig, String> {
        let text = format!(r#"{{"model": "m", "train_file": "t.jsonl", "loss_type": "{loss_type}"{extra}}}"#);
        let cfg: TrainConfig = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        cfg.validate().map(|()| cfg)
    }

    #[test]
    fn loss_types_parse_by_snake_case_name() {
        for (name, t) in [
            ("sigmoid", LossType::Sigmoid),
            ("gaussian", LossType::Gaussian),
            ("ipo", LossType::Ipo),
            ("hinge", LossType::Hinge),
            ("robust", LossType::Robust),
        ] {
            assert_eq!(with(name, "").unwrap().loss_type, t);
        }
        assert!(with("dpo", "").is_err());
    }

    #[test]
    fn label_smoothing_and_sft_weight_are_checked() {
        assert_eq!(with("robust", r#", "label_smoothing": 0.2"#).unwrap().label_smoothing, 0.2);
        for bad in ["0.5", "-0.1"] {
            let e = with("robust", &format!(r#", "label_smoothing": {bad}"#)).unwrap_err();
            assert!(e.contains("label_smoothing"), "{e}");
        }
        assert!(with("sigmoid", r#", "label_smoothing": 0.1"#).unwrap_err().contains("robust"));
        assert_eq!(with("ipo", r#", "sft_weight": 0.5"#).unwrap().sft_weight, 0.5);
        assert!(with("sigmoid", r#", "sft_weight": -1.0"#).unwrap_err().contains("sft_weight"));
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    fn cfg(extra: &str) -> Result<TrainConfig, String> {
        let text = format!(r#"{{"model": "m", "train_file": "t.jsonl"{extra}}}"#);
        let cfg: TrainConfig = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        cfg.validate().map(|()| cfg)
    }

    #[test]
    fn hub_keys_default_and_validate() {
        let c = cfg("").unwrap();
        assert!(!c.push_to_hub && !c.hub_private && c.hub_model_id.is_none() && c.hub_revision.is_none());
        assert_eq!(c.hub_strategy, HubStrategy::End);
        assert!(cfg(r#", "push_to_hub": true"#).unwrap_err().contains("hub_model_id"));
        let c = cfg(r#", "push_to_hub": true, "hub_model_id": "me/run-1", "hub_strategy": "every_save", "save_steps": 5"#)
            .unwrap();
        assert_eq!((c.hub_strategy, c.hub_model_id.as_deref()), (HubStrategy::EverySave, Some("me/run-1")));
        for bad in ["me", "me/x/y", "/x", "me/ x"] {
            let e = cfg(&format!(r#", "hub_model_id": "{bad}""#)).unwrap_err();
            assert!(e.contains("hub_model_id"), "{bad}: {e}");
        }
        let e = cfg(r#", "push_to_hub": true, "hub_model_id": "me/x", "hub_strategy": "every_save""#)
            .unwrap_err();
        assert!(e.contains("save_steps"), "{e}");
        assert!(cfg(r#", "hub_strategy": "checkpoint""#).is_err());
    }

    #[test]
    fn manual_backward_needs_fused_ops() {
        assert!(!cfg("").unwrap().manual_backward);
        assert!(cfg(r#", "manual_backward": true, "gradient_checkpointing": true"#).unwrap().manual_backward);
        let e = cfg(r#", "manual_backward": true, "fused_ops": false"#).unwrap_err();
        assert!(e.contains("manual_backward"), "{e}");
    }

    #[test]
    fn group_by_length_keys_default_parse_validate_and_reach_the_loader() {
        let c = cfg("").unwrap();
        assert!(!c.group_by_length);
        assert_eq!(c.length_group_batches, 50);
        assert!(!c.data_config(8).group_by_length);
        let c = cfg(r#", "group_by_length": true, "length_group_batches": 2, "batch_size": 3"#).unwrap();
        let d = c.data_config(c.batch_size);
        assert!(d.group_by_length);
        assert_eq!((d.length_group_batches, d.batch_size), (2, 3));
        d.validate().unwrap();
        // Evaluation stays in file order and ungrouped.
        let e = c.eval_data_config();
        assert!(!e.group_by_length && !e.shuffle);
        assert_eq!(e.length_group_batches, 2);
        let e = cfg(r#", "length_group_batches": 0"#).unwrap_err();
        assert!(e.contains("length_group_batches"), "{e}");
        assert!(cfg(r#", "group_by_lengths": true"#).unwrap_err().contains("unknown field"));
    }
}
