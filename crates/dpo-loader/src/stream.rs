//! Epoch iteration: row order, bad-row policy, truncation drops, collation, and prefetching.
//!
//! Rows are read in order on the iterating thread and parsed, rendered and tokenized in
//! parallel on a small thread pool, a chunk at a time; results are consumed in read order, so
//! batches and skip counts do not depend on the number of threads.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::collate::{Batch, collate};
use crate::dataset::{LineBytes, MAX_ROW_BYTES, PreferenceDataset, ShardStream};
use crate::error::{LoaderError, Result};
use crate::order::{Order, SplitMix64, epoch_order, epoch_rng, shuffle_with, window_rng};
use crate::row::parse_row;
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
#[serde(default)]
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
    /// Rows held by the seeded shuffle buffer when shuffled data cannot be read in any order
    /// (compressed shards). Plain files are shuffled fully through their row index instead.
    pub shuffle_buffer: usize,
    /// Threads that parse, render and tokenize rows; 0 = one per core, at most 8.
    pub tokenizer_threads: usize,
    /// Length-grouped batching (HF `group_by_length`): batches are cut from windows of
    /// `batch_size * length_group_batches` pairs sorted by length, so each batch holds pairs of
    /// similar length and carries less padding; the batches of a window come out in a seeded
    /// random order. See [`batches`].
    pub group_by_length: bool,
    /// Batches per length-grouping window (HF `LengthGroupedSampler`'s mega-batch multiplier).
    pub length_group_batches: usize,
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
            shuffle_buffer: 10_000,
            tokenizer_threads: 0,
            group_by_length: false,
            length_group_batches: 50,
        }
    }
}

impl DataConfig {
    /// The same config with `tokenizer_threads` set (it changes speed, never the batches).
    pub fn with_tokenizer_threads(self, tokenizer_threads: usize) -> Self {
        Self { tokenizer_threads, ..self }
    }

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
        if self.shuffle_buffer == 0 {
            return bad("shuffle_buffer");
        }
        if self.length_group_batches == 0 {
            return bad("length_group_batches");
        }
        Ok(())
    }
}

/// Position in the data: the index, in `epoch`'s order, of the next row to read.
///
/// With `group_by_length`, a position inside a length-grouping window is the window's first
/// row (`cursor`) and the number of its batches already taken (`batch_in_window`, 0 at a
/// window boundary); the window is read and grouped again on resume. Without grouping it is
/// always 0, and it is left out of the serialized form when 0 (older checkpoints have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub batch_in_window: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DataPosition {
    /// The start of `epoch`.
    pub fn start_of(epoch: u64) -> Self {
        Self { epoch, cursor: 0, batch_in_window: 0 }
    }

    /// Row `cursor` of `epoch`, at a window boundary.
    pub fn at(epoch: u64, cursor: u64) -> Self {
        Self { epoch, cursor, batch_in_window: 0 }
    }
}

/// Rows skipped or dropped, by reason (`prompt_too_long`, `malformed_json`, `missing_field`,
/// `wrong_type`, `not_utf8`, `empty_field`, `chosen_equals_rejected`, `unknown_role`,
/// `template_error`, `row_too_long`).
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

/// Reads rows in an epoch's order: `(global row index, line bytes)`.
#[derive(Debug)]
enum Feed {
    /// All shards plain: any order, through the row index.
    Indexed { order: Order, next: usize },
    /// Some shard compressed: shard by shard (in a seeded order when shuffling), through a
    /// seeded shuffle buffer when shuffling.
    Streamed {
        shards: Vec<usize>,
        next_shard: usize,
        current: Option<Box<ShardStream>>,
        buffer: Option<ShuffleBuffer>,
    },
}

/// A seeded shuffle buffer: once full, each new row takes the place of a uniformly drawn one,
/// which is emitted; at the end the rest are emitted in random order.
#[derive(Debug)]
struct ShuffleBuffer {
    rows: Vec<(usize, LineBytes)>,
    capacity: usize,
    rng: SplitMix64,
}

