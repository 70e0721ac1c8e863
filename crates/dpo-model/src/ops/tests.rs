//! CPU tests: every fused op against its slow reference, forward and every gradient.

use candle_core::{D, DType, Device, Tensor, Var};

use super::check::{Case, Input, cases, compare, randn_tensor, test_mask};
use super::*;

const CPU: Device = Device::Cpu;

/// Asserts that fused and reference agree on the output and every gradient within `tol`
/// (relative to the largest reference value). With `round`, the reference is the slow path in
/// f32 on the same `dt`-rounded inputs; otherwise the slow path in `dt`. Returns the worst error.
fn assert_close(case: &Case, dt: DType, tol: f64, round: bool) -> f64 {
    assert_close_floor(case, dt, tol, round, 1e-30)
}

/// [`assert_close`] with errors taken relative to `max(max |reference|, floor)`.
fn assert_close_floor(case: &Case, dt: DType, tol: f64, round: bool, floor: f64) -> f64 {
    let up = case.upstream(11).unwrap();
    let fused = case.run(true, &CPU, dt, &up, None).unwrap();
    let want = if round {
        case.run(false, &CPU, DType::F32, &up, Some(dt)).unwrap()
    } else {
        case.run(false, &CPU, dt, &up, None).unwrap()
    };
    assert_eq!(fused.out.dtype(), dt, "{}: output dtype", case.op);
    assert_eq!(fused.out.dims(), want.out.dims(), "{}: output shape", case.op);
    let mut worst = 0f64;
    let pairs = std::iter::once(("out", &fused.out, &want.out))
        .chain(fused.grads.iter().zip(&want.grads).map(|((n, g), (_, w))| (*n, g, w)));
    for (what, got, w) in pairs {
        assert_eq!(got.dims(), w.dims(), "{} {what}: shape", case.op);
        let (d, scale, finite) = compare(got, w).unwrap();
        let rel = d / scale.max(floor);
        eprintln!("{} {dt:?} {} {what}: max_abs {d:.3e} rel {rel:.3e}", case.op, case.shape);
        assert!(finite, "{} {dt:?} {what}: non-finite values", case.op);
        assert!(rel <= tol, "{} {dt:?} {} {what}: relative error {rel:e} > {tol:e}", case.op, case.shape);
        worst = worst.max(rel);
    }
    assert_eq!(fused.grads.len(), case.inputs.iter().filter(|i| i.grad).count());
    worst
}

/// `t`'s values as f32 bits (exact for f32 and the 16-bit floats), for bit-for-bit comparisons.
fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

fn cases_named(op: &str) -> Vec<Case> {
    let v: Vec<Case> = cases(false)
        .unwrap()
        .into_iter()
        .filter(|c| c.op == op || c.op.starts_with(&format!("{op}(")))
        .collect();
    assert!(!v.is_empty());
    v
}

fn check_op(op: &str) {
    for case in cases_named(op) {
        assert_close(&case, DType::F64, 1e-12, false);
        assert_close(&case, DType::F32, 1e-5, false);
        assert_close(&case, DType::BF16, 1.6e-2, true);
        assert_close(&case, DType::F16, 2e-3, true);
        // Against the bf16 slow path itself (which rounds at every step): looser.
        assert_close(&case, DType::BF16, 4e-2, false);
    }
}

#[test]
fn masked_softmax_matches_slow_path() {
    check_op("masked_softmax");
}

#[test]
fn attention_matches_slow_path() {
    check_op("attention");
}

