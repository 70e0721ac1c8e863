//! Parity with PyTorch + transformers on tiny random-init models (`scripts/make_fixtures.py`):
//! per-sequence completion log-probs and the gradient of every parameter, for Llama (tied and
//! untied, with and without biases, Llama-3 rope scaling), Qwen2 (tied and untied) and Mistral.
//! References are float64; the f64 run must agree to ~1e-9, the f32 run to 1e-4 (log-probs) and
//! 1e-3 relative (gradients). A parameter without a gradient fails the test. Each model runs with
//! the fused ops (`dpo_model::ops`, the default) and with the slow path of plain candle ops, and
//! with the blocks' hand-written backward (`manual_backward`, stacked projections included).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, TensorId};
use dpo_model::{AttentionMask, Checkpoint, Policy};
use dpo_trainer::logprobs::{CompletionIndex, LmHead, sequence_logps};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(name)
}

struct Batch {
    ids: Vec<u32>,
    attention: Vec<u8>,
    completion: Vec<u8>,
    rows: usize,
    seq: usize,
}

fn load_batch(dir: &std::path::Path) -> Batch {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    let rows2d = |key: &str| -> Vec<Vec<u64>> { serde_json::from_value(v[key].clone()).unwrap() };
    let ids = rows2d("input_ids");
    let (rows, seq) = (ids.len(), ids[0].len());
    Batch {
        ids: ids.concat().into_iter().map(|x| x as u32).collect(),
        attention: rows2d("attention_mask").concat().into_iter().map(|x| x as u8).collect(),
        completion: rows2d("completion_mask").concat().into_iter().map(|x| x as u8).collect(),
        rows,
        seq,
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// How the gradients are computed: candle's autograd through the whole model, or the blocks'
/// hand-written backward ([`dpo_model::CausalLm::manual_grads`], stacked projections included).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Backward {
    Autograd,
    Manual,
}

fn check(name: &str, dtype: DType, fused: bool, logp_tol: f64, grad_rel_tol: f64) {
    check_with(name, dtype, fused, Backward::Autograd, logp_tol, grad_rel_tol);
}

fn check_with(name: &str, dtype: DType, fused: bool, backward: Backward, logp_tol: f64, grad_rel_tol: f64) {
    let dir = fixture(name);
    let dev = Device::Cpu;
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let batch = load_batch(&dir);
    let ck = Checkpoint::open(&dir, None).unwrap();
    let mut policy = Policy::load(&ck, dtype, dtype, &dev).unwrap();
    assert!(policy.model.fused_ops() == dpo_model::default_fused_ops(&dev));
    policy.model.set_fused_ops(fused);
    let name = &format!("{name} (fused ops {}, {backward:?})", if fused { "on" } else { "off" });

    let ids = Tensor::from_vec(batch.ids.clone(), (batch.rows, batch.seq), &dev).unwrap();
    let mask = AttentionMask::causal(&batch.attention, batch.rows, batch.seq, None, &dev).unwrap();
    let index = CompletionIndex::new(&batch.ids, &batch.completion, batch.rows, batch.seq, &dev).unwrap();
    let hidden = policy.model.hidden_states(&ids, &mask).unwrap();
    // A small chunk so that the chunked path (several chunks, a ragged last one) is exercised.
    let logps = sequence_logps(&hidden, &LmHead::of(&policy.model, 7).unwrap(), &index).unwrap();

    let want = &expected["logps"];
    let got = logps.to_dtype(DType::F64).unwrap();
    let d = max_abs(&(&got - want).unwrap());
    assert!(d < logp_tol, "{name} {dtype:?}: log-probs differ by {d}\n got {got}\nwant {want}");
    let counts: Vec<f64> = expected["ntokens"].to_vec1().unwrap();
    assert_eq!(index.counts.iter().map(|&c| c as f64).collect::<Vec<_>>(), counts);

    let coeffs = expected["objective_coeffs"].to_dtype(dtype).unwrap();
    let objective = |logps: Tensor| (logps.to_dtype(dtype)? * &coeffs)?.sum_all();
    let grads: HashMap<TensorId, Tensor> = match backward {
        Backward::Autograd => {
            let store = objective(logps).unwrap().backward().unwrap();
            policy
                .params
                .iter()
                .filter_map(|(_, v)| Some((v.id(), store.get(v.as_tensor())?.clone())))
                .collect()
        }
        Backward::Manual => {
            let head = LmHead::of(&policy.model, 7).unwrap();
            let m = &policy.model;
            m.manual_grads(&ids, &mask, |h| objective(sequence_logps(h, &head, &index)?), false).unwrap().1
        }
    };
    for (pname, var) in &policy.params {
        let want = expected
            .get(&format!("grad.{pname}"))
            .unwrap_or_else(|| panic!("{name}: no reference gradient for {pname}"));
        let got = grads
            .get(&var.id())
            .unwrap_or_else(|| panic!("{name} {dtype:?}: parameter {pname} received no gradient"))
            .to_dtype(DType::F64)
            .unwrap();
        let scale = max_abs(want);
        let rel = max_abs(&(&got - want).unwrap()) / scale.max(1e-12);
        assert!(
            rel < grad_rel_tol,
            "{name} {dtype:?}: gradient of {pname} off by {rel} (relative to max |g| = {scale})"
        );
    }
    let n_ref = expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(policy.params.len(), n_ref, "{name}: parameter count differs from the reference");
}

macro_rules! parity {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            for fused in [true, false] {
                check($name, DType::F64, fused, 1e-9, 1e-8);
                check($name, DType::F32, fused, 1e-4, 1e-3);
            }
            check_with($name, DType::F64, true, Backward::Manual, 1e-9, 1e-8);
            check_with($name, DType::F32, true, Backward::Manual, 1e-4, 1e-3);
        }
    )*};
}

parity! {
    llama_untied_llama3_rope => "llama-untied",
    llama_tied_with_biases => "llama-tied-bias",
    qwen2_tied => "qwen2-tied",
    qwen2_untied => "qwen2-untied",
    mistral_explicit_head_dim => "mistral",
}

#[test]
fn transformers_v4_and_v5_configs_agree() {
    for name in ["qwen2-untied", "llama-untied"] {
        let dir = fixture(name);
        let v5 = dpo_model::ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let v4 = dpo_model::ModelConfig::from_file(&dir.join("config.v4.json")).unwrap();
        assert_eq!(format!("{v5:?}"), format!("{v4:?}"), "{name}");
    }
}

#[test]
fn rope_inverse_frequencies_match_transformers() {
    for name in ["llama-untied", "qwen2-tied", "mistral"] {
        let dir = fixture(name);
        let cfg = dpo_model::ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let want: Vec<f64> = expected["rope_inv_freq"].to_vec1().unwrap();
        let got = dpo_model::rope::inv_freq(&cfg);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(((*g as f64) - w).abs() <= 1e-6 * w.abs(), "{name}: {got:?} vs {want:?}");
        }
    }
}