/// Added to the seed for the order of shards, so it is not correlated with row shuffles.
const SHARD_SEED: u64 = 0x5348_4152_4453_0001;

impl Feed {
    fn new(dataset: &PreferenceDataset, config: &DataConfig, epoch: u64) -> Self {
        if dataset.random_access() {
            return Feed::Indexed {
                order: Order::new(dataset.len(), config.shuffle, config.seed, epoch),
                next: 0,
            };
        }
        let shards =
            epoch_order(dataset.n_shards(), config.shuffle, config.seed.wrapping_add(SHARD_SEED), epoch);
        let buffer = config.shuffle.then(|| ShuffleBuffer {
            rows: Vec::new(),
            capacity: config.shuffle_buffer.max(1),
            rng: epoch_rng(config.seed, epoch),
        });
        Feed::Streamed { shards, next_shard: 0, current: None, buffer }
    }

    /// The next row, `None` at the end of the epoch; an error (I/O, corrupt data) is fatal.
    fn next(&mut self, dataset: &PreferenceDataset) -> Result<Option<(usize, LineBytes)>> {
        match self {
            Feed::Indexed { order, next } => {
                if *next >= order.len() {
                    return Ok(None);
                }
                let i = order.get(*next);
                *next += 1;
                let line = match dataset.read_raw(i) {
                    Ok(bytes) => Ok(bytes),
                    Err(LoaderError::RowTooLong { .. }) => Err(MAX_ROW_BYTES + 1),
                    Err(e) => return Err(e),
                };
                Ok(Some((i, line)))
            }
            Feed::Streamed { shards, next_shard, current, buffer } => loop {
                let upstream = loop {
                    if let Some(stream) = current {
                        if let Some(row) = stream.next_row()? {
                            break Some(row);
                        }
                        *current = None;
                    }
                    if *next_shard == shards.len() {
                        break None;
                    }
                    *current = Some(Box::new(dataset.stream_shard(shards[*next_shard])?));
                    *next_shard += 1;
                };
                let Some(buffer) = buffer else { return Ok(upstream) };
                match upstream {
                    Some(row) if buffer.rows.len() < buffer.capacity => buffer.rows.push(row),
                    Some(row) => {
                        let j = buffer.rng.below(buffer.capacity as u64) as usize;
                        return Ok(Some(std::mem::replace(&mut buffer.rows[j], row)));
                    }
                    None if buffer.rows.is_empty() => return Ok(None),
                    None => {
                        let j = buffer.rng.below(buffer.rows.len() as u64) as usize;
                        return Ok(Some(buffer.rows.swap_remove(j)));
                    }
                }
            },
        }
    }
}

/// Parses, renders and tokenizes one row.
fn process(
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    i: usize,
    line: LineBytes,
) -> Result<TokenizedPair> {
    let source = dataset.source(i);
    let bytes = line.map_err(|_| LoaderError::RowTooLong { at: source.clone(), limit: MAX_ROW_BYTES })?;
    let row = parse_row(&bytes, &source)?;
    tokenizer.tokenize_row(&row, source)
}

/// What the pipeline yields, in read order.
#[derive(Debug)]
enum Step {
    /// A row's outcome (its own error is a bad row, skippable or not).
    Row(Result<TokenizedPair>),
    /// Reading failed; nothing follows.
    Fatal(LoaderError),
}

/// Rows read in order and processed a chunk at a time on a thread pool.
#[derive(Debug)]
struct Pipeline {
    feed: Feed,
    pending: VecDeque<Result<TokenizedPair>>,
    fatal: Option<LoaderError>,
    feed_done: bool,
    pool: Option<Arc<rayon::ThreadPool>>,
    chunk: usize,
}

impl Pipeline {
    fn new(feed: Feed, threads: usize, batch_size: usize) -> Result<Self> {
        let pool = pool(threads)?;
        let chunk = batch_size.max(pool.as_ref().map_or(1, |p| 16 * p.current_num_threads()));
        Ok(Self { feed, pending: VecDeque::new(), fatal: None, feed_done: false, pool, chunk })
    }