/// The forward that keeps `P` and the backward from it give what the recomputing pair gives,
/// bit for bit, whole and a row at a time; inputs with a graph are refused.
#[test]
fn attention_keeping_probs_equals_recomputing() {
    for dt in [DType::F32, DType::BF16] {
        for ((r, h, kv, s, d), budget) in
            [((3, 4, 2, 70, 16), SCORE_BUDGET), ((3, 4, 2, 70, 16), 1), ((2, 3, 3, 29, 8), 1)]
        {
            let x = |dims: &[usize], seed| randn_tensor(dims, seed, 1.0).unwrap().to_dtype(dt).unwrap();
            let (q, k, v, dy) =
                (x(&[r, h, s, d], 21), x(&[r, kv, s, d], 22), x(&[r, kv, s, d], 23), x(&[r, h, s, d], 24));
            let (bias, scale) = (test_mask(r, s).unwrap(), 1.0 / (d as f64).sqrt());
            let (out, kept) = attention::forward_in_chunks(&q, &k, &v, &bias, scale, budget, true).unwrap();
            let want = attention::forward_in_chunks(&q, &k, &v, &bias, scale, budget, false).unwrap().0;
            assert_eq!(bits(&out), bits(&want), "{dt:?} budget {budget}: output");
            let kept = kept.expect("P is kept on the CPU");
            let got = attention_backward_kept(&kept, &q, &k, &v, scale, &dy).unwrap();
            let want = attention::backward_in_chunks(&q, &k, &v, &bias, scale, &dy, None, budget).unwrap();
            for (name, g, w) in [("dq", &got.0, &want.0), ("dk", &got.1, &want.1), ("dv", &got.2, &want.2)] {
                assert_eq!(g.dims(), w.dims(), "{dt:?} budget {budget}: {name}");
                assert_eq!(bits(g), bits(w), "{dt:?} budget {budget}: {name}");
            }
            // The gradients are not all zeros (a backward that ignored P would not pass the above).
            assert!(bits(&got.1).iter().any(|&b| b != 0));
        }
    }
    let q = Var::from_tensor(&randn_tensor(&[1, 2, 5, 4], 25, 1.0).unwrap()).unwrap();
    let e =
        attention_keeping_probs(q.as_tensor(), q.as_tensor(), q.as_tensor(), &test_mask(1, 5).unwrap(), 0.5);
    assert!(e.is_err_and(|e| e.to_string().contains("builds no graph")));
}

#[test]
fn rms_norm_matches_slow_path() {
    check_op("rms_norm");
}

/// The weights' cast and stack: the inputs' values in `cat`'s order, without a graph; groups
/// that cannot be stacked are errors. (On the CPU `cast_cat` is its slow path; the CUDA kernel is
/// checked by `cuda_tests.rs`, `tests/cuda_emulated.rs` and `doctor`.)
#[test]
fn cast_cat_stacks_and_refuses_mismatched_groups() {
    for case in cases_named("cast_cat") {
        assert_close(&case, DType::F32, 0.0, false);
        assert_close(&case, DType::BF16, 0.0, false);
    }
    let (a, b) = (randn_tensor(&[2, 3], 1, 1.0).unwrap(), randn_tensor(&[4, 3], 2, 1.0).unwrap());
    let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
    let out = cast_cat(&[&[va.as_tensor(), vb.as_tensor()], &[va.as_tensor()]], DType::F32).unwrap();
    assert_eq!(
        out[0].to_vec2::<f32>().unwrap(),
        Tensor::cat(&[&a, &b], 0).unwrap().to_vec2::<f32>().unwrap()
    );
    assert_eq!(out[1].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
    assert!(!out[0].track_op() && !out[1].track_op());
    let c = randn_tensor(&[4, 2], 3, 1.0).unwrap();
    let err = cast_cat(&[&[&a, &c]], DType::BF16).unwrap_err().to_string();
    assert!(err.contains("cannot stack [4, 2] on [2, 3]"), "{err}");
    assert!(cast_cat(&[&[]], DType::BF16).unwrap_err().to_string().contains("empty group"));
}

/// The mixed-precision ops give exactly what the ops they fuse give (the norm then the cast; the
/// cast then the add), output and gradients, for every dtype of the branch.
#[test]
fn rms_norm_to_and_add_cast_equal_the_ops_they_fuse() {
    for case in cases_named("rms_norm_to").into_iter().chain(cases_named("add_cast")) {
        let up = case.upstream(11).unwrap();
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let (fused, parts) =
                (case.run(true, &CPU, dt, &up, None).unwrap(), case.run(false, &CPU, dt, &up, None).unwrap());
            assert_eq!(fused.out.dtype(), parts.out.dtype(), "{} {dt:?}", case.op);
            let pairs = std::iter::once((&fused.out, &parts.out))
                .chain(fused.grads.iter().zip(&parts.grads).map(|((_, g), (_, w))| (g, w)));
            for (got, want) in pairs {
                assert_eq!(got.dtype(), want.dtype(), "{} {dt:?}", case.op);
                let (d, _, finite) = compare(got, want).unwrap();
                assert!(finite && d == 0.0, "{} {dt:?}: differs by {d:e}", case.op);
            }
        }
    }
}

