//! Compressed files, folders and globs of shards, the shuffle buffer of streamed data, and
//! parallel tokenization: same batches, exact resume, errors naming the shard and its line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::{all, row, tokenizer, write};
use dpo_loader::{
    Batch, DataConfig, DataPosition, EpochStats, OnBadRow, PreferenceDataset, RowRef, batches, count_batches,
};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn zst(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 3).unwrap()
}

/// `n` rows with a bad row every 7th, blank lines and a CRLF here and there.
fn body(n: usize, offset: usize) -> String {
    (0..n)
        .map(|i| match (i + offset) % 7 {
            3 => "{\"prompt\": 1}\n".to_owned(),
            5 => row(&format!("Q{}", i + offset), " good", " bad").replace('\n', "\r\n") + "\n",
            _ => row(&format!("Q{}{}", i + offset, "?".repeat(i % 3)), &format!(" good {i}"), " bad"),
        })
        .collect()
}

fn config(batch_size: usize, shuffle: bool) -> DataConfig {
    DataConfig {
        max_length: None,
        batch_size,
        shuffle,
        seed: 11,
        on_bad_row: OnBadRow::Skip,
        ..DataConfig::default()
    }
}

/// A batch without its sources' file names (they differ between encodings): input ids,
/// completion mask, line numbers, position after it.
type Seen = (Vec<u32>, Vec<u8>, Vec<u64>, DataPosition);

/// Batches without their sources' file names.
/// The stats with the longest pairs' sources cleared (the same pairs, read from other files).
fn without_sources(mut stats: EpochStats) -> EpochStats {
    for pair in stats.longest.iter_mut().flat_map(|l| [&mut l.standard, &mut l.shared]) {
        pair.source = RowRef { file: Arc::new(PathBuf::new()), line: 0 };
    }
    stats
}

fn ids(batches: &[(Batch, DataPosition)]) -> Vec<Seen> {
    batches
        .iter()
        .map(|(b, p)| {
            (b.input_ids.clone(), b.completion_mask.clone(), b.sources.iter().map(|s| s.line).collect(), *p)
        })
        .collect()
}

fn open(path: impl AsRef<Path>) -> Arc<PreferenceDataset> {
    Arc::new(PreferenceDataset::open(path).unwrap())
}

#[test]
fn gzip_and_zstd_files_give_the_same_rows_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let text = body(40, 0);
    let plain = open(write(dir.path(), "d.jsonl", &text));
    // Compression is recognised by content, whatever the name.
    let gzip = open(write(dir.path(), "d.jsonl.gz", gz(text.as_bytes())));
    let zstd = open(write(dir.path(), "d.data", zst(text.as_bytes())));
    assert!(plain.random_access() && !gzip.random_access() && !zstd.random_access());
    let cfg = config(4, false);
    let want = ids(&all(&plain, &tok, &cfg, DataPosition::default()));
    for data in [&gzip, &zstd] {
        assert_eq!(data.len(), plain.len());
        assert_eq!(ids(&all(data, &tok, &cfg, DataPosition::default())), want);
        let counts = |d: &PreferenceDataset| without_sources(count_batches(d, &tok, &cfg).unwrap());
        assert_eq!(counts(data), counts(&plain));
        // Random access works on compressed shards too (re-reading from the start when going back).
        for i in [5, 6, 30, 2, 39] {
            assert_eq!(data.read_raw(i).unwrap(), plain.read_raw(i).unwrap(), "row {i}");
            assert_eq!(data.source(i).line, plain.source(i).line);
        }
    }
    // A BOM inside the compressed stream is skipped as in a plain file.
    let bom = format!("\u{feff}{text}");
    let data = open(write(dir.path(), "bom.jsonl.zst", zst(bom.as_bytes())));
    assert_eq!(ids(&all(&data, &tok, &cfg, DataPosition::default())), want);
}