    /// Reads `n` rows without processing them (to resume mid-epoch).
    fn skip(&mut self, dataset: &PreferenceDataset, n: usize) -> Result<()> {
        if let Feed::Indexed { next, .. } = &mut self.feed {
            *next += n;
            return Ok(());
        }
        for _ in 0..n {
            if self.feed.next(dataset)?.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn next(&mut self, dataset: &PreferenceDataset, tokenizer: &PreferenceTokenizer) -> Option<Step> {
        if self.pending.is_empty() && !self.feed_done {
            self.refill(dataset, tokenizer);
        }
        if let Some(row) = self.pending.pop_front() {
            return Some(Step::Row(row));
        }
        self.fatal.take().map(Step::Fatal)
    }

    fn refill(&mut self, dataset: &PreferenceDataset, tokenizer: &PreferenceTokenizer) {
        let mut raw = Vec::with_capacity(self.chunk);
        while raw.len() < self.chunk {
            match self.feed.next(dataset) {
                Ok(Some(row)) => raw.push(row),
                Ok(None) => {
                    self.feed_done = true;
                    break;
                }
                Err(e) => {
                    self.fatal = Some(e);
                    self.feed_done = true;
                    break;
                }
            }
        }
        let work = |(i, line)| process(dataset, tokenizer, i, line);
        match &self.pool {
            Some(pool) if raw.len() > 1 => {
                let done: Vec<_> = pool.install(|| raw.into_par_iter().map(work).collect());
                self.pending.extend(done);
            }
            _ => self.pending.extend(raw.into_iter().map(work)),
        }
    }
}

/// A shared pool of `threads` tokenization threads (0 = one per core, at most 8); `None` for 1.
fn pool(threads: usize) -> Result<Option<Arc<rayon::ThreadPool>>> {
    let n = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
        n => n,
    };
    if n <= 1 {
        return Ok(None);
    }
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = pools.get(&n) {
        return Ok(Some(Arc::clone(pool)));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|k| format!("dpo-tokenize-{k}"))
        .build()
        .map_err(|e| LoaderError::Thread(std::io::Error::other(e.to_string())))?;
    let pool = Arc::new(pool);
    pools.insert(n, Arc::clone(&pool));
    Ok(Some(pool))
}

/// Applies the bad-row policy and the `max_length` drop rule to a row's outcome: the pair to
/// keep, `None` if skipped or dropped (and counted), or the error that stops loading.
fn keep(
    config: &DataConfig,
    skips: &mut SkipCounts,
    row: Result<TokenizedPair>,
) -> Result<Option<TokenizedPair>> {
    let pair = match row {
        Ok(pair) => pair,
        Err(e) => match e.skip_reason() {
            Some(reason) if config.on_bad_row == OnBadRow::Skip => {
                tracing::debug!("skipping bad row: {e}");
                skips.add(reason);
                return Ok(None);
            }
            _ => return Err(e),
        },
    };
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
    pipeline: Pipeline,
    cursor: usize,
    skips: SkipCounts,
    done: bool,
    /// With `group_by_length`: the current window's batches not yet emitted, in emission order.
    window: VecDeque<Vec<TokenizedPair>>,
    /// With `group_by_length`: the row the current window starts at, and its batches emitted
    /// (0 at a window boundary).
    window_start: usize,
    in_window: u64,
    /// Batches of the next window to discard (resuming mid-window).
    discard: u64,
}

/// The batches of epoch `start.epoch`, beginning at `start.cursor`.
///
/// Rows are read in order `0..len` or, with `shuffle`, in an order fixed by `(seed, epoch)`: a
/// permutation of all rows when every shard is a plain file, otherwise the shards in a seeded
/// order streamed through a seeded shuffle buffer of `shuffle_buffer` rows (resuming then
/// re-reads, without tokenizing, the rows before the cursor). The iterator stops after the
/// first error.
///
/// With `group_by_length`, the kept pairs (after skips and drops, in that order) are taken a
/// window of `batch_size * length_group_batches` at a time; a window's pairs are sorted by
/// length, stably (key: the longer of the pair's two rows after `max_length` truncation, then
/// the pair's tokens on one `[prompt, chosen, rejected]` row as with prefix sharing, then read
/// order), cut into consecutive batches of `batch_size`, and the batches emitted in an order
/// drawn from `(seed, epoch, window start)`. Every window but the epoch's last is full, so the
/// number of batches per epoch is the same as without grouping; the last window's one short
/// batch holds its last pairs in read order, and is emitted last or, with `drop_last`, dropped
/// (the same pairs as without grouping). Only one window of tokenized pairs is held at a time.
/// A start with `batch_in_window = k > 0` reads the window at `start.cursor` again and skips
/// its first `k` batches.
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
    if start.batch_in_window > 0 && !config.group_by_length {
        return Err(LoaderError::Config(format!(
            "start position is batch {} of a length-grouping window, but group_by_length is off \
             (the position was saved by a run with group_by_length = true)",
            start.batch_in_window
        )));
    }
    let feed = Feed::new(&dataset, &config, start.epoch);
    let mut pipeline = Pipeline::new(feed, config.tokenizer_threads, config.batch_size)?;
    pipeline.skip(&dataset, cursor)?;
    Ok(BatchIter {
        epoch: start.epoch,
        pipeline,
        cursor,
        dataset,
        tokenizer,
        config,
        skips: SkipCounts::default(),
        done: false,
        window: VecDeque::new(),
        window_start: cursor,
        in_window: start.batch_in_window,
        discard: start.batch_in_window,
    })
}