/// The trainer's kernel check compares every case, output and gradients (here the CPU with
/// itself: no disagreement, and no case that fails to run).
#[test]
fn the_kernel_check_runs_every_case() {
    assert_eq!(super::check::disagreements(&CPU).unwrap(), Vec::<String>::new());
}

#[test]
fn rope_matches_slow_path() {
    check_op("rope");
}

#[test]
fn rms_norm_backward_add_matches_the_ops_it_fuses() {
    check_op("rms_norm_backward_add");
}

#[test]
fn rope_backward_merged_matches_the_ops_it_fuses() {
    check_op("rope_backward_merged");
}

#[test]
fn gather_rows_matches_slow_path() {
    check_op("gather_rows");
}

#[test]
fn target_logprobs_match_slow_path() {
    check_op("target_logprobs");
    check_op("target_logprobs_backward");
}

/// The gradient by vocabulary slices (the LM head's backward): each slice's columns of the whole
/// row's gradient, fused and composed, a slice holding some rows' targets and not others'.
#[test]
fn target_logprobs_backward_by_columns() {
    for dt in [DType::F32, DType::F64] {
        let z = randn_tensor(&[5, 40], 3, 4.0).unwrap().to_dtype(dt).unwrap();
        let t = Tensor::new(&[0u32, 12, 13, 39, 25], &CPU).unwrap();
        let g = randn_tensor(&[5], 4, 1.0).unwrap().to_dtype(dt).unwrap();
        let (_, lse) = target_logprobs(&z, &t).unwrap();
        let whole = target_logprobs_backward(&z, &lse, &t, &g, 0).unwrap();
        for (first, cols) in [(0, 13), (13, 13), (26, 14)] {
            let part = z.narrow(1, first, cols).unwrap();
            let want = whole.narrow(1, first, cols).unwrap();
            let fused = target_logprobs_backward(&part, &lse, &t, &g, first).unwrap();
            let slow = target_logprobs_backward_slow(&part, &lse, &t, &g, first).unwrap();
            for (got, what) in [(fused, "fused"), (slow, "composed")] {
                let d =
                    (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
                let d = d.to_scalar::<f64>().unwrap();
                assert!(d < 1e-6, "{dt:?} {what} columns {first}..+{cols}: off by {d}");
            }
        }
    }
}

/// A target outside the vocabulary is an error naming it; a NaN logit reaches its row's lse and
/// log-prob (and no other row's); extreme logits stay finite.
#[test]
fn target_logprobs_bad_targets_and_extreme_logits() {
    let z = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, f32::NAN, 0.0], [1e30, -1e30, 0.0]], &CPU).unwrap();
    let err = target_logprobs(&z, &Tensor::new(&[0u32, 3, 1], &CPU).unwrap()).unwrap_err().to_string();
    assert!(err.contains("target token 3 outside the vocabulary of 3"), "{err}");
    let t = Tensor::new(&[2u32, 0, 0], &CPU).unwrap();
    let (logp, lse) = target_logprobs(&z, &t).unwrap();
    let (logp, lse) = (logp.to_vec1::<f32>().unwrap(), lse.to_vec1::<f32>().unwrap());
    assert!((lse[0] - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln()).abs() < 1e-6);
    assert!(lse[1].is_nan() && logp[1].is_nan());
    assert_eq!((lse[2], logp[2]), (1e30, 0.0));
    let g = Tensor::new(&[1f32, 1.0, 1.0], &CPU).unwrap();
    let dz = target_logprobs_backward(&z, &Tensor::new(&lse[..], &CPU).unwrap(), &t, &g, 0).unwrap();
    let dz = dz.to_vec2::<f32>().unwrap();
    assert!(dz[1].iter().all(|v| v.is_nan()));
    assert_eq!(dz[2], vec![0.0, 0.0, 0.0]);
    let sum: f32 = dz[0].iter().sum();
    assert!(sum.abs() < 1e-6 && dz[0][2] > 0.0 && dz[0][0] < 0.0);
}

