//! Epoch iteration: truncation and drops, batch layout, shuffling, resuming, prefetching.

mod common;

use std::sync::Arc;

use common::{dataset, id, row, tokenizer, write};
use dpo_loader::{
    Batch, DataConfig, DataPosition, OnBadRow, PreferenceDataset, PreferenceTokenizer, batches, count_batches,
};

fn config(batch_size: usize, shuffle: bool) -> DataConfig {
    DataConfig {
        max_length: None,
        batch_size,
        shuffle,
        seed: 7,
        on_bad_row: OnBadRow::Skip,
        pad_to_multiple_of: None,
        drop_last: false,
        ..DataConfig::default()
    }
}

fn all(
    data: &Arc<PreferenceDataset>,
    tok: &Arc<PreferenceTokenizer>,
    cfg: &DataConfig,
    start: DataPosition,
) -> Vec<(Batch, DataPosition)> {
    let mut iter = batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
    let mut out = Vec::new();
    while let Some(batch) = iter.next() {
        out.push((batch.unwrap(), iter.position()));
    }
    out
}

fn lines(batches: &[(Batch, DataPosition)]) -> Vec<u64> {
    batches.iter().flat_map(|(b, _)| b.sources.iter().map(|s| s.line)).collect()
}

#[test]
fn batch_layout_and_padding() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let body = row("Hello", " world", " there there") + &row("Hello world", " good", " bad");
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "d.jsonl", body)).unwrap());
    let cfg = DataConfig { pad_to_multiple_of: Some(4), ..config(2, false) };
    let got = all(&data, &tok, &cfg, DataPosition::default());
    assert_eq!(got.len(), 1);
    let b = &got[0].0;
    let [hello, world, there, good, bad, eos, pad] =
        ["Hello", "Ġworld", "Ġthere", "Ġgood", "Ġbad", "<eos>", "<pad>"].map(|t| id(&tok, t));
    // Rows: chosen 1, chosen 2, rejected 1, rejected 2; longest has 4 tokens, padded to 4.
    #[rustfmt::skip]
    let want_ids = [
        hello, world, eos, pad,
        hello, world, good, eos,
        hello, there, there, eos,
        hello, world, bad, eos,
    ];
    assert_eq!((b.n_pairs, b.seq_len), (2, 4));
    assert_eq!(b.input_ids, want_ids);
    assert_eq!(b.attention_mask, [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
    assert_eq!(b.completion_mask, [0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1]);
    assert_eq!(b.n_tokens, 15);
    assert_eq!(got[0].1, DataPosition { epoch: 0, cursor: 2 });
}

#[test]
fn truncation_keeps_the_start_and_long_prompts_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    // Prompts of 1, 3 and 2 tokens ("Hello", "Hello" + "!!", "Hello" + "Ġworld").
    let body = row("Hello", " world good", " bad")
        + &row("Hello!!", " good", " bad")
        + &row("Hello world", " good", " bad");
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "d.jsonl", body)).unwrap());
    let cfg = DataConfig { max_length: Some(3), ..config(8, false) };
    let got = all(&data, &tok, &cfg, DataPosition::default());
    assert_eq!(lines(&got), [1, 3]);
    let b = &got[0].0;
    let [hello, world, good, bad, eos] = ["Hello", "Ġworld", "Ġgood", "Ġbad", "<eos>"].map(|t| id(&tok, t));
    assert_eq!(b.seq_len, 3);
    #[rustfmt::skip]
    assert_eq!(b.input_ids, [hello, world, good,  hello, world, good,  hello, bad, eos,  hello, world, bad]);
    #[rustfmt::skip]
    assert_eq!(b.completion_mask, [0, 1, 1,  0, 0, 1,  0, 1, 1,  0, 0, 1]);
    assert!(b.attention_mask.iter().all(|&m| m == 1));
    let stats = count_batches(&data, &tok, &cfg).unwrap();
    assert_eq!((stats.pairs, stats.batches, stats.skips.get("prompt_too_long")), (2, 1, 1));
    // A prompt exactly max_length long is dropped too.
    let cfg = DataConfig { max_length: Some(2), ..cfg };
    assert_eq!(lines(&all(&data, &tok, &cfg, DataPosition::default())), [1]);
}

#[test]
fn batch_counts_and_drop_last() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (dataset(dir.path(), "d.jsonl", 10), tokenizer(dir.path()));
    for (drop_last, sizes) in [(false, vec![4, 4, 2]), (true, vec![4, 4])] {
        let cfg = DataConfig { drop_last, ..config(4, true) };
        let got = all(&data, &tok, &cfg, DataPosition::default());
        assert_eq!(got.iter().map(|(b, _)| b.n_pairs).collect::<Vec<_>>(), sizes);
        assert_eq!(count_batches(&data, &tok, &cfg).unwrap().batches, sizes.len());
    }
}