/// The length-grouping sort key of a pair: its longer row after `max_length` truncation, then
/// its tokens on one `[prompt, chosen, rejected]` row (each completion truncated likewise).
fn length_key(pair: &TokenizedPair, max_length: Option<usize>) -> (usize, usize) {
    let p = pair.prompt_ids.len();
    let row = |c: &[u32]| max_length.map_or(p + c.len(), |m| (p + c.len()).min(m));
    let (chosen, rejected) = (row(&pair.chosen_ids), row(&pair.rejected_ids));
    (chosen.max(rejected), chosen + rejected - p.min(chosen).min(rejected))
}

impl BatchIter {
    /// Position after the last batch emitted: after batch k, resuming here yields batch k+1 on.
    /// The next row to read, or, inside a length-grouping window, the window's start and the
    /// number of its batches emitted.
    pub fn position(&self) -> DataPosition {
        if self.in_window > 0 {
            return DataPosition {
                epoch: self.epoch,
                cursor: self.window_start as u64,
                batch_in_window: self.in_window,
            };
        }
        DataPosition::at(self.epoch, self.cursor as u64)
    }

    /// Rows skipped or dropped so far by this iterator.
    pub fn skips(&self) -> &SkipCounts {
        &self.skips
    }

    /// Runs this iterator on a background thread with up to `capacity` batches ready.
    pub fn prefetch(self, capacity: usize) -> Result<Prefetch> {
        Prefetch::new(self, capacity, |batch| batch)
    }

    /// [`BatchIter::prefetch`], with `prepare` run on each batch on the background thread too:
    /// whatever a consumer would otherwise build from the batch between its steps (a trainer's
    /// device layout).
    pub fn prefetch_with<T: Send + 'static>(
        self,
        capacity: usize,
        prepare: impl FnMut(Batch) -> T + Send + 'static,
    ) -> Result<Prefetch<T>> {
        Prefetch::new(self, capacity, prepare)
    }
}

impl BatchIter {
    /// Reads up to `n` kept pairs (fewer at the end of the epoch).
    fn read_pairs(&mut self, n: usize) -> Result<Vec<TokenizedPair>> {
        let mut pairs = Vec::with_capacity(n.min(1 << 16));
        while pairs.len() < n {
            let Some(step) = self.pipeline.next(&self.dataset, &self.tokenizer) else { break };
            let row = match step {
                Step::Row(row) => row,
                Step::Fatal(e) => return Err(e),
            };
            if let Some(pair) = keep(&self.config, &mut self.skips, row)? {
                pairs.push(pair);
            }
            self.cursor += 1;
        }
        Ok(pairs)
    }