/// At a real vocabulary (Qwen2's 151,936) the f32 log-sum-exp is as exact as f32 allows: the
/// sum of 151,936 terms in f32 one after the other was 3e-4 off (the GPU doctor's one failure:
/// the CPU kernel against the GPU's, which sums in a tree), and 1e-4 in the gradient.
#[test]
fn target_logprobs_lse_is_exact_at_a_large_vocabulary() {
    let (rows, vocab) = (16, 151_936);
    let z = randn_tensor(&[rows, vocab], 16, 4.0).unwrap();
    let t = Tensor::zeros(rows, DType::U32, &CPU).unwrap();
    let (_, lse) = target_logprobs(&z, &t).unwrap();
    let want = z.to_dtype(DType::F64).unwrap().exp().unwrap().sum(1).unwrap().log().unwrap();
    let err = (lse.to_dtype(DType::F64).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap();
    let err = err.to_scalar::<f64>().unwrap();
    assert!(err < 1e-5, "largest lse error {err:.2e}");
}

#[test]
fn silu_mul_matches_slow_path() {
    check_op("silu_mul");
}

/// Large logits and odd sizes: scores up to ~1e4 after scaling, k = 1 and k odd. Near one-hot
/// rows have tiny gradients, so errors are taken relative to at least `scale * |upstream|` ~
/// `scale`, the size of the gradient of a non-degenerate row.
#[test]
fn masked_softmax_extreme_values_and_odd_sizes() {
    for (dims, std, scale) in
        [([1, 1, 5, 1], 1.0, 1.0), ([2, 3, 7, 13], 1e3, 10.0), ([1, 2, 1, 4099], 300.0, 0.5)]
    {
        let bias = Tensor::zeros((dims[0], 1, dims[2], dims[3]), DType::F32, &CPU).unwrap();
        let case = Case {
            op: "masked_softmax",
            out_dims: None,
            shape: format!("{dims:?}"),
            inputs: vec![
                Input {
                    name: "scores",
                    value: randn_tensor(&dims, 21, std).unwrap(),
                    grad: true,
                    keep_f32: false,
                },
                Input { name: "bias", value: bias, grad: false, keep_f32: true },
            ],
            fused: Box::new(move |x| masked_softmax(&x[0], &x[1], scale)),
            slow: Box::new(move |x| masked_softmax_slow(&x[0], &x[1], scale)),
        };
        assert_close_floor(&case, DType::F64, 1e-12, false, scale);
        assert_close_floor(&case, DType::F32, 1e-5, false, scale);
        assert_close_floor(&case, DType::BF16, 3e-2, true, scale);
        let p = masked_softmax(&case.inputs[0].value, &case.inputs[1].value, scale).unwrap();
        let sums: Vec<f32> = p.sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(sums.iter().all(|&v| (v - 1.0).abs() < 1e-5), "{sums:?}");
    }
}

/// Fully masked query rows (every key padding) give no NaN: with the causal part masked twice
/// (-2e30) and the padded past once (-1e30), they are uniform over the past keys, as in the
/// slow path. A fully masked bias row gives a uniform row over all keys.
#[test]
fn masked_softmax_fully_masked_rows() {
    let (r, h, s) = (3, 2, 9);
    let bias = test_mask(r, s).unwrap();
    let scores = Var::from_tensor(&randn_tensor(&[r, h, s, s], 5, 4.0).unwrap()).unwrap();
    let p = masked_softmax(scores.as_tensor(), &bias, 0.5).unwrap();
    // Row 2 is all padding.
    let last: Vec<f32> = p.get(2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (i, v) in last.iter().enumerate() {
        let (q, k) = ((i / s) % s, i % s);
        let want = if k <= q { 1.0 / (q + 1) as f32 } else { 0.0 };
        assert!((v - want).abs() < 1e-7, "query {q} key {k}: {v} vs {want}");
    }
    let sums: Vec<f32> = p.sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|&v| (v - 1.0).abs() < 1e-5), "{sums:?}");
    let slow = masked_softmax_slow(scores.as_tensor(), &bias, 0.5).unwrap();
    assert!(compare(&p, &slow).unwrap().0 < 1e-6);
    let up = randn_tensor(&[r, h, s, s], 6, 1.0).unwrap();
    let grads = (&p * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(scores.as_tensor()).unwrap();
    assert!(g.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
    // An all -1e30 bias row: exactly uniform.
    let full = Tensor::full(crate::mask::MASKED, (1, 1, 2, 5), &CPU).unwrap();
    let p = masked_softmax(&randn_tensor(&[1, 1, 2, 5], 7, 3.0).unwrap(), &full, 1.0).unwrap();
    let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|&x| x == 0.2), "{v:?}");
}

