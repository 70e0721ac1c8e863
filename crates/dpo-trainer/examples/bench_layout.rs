//! Host time of a batch's device layout at the GPU benchmark's shape (8 pairs, prompt 256 +
//! completions 256 + 256 tokens): building it (`HostBatch`, on the prefetch thread since the
//! tenth session) and uploading it (`HostBatch::upload`, on the training thread), for the
//! standard and the prefix-sharing layouts. On the CPU device the upload is a copy (and, for the
//! shared layout, the mask's conversion to an f32 bias); on a GPU, a copy to the device.
//!
//! `cargo run --release -p dpo-trainer --example bench_layout`

use std::time::Instant;

use candle_core::Device;
use dpo_loader::Batch;
use dpo_trainer::step::HostBatch;

fn main() -> candle_core::Result<()> {
    let (pairs, prompt, completion) = (8usize, 256usize, 256usize);
    let (rows, seq) = (2 * pairs, prompt + completion);
    let batch = Batch {
        n_pairs: pairs,
        seq_len: seq,
        input_ids: (0..rows * seq).map(|i| (i % 1000) as u32).collect(),
        attention_mask: vec![1; rows * seq],
        completion_mask: (0..rows * seq).map(|i| u8::from(i % seq >= prompt)).collect(),
        sources: Vec::new(),
        n_tokens: rows * seq,
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for sharing in [false, true] {
        let (mut build, mut upload) = (Vec::new(), Vec::new());
        for _ in 0..21 {
            let t = Instant::now();
            let host = HostBatch::of(&batch, sharing, None);
            build.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let db = host.upload(&Device::Cpu)?;
            upload.push(t.elapsed().as_secs_f64() * 1e3);
            drop(db);
        }
        println!(
            "{} layout: build {:.2} ms (prefetch thread), upload {:.2} ms (training thread); median of 21",
            if sharing { "prefix-sharing" } else { "standard" },
            median(build),
            median(upload)
        );
    }
    Ok(())
}
