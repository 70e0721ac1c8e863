//! The trainer reproduces TRL 1.16's DPOTrainer, step by step, in f32 on CPU.
//!
//! `scripts/trl_reference.py` ran TRL on `tests/fixtures/trl/` (tiny Qwen2, 42 pairs with
//! boundary-merge, EOS, truncation and drop cases; batch 4, gradient accumulation 2, linear
//! warmup, weight decay, clipping on some steps, 10 steps crossing an epoch boundary, eval at
//! steps 5 and 10). This test runs the same configuration and compares every logged number.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dpo_trainer::schedule::LrSchedule;
use dpo_trainer::{Silent, TrainConfig, Trainer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl")
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn trl_config(output_dir: &Path) -> TrainConfig {
    let f = fixtures();
    TrainConfig {
        model: f.join("model"),
        train_file: f.join("train.jsonl"),
        eval_file: Some(f.join("eval.jsonl")),
        output_dir: output_dir.to_path_buf(),
        beta: 0.1,
        learning_rate: 5e-3,
        lr_scheduler_type: LrSchedule::Linear,
        warmup_steps: 2.0,
        weight_decay: 0.05,
        max_grad_norm: 1.0,
        batch_size: 4,
        eval_batch_size: Some(4),
        gradient_accumulation_steps: 2,
        max_steps: Some(10),
        max_length: Some(40),
        shuffle: false,
        seed: 42,
        logging_steps: 1,
        eval_steps: Some(5),
        progress_bar: false,
        ..TrainConfig::default()
    }
}

#[test]
fn reproduces_trl_per_step_metrics() {
    reproduces_trl_with(|_| {});
}

/// The GPU levers do the same work another way: the same per-step numbers as TRL.
#[test]
fn reproduces_trl_with_the_manual_backward_checkpointing_or_prefix_sharing() {
    reproduces_trl_with(|c| c.manual_backward = true);
    reproduces_trl_with(|c| c.gradient_checkpointing = true);
    reproduces_trl_with(|c| c.prefix_sharing = true);
    reproduces_trl_with(|c| {
        c.prefix_sharing = true;
        c.manual_backward = true;
    });
    reproduces_trl_with(|c| {
        c.manual_backward = true;
        c.gradient_checkpointing = true;
    });
}

fn reproduces_trl_with(edit: impl Fn(&mut TrainConfig)) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = trl_config(tmp.path());
    edit(&mut cfg);
    let mut trainer = Trainer::new(cfg).unwrap();
    assert_eq!(trainer.counts.train.pairs, 41, "TRL keeps 41 of 42 train rows");
    assert_eq!(trainer.steps_per_epoch, 6);
    trainer.run(&mut Silent, None).unwrap();

    let ours = read_jsonl(&tmp.path().join("metrics.jsonl"));
    let theirs = read_jsonl(&fixtures().join("trl_metrics.jsonl"));
    let find = |records: &[Value], step: u64, eval: bool| -> Value {
        records
            .iter()
            .find(|r| {
                r["step"] == step
                    && r.get("eval_loss").is_some() == eval
                    && r.get("kind").is_none_or(|k| k == if eval { "eval" } else { "train" })
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {} record for step {step}", if eval { "eval" } else { "train" }))
    };
    let train_keys = [
        "loss",
        "grad_norm",
        "learning_rate",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "epoch",
    ];
    let mut worst = 0f64;
    for step in 1..=10u64 {
        let (a, b) = (find(&ours, step, false), find(&theirs, step, false));
        for k in train_keys {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            // log-probs are sums of ~30 terms of magnitude ~5: compare them relatively.
            let tol = if k.starts_with("logps") { 1e-4 * y.abs().max(1.0) } else { 1e-4 };
            assert!((x - y).abs() <= tol, "step {step} {k}: ours {x} vs TRL {y}");
            if !k.starts_with("logps") {
                worst = worst.max((x - y).abs());
            }
        }
    }
    for step in [5u64, 10] {
        let (a, b) = (find(&ours, step, true), find(&theirs, step, true));
        for k in [
            "eval_loss",
            "eval_rewards/chosen",
            "eval_rewards/rejected",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
        ] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4, "eval at step {step} {k}: ours {x} vs TRL {y}");
        }
    }
    eprintln!("largest difference to TRL over 10 steps (loss, grad_norm, lr, rewards): {worst:e}");

    // After 10 steps the weights themselves agree.
    let want: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("params_step10.safetensors"), &Device::Cpu).unwrap();
    for (name, var) in &trainer.policy.params {
        let w = &want[name];
        let d = (var.as_tensor().to_dtype(DType::F32).unwrap() - w).unwrap().abs().unwrap();
        let d = d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{name} differs from TRL's after 10 steps by {d}");
    }

    // The trained model is written in Hugging Face layout next to the metrics.
    let final_dir = tmp.path().join("final");
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(final_dir.join(f).is_file(), "final/{f} missing");
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps_run"], 10);
    assert_eq!(summary["stopped_because"], "step_budget");
    let clip = &summary["constraints"]["gradient_clipping"];
    assert_eq!(clip["clipped_steps"], 4, "TRL clipped steps 1, 3, 4 and 6");
}

/// `probe_largest_batch` (on by default, so the runs above include it) changes nothing of the
/// run, and probes the epoch's largest batch in either layout.
#[test]
fn the_largest_batch_probe_changes_nothing_and_is_the_epoch_s_largest() {
    use dpo_loader::{DataPosition, PreferenceDataset, PreferenceTokenizer, batches};
    use dpo_trainer::step::DeviceBatch;
    use std::sync::Arc;
    for prefix_sharing in [false, true] {
        let run = |probe: bool| {
            let tmp = tempfile::tempdir().unwrap();
            let mut cfg = trl_config(tmp.path());
            (cfg.prefix_sharing, cfg.probe_largest_batch) = (prefix_sharing, probe);
            let summary = Trainer::new(cfg).unwrap().run(&mut Silent, None).unwrap();
            let mut metrics = read_jsonl(&tmp.path().join("metrics.jsonl"));
            for m in &mut metrics {
                m.as_object_mut().unwrap().retain(|k, _| !dpo_trainer::metrics::is_measurement(k));
            }
            (metrics, summary["data"]["train"]["largest_batch_probed"].clone())
        };
        let (with_probe, shape) = run(true);
        let (without, no_shape) = run(false);
        assert_eq!(with_probe, without, "prefix_sharing = {prefix_sharing}");
        assert!(no_shape.is_null());

        let cfg = trl_config(Path::new("unused"));
        let ds = Arc::new(PreferenceDataset::open(&cfg.train_file).unwrap());
        let tok = Arc::new(PreferenceTokenizer::from_model_dir(&cfg.model).unwrap());
        let data_cfg = cfg.data_config(cfg.batch_size);
        let longest = batches(ds, tok, data_cfg, DataPosition::start_of(0))
            .unwrap()
            .map(|b| {
                let b = b.unwrap();
                let db = if prefix_sharing {
                    DeviceBatch::shared_prefix(&b, None, &Device::Cpu)
                } else {
                    DeviceBatch::new(&b, None, &Device::Cpu)
                };
                db.unwrap().ids.dims2().unwrap().1
            })
            .max()
            .unwrap();
        let rows = if prefix_sharing { cfg.batch_size } else { 2 * cfg.batch_size };
        assert_eq!(shape, serde_json::json!([rows, longest]), "prefix_sharing = {prefix_sharing}");
    }
}
