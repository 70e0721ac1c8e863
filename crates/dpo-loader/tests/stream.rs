//! Epoch iteration: truncation and drops, batch layout, shuffling, resuming, prefetching.

use std::sync::Arc;

use crate::common::{all, dataset, id, row, tokenizer, write};
use dpo_loader::{
    Batch, DataConfig, DataPosition, OnBadRow, PreferenceDataset, TokenizedPair, batches, count_batches,
    scan_rows,
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
    assert_eq!(got[0].1, DataPosition::at(0, 2));
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
fn count_batches_names_the_pairs_of_the_largest_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (varied(dir.path()), tokenizer(dir.path()));
    let m = 40;
    let cfg = DataConfig { max_length: Some(m), ..config(4, true) };
    let longest = count_batches(&data, &tok, &cfg).unwrap().longest.unwrap();
    // The standard layout: no batch of the epoch is longer than the pair's longer row.
    let got = all(&data, &tok, &cfg, DataPosition::default());
    let row = |p: &TokenizedPair| (p.prompt_ids.len() + p.chosen_ids.len().max(p.rejected_ids.len())).min(m);
    assert_eq!(row(&longest.standard), got.iter().map(|(b, _)| b.seq_len).max().unwrap());
    // Prefix sharing: the longest prompt + chosen + rejected, each completion truncated with
    // the prompt to max_length, over every kept pair.
    let shared = |p: &TokenizedPair| {
        let c = |ids: &[u32]| ids.len().min(m - p.prompt_ids.len());
        p.prompt_ids.len() + c(&p.chosen_ids) + c(&p.rejected_ids)
    };
    let mut want = 0;
    scan_rows(&data, &tok, 1, |_, pair| {
        if let Some(p) = pair.ok().filter(|p| p.prompt_ids.len() < m) {
            want = want.max(shared(&p));
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(shared(&longest.shared), want);
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
    let past_end = DataPosition::at(3, 13);
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
    let start = DataPosition::at(2, 4);
    let plain = all(&data, &tok, &cfg, start);
    for capacity in [0, 1, 4] {
        let iter = batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
        let mut pre = iter.prefetch(capacity).unwrap();
        assert_eq!(pre.position(), start);
        let got: Vec<_> = pre.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, plain, "capacity {capacity}");
        assert_eq!(pre.position(), DataPosition::at(2, 25));
        let plain_iter = {
            let mut it = batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
            it.by_ref().for_each(drop);
            it
        };
        assert_eq!(pre.skips(), plain_iter.skips());
        assert!(pre.next().is_none());
    }
}

/// `prefetch_with` runs its preparation on the background thread, once per batch in order, and
/// yields what it made with the same positions as `prefetch`.
#[test]
fn prefetch_with_prepares_each_batch_on_the_background_thread() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let data = dataset(dir.path(), "d.jsonl", 10);
    let cfg = config(3, false);
    let plain: Vec<_> = batches(data.clone(), tok.clone(), cfg.clone(), DataPosition::default())
        .unwrap()
        .prefetch(2)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let iter = batches(data, tok, cfg, DataPosition::default()).unwrap();
    let prepared = iter
        .prefetch_with(2, |batch| {
            let thread = std::thread::current().name().map(str::to_owned);
            (batch.sources.iter().map(|s| s.line).collect::<Vec<_>>(), thread)
        })
        .unwrap();
    let got: Vec<_> = prepared.map(Result::unwrap).collect();
    assert_eq!(got.len(), plain.len());
    for (((lines, thread), position), (batch, expected)) in got.iter().zip(&plain) {
        assert_eq!(thread.as_deref(), Some("dpo-prefetch"));
        assert_eq!(lines, &batch.sources.iter().map(|s| s.line).collect::<Vec<_>>());
        assert_eq!(position, expected);
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

/// 240 rows whose lengths vary widely (many short, a few long, as in real data: completions
/// of 1 to ~60 tokens, a pair's two of similar length), with bad rows and prompts too long for
/// `max_length = 48` mixed in.
fn varied(dir: &std::path::Path) -> Arc<PreferenceDataset> {
    let mut body = String::new();
    for i in 0u64..240 {
        let h = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
        let chosen = 1 + (h % 64) * (h % 64) / 70;
        body += &match i % 37 {
            5 => "{\"prompt\": 3}\n".to_owned(),
            11 => row(&"Q!".repeat(30), " good", " bad"),
            _ => row(&format!("Q{i}"), &" good".repeat(chosen), &" bad".repeat(chosen + (h >> 8) % 4)),
        };
    }
    Arc::new(PreferenceDataset::open(write(dir, "varied.jsonl", body)).unwrap())
}

fn grouped(batch_size: usize, groups: usize) -> DataConfig {
    DataConfig {
        max_length: Some(48),
        group_by_length: true,
        length_group_batches: groups,
        ..config(batch_size, true)
    }
}

/// Tokens in the padded batches, `rows * seq_len` summed.
fn padded(got: &[(Batch, DataPosition)]) -> usize {
    got.iter().map(|(b, _)| b.n_rows() * b.seq_len).sum()
}

fn sorted_lines(got: &[(Batch, DataPosition)]) -> Vec<u64> {
    let mut v = lines(got);
    v.sort_unstable();
    v
}

/// Each pair's longer row (real tokens), per batch.
fn pair_lengths(b: &Batch) -> Vec<usize> {
    let row = |r: usize| {
        b.attention_mask[r * b.seq_len..(r + 1) * b.seq_len].iter().map(|&m| m as usize).sum::<usize>()
    };
    (0..b.n_pairs).map(|i| row(i).max(row(b.n_pairs + i))).collect()
}

#[test]
fn group_by_length_keeps_the_pairs_and_batch_count_and_cuts_padding() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (varied(dir.path()), tokenizer(dir.path()));
    let plain_cfg = DataConfig { group_by_length: false, ..grouped(4, 5) };
    for epoch in [0, 1] {
        let plain = all(&data, &tok, &plain_cfg, DataPosition::start_of(epoch));
        let stats = count_batches(&data, &tok, &plain_cfg).unwrap();
        assert_eq!(plain.len(), stats.batches);
        assert!(
            stats.skips.total() > 0 && !stats.pairs.is_multiple_of(4),
            "the data exercises drops and a short batch"
        );
        for groups in [1, 2, 5, 1000] {
            let cfg = grouped(4, groups);
            let got = all(&data, &tok, &cfg, DataPosition::start_of(epoch));
            assert_eq!(got.len(), stats.batches, "G={groups}: batches per epoch unchanged");
            assert_eq!(count_batches(&data, &tok, &cfg).unwrap().batches, stats.batches);
            assert_eq!(sorted_lines(&got), sorted_lines(&plain), "G={groups}: the same pairs");
            let real = |g: &[(Batch, DataPosition)]| g.iter().map(|(b, _)| b.n_tokens).sum::<usize>();
            assert_eq!(real(&got), real(&plain));
            assert!(padded(&got) <= padded(&plain), "G={groups}: {} > {}", padded(&got), padded(&plain));
            assert_eq!(got.iter().filter(|(b, _)| b.n_pairs < 4).count(), 1, "one short batch");
            if groups == 1 {
                // A window of one batch: the same batches, sorted inside.
                assert_eq!(padded(&got), padded(&plain));
            }
        }
        // Padding tokens (padded minus real) at least halved on this data, windows of 5 batches.
        let got = all(&data, &tok, &grouped(4, 5), DataPosition::start_of(epoch));
        let real: usize = plain.iter().map(|(b, _)| b.n_tokens).sum();
        let (g, p) = (padded(&got) - real, padded(&plain) - real);
        eprintln!("epoch {epoch}: {real} real tokens, padding {g} grouped vs {p} ungrouped");
        assert!(2 * g <= p, "epoch {epoch}: padding {g} grouped vs {p} ungrouped");
    }
}

#[test]
fn group_by_length_sorts_each_window_and_emits_its_batches_in_seeded_order() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (varied(dir.path()), tokenizer(dir.path()));
    // One window for the whole epoch: the full batches' length ranges do not overlap (the
    // short batch, last, holds the last pairs read, of any length) ...
    let cfg = DataConfig { shuffle: false, ..grouped(4, 1000) };
    let mut got = all(&data, &tok, &cfg, DataPosition::default());
    let short = got.pop().unwrap();
    assert!(short.0.n_pairs < 4 && got.iter().all(|(b, _)| b.n_pairs == 4));
    let mut ranges: Vec<(usize, usize)> = got
        .iter()
        .map(|(b, _)| {
            let l = pair_lengths(b);
            (*l.iter().min().unwrap(), *l.iter().max().unwrap())
        })
        .collect();
    let emitted: Vec<usize> = ranges.iter().map(|r| r.1).collect();
    ranges.sort_unstable();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:?}");
    // ... and they come out neither shortest nor longest first.
    let (mut up, mut down) = (emitted.clone(), emitted.clone());
    up.sort_unstable();
    down.sort_unstable_by(|a, b| b.cmp(a));
    assert!(emitted != up && emitted != down, "{emitted:?}");

    // A pure function of (seed, epoch): same again, different for another epoch or seed.
    let cfg = grouped(3, 4);
    let run = |cfg: &DataConfig, epoch| all(&data, &tok, cfg, DataPosition::start_of(epoch));
    let e0 = run(&cfg, 0);
    assert_eq!(e0, run(&cfg, 0));
    let threads = DataConfig { tokenizer_threads: 1, ..cfg.clone() };
    assert_eq!(e0, run(&threads, 0), "independent of the thread count");
    assert_ne!(lines(&e0), lines(&run(&cfg, 1)));
    assert_ne!(lines(&e0), lines(&run(&DataConfig { seed: 8, ..cfg.clone() }, 0)));
}

