//! `output_dir/data_counts.json`: a later run into the same folder (a resume, above all) skips the
//! counting pass over the data only when data, tokenizer, settings and binary are the same; and
//! a checkpoint refuses to resume under another tokenizer.

use std::path::{Path, PathBuf};

use dpo_loader::OnBadRow;
use dpo_trainer::data_counts::FILE;
use dpo_trainer::{Resume, Silent, TrainConfig, Trainer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl")
}

/// The TRL fixture (model folder and data) copied into `dir`, so that a test can edit it.
fn config_in(dir: &Path) -> TrainConfig {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("model").join(f), dir.join("model").join(f)).unwrap();
    }
    for f in ["train.jsonl", "eval.jsonl"] {
        std::fs::copy(fixtures().join(f), dir.join(f)).unwrap();
    }
    TrainConfig {
        model: dir.join("model"),
        train_file: dir.join("train.jsonl"),
        eval_file: Some(dir.join("eval.jsonl")),
        output_dir: dir.join("out"),
        batch_size: 4,
        max_length: Some(40),
        max_steps: Some(1),
        save_steps: Some(1),
        progress_bar: false,
        ..TrainConfig::default()
    }
}

fn append_line(path: &Path, line: &str) {
    let mut text = std::fs::read_to_string(path).unwrap();
    text.push_str(line);
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_later_run_reuses_the_counts_only_for_the_same_data_tokenizer_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path());
    let mut first = Trainer::new(cfg.clone()).unwrap();
    assert!(!first.counts.reused);
    assert!(!cfg.output_dir.join(FILE).exists(), "nothing is written before the run starts");
    first.run(&mut Silent, None).unwrap();
    assert!(cfg.output_dir.join(FILE).exists());

    let again = Trainer::new(cfg.clone()).unwrap();
    assert!(again.counts.reused, "same data, tokenizer, settings and binary");
    assert_eq!((&again.counts.train, &again.counts.eval), (&first.counts.train, &first.counts.eval));
    assert_eq!(again.total_steps, first.total_steps);

    // Settings that decide which pairs are kept, or how many batches they make.
    let reused = |edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = cfg.clone();
        edit(&mut c);
        Trainer::new(c).unwrap().counts.reused
    };
    assert!(!reused(&|c| c.max_length = Some(30)));
    assert!(!reused(&|c| c.on_bad_row = OnBadRow::Skip));
    assert!(!reused(&|c| c.dataloader_drop_last = true));
    assert!(!reused(&|c| c.eval_batch_size = Some(3)));
    // ... and not the ones that do not.
    assert!(reused(&|c| c.learning_rate = 1.0));
    assert!(reused(&|c| c.group_by_length = true));

    // The eval data's bytes.
    let eval_text = std::fs::read_to_string(tmp.path().join("eval.jsonl")).unwrap();
    append_line(&tmp.path().join("eval.jsonl"), eval_text.lines().next().unwrap());
    let changed = Trainer::new(cfg.clone()).unwrap();
    assert!(!changed.counts.reused);
    assert_eq!(changed.counts.eval.as_ref().unwrap().pairs, first.counts.eval.as_ref().unwrap().pairs + 1);
    std::fs::write(tmp.path().join("eval.jsonl"), &eval_text).unwrap();
    assert!(reused(&|_| {}), "the record was not overwritten by a run that did not start");

    // The tokenizer's files: a chat template file that now takes precedence.
    std::fs::write(tmp.path().join("model/chat_template.jinja"), "{{ messages }}").unwrap();
    assert!(!reused(&|_| {}));
    std::fs::remove_file(tmp.path().join("model/chat_template.jinja")).unwrap();

    // An unreadable record: counted again, no error.
    std::fs::write(cfg.output_dir.join(FILE), "{not json").unwrap();
    let recounted = Trainer::new(cfg.clone()).unwrap();
    assert!(!recounted.counts.reused);
    assert_eq!(recounted.counts.train, first.counts.train);
}

#[test]
fn resuming_under_another_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_in(tmp.path());
    Trainer::new(cfg.clone()).unwrap().run(&mut Silent, None).unwrap();
    // The same tokens, another file: still another tokenizer as far as a checkpoint knows.
    append_line(&tmp.path().join("model/tokenizer_config.json"), "\n");
    let resume = Resume { checkpoint: "latest".into(), allow_changed: true };
    let more = TrainConfig { max_steps: Some(2), ..cfg.clone() };
    let err = Trainer::new(more.clone()).unwrap().run(&mut Silent, Some(&resume)).unwrap_err().to_string();
    assert!(err.contains("different tokenizer"), "{err}");
    // The original file resumes.
    std::fs::copy(
        fixtures().join("model/tokenizer_config.json"),
        tmp.path().join("model/tokenizer_config.json"),
    )
    .unwrap();
    Trainer::new(more).unwrap().run(&mut Silent, Some(&resume)).unwrap();
}