#[test]
fn empty_blank_and_corrupt_compressed_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, bytes, expected) in [
        ("empty.jsonl.gz", gz(b""), "the data file is empty"),
        ("blank.jsonl.zst", zst(b"\n \r\n\n"), "the data file has only blank lines, no rows"),
    ] {
        let path = write(d, name, bytes);
        let e = PreferenceDataset::open(&path).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: {expected}", path.display()));
    }
    let full = gz(body(2000, 0).as_bytes());
    let path = write(d, "cut.jsonl.gz", &full[..full.len() / 2]);
    let msg = PreferenceDataset::open(&path).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}: corrupt or truncated compressed data after line ", path.display())),
        "{msg}"
    );
    let mut bad = zst(body(50, 0).as_bytes());
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    bad[mid + 1] ^= 0xff;
    let path = write(d, "flipped.jsonl.zst", bad);
    let msg = PreferenceDataset::open(&path).unwrap_err().to_string();
    assert!(msg.contains("flipped.jsonl.zst: corrupt or truncated compressed data"), "{msg}");
}

#[test]
fn folders_and_globs_are_one_dataset_numbered_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let (a, b, c) = (body(10, 0), body(12, 10), body(5, 22));
    write(&shards, "train-0.jsonl", &a);
    write(&shards, "train-1.jsonl.zst", zst(b.as_bytes()));
    write(&shards, "train-2.jsonl.gz", gz(c.as_bytes()));
    write(&shards, "README.md", "not data");
    write(&shards, ".hidden.jsonl", "{oops");
    let whole = open(write(dir.path(), "whole.jsonl", format!("{a}{b}{c}")));
    let folder = open(&shards);
    let glob = open(shards.join("train-*"));
    let cfg = config(3, false);
    let want = ids(&all(&whole, &tok, &cfg, DataPosition::default()));
    for data in [&folder, &glob] {
        assert_eq!((data.len(), data.n_shards()), (27, 3));
        let names: Vec<String> =
            data.shard_paths().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["train-0.jsonl", "train-1.jsonl.zst", "train-2.jsonl.gz"]);
        let got = all(data, &tok, &cfg, DataPosition::default());
        // Same pairs; line numbers are per shard.
        let strip = |v: Vec<Seen>| v.into_iter().map(|(i, m, _, p)| (i, m, p)).collect::<Vec<_>>();
        assert_eq!(strip(ids(&got)), strip(want.clone()));
        let src = data.source(10);
        assert_eq!((src.file.file_name().unwrap().to_str().unwrap(), src.line), ("train-1.jsonl.zst", 1));
        assert_eq!(data.source(26).line, 5);
        let stats = without_sources(count_batches(data, &tok, &cfg).unwrap());
        assert_eq!(stats, without_sources(count_batches(&whole, &tok, &cfg).unwrap()));
        // Errors name the shard and its own line.
        let e = count_batches(data, &tok, &DataConfig { on_bad_row: OnBadRow::Error, ..cfg.clone() });
        let msg = e.unwrap_err().to_string();
        assert!(msg.ends_with("train-0.jsonl:4: field `prompt` must be a string, found a number"), "{msg}");
        let e = data.read_row(17).unwrap_err().to_string();
        assert!(e.contains("train-1.jsonl.zst:9: field `prompt` must be a string"), "{e}");
    }
}

#[test]
fn folders_and_patterns_without_data_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    write(&empty, "notes.txt", "x");
    let msg = PreferenceDataset::open(&empty).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{}: the folder has no data files", empty.display())), "{msg}");
    let pattern = dir.path().join("nothing-*.jsonl");
    let msg = PreferenceDataset::open(&pattern).unwrap_err().to_string();
    assert_eq!(msg, format!("{}: the pattern matches no file", pattern.display()));
    // An empty shard among good ones is named.
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    write(&shards, "a.jsonl", row("Hello", " world", " there"));
    let empty_shard = write(&shards, "b.jsonl", "");
    let msg = PreferenceDataset::open(&shards).unwrap_err().to_string();
    assert_eq!(msg, format!("{}: the data file is empty", empty_shard.display()));
}