#[test]
fn group_by_length_resumes_from_every_position_including_mid_window() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (varied(dir.path()), tokenizer(dir.path()));
    for drop_last in [false, true] {
        let cfg = DataConfig { drop_last, ..grouped(4, 3) };
        let start = DataPosition::start_of(2);
        let full = all(&data, &tok, &cfg, start);
        let stats = count_batches(&data, &tok, &cfg).unwrap();
        assert_eq!(full.len(), stats.batches);
        if drop_last {
            assert!(full.iter().all(|(b, _)| b.n_pairs == 4));
            assert_eq!(lines(&full).len(), stats.pairs - stats.pairs % 4, "exactly the short batch dropped");
            // The same pairs as batching without grouping drops: the last read, not the longest.
            let plain = DataConfig { group_by_length: false, ..cfg.clone() };
            assert_eq!(sorted_lines(&full), sorted_lines(&all(&data, &tok, &plain, start)));
        } else {
            // The short batch comes last and holds the last pairs read.
            let plain = DataConfig { group_by_length: false, ..cfg.clone() };
            let (grouped_last, plain_last) = (&full.last().unwrap().0, &all(&data, &tok, &plain, start));
            assert_eq!(grouped_last.n_pairs, stats.pairs % 4);
            assert_eq!(grouped_last, &plain_last.last().unwrap().0);
        }
        let mid = full.iter().filter(|(_, p)| p.batch_in_window > 0).count();
        assert_eq!(mid, full.len() - full.len().div_ceil(3), "positions inside windows");
        for (k, (_, position)) in full.iter().enumerate() {
            // Inside a window: its start and the batches taken; after its last batch: the next row.
            let boundary = (k + 1).is_multiple_of(3) || k + 1 == full.len();
            assert_eq!(position.batch_in_window, if boundary { 0 } else { (k as u64 + 1) % 3 }, "{k}");
            let saved: DataPosition =
                serde_json::from_str(&serde_json::to_string(position).unwrap()).unwrap();
            assert_eq!(saved, *position);
            assert_eq!(all(&data, &tok, &cfg, saved), full[k + 1..], "resume after batch {k}");
        }
        assert_eq!(full.last().unwrap().1, DataPosition::at(2, 240));
        // Through the prefetcher, from mid-window.
        let resumed = batches(data.clone(), tok.clone(), cfg.clone(), full[3].1).unwrap();
        let mut pre = resumed.prefetch(2).unwrap();
        assert_eq!(pre.position(), full[3].1);
        let got: Vec<_> = pre.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, full[4..]);
        assert_eq!(pre.position(), DataPosition::at(2, 240));
    }
}

#[test]
fn a_mid_window_position_needs_group_by_length_and_a_window_that_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (varied(dir.path()), tokenizer(dir.path()));
    let mid = DataPosition { epoch: 0, cursor: 0, batch_in_window: 2 };
    let plain = DataConfig { group_by_length: false, ..grouped(4, 3) };
    let e = batches(data.clone(), tok.clone(), plain, mid).unwrap_err();
    assert!(e.to_string().contains("group_by_length is off"), "{e}");
    // Old positions (no field) load as window boundaries.
    let old: DataPosition = serde_json::from_str(r#"{"epoch":1,"cursor":5}"#).unwrap();
    assert_eq!(old, DataPosition::at(1, 5));
    // A window of 3 batches has no batch 4.
    let past = DataPosition { batch_in_window: 4, ..mid };
    let e = batches(data.clone(), tok.clone(), grouped(4, 3), past).unwrap().next().unwrap().unwrap_err();
    assert!(e.to_string().contains("has only 3 batches"), "{e}");
    let e = batches(data, tok, DataConfig { length_group_batches: 0, ..grouped(4, 3) }, mid).unwrap_err();
    assert!(e.to_string().contains("length_group_batches must be at least 1"), "{e}");
}
