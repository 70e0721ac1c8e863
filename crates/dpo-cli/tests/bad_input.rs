//! Bad input stops the run before anything is written: a clear message naming the file, line
//! and field (or the missing file / unknown architecture), a non-zero exit, and no `output_dir`.

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;

mod common;

/// Runs dpo-train on `train` (and `model`) and returns (success, stderr, output_dir).
fn run(dir: &Path, model: &Path, train: &Path, extra: &[&str]) -> (bool, String, PathBuf) {
    let out = dir.join("out");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\ntrain_file = \"{}\"\noutput_dir = \"{}\"\nmax_steps = 2\nbatch_size = 2\nprogress_bar = false\n",
            model.display(),
            train.display(),
            out.display()
        ),
    )
    .unwrap();
    let o =
        Command::new(env!("CARGO_BIN_EXE_dpo-train")).arg("--config").arg(&cfg).args(extra).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned(), out)
}

fn rows(lines: &[&str]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

const GOOD: &str = r#"{"prompt": "Hello", "chosen": " there", "rejected": " you"}"#;

#[test]
fn bad_rows_name_file_line_and_field_and_write_nothing() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("malformed json", r#"{"prompt": "x", "chosen": "#, &[":3:", "malformed JSON"]),
        ("missing field", r#"{"prompt": "x", "chosen": "a"}"#, &[":3:", "`rejected`"]),
        ("wrong type", r#"{"prompt": "x", "chosen": 5, "rejected": "b"}"#, &[":3:", "`chosen`", "number"]),
    ];
    for (what, bad, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.jsonl");
        std::fs::write(&train, rows(&[GOOD, GOOD, bad, GOOD])).unwrap();
        let (ok, err, out) = run(dir.path(), &fixtures().join("model"), &train, &[]);
        assert!(!ok, "{what}: the run must fail");
        assert!(err.contains("train.jsonl"), "{what}: the message names the file: {err}");
        for n in *needles {
            assert!(err.contains(n), "{what}: the message should contain {n:?}: {err}");
        }
        assert!(!out.exists(), "{what}: nothing may be written to output_dir");
        // With on_bad_row = "skip" the same file trains, and the skip is counted.
        let (ok, err, out) =
            run(dir.path(), &fixtures().join("model"), &train, &["--set", "on_bad_row=\"skip\""]);
        assert!(ok, "{what}: skip mode should train: {err}");
        let summary = std::fs::read_to_string(out.join("run_summary.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
        let skipped = &v["data"]["train"]["skipped"];
        assert_eq!(
            skipped.as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
            1,
            "{what}: {skipped}"
        );
    }
}

#[test]
fn empty_file_missing_model_file_and_unknown_architecture_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (ok, err, out) = run(dir.path(), &fixtures().join("model"), &empty, &[]);
    assert!(!ok && err.contains("empty.jsonl") && err.contains("empty"), "{err}");
    assert!(!out.exists());
    // A missing file: named, with the OS's reason said once (not again by the error chain).
    let (ok, err, _) = run(dir.path(), &fixtures().join("model"), &dir.path().join("missing.jsonl"), &[]);
    assert!(!ok && err.contains("missing.jsonl"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");

    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, rows(&[GOOD, GOOD])).unwrap();
    // A model folder without weights.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("model").join(f), model.join(f)).unwrap();
    }
    let (ok, err, out) = run(dir.path(), &model, &train, &[]);
    assert!(!ok && err.contains("model.safetensors"), "{err}");
    assert!(!out.exists());
    // An architecture the trainer does not build.
    let cfg = std::fs::read_to_string(model.join("config.json"))
        .unwrap()
        .replace("Qwen2ForCausalLM", "GPT2LMHeadModel");
    std::fs::write(model.join("config.json"), cfg.replace("\"qwen2\"", "\"gpt2\"")).unwrap();
    let (ok, err, out) = run(dir.path(), &model, &train, &[]);
    assert!(!ok && err.contains("GPT2LMHeadModel") && err.contains("config.json"), "{err}");
    assert!(!out.exists());
}
