//! `precompute_ref_log_probs`: the cached reference log-probs train exactly as the online
//! reference does, over several shuffled epochs, and a later run reuses the cache.

use std::path::Path;
use std::process::{Command, Stdio};

use common::fixtures;
use serde_json::Value;

mod common;

/// 42 pairs in batches of 4 with `dataloader_drop_last`: each shuffled epoch leaves out a
/// different 2 pairs; 25 steps cover two and a half epochs.
fn run(dir: &Path, cache: &Path, extra: &str) -> (Vec<Value>, String) {
    let f = fixtures();
    run_on(dir, cache, &f.join("train.jsonl"), &f.join("eval.jsonl"), extra)
}

fn run_on(dir: &Path, cache: &Path, train: &Path, eval: &Path, extra: &str) -> (Vec<Value>, String) {
    let rest = format!(
        r#"ref_cache_dir = "{c}"
learning_rate = 5e-3
batch_size = 4
max_length = 40
shuffle = true
dataloader_drop_last = true
max_steps = 25
logging_steps = 1
eval_steps = 25
progress_bar = false
{extra}"#,
        c = cache.display(),
    );
    let path = common::write_config(dir, train, eval, &rest);
    let out = Command::new(env!("CARGO_BIN_EXE_dpo-train"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "dpo-train failed:\n{log}");
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| !dpo_trainer::metrics::is_measurement(k));
            v
        })
        .collect();
    (metrics, log)
}

fn losses(metrics: &[Value], key: &str) -> Vec<f64> {
    metrics.iter().filter_map(|m| m.get(key).and_then(Value::as_f64)).collect()
}

#[test]
fn precomputed_reference_trains_as_the_online_one_over_shuffled_epochs_and_is_reused() {
    let cache = tempfile::tempdir().unwrap();
    let online = tempfile::tempdir().unwrap();
    let (m_online, _) = run(online.path(), cache.path(), "");
    let first = tempfile::tempdir().unwrap();
    let (m_first, log) = run(first.path(), cache.path(), "precompute_ref_log_probs = true");
    assert!(log.contains("reference log-probs computed"), "{log}");

    // Same steps, same losses: the reference's numbers differ only by batch composition
    // (padding), so agreement is to f32 rounding.
    for key in ["loss", "rewards/margins", "eval_loss"] {
        let (a, b) = (losses(&m_online, key), losses(&m_first, key));
        assert!(!a.is_empty() && a.len() == b.len(), "{key}: {} vs {} records", a.len(), b.len());
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-4, "{key} record {step}: online {x} vs precomputed {y}");
        }
    }
    assert_eq!(losses(&m_online, "loss").len(), 25);

    // A second run finds the cache and reproduces the first precomputed run exactly.
    let second = tempfile::tempdir().unwrap();
    let (m_second, log) = run(second.path(), cache.path(), "precompute_ref_log_probs = true");
    assert!(log.contains("reference log-probs loaded"), "{log}");
    assert!(!log.contains("reference log-probs computed"), "{log}");
    assert_eq!(m_first, m_second);
}

/// The lines of `log` that say a cache of `split` was `what` ("computed" or "loaded").
fn cache_lines(log: &str, what: &str, split: &str) -> usize {
    log.lines().filter(|l| l.contains(&format!("reference log-probs {what}")) && l.contains(split)).count()
}

#[test]
fn each_dataset_has_its_own_cache_and_a_data_folder_or_pattern_trains() {
    let data = tempfile::tempdir().unwrap();
    let folder = data.path().join("train");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixtures().join("train.jsonl"), folder.join("part-0.jsonl")).unwrap();
    let eval = data.path().join("eval.jsonl");
    std::fs::copy(fixtures().join("eval.jsonl"), &eval).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let pre = "precompute_ref_log_probs = true";
    let first = tempfile::tempdir().unwrap();
    let (_, log) = run_on(first.path(), cache.path(), &folder, &eval, pre);
    assert_eq!(
        (cache_lines(&log, "computed", "train-"), cache_lines(&log, "computed", "eval-")),
        (1, 1),
        "{log}"
    );

    // The same lines with chosen and rejected swapped: the eval cache must not be reused (its
    // numbers would be the old texts'), the training cache is (through a pattern this time).
    let swapped: String = std::fs::read_to_string(&eval)
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: serde_json::Map<String, Value> = serde_json::from_str(l).unwrap();
            let (c, r) = (row.remove("chosen").unwrap(), row.remove("rejected").unwrap());
            row.insert("chosen".into(), r);
            row.insert("rejected".into(), c);
            serde_json::to_string(&row).unwrap() + "\n"
        })
        .collect();
    std::fs::write(&eval, swapped).unwrap();
    let pattern = folder.join("part-*.jsonl");
    let second = tempfile::tempdir().unwrap();
    let (m_cached, log) = run_on(second.path(), cache.path(), &pattern, &eval, pre);
    assert_eq!(cache_lines(&log, "loaded", "train-"), 1, "{log}");
    assert_eq!(cache_lines(&log, "computed", "eval-"), 1, "{log}");
    // ... and evaluates as the online reference does on the edited file.
    let online = tempfile::tempdir().unwrap();
    let (m_online, _) = run_on(online.path(), cache.path(), &pattern, &eval, "");
    let (a, b) = (losses(&m_online, "eval_loss"), losses(&m_cached, "eval_loss"));
    assert!(!a.is_empty() && a.len() == b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4, "eval_loss: online {x} vs precomputed {y}");
    }
}
