//! The GPU levers change how the work is done, never the numbers: prefix sharing (prompt once
//! per pair) and activation checkpointing give the standard layout's log-probs and gradients.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, TensorId};
use dpo_loader::{DataConfig, DataPosition, PreferenceDataset, PreferenceTokenizer, batches};
use dpo_model::{Checkpoint, Policy};
use dpo_trainer::logprobs::LmHead;
use dpo_trainer::step::DeviceBatch;

fn fixture_batches(max_length: usize) -> Vec<dpo_loader::Batch> {
    let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl");
    let ds = Arc::new(PreferenceDataset::open(f.join("train.jsonl")).unwrap());
    let tok = Arc::new(PreferenceTokenizer::from_model_dir(f.join("model")).unwrap());
    let cfg =
        DataConfig { max_length: Some(max_length), batch_size: 4, shuffle: false, ..DataConfig::default() };
    batches(ds, tok, cfg, DataPosition::start_of(0)).unwrap().map(|b| b.unwrap()).collect()
}

fn policy(dtype: DType, fused: bool) -> Policy {
    let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl/model");
    let ck = Checkpoint::open(&f, None).unwrap();
    let mut p = Policy::load(&ck, dtype, dtype, &Device::Cpu).unwrap();
    p.model.set_fused_ops(fused);
    p
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap();
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// `sum_i c_i logp_i` and its gradients, through the plain backward.
fn grads_plain(p: &Policy, db: &DeviceBatch) -> (Tensor, HashMap<TensorId, Tensor>) {
    let logps = db.logps(&p.model, 5).unwrap();
    let c = Tensor::arange(1u32, logps.dim(0).unwrap() as u32 + 1, &Device::Cpu)
        .unwrap()
        .to_dtype(logps.dtype())
        .unwrap();
    let obj = (logps.clone() * c).unwrap().sum_all().unwrap();
    let store = obj.backward().unwrap();
    let g = p
        .params
        .iter()
        .map(|(_, v)| (v.as_tensor().id(), store.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (logps, g)
}

#[test]
fn prefix_sharing_gives_the_same_logps_and_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
        for fused in [true, false] {
            let p = policy(dtype, fused);
            // max_length 40 truncates some rows: the shared layout must truncate identically.
            for batch in fixture_batches(40).iter().take(4) {
                let standard = DeviceBatch::new(batch, None, &Device::Cpu).unwrap();
                let shared = DeviceBatch::shared_prefix(batch, None, &Device::Cpu).unwrap();
                assert!(shared.ids.elem_count() < standard.ids.elem_count());
                let (la, ga) = grads_plain(&p, &standard);
                let (lb, gb) = grads_plain(&p, &shared);
                let d = max_diff(&la, &lb);
                assert!(d < tol * 100.0, "{dtype:?} fused={fused}: log-probs differ by {d}");
                for (name, v) in &p.params {
                    let (a, b) = (&ga[&v.as_tensor().id()], &gb[&v.as_tensor().id()]);
                    let rel = max_diff(a, b) / (max_diff(a, &a.zeros_like().unwrap()) + 1e-30);
                    assert!(
                        rel < tol * 10.0,
                        "{dtype:?} fused={fused}: gradient of {name} differs by {rel} (relative)"
                    );
                }
            }
        }
    }
}

#[test]
fn prefix_sharing_respects_a_sliding_window() {
    let p = policy(DType::F64, true);
    for batch in fixture_batches(40).iter().take(3) {
        for window in [1, 3, 7] {
            let standard = DeviceBatch::new(batch, Some(window), &Device::Cpu).unwrap();
            let shared = DeviceBatch::shared_prefix(batch, Some(window), &Device::Cpu).unwrap();
            let d = max_diff(&standard.logps(&p.model, 5).unwrap(), &shared.logps(&p.model, 5).unwrap());
            assert!(d < 1e-9, "window {window}: log-probs differ by {d}");
        }
        // The window matters: a window of 3 is not the full causal mask.
        let full = DeviceBatch::new(batch, None, &Device::Cpu).unwrap().logps(&p.model, 5).unwrap();
        let w3 = DeviceBatch::new(batch, Some(3), &Device::Cpu).unwrap().logps(&p.model, 5).unwrap();
        assert!(max_diff(&full, &w3) > 1e-3);
    }
}

/// The block-by-block backward passes: autograd with activation checkpointing, the manual
/// backward from saved tensors, the manual backward with checkpointing.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Checkpointed,
    Manual,
    ManualCheckpointed,
}

