//! A training run's CUDA paths, on a machine without a GPU. `scripts/cuda-emu.sh` (which CI runs)
//! puts an emulated libcuda in front of the `cuda` binary; with `CUDA_EMU_DRY` set it checks
//! every launch (our kernels' argument lists, pointers into live device memory, launch shapes)
//! and runs none, so every number is zero. What fails here is what would stop a run on a GPU on
//! the host's side: candle refusing a dtype or layout on CUDA, a CUDA-only branch that errors or
//! panics, a missing kernel. The bundled default trains 2 bf16 steps once per lever of
//! `scripts/bench-gpu.sh`, and resumes from a checkpoint (`scripts/cuda-dry-run.sh` runs more,
//! also at the benchmark's sizes).
//!
//! The emulated driver also counts the host's waits for the device: synchronizations, and copies
//! from the device, which into the host's pageable memory return only once the device has
//! reached them. At each the device's queue drains, and it waits for the host to issue more. A
//! step reads its statistics and the gradient norm once, after the optimizer's update is queued
//! (BENCHMARKS.md, eighteenth session); a read in the middle of a step (a `to_scalar`, say) would
//! idle the GPU for as long as the host takes to launch the rest. Without the emulated driver (`cargo test --features cuda`
//! on a machine with a GPU) the same runs train for real and nothing is counted.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variables of a run.
type Env = &'static [(&'static str, &'static str)];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether the emulated driver is the one the binary will load (`scripts/cuda-emu.sh` says so).
fn emulated() -> bool {
    std::env::var_os("CUDA_EMU").is_some()
}

/// Trains the bundled default for `steps` bf16 steps on CUDA into `out`, with `env` and `sets`
/// (`--set` arguments); `census`: the emulated driver's tally file. Returns the log; panics with
/// it on failure.
fn train(out: &Path, steps: usize, env: Env, sets: &[&str], census: Option<&Path>, resume: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo-train"));
    cmd.current_dir(repo()).args(["--config", "configs/default.toml"]);
    let common = [
        "device=\"cuda\"".to_string(),
        "dtype=\"bf16\"".to_string(),
        format!("max_steps={steps}"),
        "eval_on_start=false".to_string(),
        "eval_steps=2".to_string(),
        "logging_steps=1".to_string(),
        "save_steps=1".to_string(),
        "progress_bar=false".to_string(),
        "overwrite_output_dir=true".to_string(),
        format!("output_dir=\"{}\"", out.display()),
    ];
    for s in common.iter().map(String::as_str).chain(sets.iter().copied()) {
        cmd.args(["--set", s]);
    }
    if resume {
        cmd.args(["--resume", "latest", "--resume-allow-changed"]);
    }
    if emulated() {
        // The startup kernel check would compare zeros with zeros.
        cmd.env("CUDA_EMU_DRY", "1").env("DPO_TRAIN_SKIP_KERNEL_CHECK", "1");
    }
    if let Some(path) = census {
        cmd.env("CUDA_EMU_CENSUS", path);
    }
    cmd.envs(env.iter().copied());
    let done = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&done.stderr).into_owned();
    assert!(done.status.success(), "{sets:?} {env:?}, {steps} steps: dpo-train failed\n{log}");
    log
}

#[test]
fn cuda_dry_every_lever_trains() {
    let dir = tempfile::tempdir().unwrap();
    let runs: &[(&str, Env, &[&str])] = &[
        ("plain", &[], &[]),
        ("manual", &[], &["manual_backward=true"]),
        ("share-manual", &[], &["prefix_sharing=true", "manual_backward=true"]),
        (
            "precompute-share-manual",
            &[],
            &["prefix_sharing=true", "manual_backward=true", "precompute_ref_log_probs=true"],
        ),
        (
            "share-gc-manual",
            &[],
            &["prefix_sharing=true", "gradient_checkpointing=true", "manual_backward=true"],
        ),
        ("keep-attn", &[], &["recompute_attention=false"]),
        (
            "share-manual-keep-attn",
            &[],
            &["prefix_sharing=true", "manual_backward=true", "recompute_attention=false"],
        ),
        ("share-manual-bf16head", &[], &["prefix_sharing=true", "manual_backward=true", "lm_head_f32=false"]),
        (
            "share-manual-flash",
            &[("DPO_TRAIN_FLASH_ATTENTION", "1")],
            &["prefix_sharing=true", "manual_backward=true"],
        ),
    ];
    for (name, env, sets) in runs {
        train(&dir.path().join(name), 2, env, sets, None, false);
    }
    // Resume: 2 more steps from the checkpoint of the plain run's step 2.
    let plain = dir.path().join("plain");
    let log = train(&plain, 4, &[], &[], None, true);
    assert!(log.contains("resuming") && log.contains("checkpoint-2"), "no resume from step 2:\n{log}");
    let steps = std::fs::read_to_string(plain.join("metrics.jsonl")).unwrap();
    assert!(steps.contains("\"step\":4"), "the resumed run did not reach step 4:\n{steps}");
}

/// The host's waits for the device in the census file at `path`: its copies from the device,
/// synchronizations, synchronizing allocations and frees (every "(host)" line but the
/// asynchronous copies to the device, which return without waiting).
fn waits(path: &Path) -> usize {
    let census = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    census
        .lines()
        .filter(|l| l.starts_with("(host) ") && !l.starts_with("(host) cuMemcpyHtoDAsync"))
        .map(|l| l.split('\t').nth(1).unwrap().parse::<usize>().unwrap())
        .sum()
}

