//! Epoch iteration: row order, bad-row policy, truncation drops, collation, and prefetching.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::collate::{Batch, collate};
use crate::error::{LoaderError, Result};
use crate::jsonl::PreferenceDataset;
use crate::order::epoch_order;
use crate::tokenize::{PreferenceTokenizer, TokenizedPair};

/// What to do with a row that cannot be used (bad JSON, missing field, empty or equal texts...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Stop with an error naming the file, line and field.
    #[default]
    Error,
    /// Skip it and count it in [`SkipCounts`] by reason.
    Skip,
}

/// How rows become batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataConfig {
    /// Rows are truncated to this many tokens; pairs whose prompt alone has as many are dropped.
    pub max_length: Option<usize>,
    /// Pairs per batch (each batch has twice as many rows).
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub on_bad_row: OnBadRow,
    pub pad_to_multiple_of: Option<usize>,
    /// Drop the last, incomplete batch of an epoch.
    pub drop_last: bool,
}

impl Default for DataConfig {
    /// TRL/HF defaults: `max_length` 1024, batch size 8, shuffled with seed 42, last batch kept.
    fn default() -> Self {
        Self {
            max_length: Some(1024),
            batch_size: 8,
            shuffle: true,
            seed: 42,
            on_bad_row: OnBadRow::Error,
            pad_to_multiple_of: None,
            drop_last: false,
        }
    }
}

impl DataConfig {
    /// Checks that sizes are positive.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(LoaderError::Config(format!("{what} must be at least 1")));
        if self.batch_size == 0 {
            return bad("batch_size");
        }
        if self.max_length == Some(0) {
            return bad("max_length");
        }
        if self.pad_to_multiple_of == Some(0) {
            return bad("pad_to_multiple_of");
        }
        Ok(())
    }
}

/// Position in the data: the index, in `epoch`'s order, of the next row to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: u64,
}

impl DataPosition {
    /// The start of `epoch`.
    pub fn start_of(epoch: u64) -> Self {
        Self { epoch, cursor: 0 }
    }
}

/// Rows skipped or dropped, by reason (`prompt_too_long`, `malformed_json`, `missing_field`,
/// `wrong_type`, `not_utf8`, `empty_field`, `chosen_equals_rejected`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SkipCounts(pub BTreeMap<String, u64>);

impl SkipCounts {
    pub fn add(&mut self, reason: &str) {
        *self.0.entry(reason.to_owned()).or_default() += 1;
    }

    /// The count for `reason` (0 if none).
    pub fn get(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }

    /// All rows skipped or dropped.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (reason, n) in &self.0 {
            write!(f, "{sep}{reason}={n}")?;
            sep = ", ";
        }
        Ok(())
    }
}

/// Reads, checks and tokenizes row `i`; `None` when it is skipped or dropped (and counted).
fn prepare(
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    config: &DataConfig,
    skips: &mut SkipCounts,
    i: usize,
) -> Result<Option<TokenizedPair>> {
    let row = match dataset.read_row(i) {
        Ok(row) => row,
        Err(e) => match e.skip_reason() {
            Some(reason) if config.on_bad_row == OnBadRow::Skip => {
                tracing::debug!("skipping bad row: {e}");
                skips.add(reason);
                return Ok(None);
            }
            _ => return Err(e),
        },
    };
    let pair = tokenizer.tokenize_row(&row, dataset.source(i))?;
    if config.max_length.is_some_and(|m| pair.prompt_ids.len() >= m) {
        tracing::debug!(row = %pair.source, "dropping row: prompt fills max_length");
        skips.add("prompt_too_long");
        return Ok(None);
    }
    Ok(Some(pair))
}

/// Iterator over the batches of one epoch, from a [`DataPosition`].
#[derive(Debug)]
pub struct BatchIter {
    dataset: Arc<PreferenceDataset>,
    tokenizer: Arc<PreferenceTokenizer>,
    config: DataConfig,
    epoch: u64,
    order: Vec<usize>,
    cursor: usize,
    skips: SkipCounts,
    done: bool,
}

/// The batches of epoch `start.epoch`, beginning at `start.cursor`.
///
/// Rows are read in order `0..len` or, with `shuffle`, a permutation fixed by `(seed, epoch)`.
/// The iterator stops after the first error.
pub fn batches(
    dataset: Arc<PreferenceDataset>,
    tokenizer: Arc<PreferenceTokenizer>,
    config: DataConfig,
    start: DataPosition,
) -> Result<BatchIter> {
    config.validate()?;
    let n = dataset.len();
    let cursor = usize::try_from(start.cursor).ok().filter(|&c| c <= n).ok_or_else(|| {
        LoaderError::Config(format!(
            "start position {} is past the end of {} ({n} rows)",
            start.cursor,
            dataset.path().display()
        ))
    })?;
    Ok(BatchIter {
        order: epoch_order(n, config.shuffle, config.seed, start.epoch),
        epoch: start.epoch,
        cursor,
        dataset,
        tokenizer,
        config,
        skips: SkipCounts::default(),
        done: false,
    })
}