/// `sum_i c_i logp_i` and its gradients through one of the block-by-block backward passes.
fn grads_by_block(
    p: &Policy,
    db: &DeviceBatch,
    c: &Tensor,
    mode: Mode,
) -> (Tensor, HashMap<TensorId, Tensor>) {
    let head = |hidden: &Tensor| {
        let logps = dpo_trainer::logprobs::sequence_logps(hidden, &LmHead::of(&p.model, 5)?, &db.index)?;
        (logps * c)?.sum_all()
    };
    let r = match mode {
        Mode::Checkpointed => p.model.checkpointed_grads(&db.ids, &db.mask, head),
        Mode::Manual => p.model.manual_grads(&db.ids, &db.mask, head, false),
        Mode::ManualCheckpointed => p.model.manual_grads(&db.ids, &db.mask, head, true),
    };
    r.unwrap()
}

#[test]
fn activation_checkpointing_and_the_manual_backward_give_the_same_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let p = policy(dtype, true);
        let batch = &fixture_batches(40)[1];
        for db in [
            DeviceBatch::new(batch, None, &Device::Cpu).unwrap(),
            DeviceBatch::shared_prefix(batch, None, &Device::Cpu).unwrap(),
            DeviceBatch::new(batch, Some(3), &Device::Cpu).unwrap(),
        ] {
            let (la, ga) = grads_plain(&p, &db);
            let c = Tensor::arange(1u32, la.dim(0).unwrap() as u32 + 1, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let want = (la * &c).unwrap().sum_all().unwrap();
            for mode in [Mode::Checkpointed, Mode::Manual, Mode::ManualCheckpointed] {
                let (value, gb) = grads_by_block(&p, &db, &c, mode);
                assert!(max_diff(&value, &want) < tol * 100.0);
                for (name, v) in &p.params {
                    let a = &ga[&v.as_tensor().id()];
                    let b = gb
                        .get(&v.as_tensor().id())
                        .unwrap_or_else(|| panic!("{mode:?}: no gradient for {name}"));
                    assert_eq!(b.dtype(), a.dtype());
                    let rel = max_diff(a, b) / (max_diff(a, &a.zeros_like().unwrap()) + 1e-30);
                    assert!(rel < tol, "{dtype:?} {mode:?}: gradient of {name} differs by {rel} (relative)");
                }
            }
        }
    }
}