    /// The next batch's pairs, `None` at the end of the epoch.
    fn next_pairs(&mut self) -> Result<Option<Vec<TokenizedPair>>> {
        let size = self.config.batch_size;
        if !self.config.group_by_length {
            let pairs = self.read_pairs(size)?;
            let short = pairs.is_empty() || (self.config.drop_last && pairs.len() < size);
            return Ok((!short).then_some(pairs));
        }
        while self.window.is_empty() {
            self.window_start = self.cursor;
            let pairs = self.read_pairs(size.saturating_mul(self.config.length_group_batches))?;
            if pairs.is_empty() && self.discard == 0 {
                return Ok(None);
            }
            self.window = self.group(pairs);
            let discard = std::mem::take(&mut self.discard);
            if discard as usize > self.window.len() {
                return Err(LoaderError::Config(format!(
                    "start position is batch {discard} of the length-grouping window at row {} of \
                     epoch {}, which has only {} batches (was the data or batch size changed?)",
                    self.window_start,
                    self.epoch,
                    self.window.len()
                )));
            }
            self.window.drain(..discard as usize);
            self.in_window = discard;
            if self.window.is_empty() {
                self.in_window = 0;
                if self.cursor == self.window_start {
                    return Ok(None);
                }
            }
        }
        let pairs = self.window.pop_front().expect("the window is not empty");
        self.in_window = if self.window.is_empty() { 0 } else { self.in_window + 1 };
        Ok(Some(pairs))
    }

    /// A window's pairs as batches in emission order: sorted by [`length_key`] (stable, so ties
    /// keep read order), cut into batches of `batch_size`, shuffled by the window's generator.
    /// Only the epoch's last window can leave a short batch; it takes that window's last pairs
    /// in read order, set aside before the sort, so that `drop_last` drops the very pairs it
    /// drops without grouping (not the window's longest, which would bias every epoch against
    /// long pairs), and without `drop_last` it comes last.
    fn group(&self, mut pairs: Vec<TokenizedPair>) -> VecDeque<Vec<TokenizedPair>> {
        let size = self.config.batch_size;
        let short = pairs.split_off(pairs.len() - pairs.len() % size);
        pairs.sort_by_cached_key(|p| length_key(p, self.config.max_length));
        let mut out: Vec<Vec<TokenizedPair>> = Vec::with_capacity(pairs.len() / size + 1);
        let mut rest = pairs.into_iter().peekable();
        while rest.peek().is_some() {
            out.push(rest.by_ref().take(size).collect());
        }
        let mut rng = window_rng(self.config.seed, self.epoch, self.window_start as u64);
        shuffle_with(&mut out, &mut rng);
        if !short.is_empty() && !self.config.drop_last {
            out.push(short);
        }
        out.into()
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let pairs = match self.next_pairs() {
            Ok(Some(pairs)) => pairs,
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let c = &self.config;
        Some(Ok(collate(&pairs, self.tokenizer.pad_id(), c.max_length, c.pad_to_multiple_of)))
    }
}

/// What one epoch yields, from [`count_batches`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStats {
    /// Rows in the file.
    pub rows: usize,
    /// Pairs kept after skips and drops.
    pub pairs: usize,
    /// Batches per epoch (the same for every epoch).
    pub batches: usize,
    pub skips: SkipCounts,
    /// The pairs that make the epoch's largest batches (`None` without pairs).
    pub longest: Option<LongestPairs>,
}

/// The kept pairs of an epoch whose batches are the largest (first kept in read order among
/// equals): a batch is as long as its longest row, one `[prompt, completion]` row per
/// completion in the standard layout, one `[prompt, chosen, rejected]` row per pair with prefix
/// sharing (lengths after `max_length` truncation, as the batching measures them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LongestPairs {
    /// With the longest `[prompt, completion]` row.
    pub standard: TokenizedPair,
    /// With the longest `[prompt, chosen, rejected]` row.
    pub shared: TokenizedPair,
}

