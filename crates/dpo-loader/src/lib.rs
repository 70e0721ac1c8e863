//! Preference data for DPO: JSONL rows to padded token batches (plain `Vec`s, no tensors).
//!
//! Implements the conventions of TRL 1.16's `DPOTrainer` exactly, so a trainer on these
//! batches reproduces TRL's per-step numbers:
//!
//! - Data is JSONL (plain, gzip or zstd), a folder or glob of such shards, or Parquet (feature
//!   `parquet`); blank lines are ignored, a UTF-8 BOM and CRLF accepted. See `docs/data.md`.
//! - Rows are `{"prompt": str, "chosen": str, "rejected": str}` (text), or conversational:
//!   message lists rendered with the model's chat template (`minijinja`, as transformers renders
//!   it), with an explicit or implicit prompt (TRL's `extract_prompt`); for those, the prompt is
//!   rendered with the generation prompt, no EOS is appended and the texts are encoded without
//!   special tokens. The text conventions below apply to text rows.
//! - The tokenizer's EOS token text is appended to `chosen` and `rejected` unless they already
//!   end with it.
//! - `prompt`, `prompt + chosen` and `prompt + rejected` are each encoded with special tokens
//!   (HF `tokenizer(text)`); the prompt is the shortest common token prefix of the prompt with
//!   either, and each completion is the rest of its sequence (tokens merging across the
//!   boundary go to the completion).
//! - With `max_length` (truncation `keep_start`), pairs whose prompt has `>= max_length` tokens
//!   are dropped and counted as `prompt_too_long`.
//! - A batch of `B` pairs has `2B` rows, prompt+chosen for each pair then prompt+rejected, each
//!   cut to its first `max_length` tokens and right-padded with the pad id to the longest row
//!   (optionally to a multiple of `pad_to_multiple_of`); `completion_mask` is 1 on completion
//!   tokens, `attention_mask` 1 on real tokens (`DataCollatorForPreference`).
//!
//! The epoch order (identity, or a shuffle fixed by `(seed, epoch)`) is this crate's own, not
//! PyTorch's sampler.

mod chat;
mod collate;
mod dataset;
mod error;
mod order;
mod row;
mod stream;
mod tokenize;

pub use chat::ChatTemplate;
pub use collate::{Batch, collate};
pub use dataset::{Compression, MAX_ROW_BYTES, PreferenceDataset};
pub use error::{LoaderError, Result, RowRef};
pub use order::{SplitMix64, epoch_order};
pub use row::{Message, RawRow, parse_row};
pub use stream::{
    BatchIter, DataConfig, DataPosition, EpochStats, LongestPairs, OnBadRow, Prefetch, SkipCounts, batches,
    count_batches, scan_rows,
};
pub use tokenize::{PreferenceTokenizer, RenderedRow, TokenizedPair, common_prefix_length};