/// The CPU kernels follow the GPU's rule: a score under a masking bias is not read, nor `dP`
/// where `P` is 0. NaN there changes nothing (a fully masked row stays uniform); NaN in a
/// score that is read still shows.
#[test]
fn masked_softmax_reads_no_masked_score() {
    // Causal over the first 6 keys, keys 6-8 masked; row 1's query 2 sees no key.
    let (r, h, q, k) = (2, 3, 6, 9);
    let bias =
        Tensor::from_vec(
            (0..r * q * k)
                .map(|e| {
                    if e % k > (e / k) % q || (e / (q * k) == 1 && (e / k) % q == 2) { -1e30f32 } else { 0.0 }
                })
                .collect::<Vec<_>>(),
            (r, 1, q, k),
            &CPU,
        )
        .unwrap();
    let nan_where = |x: &Tensor, at: &Tensor| {
        let nan = Tensor::full(f32::NAN, x.shape(), &CPU).unwrap();
        at.broadcast_as(x.shape()).unwrap().where_cond(&nan, x).unwrap()
    };
    let s = randn_tensor(&[r, h, q, k], 51, 3.0).unwrap();
    let p = masked_softmax(&s, &bias, 0.7).unwrap();
    let s_bad = nan_where(&s, &bias.le(super::softmax::BIAS_MASKS).unwrap());
    assert_eq!(bits(&masked_softmax(&s_bad, &bias, 0.7).unwrap()), bits(&p));
    let row = p.get(1).unwrap().get(0).unwrap().get(2).unwrap().to_vec1::<f32>().unwrap();
    assert!(row.iter().all(|&x| x == 1.0 / k as f32), "a fully masked row is uniform: {row:?}");
    let dp = randn_tensor(&[r, h, q, k], 52, 1.0).unwrap();
    let dp_bad = nan_where(&dp, &p.eq(&p.zeros_like().unwrap()).unwrap());
    let bwd = |dp: &Tensor| p.apply_op2_no_bwd(dp, &super::softmax::MaskedSoftmaxBwd { scale: 0.7 }).unwrap();
    assert_eq!(bits(&bwd(&dp_bad)), bits(&bwd(&dp)));
    // A NaN the softmax reads is not hidden.
    let s_read = s
        .slice_assign(&[0..1, 0..1, 0..1, 0..1], &Tensor::full(f32::NAN, (1, 1, 1, 1), &CPU).unwrap())
        .unwrap();
    let v = masked_softmax(&s_read, &bias, 0.7)
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v[0].is_nan());
}

