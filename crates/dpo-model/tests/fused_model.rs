//! The model with fused ops (`CausalLm::with_fused_ops(true)`) against the slow path (plain
//! candle ops): hidden states and the gradient of every weight, on a small random Qwen2-like
//! model with padding, in f64, f32 and bf16. The ignored `fused_vs_slow_cpu_timing` measures
//! forward+backward time on the CPU for both paths.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use dpo_model::{AttentionMask, CausalLm, ModelConfig, parameter_shapes};

fn randn(n: usize, seed: u64, std: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n).map(|_| (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos() * std).collect()
}

fn config(hidden: usize, layers: usize, heads: usize, kv: usize, inter: usize) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 101, "hidden_size": {hidden},
            "intermediate_size": {inter}, "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "num_key_value_heads": {kv}, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": true}}"#
    ))
    .unwrap()
}

/// Random weights as `Var`s in `dtype` (norms near 1, the rest N(0, 0.05^2)).
fn weights(cfg: &ModelConfig, dtype: DType) -> (HashMap<String, Tensor>, Vec<(String, Var)>) {
    let mut map = HashMap::new();
    let mut vars = Vec::new();
    for (i, (name, shape)) in parameter_shapes(cfg).into_iter().enumerate() {
        let n = shape.iter().product();
        let v = if name.contains("norm") {
            randn(n, i as u64 + 1, 0.1).into_iter().map(|x| 1.0 + x).collect()
        } else {
            randn(n, i as u64 + 1, 0.05)
        };
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let var = Var::from_tensor(&t).unwrap();
        map.insert(name.clone(), var.as_tensor().clone());
        vars.push((name, var));
    }
    (map, vars)
}

struct Batch {
    ids: Tensor,
    mask: AttentionMask,
    upstream: Tensor,
}

/// `rows` rows of `seq` tokens; row r has `3 r` padding tokens at the end, the last row of
/// three or more is left-padded as well (fully masked query rows).
fn batch(cfg: &ModelConfig, rows: usize, seq: usize) -> Batch {
    let ids: Vec<u32> = (0..rows * seq).map(|i| ((i * 37 + 11) % cfg.vocab_size) as u32).collect();
    let valid: Vec<u8> = (0..rows * seq)
        .map(|i| {
            let (r, j) = (i / seq, i % seq);
            u8::from(j + 3 * r < seq && !(rows >= 3 && r == rows - 1 && j < 4))
        })
        .collect();
    let dev = Device::Cpu;
    let upstream = randn(rows * seq * cfg.hidden_size, 999, 1.0);
    Batch {
        ids: Tensor::from_vec(ids, (rows, seq), &dev).unwrap(),
        mask: AttentionMask::causal(&valid, rows, seq, None, &dev).unwrap(),
        upstream: Tensor::from_vec(upstream, (rows, seq, cfg.hidden_size), &dev).unwrap(),
    }
}