fn streamed(dir: &Path, n: usize) -> (Arc<PreferenceDataset>, PathBuf) {
    let shards = dir.join("streamed");
    std::fs::create_dir_all(&shards).unwrap();
    let text = body(n, 0);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let (first, second) = lines.split_at(n / 3);
    write(&shards, "a.jsonl.zst", zst(first.concat().as_bytes()));
    write(&shards, "b.jsonl", second.concat());
    (open(&shards), shards)
}

#[test]
fn streamed_data_is_shuffled_by_a_seeded_buffer_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let (data, _) = streamed(dir.path(), 60);
    assert!(!data.random_access());
    let cfg = DataConfig { shuffle_buffer: 8, ..config(4, true) };
    let lines = |cfg: &DataConfig, epoch| -> Vec<(String, u64)> {
        all(&data, &tok, cfg, DataPosition::start_of(epoch))
            .iter()
            .flat_map(|(b, _)| b.sources.iter().map(|s| (s.file.display().to_string(), s.line)))
            .collect()
    };
    let e0 = lines(&cfg, 0);
    assert_eq!(e0, lines(&cfg, 0), "deterministic");
    assert_ne!(e0, lines(&cfg, 1), "new order each epoch");
    let sequential = lines(&config(4, false), 0);
    assert_ne!(e0, sequential);
    let (mut a, mut b) = (e0.clone(), sequential.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b, "a permutation of the kept rows");
    // A buffer as large as the data shuffles within... everything; a buffer of 1 only
    // reorders the shards.
    let one = lines(&DataConfig { shuffle_buffer: 1, ..cfg.clone() }, 0);
    let mut runs = one.clone();
    runs.dedup_by(|x, y| x.0 == y.0);
    assert!(runs.len() <= 2, "shard by shard: {one:?}");

    // Resuming from any position yields exactly the remaining batches, skips included.
    let start = DataPosition::start_of(2);
    let full = all(&data, &tok, &cfg, start);
    for k in 0..full.len() {
        assert_eq!(all(&data, &tok, &cfg, full[k].1), full[k + 1..], "resume after batch {k}");
    }
    let mut iter = batches(data.clone(), tok.clone(), cfg.clone(), start).unwrap();
    iter.by_ref().for_each(drop);
    assert_eq!(iter.skips(), &count_batches(&data, &tok, &cfg).unwrap().skips);
}

#[test]
fn batches_do_not_depend_on_the_number_of_tokenizer_threads() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let plain = open(write(dir.path(), "p.jsonl", body(300, 0)));
    let (stream, _) = streamed(dir.path(), 300);
    for data in [&plain, &stream] {
        let base = DataConfig { tokenizer_threads: 1, ..config(5, true) };
        let want = all(data, &tok, &base, DataPosition::start_of(1));
        let stats = count_batches(data, &tok, &base).unwrap();
        for threads in [0, 2, 3] {
            let cfg = DataConfig { tokenizer_threads: threads, ..base.clone() };
            assert_eq!(all(data, &tok, &cfg, DataPosition::start_of(1)), want, "{threads} threads");
            assert_eq!(count_batches(data, &tok, &cfg).unwrap(), stats);
        }
        // An error stops at the same row whatever the thread count.
        let cfg = DataConfig { on_bad_row: OnBadRow::Error, tokenizer_threads: 3, ..base.clone() };
        let mut iter = batches(data.clone(), tok.clone(), cfg, DataPosition::default()).unwrap();
        let before: usize = iter.by_ref().take_while(Result::is_ok).count();
        let cfg1 = DataConfig { on_bad_row: OnBadRow::Error, ..base.clone() };
        let mut iter1 = batches(data.clone(), tok.clone(), cfg1, DataPosition::default()).unwrap();
        assert_eq!(iter1.by_ref().take_while(Result::is_ok).count(), before);
        assert_eq!(iter.position(), iter1.position());
    }
}
