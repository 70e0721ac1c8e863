//! Loader benchmark: streams every batch of one epoch of a preference file through reading,
//! parsing, chat-template rendering, tokenization and collation (the prefetch thread plus the
//! tokenization pool, as the trainer runs it), then prints rows, pairs/s and peak RSS.
//!
//! `cargo run --release -p dpo-loader --example bench_loader -- DATA MODEL_DIR [--threads N]
//!  [--batch-size B] [--max-length L] [--shuffle] [--count]` (see scripts/bench-loader.sh)

use std::sync::Arc;
use std::time::Instant;

use dpo_loader::{
    DataConfig, DataPosition, OnBadRow, PreferenceDataset, PreferenceTokenizer, batches, count_batches,
};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (data, model) = match (args.first(), args.get(1)) {
        (Some(d), Some(m)) if !d.starts_with("--") => (d.clone(), m.clone()),
        _ => {
            eprintln!(
                "usage: bench_loader DATA MODEL_DIR [--threads N] [--batch-size B] [--max-length L] [--shuffle] [--count]"
            );
            std::process::exit(2);
        }
    };
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|k| args.get(k + 1)).cloned();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let cfg = DataConfig {
        max_length: Some(value("--max-length").map_or(1024, |v| v.parse().expect("--max-length"))),
        batch_size: value("--batch-size").map_or(8, |v| v.parse().expect("--batch-size")),
        shuffle: flag("--shuffle"),
        on_bad_row: OnBadRow::Skip,
        tokenizer_threads: value("--threads").map_or(0, |v| v.parse().expect("--threads")),
        ..DataConfig::default()
    };

    let t = Instant::now();
    let tokenizer = Arc::new(PreferenceTokenizer::from_model_dir(&model).expect("tokenizer"));
    let dataset = Arc::new(PreferenceDataset::open(&data).expect("data"));
    let open_s = t.elapsed().as_secs_f64();
    let bytes: u64 = dataset.shard_paths().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    println!(
        "data: {data} ({:.1} MiB on disk, {} rows, {} shard(s)); vocab {}; open+index {open_s:.2}s; rss {:.1} MiB",
        bytes as f64 / (1 << 20) as f64,
        dataset.len(),
        dataset.n_shards(),
        tokenizer.inner().get_vocab_size(true),
        peak_rss_mib()
    );

    if flag("--count") {
        let t = Instant::now();
        let stats = count_batches(&dataset, &tokenizer, &cfg).expect("count");
        let s = t.elapsed().as_secs_f64();
        println!("count_batches: {} pairs in {s:.1}s = {:.0} pairs/s", stats.pairs, stats.pairs as f64 / s);
    }

    let t = Instant::now();
    let iter =
        batches(dataset.clone(), tokenizer.clone(), cfg.clone(), DataPosition::start_of(0)).expect("batches");
    let mut prefetch = iter.prefetch(4).expect("prefetch");
    let (mut pairs, mut tokens, mut n_batches) = (0usize, 0usize, 0usize);
    let mut last_report = Instant::now();
    for batch in prefetch.by_ref() {
        let (batch, _) = batch.expect("batch");
        pairs += batch.n_pairs;
        tokens += batch.n_tokens;
        n_batches += 1;
        if last_report.elapsed().as_secs() >= 30 {
            last_report = Instant::now();
            let s = t.elapsed().as_secs_f64();
            eprintln!("  {pairs} pairs, {:.0} pairs/s, rss {:.1} MiB", pairs as f64 / s, peak_rss_mib());
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "stream: {n_batches} batches, {pairs} pairs, {tokens} tokens in {s:.1}s = {:.0} pairs/s, {:.2} M tokens/s; \
         skipped {}",
        pairs as f64 / s,
        tokens as f64 / s / 1e6,
        prefetch.skips()
    );
    println!("peak RSS (VmHWM): {:.1} MiB", peak_rss_mib());
}