#[test]
fn shuffle_is_a_function_of_seed_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (dataset(dir.path(), "d.jsonl", 20), tokenizer(dir.path()));
    let cfg = config(3, true);
    let order = |cfg: &DataConfig, epoch| lines(&all(&data, &tok, cfg, DataPosition::start_of(epoch)));
    let e0 = order(&cfg, 0);
    assert_eq!(e0, order(&cfg, 0));
    let mut sorted = e0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=20).collect::<Vec<_>>());
    assert_ne!(e0, sorted, "shuffled");
    assert_ne!(e0, order(&cfg, 1), "new order each epoch");
    assert_ne!(e0, order(&DataConfig { seed: 8, ..cfg.clone() }, 0));
    assert_eq!(order(&config(3, false), 5), sorted, "sequential without shuffle");
}

#[test]
fn resuming_from_any_position_gives_the_same_remaining_batches() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    // 12 rows with bad and too-long rows mixed in, so positions count rows, not pairs.
    let mut body = String::new();
    for i in 0..12 {
        body += &match i % 5 {
            1 => "{\"prompt\": 3}\n".to_owned(),
            3 => row("Hello!!!!!!!!", " good", " bad"),
            _ => row(&format!("Q{i}"), " good", " bad"),
        };
    }
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "d.jsonl", body)).unwrap());
    let cfg = DataConfig { max_length: Some(6), ..config(2, true) };
    let start = DataPosition::start_of(3);
    let full = all(&data, &tok, &cfg, start);
    assert_eq!(full.len(), 4);
    for k in 0..full.len() {
        let resumed = all(&data, &tok, &cfg, full[k].1);
        assert_eq!(resumed, full[k + 1..], "resume after batch {k}");
    }
    assert_eq!(full.last().unwrap().1.cursor, 12);
    let serialized = serde_json::to_string(&full[1].1).unwrap();
    assert_eq!(serialized, format!("{{\"epoch\":3,\"cursor\":{}}}", full[1].1.cursor));
    let past_end = DataPosition { epoch: 3, cursor: 13 };
    let e = batches(data, tok, cfg, past_end).unwrap_err();
    assert!(e.to_string().contains("start position 13 is past the end"), "{e}");
}

#[test]
fn prefetch_yields_the_same_batches_positions_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let mut body = String::new();
    for i in 0..25 {
        body += &if i % 7 == 3 { "not json\n".to_owned() } else { row(&format!("Q{i}"), " good", " bad") };
    }
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "d.jsonl", body)).unwrap());
    let cfg = config(3, true);
    let start = DataPosition { epoch: 2, cursor: 4 };
    let plain = all(&data, &tok, &cfg, start);
    for capacity in [0, 1, 4] {
        let iter = batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
        let mut pre = iter.prefetch(capacity).unwrap();
        assert_eq!(pre.position(), start);
        let got: Vec<_> = pre.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, plain, "capacity {capacity}");
        assert_eq!(pre.position(), DataPosition { epoch: 2, cursor: 25 });
        let plain_iter = {
            let mut it = batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
            it.by_ref().for_each(drop);
            it
        };
        assert_eq!(pre.skips(), plain_iter.skips());
        assert!(pre.next().is_none());
    }
}

#[test]
fn prefetch_propagates_errors_and_stops_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let body = row("Q0", " a", " b") + &row("Q1", " a", " b") + "{oops\n" + &row("Q3", " a", " b");
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "d.jsonl", body)).unwrap());
    let cfg = DataConfig { on_bad_row: OnBadRow::Error, ..config(1, false) };
    let mut pre = batches(data, tok.clone(), cfg, DataPosition::default()).unwrap().prefetch(2).unwrap();
    let lines: Vec<u64> = pre.by_ref().take(2).map(|b| b.unwrap().0.sources[0].line).collect();
    assert_eq!(lines, [1, 2]);
    let msg = pre.next().unwrap().unwrap_err().to_string();
    assert!(msg.contains("d.jsonl:3: malformed JSON"), "{msg}");
    assert!(pre.next().is_none());
    assert_eq!(pre.position().cursor, 2);

    // Dropped while the producer is blocked on a full channel: must not hang.
    let big = dataset(dir.path(), "big.jsonl", 200);
    let mut pre = batches(big, tok, config(1, false), DataPosition::default()).unwrap().prefetch(1).unwrap();
    assert!(pre.next().unwrap().is_ok());
    std::thread::sleep(std::time::Duration::from_millis(20));
    drop(pre);
}
