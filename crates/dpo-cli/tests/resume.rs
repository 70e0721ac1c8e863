//! Checkpoints survive SIGKILL and a resumed run is the uninterrupted run, number for number.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fixtures;
use serde_json::Value;

mod common;

fn write_config(dir: &Path, train: &Path, steps: u64) -> PathBuf {
    write_config_with(dir, train, steps, "")
}

/// The test config with `extra` TOML lines appended.
fn write_config_with(dir: &Path, train: &Path, steps: u64, extra: &str) -> PathBuf {
    let rest = format!(
        r#"learning_rate = 5e-3
warmup_steps = 2
weight_decay = 0.05
batch_size = 4
gradient_accumulation_steps = 2
max_length = 40
shuffle = true
max_steps = {steps}
logging_steps = 1
eval_steps = 4
save_steps = 2
save_total_limit = 2
progress_bar = false
{extra}"#
    );
    common::write_config(dir, train, &fixtures().join("eval.jsonl"), &rest)
}

fn dpo_train(config: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo-train"));
    c.arg("--config").arg(config).args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run_ok(mut c: Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "dpo-train failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Records without the fields that measure the machine (throughput, memory).
fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| !dpo_trainer::metrics::is_measurement(k));
            v
        })
        .collect()
}

/// Runs 12 steps uninterrupted and again killed once `checkpoint-<kill_at>` is written, then
/// resumed from it; both must match record for record and bit for bit. Returns the killed run's
/// folder and the trainer state it was resumed from.
fn kill_and_resume(extra: &str, kill_at: u64) -> (tempfile::TempDir, Value) {
    let train = fixtures().join("train.jsonl");
    let a = tempfile::tempdir().unwrap();
    run_ok(dpo_train(&write_config_with(a.path(), &train, 12, extra), &[]));

    let b = tempfile::tempdir().unwrap();
    let cfg_b = write_config_with(b.path(), &train, 12, extra);
    let mut child = dpo_train(&cfg_b, &[]).env("DPO_TRAIN_TEST_STEP_DELAY_MS", "150").spawn().unwrap();
    let ckpt = b.path().join(format!("out/checkpoint-{kill_at}/trainer_state.json"));
    while !ckpt.exists() {
        // The run has a finite budget: without the checkpoint it ends, and that fails here.
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!b.path().join("out/final").exists(), "the killed run must not have finished");
    let resumed_from: Value = serde_json::from_str(&std::fs::read_to_string(ckpt).unwrap()).unwrap();

    run_ok(dpo_train(&cfg_b, &["--resume", "latest"]));
    let (ma, mb) = (metrics(a.path()), metrics(b.path()));
    assert_eq!(ma.len(), mb.len(), "same number of records");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x, y, "resumed run differs from the uninterrupted one");
    }
    let wa = std::fs::read(a.path().join("out/final/model.safetensors")).unwrap();
    let wb = std::fs::read(b.path().join("out/final/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    (b, resumed_from)
}

#[test]
fn sigkill_then_resume_reproduces_the_uninterrupted_run() {
    let (b, _) = kill_and_resume("", 6);
    // save_total_limit = 2: only the two newest checkpoints remain.
    let mut kept: Vec<String> = std::fs::read_dir(b.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["checkpoint-10", "checkpoint-12"]);
}

#[test]
fn sigkill_mid_length_grouping_window_then_resume_reproduces_the_uninterrupted_run() {
    // Windows of 3 batches and 2 micro-batches a step: step 4 ends after batch 2 of a window.
    let (dir, state) = kill_and_resume("group_by_length = true\nlength_group_batches = 3", 4);
    assert_eq!(state["step"], 4);
    assert_eq!(state["data_position"]["batch_in_window"], 2, "{}", state["data_position"]);

    // checkpoint-10 is also inside a window (batch 20 = 2 of the window at batch 18): other
    // windows would not rebuild it, so this is refused even with --resume-allow-changed.
    let ckpt = dir.path().join("out/checkpoint-10");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(saved["data_position"]["batch_in_window"], 2);
    let cfg = dir.path().join("run.toml");
    let resume = ckpt.to_str().unwrap();
    let changed = ["--resume", resume, "--set", "max_steps=14", "--set", "length_group_batches=2"];
    let out = dpo_train(&cfg, &[&changed[..], &["--resume-allow-changed"]].concat()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("inside a length-grouping window"), "{err}");
}

/// A stop signal mid-run (SIGTERM from a scheduler, SIGINT from Ctrl-C): the run ends after its
/// step with a checkpoint of it although `save_steps` is unset, writes no final model, exits with
/// `128 + signal`, and resuming from that checkpoint gives the uninterrupted run, bit for bit.
#[cfg(unix)]
fn signal_then_resume(signal: i32) {
    let train = fixtures().join("train.jsonl");
    let no_saves = ["--set", "save_steps="];
    let a = tempfile::tempdir().unwrap();
    run_ok(dpo_train(&write_config(a.path(), &train, 12), &no_saves));

    let b = tempfile::tempdir().unwrap();
    let cfg_b = write_config(b.path(), &train, 12);
    let mut child = dpo_train(&cfg_b, &no_saves).env("DPO_TRAIN_TEST_STEP_DELAY_MS", "150").spawn().unwrap();
    let log = b.path().join("out/metrics.jsonl");
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"step\":3,")) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before the signal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + signal), "{err}");
    assert!(err.contains("--resume latest"), "{err}");

    let out_b = b.path().join("out");
    let checkpoints: Vec<String> = std::fs::read_dir(&out_b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let step: u64 = checkpoints[0]["checkpoint-".len()..].parse().unwrap();
    assert!((3..12).contains(&step), "stopped at step {step}");
    assert!(!out_b.join("final").exists(), "an interrupted run writes no final model");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out_b.join("run_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["stopped_because"], "interrupted");
    assert_eq!(summary["final_model"], Value::Null);

    run_ok(dpo_train(&cfg_b, &[&["--resume", "latest"][..], &no_saves].concat()));
    assert_eq!(metrics(a.path()), metrics(b.path()), "resumed run differs from the uninterrupted one");
    let wa = std::fs::read(a.path().join("out/final/model.safetensors")).unwrap();
    let wb = std::fs::read(out_b.join("final/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
}

#[cfg(unix)]
#[test]
fn sigterm_stops_with_a_checkpoint_and_resume_reproduces_the_uninterrupted_run() {
    signal_then_resume(libc::SIGTERM);
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_with_a_checkpoint_and_resume_reproduces_the_uninterrupted_run() {
    signal_then_resume(libc::SIGINT);
}

#[test]
fn resume_extends_the_budget_and_refuses_other_data_or_changed_hyperparameters() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    std::fs::copy(fixtures().join("train.jsonl"), &train).unwrap();
    let cfg = write_config(dir.path(), &train, 4);
    run_ok(dpo_train(&cfg, &[]));

    // A larger max_steps continues from checkpoint-4 up to step 6.
    run_ok(dpo_train(&cfg, &["--resume", "latest", "--set", "max_steps=6"]));
    let steps: Vec<u64> = metrics(dir.path())
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);

    // A changed hyperparameter is refused unless allowed.
    let out = dpo_train(&cfg, &["--resume", "latest", "--set", "max_steps=8", "--set", "beta=0.5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("beta"), "{err}");
    // So is switching length-grouped batching on (it changes the batches from here on).
    let out =
        dpo_train(&cfg, &["--resume", "latest", "--set", "max_steps=8", "--set", "group_by_length=true"])
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("group_by_length: false -> true"), "{err}");
    run_ok(dpo_train(
        &cfg,
        &["--resume", "latest", "--set", "max_steps=8", "--set", "beta=0.5", "--resume-allow-changed"],
    ));

    // Different data is refused, override or not.
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str("{\"prompt\": \"x\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
    std::fs::write(&train, text).unwrap();
    let out = dpo_train(&cfg, &["--resume", "latest", "--set", "max_steps=10", "--resume-allow-changed"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("different train_file"), "{err}");
}