/// With `recompute_attention` off the manual backward reads the probabilities its forward kept
/// instead of computing them again: the same value and gradients, bit for bit (f32, and bf16 over
/// f32 master weights; both layouts; with checkpointing, where each block's are kept in turn).
#[test]
fn the_manual_backward_from_kept_probabilities_is_exact() {
    let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl/model");
    let ck = Checkpoint::open(&f, None).unwrap();
    let bits = |t: &Tensor| -> Vec<u64> {
        let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let batch = &fixture_batches(40)[2];
    for compute in [DType::F32, DType::BF16] {
        let recompute = Policy::load(&ck, DType::F32, compute, &Device::Cpu).unwrap();
        let mut keep = Policy::load(&ck, DType::F32, compute, &Device::Cpu).unwrap();
        keep.model = keep.model.with_attention_recompute(false);
        for db in [
            DeviceBatch::new(batch, None, &Device::Cpu).unwrap(),
            DeviceBatch::shared_prefix(batch, None, &Device::Cpu).unwrap(),
        ] {
            let c = Tensor::arange(1u32, 2 * db.pairs as u32 + 1, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            for mode in [Mode::Manual, Mode::ManualCheckpointed] {
                let (va, ga) = grads_by_block(&recompute, &db, &c, mode);
                let (vb, gb) = grads_by_block(&keep, &db, &c, mode);
                assert_eq!(bits(&va), bits(&vb), "{compute:?} {mode:?}: value");
                for ((name, a), (_, b)) in recompute.params.iter().zip(&keep.params) {
                    let (a, b) = (&ga[&a.as_tensor().id()], &gb[&b.as_tensor().id()]);
                    assert_eq!(bits(a), bits(b), "{compute:?} {mode:?}: gradient of {name}");
                }
            }
        }
    }
}

/// bf16 compute over f32 master weights (the GPU setting): the manual backward is as close to
/// the f32 gradients as autograd's bf16 backward is (every gradient f32).
#[test]
fn manual_backward_in_bf16_over_f32_weights_matches_autograd() {
    let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl/model");
    let ck = Checkpoint::open(&f, None).unwrap();
    let exact = Policy::load(&ck, DType::F32, DType::F32, &Device::Cpu).unwrap();
    let p = Policy::load(&ck, DType::F32, DType::BF16, &Device::Cpu).unwrap();
    let batch = &fixture_batches(40)[2];
    for shared in [false, true] {
        let layout = |b| {
            if shared {
                DeviceBatch::shared_prefix(b, None, &Device::Cpu)
            } else {
                DeviceBatch::new(b, None, &Device::Cpu)
            }
        };
        let db = layout(batch).unwrap();
        let (la, g_exact) = grads_plain(&exact, &db);
        let (_, g_auto) = grads_plain(&p, &db);
        let c = Tensor::arange(1u32, la.dim(0).unwrap() as u32 + 1, &Device::Cpu)
            .unwrap()
            .to_dtype(la.dtype())
            .unwrap();
        let (_, g_manual) = grads_by_block(&p, &db, &c, Mode::Manual);
        for ((name, v), (_, ve)) in p.params.iter().zip(&exact.params) {
            let want = &g_exact[&ve.as_tensor().id()];
            let (a, b) = (&g_auto[&v.as_tensor().id()], &g_manual[&v.as_tensor().id()]);
            assert_eq!((a.dtype(), b.dtype()), (DType::F32, DType::F32), "{name}");
            let scale = max_diff(want, &want.zeros_like().unwrap()) + 1e-30;
            let (ea, em) = (max_diff(a, want) / scale, max_diff(b, want) / scale);
            eprintln!("shared={shared} {name}: autograd bf16 {ea:.2e}, manual bf16 {em:.2e}");
            assert!(
                em < 3e-2 && em < 2.0 * ea + 2e-3,
                "{name}: manual bf16 error {em:e} vs autograd bf16 {ea:e}"
            );
        }
    }
}

/// `DPO_TRAIN_PROFILE=ops` on the manual backward: each phase is split into the model's ops
/// (every linear layer of every block counted), the ops add up to their phase, and the
/// gradients are those of the unprofiled run.
#[test]
fn the_op_profile_splits_each_phase_into_the_model_s_ops() {
    use dpo_model::profile::{self, Level};
    let p = policy(DType::F32, true);
    let db = DeviceBatch::new(&fixture_batches(40)[1], None, &Device::Cpu).unwrap();
    let c = Tensor::ones(db.index.counts.len(), DType::F32, &Device::Cpu).unwrap();
    let (_, plain) = grads_by_block(&p, &db, &c, Mode::Manual);
    profile::set_level(Level::Ops);
    profile::start(&Device::Cpu).unwrap();
    let (_, profiled) = grads_by_block(&p, &db, &c, Mode::Manual);
    profile::phase(&Device::Cpu, "backward").unwrap();
    profile::set_level(Level::Off);
    for (id, g) in &plain {
        assert_eq!(max_diff(g, &profiled[id]), 0.0);
    }
    let phases = profile::take().unwrap();
    let names: Vec<_> = phases.iter().map(|p| p.name).collect();
    assert_eq!(names, ["policy_fwd", "head_loss", "backward"]);
    let layers = p.model.config.num_hidden_layers as u32;
    let count =
        |phase: usize, op: &str| phases[phase].ops.iter().find(|o| o.name == op).map_or(0, |o| o.count);
    // Per block: q, k and v stacked into one projection, o, gate and up stacked, down.
    assert_eq!(count(0, "linear"), 4 * layers);
    assert_eq!(count(2, "linear_bwd"), 4 * layers);
    // RoPE's backward on dq and dk writes the stacked projection's gradient: one op per block.
    assert_eq!(count(2, "rope_bwd"), layers);
    for (phase, op, per_layer) in [
        (0, "attention", 1),
        (0, "rms_norm", 2),
        (0, "rope", 2),
        (0, "silu_mul", 1),
        (1, "log_probs", 0),
        (2, "attention_bwd", 1),
        (2, "rms_norm_bwd", 2),
        (2, "silu_mul_bwd", 1),
    ] {
        assert!(count(phase, op) >= (per_layer * layers).max(1), "{op}: {:?}", phases[phase]);
    }
    for ph in &phases {
        let sum: f64 = ph.ops.iter().map(|o| o.seconds).sum();
        assert!((sum - ph.seconds).abs() < 1e-3 + 1e-2 * ph.seconds, "{ph:?}");
    }
}