/// Every row's outcome in file order, tokenized on `threads` threads (0 = one per core):
/// `f(row index, pair or the row's error)`. Stops at the first error of `f` or of reading.
pub fn scan_rows(
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    threads: usize,
    mut f: impl FnMut(usize, Result<TokenizedPair>) -> Result<()>,
) -> Result<()> {
    let config = DataConfig { shuffle: false, ..DataConfig::default() };
    let mut pipeline = Pipeline::new(Feed::new(dataset, &config, 0), threads, 1)?;
    let mut i = 0;
    while let Some(step) = pipeline.next(dataset, tokenizer) {
        match step {
            Step::Row(row) => f(i, row)?,
            Step::Fatal(e) => return Err(e),
        }
        i += 1;
    }
    Ok(())
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
    // (length, pair) of the longest standard and shared rows so far.
    let mut longest: Option<((usize, TokenizedPair), (usize, TokenizedPair))> = None;
    scan_rows(dataset, tokenizer, config.tokenizer_threads, |_, row| {
        let Some(pair) = keep(config, &mut skips, row)? else { return Ok(()) };
        pairs += 1;
        let (standard, shared) = length_key(&pair, config.max_length);
        match &mut longest {
            None => longest = Some(((standard, pair.clone()), (shared, pair))),
            Some((a, b)) => {
                if standard > a.0 {
                    *a = (standard, pair.clone());
                }
                if shared > b.0 {
                    *b = (shared, pair);
                }
            }
        }
        Ok(())
    })?;
    let batches =
        if config.drop_last { pairs / config.batch_size } else { pairs.div_ceil(config.batch_size) };
    let longest = longest.map(|((_, standard), (_, shared))| LongestPairs { standard, shared });
    Ok(EpochStats { rows: dataset.len(), pairs, batches, skips, longest })
}

enum Message<T> {
    Item(Result<(T, DataPosition)>, SkipCounts),
    /// The epoch ended: final position and counts (rows dropped after the last batch included).
    End(DataPosition, SkipCounts),
}

/// A [`BatchIter`] run on a background thread; yields each batch (or what the thread prepared
/// from it, [`BatchIter::prefetch_with`]) with the position after it.
///
/// Errors arrive in order and end the iteration. Dropping it stops the thread (after the batch
/// it is working on).
#[derive(Debug)]
pub struct Prefetch<T = Batch> {
    rx: Option<Receiver<Message<T>>>,
    handle: Option<JoinHandle<()>>,
    position: DataPosition,
    skips: SkipCounts,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts the background thread with a channel of `capacity` items, each `prepare(batch)`.
    pub fn new(
        iter: BatchIter,
        capacity: usize,
        prepare: impl FnMut(Batch) -> T + Send + 'static,
    ) -> Result<Self> {
        let position = iter.position();
        let skips = iter.skips().clone();
        let (tx, rx) = sync_channel(capacity);
        let handle = std::thread::Builder::new()
            .name("dpo-prefetch".into())
            .spawn(move || produce(iter, prepare, tx))
            .map_err(LoaderError::Thread)?;
        Ok(Self { rx: Some(rx), handle: Some(handle), position, skips })
    }
}

impl<T> Prefetch<T> {
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

fn produce<T>(mut iter: BatchIter, mut prepare: impl FnMut(Batch) -> T, tx: SyncSender<Message<T>>) {
    while let Some(item) = iter.next() {
        let failed = item.is_err();
        let item = item.map(|batch| (prepare(batch), iter.position()));
        if tx.send(Message::Item(item, iter.skips().clone())).is_err() || failed {
            return;
        }
    }
    let _ = tx.send(Message::End(iter.position(), iter.skips().clone()));
}

impl<T> Iterator for Prefetch<T> {
    type Item = Result<(T, DataPosition)>;

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

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