#[test]
fn cuda_dry_a_step_waits_for_the_device_once() {
    if !emulated() {
        eprintln!("not on the emulated driver (scripts/cuda-emu.sh): nothing counts the host's waits");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No evals and no checkpoints between steps: one step's waits are a run of 3 steps less one
    // of 2 (start-up and the final save are the same in both).
    let quiet = ["eval_steps=1000", "save_steps=1000"];
    let manual = ["prefix_sharing=true", "manual_backward=true"];
    for (name, sets) in [("autograd", quiet.to_vec()), ("manual", [&quiet[..], &manual[..]].concat())] {
        let count = |steps: usize| {
            let census = dir.path().join(format!("{name}-{steps}.tsv"));
            train(&dir.path().join(format!("{name}-{steps}")), steps, &[], &sets, Some(&census), false);
            waits(&census)
        };
        let (two, three) = (count(2), count(3));
        assert!(two > 0, "{name}: the census counted no wait at all");
        assert!(three > two, "{name}: a step copied nothing to the host: its loss was never read");
        // The batch's statistics, then the gradient norm and clipping factor (queued after the
        // update; the second copy finds the device done).
        assert!(
            three - two <= 2,
            "{name}: a step waits for the device {} times ({two} in 2 steps, {three} in 3)",
            three - two
        );
    }
}

/// The device memory pool's figures of each training record (`memory/device_allocated_gib`,
/// `memory/device_peak_gib`), by step.
fn device_memory(out: &Path) -> Vec<(u64, f64, f64)> {
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let records = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    let gib = |r: &serde_json::Value, k: &str| {
        r[k].as_f64().unwrap_or_else(|| panic!("a training record without `{k}`: {r}"))
    };
    records
        .filter(|r| r.get("loss").is_some())
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                gib(&r, "memory/device_allocated_gib"),
                gib(&r, "memory/device_peak_gib"),
            )
        })
        .collect()
}

#[test]
fn cuda_dry_between_steps_the_device_holds_the_models_and_moments_alone() {
    if !emulated() {
        eprintln!("not on the emulated driver (scripts/cuda-emu.sh): its pool is not the one measured here");
        return;
    }
    // Every row the same pair: every batch has the same shapes, so every step allocates the same
    // tensors. What a step leaves behind (a tensor kept from one step to the next, a cache that
    // grows, a small tensor that is a view of a large one) shows in the device memory in use at
    // the step's record, after its update.
    let dir = tempfile::tempdir().unwrap();
    let row =
        std::fs::read_to_string(repo().join("data/train.jsonl")).unwrap().lines().next().unwrap().to_string();
    let train_file = dir.path().join("same.jsonl");
    std::fs::write(&train_file, format!("{row}\n").repeat(64)).unwrap();
    let data = format!("train_file=\"{}\"", train_file.display());
    let quiet = [data.as_str(), "eval_steps=1000", "save_steps=1000"];
    let manual = [&quiet[..], &["prefix_sharing=true", "manual_backward=true"]].concat();
    let precomputed = [&manual[..], &["precompute_ref_log_probs=true"]].concat();
    // Bytes a parameter: the policy's f32 weights and AdamW's two f32 moments (12), and the bf16
    // reference's weights (2) unless its log-probs are precomputed. (Two bugs this caught: each
    // norm weight's gradient a view that kept its backward's `[tokens + 1, hidden]` f32 buffer,
    // 1 GiB on the GPU benchmark; AdamW's moments as two clones of one zero tensor, so that the
    // fused CUDA update, in place, kept one moment where there are two: 10 bytes a parameter.)
    for (name, sets, per_param) in
        [("autograd", quiet.to_vec(), 14), ("manual", manual, 14), ("manual-precomputed", precomputed, 12)]
    {
        let out = dir.path().join(name);
        let log = train(&out, 6, &[], &sets, None, false);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run_summary.json")).unwrap()).unwrap();
        let models_and_moments = per_param * summary["model"]["parameters"].as_u64().unwrap();
        let steps = device_memory(&out);
        assert_eq!(steps.len(), 6, "{name}: a record per step");
        let gib = (1u64 << 30) as f64;
        for &(step, held, _) in &steps {
            let held = (held * gib).round() as u64;
            assert_eq!(
                held, models_and_moments,
                "{name}: after step {step} the device holds {held} bytes, the models and moments \
                 {models_and_moments} ({per_param} a parameter): the step left tensors behind"
            );
        }
        let (_, held, peak) = steps[1];
        assert!(peak > held, "{name}: the pool's peak {peak} GiB, {held} in use between steps");
        for &(step, _, p) in &steps[2..] {
            assert_eq!(p, peak, "{name}: the peak grew to {p} GiB by step {step} (step 2: {peak})");
        }
        // The driver's own count of the whole run's peak (three decimals) is at least the pool's.
        let emulated_peak: f64 = log
            .split("peak device memory ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no peak from the emulated driver:\n{log}"));
        assert!(
            peak <= emulated_peak + 5e-4,
            "{name}: the pool's peak {peak} GiB, the driver's {emulated_peak}"
        );
    }
}