impl BatchIter {
    /// Position of the next row to read: after batch k, resuming here yields batch k+1 on.
    pub fn position(&self) -> DataPosition {
        DataPosition { epoch: self.epoch, cursor: self.cursor as u64 }
    }

    /// Rows skipped or dropped so far by this iterator.
    pub fn skips(&self) -> &SkipCounts {
        &self.skips
    }

    /// Runs this iterator on a background thread with up to `capacity` batches ready.
    pub fn prefetch(self, capacity: usize) -> Result<Prefetch> {
        Prefetch::new(self, capacity)
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut pairs = Vec::with_capacity(self.config.batch_size);
        while pairs.len() < self.config.batch_size && self.cursor < self.order.len() {
            let i = self.order[self.cursor];
            match prepare(&self.dataset, &self.tokenizer, &self.config, &mut self.skips, i) {
                Ok(Some(pair)) => pairs.push(pair),
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            self.cursor += 1;
        }
        if pairs.is_empty() || (self.config.drop_last && pairs.len() < self.config.batch_size) {
            self.done = true;
            return None;
        }
        let c = &self.config;
        Some(Ok(collate(&pairs, self.tokenizer.pad_id(), c.max_length, c.pad_to_multiple_of)))
    }
}

/// What one epoch yields, from [`count_batches`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochStats {
    /// Rows in the file.
    pub rows: usize,
    /// Pairs kept after skips and drops.
    pub pairs: usize,
    /// Batches per epoch (the same for every epoch).
    pub batches: usize,
    pub skips: SkipCounts,
}

/// Reads and tokenizes every row once to count the batches of an epoch.
pub fn count_batches(
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    config: &DataConfig,
) -> Result<EpochStats> {
    config.validate()?;
    let mut skips = SkipCounts::default();
    let mut pairs = 0;
    for i in 0..dataset.len() {
        if prepare(dataset, tokenizer, config, &mut skips, i)?.is_some() {
            pairs += 1;
        }
    }
    let batches =
        if config.drop_last { pairs / config.batch_size } else { pairs.div_ceil(config.batch_size) };
    Ok(EpochStats { rows: dataset.len(), pairs, batches, skips })
}

enum Message {
    Item(Result<(Batch, DataPosition)>, SkipCounts),
    /// The epoch ended: final position and counts (rows dropped after the last batch included).
    End(DataPosition, SkipCounts),
}

/// A [`BatchIter`] run on a background thread; yields each batch with the position after it.
///
/// Errors arrive in order and end the iteration. Dropping it stops the thread (after the batch
/// it is working on).
#[derive(Debug)]
pub struct Prefetch {
    rx: Option<Receiver<Message>>,
    handle: Option<JoinHandle<()>>,
    position: DataPosition,
    skips: SkipCounts,
}

impl Prefetch {
    /// Starts the background thread with a channel of `capacity` batches.
    pub fn new(iter: BatchIter, capacity: usize) -> Result<Self> {
        let position = iter.position();
        let skips = iter.skips().clone();
        let (tx, rx) = sync_channel(capacity);
        let handle = std::thread::Builder::new()
            .name("dpo-prefetch".into())
            .spawn(move || produce(iter, tx))
            .map_err(LoaderError::Thread)?;
        Ok(Self { rx: Some(rx), handle: Some(handle), position, skips })
    }

    /// Position after the last batch received (like [`BatchIter::position`]).
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Rows skipped or dropped up to the last batch received.
    pub fn skips(&self) -> &SkipCounts {
        &self.skips
    }

    fn finish(&mut self) {
        self.rx = None; // unblocks a producer waiting to send
        if let Some(Err(panic)) = self.handle.take().map(JoinHandle::join) {
            std::panic::resume_unwind(panic);
        }
    }
}

fn produce(mut iter: BatchIter, tx: SyncSender<Message>) {
    while let Some(item) = iter.next() {
        let failed = item.is_err();
        let item = item.map(|batch| (batch, iter.position()));
        if tx.send(Message::Item(item, iter.skips().clone())).is_err() || failed {
            return;
        }
    }
    let _ = tx.send(Message::End(iter.position(), iter.skips().clone()));
}

impl Iterator for Prefetch {
    type Item = Result<(Batch, DataPosition)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.rx.as_ref()?.recv() {
            Ok(Message::Item(item, skips)) => {
                self.skips = skips;
                match &item {
                    Ok((_, position)) => self.position = *position,
                    Err(_) => self.finish(),
                }
                Some(item)
            }
            Ok(Message::End(position, skips)) => {
                (self.position, self.skips) = (position, skips);
                self.finish();
                None
            }
            // The producer died without a last message: it panicked; re-raise that here.
            Err(_) => {
                self.finish();
                None
            }
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