/// Non-contiguous inputs are made contiguous by the public functions; results match.
#[test]
fn non_contiguous_inputs() {
    let x = randn_tensor(&[6, 5, 8], 31, 1.0).unwrap();
    let xt = x.transpose(0, 1).unwrap();
    assert!(!xt.is_contiguous());
    let w = randn_tensor(&[8], 32, 1.0).unwrap();
    let a = rms_norm(&xt, &w, 1e-6).unwrap();
    let b = rms_norm_slow(&xt, &w, 1e-6).unwrap();
    assert!(compare(&a, &b).unwrap().0 < 1e-6);
    let a = silu_mul(&xt, &xt.sqr().unwrap()).unwrap();
    let b = silu_mul_slow(&xt, &xt.sqr().unwrap()).unwrap();
    assert!(compare(&a, &b).unwrap().0 < 1e-5);
    let q = randn_tensor(&[2, 4, 3, 8], 33, 1.0).unwrap().transpose(1, 2).unwrap(); // [2, 3, 4, 8]
    let (cos, sin) = super::check::rope_tables(&[0], false, 4, 8).unwrap();
    let a = rope(&q, &cos, &sin).unwrap();
    let b = rope_slow(&q, &cos, &sin).unwrap();
    assert!(compare(&a, &b).unwrap().0 < 1e-6);
    let s = randn_tensor(&[2, 3, 4, 4], 34, 1.0).unwrap().transpose(2, 3).unwrap();
    let bias = test_mask(2, 4).unwrap();
    let a = masked_softmax(&s, &bias, 0.3).unwrap();
    let b = masked_softmax_slow(&s, &bias, 0.3).unwrap();
    assert!(compare(&a, &b).unwrap().0 < 1e-6);
}

/// RMSNorm's weight as an f32 master copy under a bf16 computation (as the model does): the
/// gradient flows back through the cast.
#[test]
fn rms_norm_weight_gradient_through_cast() {
    let x = randn_tensor(&[4, 7, 32], 41, 1.0).unwrap().to_dtype(DType::BF16).unwrap();
    let w = Var::from_tensor(&(randn_tensor(&[32], 42, 0.1).unwrap() + 1.0).unwrap()).unwrap();
    let up = randn_tensor(&[4, 7, 32], 43, 1.0).unwrap().to_dtype(DType::BF16).unwrap();
    let grad = |f: fn(&Tensor, &Tensor, f64) -> candle_core::Result<Tensor>| {
        let y = f(&x, w.as_tensor(), 1e-5).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        g.get(w.as_tensor()).unwrap().clone()
    };
    let (a, b) = (grad(rms_norm), grad(rms_norm_slow));
    assert_eq!(a.dtype(), DType::F32);
    let (d, scale, _) = compare(&a, &b).unwrap();
    assert!(d / scale < 3e-2, "{d} {scale}");
}

/// The harness can fail: a slightly wrong op is caught at the tolerances used above.
#[test]
fn comparison_detects_a_wrong_op() {
    let mut case = cases_named("silu_mul").remove(0);
    case.fused = Box::new(|x| silu_mul(&x[0], &x[1])?.affine(1.0 + 1e-4, 0.0));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_close(&case, DType::F32, 1e-5, false)
    }));
    assert!(r.is_err(), "a 1e-4 relative error passed a 1e-5 tolerance");
    let mut case = cases_named("rope").remove(0);
    // The forward with the wrong backward (rotate_half instead of its transpose) must fail.
    case.fused = Box::new(|x| {
        let y = rope(&x[0], &x[1], &x[2])?;
        let wrong = rope(&x[0].detach(), &x[1], &x[2])?;
        // y - y.detach() carries rope's gradient, i.e. the transpose; subtracting twice gives
        // the un-transposed rotation's gradient sign flipped on the rotated half.
        wrong + (y.clone() - y.detach())?.affine(-1.0, 0.0)
    });
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_close(&case, DType::F32, 1e-5, false)
    }));
    assert!(r.is_err(), "a wrong gradient passed");
}

#[test]
fn self_check_passes_on_cpu() {
    let report = self_check(&CPU).unwrap();
    eprintln!("{report}");
    assert!(report.trim_end().lines().last().unwrap().starts_with("RESULT: PASS"), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
}