/// Hidden states and the gradient of `sum(hidden * upstream)` for every weight.
fn run(model: &CausalLm, vars: &[(String, Var)], b: &Batch) -> (Tensor, Vec<(String, Tensor)>) {
    let h = model.hidden_states(&b.ids, &b.mask).unwrap();
    let up = b.upstream.to_dtype(h.dtype()).unwrap();
    let grads = (&h * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars
        .iter()
        .map(|(n, v)| {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{n}: no gradient"));
            (n.clone(), g.to_dtype(DType::F64).unwrap())
        })
        .collect();
    (h.to_dtype(DType::F64).unwrap(), g)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let max =
        |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let d = max(&(a - b).unwrap());
    assert!(d.is_finite(), "non-finite difference");
    d / max(b).max(1e-300)
}

fn compare(dtype: DType, tol: f64) {
    let cfg = config(64, 2, 4, 2, 96);
    let (tensors, vars) = weights(&cfg, dtype);
    let model = CausalLm::from_tensors(cfg.clone(), &tensors, dtype).unwrap();
    assert!(model.fused_ops(), "fused ops are the CPU default");
    let b = batch(&cfg, 3, 19);
    let (h_s, g_s) = run(&model.clone().with_fused_ops(false), &vars, &b);
    // Fused ops with attention recomputed in the backward (the default), and with it kept.
    for recompute in [true, false] {
        let m = model.clone().with_fused_ops(true).with_attention_recompute(recompute);
        let (h_f, g_f) = run(&m, &vars, &b);
        let e = rel_err(&h_f, &h_s);
        eprintln!("{dtype:?} recompute={recompute} hidden states: {e:.2e}");
        assert!(e <= tol, "{dtype:?} recompute={recompute} hidden states: {e:e}");
        assert_eq!(g_f.len(), g_s.len());
        for ((n, a), (_, b)) in g_f.iter().zip(&g_s) {
            let e = rel_err(a, b);
            eprintln!("{dtype:?} recompute={recompute} gradient of {n}: {e:.2e}");
            assert!(
                e <= tol,
                "{dtype:?} recompute={recompute} gradient of {n}: relative error {e:e} > {tol:e}"
            );
        }
    }
}

#[test]
fn fused_model_matches_slow_path_f64() {
    compare(DType::F64, 1e-10);
}

#[test]
fn fused_model_matches_slow_path_f32() {
    compare(DType::F32, 1e-4);
}

#[test]
fn fused_model_matches_slow_path_bf16() {
    compare(DType::BF16, 5e-2);
}

/// The hidden states, checking that the forward ran `per_block` projections (matmuls) a block.
fn linear_ops(model: &CausalLm, b: &Batch, per_block: u32) -> Tensor {
    use dpo_model::profile::{self, Level};
    profile::set_level(Level::Ops);
    profile::start(&Device::Cpu).unwrap();
    let h = model.hidden_states(&b.ids, &b.mask).unwrap();
    profile::phase(&Device::Cpu, "forward").unwrap();
    profile::set_level(Level::Off);
    let phases = profile::take().unwrap();
    let linear = phases[0].ops.iter().find(|o| o.name == "linear").map_or(0, |o| o.count);
    assert_eq!(linear, per_block * model.config.num_hidden_layers as u32);
    h
}

/// q, k and v stacked into one projection (frozen weights) give the hidden states of three
/// projections, with biases (Qwen2) and without (Llama); trainable weights are never stacked,
/// so every one of them still gets its gradient.
#[test]
fn stacked_qkv_gives_the_same_hidden_states() {
    let llama = ModelConfig::from_json(
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 101, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false}"#,
    )
    .unwrap();
    for cfg in [config(64, 2, 4, 2, 96), llama] {
        assert_eq!(cfg.qkv_bias, cfg.arch == dpo_model::Arch::Qwen2);
        let (tensors, mut vars) = weights(&cfg, DType::F64);
        vars.retain(|(n, _)| n != "lm_head.weight"); // not a part of the hidden states
        let frozen: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        let b = batch(&cfg, 3, 19);
        let model = CausalLm::from_tensors(cfg.clone(), &frozen, DType::F64).unwrap();
        let three = model.clone().with_stacked_projections(false).unwrap();
        let stacked = model.with_stacked_projections(true).unwrap();
        let (h3, h1) = (three.hidden_states(&b.ids, &b.mask).unwrap(), linear_ops(&stacked, &b, 4));
        let e = rel_err(&h1, &h3);
        assert!(e < 1e-13, "{:?}: stacked vs three projections {e:e}", cfg.arch);
        // Trainable weights: the graph reaches q, k and v themselves.
        let trainable = CausalLm::from_tensors(cfg.clone(), &tensors, DType::F64).unwrap();
        let trainable = trainable.with_stacked_projections(true).unwrap();
        linear_ops(&trainable, &b, 7);
        let (h, g) = run(&trainable, &vars, &b);
        assert!(rel_err(&h, &h3) < 1e-13);
        assert!(g.iter().any(|(n, _)| n.ends_with("k_proj.weight")));
    }
}

/// `cargo test -p dpo-model --test fused_model -- --ignored --nocapture`
#[test]
#[ignore]
fn fused_vs_slow_cpu_timing() {
    let cfg = config(256, 4, 8, 2, 704);
    for dtype in [DType::F32, DType::BF16] {
        let (tensors, vars) = weights(&cfg, dtype);
        let model = CausalLm::from_tensors(cfg.clone(), &tensors, dtype).unwrap();
        let b = batch(&cfg, 4, 128);
        for (fused, recompute) in [(true, true), (true, false), (false, false), (true, true), (true, false)] {
            let m = model.clone().with_fused_ops(fused).with_attention_recompute(recompute);
            let start = Instant::now();
            let iters = 3;
            for _ in 0..iters {
                run(&m, &vars, &b);
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
            eprintln!(
                "{dtype:?} fused={fused} recompute_attention={recompute}: {ms:.1} ms per forward+backward (4 x 128 tokens, 4 layers)"
            );
        }
    }
}
