//! The CUDA launchers of `cuda.rs` against the CPU kernels of the same ops, through the ops'
//! own entry points: every kernel's argument list, dtype dispatch, launch shape, output size
//! and the layouts' start offsets (each input sits one row into its buffer).
//!
//! On a GPU this is a plain CUDA-vs-CPU test. Without one, `scripts/cuda-emu.sh`
//! runs it against an emulated driver (`tests/cuda-emu/fake/`) that executes `dpo_ops.cu` on the
//! CPU, refuses a pointer argument outside device memory or an oversized block, and fills new
//! allocations with NaN bytes, so an argument in the wrong place or an output element left
//! unwritten fails here rather than on the GPU. Only our kernels are emulated: the ops are fed
//! contiguous inputs in the dtypes they compute in, so that no candle kernel runs on the device.

use candle_core::{CustomOp2, DType, Device, Result, Tensor};

use super::check::randn_tensor;
use super::gather::GatherRows;
use super::logprobs::TargetLogProbsBwd;
use super::softmax::MaskedSoftmax;
use super::*;

const CPU: Device = Device::Cpu;
const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (without a GPU: scripts/cuda-emu.sh)")
}

/// Deterministic N(0, std^2) values in `dt` on the CPU.
fn randn(shape: &[usize], seed: u64, std: f32, dt: DType) -> Tensor {
    randn_tensor(shape, seed, std).unwrap().to_dtype(dt).unwrap()
}

/// `t` on `dev` as a view that starts one row (of the first axis) into its buffer.
fn up(t: &Tensor, dev: &Device) -> Tensor {
    let n = t.dim(0).unwrap();
    let padded = Tensor::cat(&[&t.narrow(0, 0, 1).unwrap(), t], 0).unwrap();
    let on = padded.to_device(dev).unwrap().narrow(0, 1, n).unwrap();
    assert!(on.layout().start_offset() > 0 && on.is_contiguous());
    on
}

/// Both sides compute in f32 (f64) and round once to `dt`: about one rounding apart.
fn tol(dt: DType) -> f64 {
    super::check::tolerance(dt, true)
}

/// `max |got - want| / max |want|` within `tol` for `got` on the device, `want` on the CPU
/// (same shape and dtype, every value finite).
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!((got.dims(), got.dtype()), (want.dims(), want.dtype()), "{what}: shape and dtype");
    assert!(got.device().is_cuda(), "{what}: computed off the device");
    let f64s = |t: &Tensor| -> Vec<f64> {
        t.to_device(&CPU).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let (got, want) = (f64s(got), f64s(want));
    let scale = want.iter().fold(1e-30f64, |m, w| m.max(w.abs()));
    let diff = got.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((g - w).abs()));
    let finite = got.iter().all(|g| g.is_finite());
    eprintln!("{what}: relative error {:.2e}", diff / scale);
    assert!(
        finite && diff / scale <= tol,
        "{what}: relative error {:e} > {tol:e} (finite: {finite})",
        diff / scale
    );
}

/// Rows of 37 (a warp each) and 1,030 entries (past the warp kernels' 1,024: a block each).
#[test]
fn masked_softmax_forward_and_backward() -> Result<()> {
    let dev = gpu();
    for (r, h, q, k, bias_rows) in [(2, 2, 5, 37, 2), (2, 2, 5, 37, 1), (2, 1, 3, 1030, 2)] {
        let bias = Tensor::from_vec(
            (0..bias_rows * q * k).map(|i| if i % k > (i / k) % q + 30 { -1e9f32 } else { 0.0 }).collect(),
            (bias_rows, 1, q, k),
            &CPU,
        )?;
        for dt in DTYPES {
            let what = format!("softmax {dt:?} [{r}, {h}, {q}, {k}] bias rows {bias_rows}");
            let (s, dp) = (randn(&[r, h, q, k], 1, 4.0, dt), randn(&[r, h, q, k], 2, 1.0, dt));
            let (sd, bd, dpd) = (up(&s, &dev), up(&bias, &dev), up(&dp, &dev));
            let (p, pd) = (masked_softmax(&s, &bias, 0.5)?, masked_softmax(&sd, &bd, 0.5)?);
            assert_close(&pd, &p, tol(dt), &what);
            let op = MaskedSoftmax { scale: 0.5 };
            let ds = op.bwd(&s, &bias, &p, &dp)?.0.unwrap();
            let dsd = op.bwd(&sd, &bd, &up(&p, &dev), &dpd)?.0.unwrap();
            assert_close(&dsd, &ds, tol(dt), &format!("{what} backward"));
        }
    }
    Ok(())
}

/// The norm, its backward (dx, and dw summed over several row groups), with and without the
/// residual gradient, and the mixed-precision kernels (f32 in, bf16/f16 out; bf16/f16 dy).
#[test]
fn rms_norm_all_kernels() -> Result<()> {
    let dev = gpu();
    for (rows, d) in [(300, 40), (3, 1100)] {
        for dt in DTYPES {
            let what = format!("rms_norm {dt:?} [{rows}, {d}]");
            let (x, w) = (randn(&[rows, d], 1, 2.0, dt), randn(&[d], 2, 1.0, dt));
            let (dy, res) = (randn(&[rows, d], 3, 1.0, dt), randn(&[rows, d], 4, 1.0, dt));
            let (xd, wd, dyd, resd) = (up(&x, &dev), up(&w, &dev), up(&dy, &dev), up(&res, &dev));
            assert_close(&rms_norm(&xd, &wd, 1e-6)?, &rms_norm(&x, &w, 1e-6)?, tol(dt), &what);
            let (dx, dw) = rms_norm_backward(&x, &w, 1e-6, &dy)?;
            let (dxd, dwd) = rms_norm_backward(&xd, &wd, 1e-6, &dyd)?;
            assert_close(&dxd, &dx, tol(dt), &format!("{what} dx"));
            assert_close(&dwd, &dw, tol(dt), &format!("{what} dw"));
            let (dx, dw) = rms_norm_backward_add(&x, &w, 1e-6, &dy, &res)?;
            let (dxd, dwd) = rms_norm_backward_add(&xd, &wd, 1e-6, &dyd, &resd)?;
            assert_close(&dxd, &dx, tol(dt), &format!("{what} dx + res"));
            assert_close(&dwd, &dw, tol(dt), &format!("{what} dw (res)"));
        }
        let (x, w) = (randn(&[rows, d], 5, 2.0, DType::F32), randn(&[d], 6, 1.0, DType::F32));
        let res = randn(&[rows, d], 7, 1.0, DType::F32);
        let (xd, wd, resd) = (up(&x, &dev), up(&w, &dev), up(&res, &dev));
        for dt in [DType::BF16, DType::F16] {
            let what = format!("rms_norm f32 -> {dt:?} [{rows}, {d}]");
            let (y, yd) = (rms_norm_to(&x, &w, 1e-6, dt)?, rms_norm_to(&xd, &wd, 1e-6, dt)?);
            assert_close(&yd, &y, tol(dt), &what);
            let dy = randn(&[rows, d], 8, 1.0, dt);
            let (dx, dw) = rms_norm_backward_add(&x, &w, 1e-6, &dy, &res)?;
            let (dxd, dwd) = rms_norm_backward_add(&xd, &wd, 1e-6, &up(&dy, &dev), &resd)?;
            assert_close(&dxd, &dx, tol(DType::F32), &format!("{what} dx + res"));
            assert_close(&dwd, &dw, tol(DType::F32), &format!("{what} dw"));
            // dx in dy's dtype too, from the same kernel: its own f32 dx rounded, bit for bit.
            let (dxd2, dwd2, lod) = rms_norm_backward_add_lo(&xd, &wd, 1e-6, &up(&dy, &dev), &resd, dt)?;
            assert_eq!(lod.dtype(), dt);
            assert_close(&dxd2, &dxd, 0.0, &format!("{what} dx + res, with lo"));
            assert_close(&dwd2, &dwd, 0.0, &format!("{what} dw, with lo"));
            assert_close(
                &lod,
                &dxd.to_device(&CPU)?.to_dtype(dt)?,
                0.0,
                &format!("{what} dx + res in {dt:?}"),
            );
        }
    }
    Ok(())
}

#[test]
fn add_cast_bf16_and_f16() -> Result<()> {
    let dev = gpu();
    let h = randn(&[7, 333], 1, 1.0, DType::F32);
    for dt in [DType::BF16, DType::F16] {
        let y = randn(&[7, 333], 2, 1.0, dt);
        let got = add_cast(&up(&h, &dev), &up(&y, &dev))?;
        assert_close(&got, &add_cast(&h, &y)?, tol(DType::F32), &format!("add_cast {dt:?}"));
    }
    Ok(())
}

/// The residual add and the norm of its sum in one pass (rows of 333, and of 1,100: more
/// elements than threads), against the CPU's two ops, and bit for bit the two kernels'.
#[test]
fn add_rms_norm_one_pass() -> Result<()> {
    let dev = gpu();
    for (rows, d) in [(7, 333), (3, 1100)] {
        let (h, w) = (randn(&[rows, d], 1, 1.0, DType::F32), randn(&[d], 2, 1.0, DType::F32));
        let (hd, wd) = (up(&h, &dev), up(&w, &dev));
        for dt in [DType::BF16, DType::F16] {
            let what = format!("add_rms_norm_to {dt:?} [{rows}, {d}]");
            let y = randn(&[rows, d], 3, 1.0, dt);
            let (sum, normed) = add_rms_norm_to(&hd, &up(&y, &dev), &wd, 1e-6, dt)?;
            assert_eq!((sum.dtype(), normed.dtype()), (DType::F32, dt));
            let (want_sum, want) = add_rms_norm_to(&h, &y, &w, 1e-6, dt)?;
            assert_close(&sum, &want_sum, 0.0, &format!("{what}: the sum"));
            assert_close(&normed, &want, tol(dt), &what);
            let two = rms_norm_to(&add_cast(&hd, &up(&y, &dev))?, &wd, 1e-6, dt)?;
            assert_close(&normed, &two.to_device(&CPU)?, 0.0, &format!("{what}: the two kernels'"));
        }
    }
    Ok(())
}

/// Weights cast and stacked (`cast_cat`): twenty tensors in ten groups, so two launches, the
/// second with fewer than 16 parts; lengths that are not whole vectors (a part that starts
/// mid-vector in its group, and a tail), and each input starting inside its buffer. Bit for bit
/// the CPU's casts; each group 16-byte aligned in the shared buffer.
#[test]
fn cast_cat_groups() -> Result<()> {
    let dev = gpu();
    let shapes: [&[usize]; 10] =
        [&[6, 16], &[3, 16], &[3, 16], &[6], &[3], &[3], &[16, 6], &[13, 16], &[13, 16], &[5]];
    let host: Vec<Tensor> = (0..20).map(|i| randn(shapes[i % 10], 10 + i as u64, 3.0, DType::F32)).collect();
    let on: Vec<Tensor> = host.iter().map(|t| up(t, &dev)).collect();
    fn groups(t: &[Tensor]) -> Vec<Vec<&Tensor>> {
        let ranges = [0..3, 3..6, 6..7, 7..9, 9..10];
        [0, 10]
            .iter()
            .flat_map(|&at| ranges.clone().map(|r| t[r.start + at..r.end + at].iter().collect()))
            .collect()
    }
    fn slices<'a>(g: &'a [Vec<&'a Tensor>]) -> Vec<&'a [&'a Tensor]> {
        g.iter().map(Vec::as_slice).collect()
    }
    let (gh, gd) = (groups(&host), groups(&on));
    for dt in [DType::BF16, DType::F16] {
        let got = cast_cat(&slices(&gd), dt)?;
        let want = cast_cat_slow(&slices(&gh), dt)?;
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(g, w, 0.0, &format!("cast_cat {dt:?} group {i}"));
            assert_eq!(g.layout().start_offset() * dt.size_in_bytes() % 16, 0, "group {i} aligned");
        }
    }
    Ok(())
}

/// RoPE on contiguous heads and on heads read in place from `[rows, seq, heads, d]`, with
/// shared and per-row tables; its backward; the merged q/k/v backward.
#[test]
fn rope_all_kernels() -> Result<()> {
    let dev = gpu();
    let (r, h, kv, s, d) = (2, 3, 1, 5, 8);
    for dt in DTYPES {
        for tables in [vec![s, d], vec![r, s, d]] {
            let what = format!("rope {dt:?} tables {tables:?}");
            let (cos, sin) = (randn(&tables, 1, 1.0, dt), randn(&tables, 2, 1.0, dt));
            let (cd, sd) = (up(&cos, &dev), up(&sin, &dev));
            let x = randn(&[r, h, s, d], 3, 1.0, dt);
            assert_close(&rope(&up(&x, &dev), &cd, &sd)?, &rope(&x, &cos, &sin)?, tol(dt), &what);
            let xs = randn(&[r, s, h, d], 4, 1.0, dt);
            let strided = up(&xs, &dev).transpose(1, 2)?;
            let want = rope(&xs.transpose(1, 2)?, &cos, &sin)?;
            assert_close(&rope(&strided, &cd, &sd)?, &want, tol(dt), &format!("{what} strided heads"));
            let bias = randn(&[h * d], 9, 1.0, dt);
            let want = rope_with_bias(&xs.transpose(1, 2)?, &bias, &cos, &sin)?;
            let got = rope_with_bias(&strided, &up(&bias, &dev), &cd, &sd)?;
            assert_close(&got, &want, tol(dt), &format!("{what} strided heads with a bias"));
            let dy = randn(&[r, h, s, d], 5, 1.0, dt);
            let want = rope_backward(&dy, &cos, &sin)?;
            assert_close(
                &rope_backward(&up(&dy, &dev), &cd, &sd)?,
                &want,
                tol(dt),
                &format!("{what} backward"),
            );
            let (dq, dk, dv) = (
                randn(&[r, h, s, d], 6, 1.0, dt),
                randn(&[r, kv, s, d], 7, 1.0, dt),
                randn(&[r, kv, s, d], 8, 1.0, dt),
            );
            let want = rope_backward_merged(&dq, &dk, &dv, &cos, &sin)?;
            let got = rope_backward_merged(&up(&dq, &dev), &up(&dk, &dev), &up(&dv, &dev), &cd, &sd)?;
            assert_close(&got, &want, tol(dt), &format!("{what} merged backward"));
        }
    }
    Ok(())
}

#[test]
fn silu_mul_forward_and_backward() -> Result<()> {
    let dev = gpu();
    for dt in DTYPES {
        let what = format!("silu_mul {dt:?}");
        let (g, u, dy) =
            (randn(&[9, 130], 1, 2.0, dt), randn(&[9, 130], 2, 1.0, dt), randn(&[9, 130], 3, 1.0, dt));
        let (gd, ud, dyd) = (up(&g, &dev), up(&u, &dev), up(&dy, &dev));
        assert_close(&silu_mul(&gd, &ud)?, &silu_mul(&g, &u)?, tol(dt), &what);
        let (dg, du) = silu_mul_backward(&gd, &ud, &dyd)?;
        let (want_dg, want_du) = silu_mul_backward(&g, &u, &dy)?;
        assert_close(&dg, &want_dg, tol(dt), &format!("{what} backward, d gate"));
        assert_close(&du, &want_du, tol(dt), &format!("{what} backward, d up"));
        // With the value (the stacked layout of the hand-written backward).
        let (dgu, y) = silu_mul_backward_stacked_and_value(&gd, &ud, &dyd)?;
        assert_close(&dgu, &Tensor::cat(&[&want_dg, &want_du], 0)?, tol(dt), &format!("{what} stacked"));
        assert_close(&y, &silu_mul(&gd, &ud)?, 0.0, &format!("{what}: the value, as the forward's"));
    }
    Ok(())
}

/// The fused LM-head log-softmax: (logp, lse) and the logits' gradient.
#[test]
fn target_logprobs_forward_and_backward() -> Result<()> {
    let dev = gpu();
    let (n, vocab) = (7, 1029);
    let targets = Tensor::new(&[0u32, 1028, 5, 1000, 17, 512, 3], &CPU)?;
    let td = up(&targets, &dev);
    for dt in DTYPES {
        let acc = crate::accum_dtype(dt);
        let z = randn(&[n, vocab], 1, 4.0, dt);
        let zd = up(&z, &dev);
        let ((logp, lse), (logpd, lsed)) = (target_logprobs(&z, &targets)?, target_logprobs(&zd, &td)?);
        assert_close(&logpd, &logp, tol(acc), &format!("logp {dt:?}"));
        assert_close(&lsed, &lse, tol(acc), &format!("lse {dt:?}"));
        let lse_g = Tensor::stack(&[&lse, &randn(&[n], 2, 1.0, acc)], 0)?;
        let op = TargetLogProbsBwd { first: 0, out: dt };
        let want = z.apply_op3_no_bwd(&lse_g, &targets, &op)?;
        let got = zd.apply_op3_no_bwd(&up(&lse_g, &dev), &td, &op)?;
        assert_close(&got, &want, tol(dt), &format!("dlogits {dt:?}"));
        // Columns 500.. 1,020 alone (targets 512 and 1000 inside, the others not).
        let op = TargetLogProbsBwd { first: 500, out: dt };
        // (Uploaded as a contiguous block: the emulated driver has no copy kernel.)
        let zc = z.narrow(1, 500, 520)?.contiguous()?;
        let zcd = up(&zc, &dev);
        let got = zcd.apply_op3_no_bwd(&up(&lse_g, &dev), &td, &op)?;
        assert_close(
            &got,
            &zc.apply_op3_no_bwd(&lse_g, &targets, &op)?,
            tol(dt),
            &format!("dlogits {dt:?} cols"),
        );
        assert_close(&got, &want.narrow(1, 500, 520)?, tol(dt), &format!("dlogits {dt:?} cols of the whole"));
        // From f32 logits into the 16-bit dtypes (the LM head's bf16 operands).
        for to in [DType::BF16, DType::F16].into_iter().filter(|_| dt == DType::F32) {
            let op = TargetLogProbsBwd { first: 500, out: to };
            let got = zcd.apply_op3_no_bwd(&up(&lse_g, &dev), &td, &op)?;
            let want = zc.apply_op3_no_bwd(&lse_g, &targets, &op)?;
            assert_close(&got, &want, tol(to), &format!("dlogits {dt:?} cols into {to:?}"));
        }
    }
    Ok(())
}

/// The prefix-sharing layout's bias for one row `[prompt | chosen | rejected]` of `n` tokens each:
/// causal, and each completion sees the prompt but not the other. With n = 64 the rejected
/// queries' tile computes the first key tile and its own, and skips the one between.
fn sharing_bias(n: usize) -> Result<Tensor> {
    let s = 3 * n;
    let allowed: Vec<u8> = (0..s * s)
        .map(|e| (e / s, e % s))
        .map(|(i, j)| u8::from(j <= i && (j < n || j / n == i / n)))
        .collect();
    Ok(crate::AttentionMask::custom(&allowed, (0..s as u32).collect(), 1, s, &CPU)?.bias)
}

/// The tensor-core attention (`flash_forward`, and the backward) against the CPU's attention:
/// head sizes 32 and 64, grouped-query heads, two tiles of queries and keys, a per-row causal +
/// padding mask with fully masked queries, a broadcast random mask, and the prefix-sharing
/// layout (a skipped key tile between two computed ones); through `attention` too.
#[test]
fn flash_attention_forward() -> Result<()> {
    // SAFETY: read once per process (OnceLock), and no test reads it earlier.
    unsafe { std::env::set_var("DPO_TRAIN_FLASH_ATTENTION", "1") };
    let dev = gpu();
    // Each case runs to the end (all their errors print), the test fails after the last.
    let mut failed = Vec::new();
    for (r, h, kv, s, d, bias) in [
        (2, 2, 1, 128, 32, check::test_mask(2, 128)?),
        (3, 2, 1, 70, 64, check::test_mask(3, 70)?),
        (3, 4, 2, 70, 32, check::test_mask(3, 70)?),
        (1, 2, 1, 70, 64, check::random_bias(70, 70, 5)?),
        (1, 2, 1, 192, 64, sharing_bias(64)?),
    ] {
        let case = std::panic::AssertUnwindSafe(|| -> Result<()> {
            let dt = DType::BF16;
            let (q, k, v) = (
                randn(&[r, h, s, d], 1, 1.0, dt),
                randn(&[r, kv, s, d], 2, 1.0, dt),
                randn(&[r, kv, s, d], 3, 1.0, dt),
            );
            let (qd, kd, vd, bd) = (up(&q, &dev), up(&k, &dev), up(&v, &dev), up(&bias, &dev));
            let scale = 1.0 / (d as f64).sqrt();
            let what = |x: &str| format!("flash attention {x} d={d} seq={s}");
            let want = attention(&q, &k, &v, &bias, scale)?;
            let flash = |merged| super::attention::flash_forward(&qd, &kd, &vd, &bd, scale, merged);
            let got = flash(false)?.expect("the kernel applies");
            assert_close(&got, &want, tol(dt), &what("forward"));
            // Written with the heads merged, as the output projection reads them: the same bits.
            let heads_merged = flash(true)?.expect("the kernel applies");
            assert!(!heads_merged.is_contiguous() && heads_merged.transpose(1, 2)?.is_contiguous());
            assert_close(&heads_merged, &got, 0.0, &what("forward, heads merged"));
            assert_close(&attention(&qd, &kd, &vd, &bd, scale)?, &want, tol(dt), &what("through attention"));
            let dy = randn(&[r, h, s, d], 4, 1.0, dt);
            let want = attention_backward(&q, &k, &v, &bias, scale, &dy, None)?;
            // The upstream one element into its buffer (not 16-byte aligned: copied first).
            let dyd = Tensor::cat(&[&dy.flatten_all()?.narrow(0, 0, 1)?, &dy.flatten_all()?], 0)?
                .to_device(&dev)?
                .narrow(0, 1, dy.elem_count())?
                .reshape(dy.shape())?;
            // The forward recomputed, then its output kept as it came and with heads merged (as
            // the manual backward keeps it): the statistics-only kernel gives the same bits.
            // (Laid out on the host: the emulated driver has no copy kernels.)
            let merged = up(&got.to_device(&CPU)?.transpose(1, 2)?.contiguous()?, &dev).transpose(1, 2)?;
            let recomputed = attention_backward(&qd, &kd, &vd, &bd, scale, &dyd, None)?;
            for (x, got, want) in
                [("dq", &recomputed.0, want.0), ("dk", &recomputed.1, want.1), ("dv", &recomputed.2, want.2)]
            {
                assert_close(got, &want, check::tolerance(dt, false), &what(x));
            }
            // The upstream with its heads merged too, as the output projection's backward gives it.
            let dy_merged = up(&dy.transpose(1, 2)?.contiguous()?, &dev).transpose(1, 2)?;
            for (how, out, dy) in [
                ("kept", &got, &dyd),
                ("kept, heads merged", &merged, &dyd),
                ("kept, heads merged, upstream heads merged", &merged, &dy_merged),
            ] {
                let kept = attention_backward(&qd, &kd, &vd, &bd, scale, dy, Some(out))?;
                for (x, a, b) in [
                    ("dq", &kept.0, &recomputed.0),
                    ("dk", &kept.1, &recomputed.1),
                    ("dv", &kept.2, &recomputed.2),
                ] {
                    assert_close(a, b, 0.0, &what(&format!("{x}, output {how}")));
                }
            }
            Ok(())
        });
        match std::panic::catch_unwind(case) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("d={d} seq={s}: {e}")),
            Err(_) => failed.push(format!("d={d} seq={s}")),
        }
    }
    assert!(failed.is_empty(), "flash attention failed for {failed:?}");
    Ok(())
}

/// Rows by index and the backward (repeated ids, a skipped id, rows never picked).
#[test]
fn gather_rows_forward_and_backward() -> Result<()> {
    let dev = gpu();
    let ids = Tensor::new(&[3u32, 7, 3, 0, 9, 3, 2, 0], &CPU)?;
    let idsd = up(&ids, &dev);
    for dt in DTYPES {
        let (w, dy) = (randn(&[11, 40], 1, 1.0, dt), randn(&[8, 40], 2, 1.0, dt));
        let wd = up(&w, &dev);
        let (y, yd) = (gather_rows(&w, &ids, Some(0))?, gather_rows(&wd, &idsd, Some(0))?);
        assert_close(&yd, &y, 0.0, &format!("gather_rows {dt:?}"));
        let op = GatherRows { no_grad: Some(0) };
        let dw = op.bwd(&w, &ids, &y, &dy)?.0.unwrap();
        let dwd = op.bwd(&wd, &idsd, &yd, &up(&dy, &dev))?.0.unwrap();
        assert_close(&dwd, &dw, tol(dt), &format!("gather_rows {dt:?} backward"));
        // Added to a gradient: in place on the device for f32 (other dtypes take candle's add,
        // which the emulated driver does not have).
        if dt == DType::F32 {
            let acc = randn(&[11, 40], 3, 1.0, dt);
            let want = crate::ops::add_gather_rows_backward(acc.clone(), &dy, &ids, Some(0))?;
            let accd = up(&acc, &dev);
            let got = crate::ops::add_gather_rows_backward(accd.clone(), &up(&dy, &dev), &idsd, Some(0))?;
            assert_close(&got, &want, 0.0, "gather_rows backward added");
            assert_close(&accd, &want, 0.0, "gather_rows backward added in place");
        }
    }
    Ok(())
}

/// The optimizer's step on the device: the clipping norm and factor of 21 tensors (two
/// launches of 16 and 5, the largest first; one empty, a tensor sizes 1 and 7), then AdamW on all
/// of them from the device's factor, against the kernel's own formula on the CPU (the same f32
/// operations in the same order: equal bit for bit under the emulation); a non-finite norm
/// makes a NaN factor, and AdamW then writes nothing.
#[test]
fn clip_and_adamw() -> Result<()> {
    let dev = gpu();
    let f32s = |t: &Tensor| t.to_device(&CPU).unwrap().to_vec1::<f32>().unwrap();
    let sizes: Vec<usize> = (0..21).map(|i| [1000, 0, 7, 1, 3000, 2049, 64][i % 7] + 8 * i).collect();
    let sizes: Vec<usize> = sizes.iter().enumerate().map(|(i, &n)| if i == 1 { 0 } else { n }).collect();
    let host = |seed: u64, std: f32| -> Vec<Tensor> {
        sizes.iter().enumerate().map(|(i, &n)| randn(&[n], seed + 10 * i as u64, std, DType::F32)).collect()
    };
    let (p, m, g) = (host(1, 1.0), host(2, 0.1), host(3, 1.0));
    let v: Vec<Tensor> = host(4, 0.1).iter().map(|t| t.sqr().unwrap()).collect();
    let on = |ts: &[Tensor]| -> Vec<Tensor> { ts.iter().map(|t| t.to_device(&dev).unwrap()).collect() };
    let (pd, md, vd, gd) = (on(&p), on(&m), on(&v), on(&g));
    let want: f64 = g.iter().flat_map(f32s).map(|x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let read = |clip: &Tensor| read_clip(clip).unwrap();
    let max_norm = want / 3.0;
    let clip = clip_fused(&gd, max_norm)?.expect("on CUDA");
    let (norm, factor) = read(&clip);
    assert!((norm - want).abs() <= 1e-12 * want, "norm {norm} vs {want}");
    assert_eq!(factor, (max_norm / (norm + 1e-6)).min(1.0), "the clipping factor");
    assert_eq!(read(&clip_fused(&gd, 0.0)?.expect("on CUDA")).1, 1.0, "no clipping: factor 1");
    assert_eq!(read(&clip_fused(&gd, 1e9)?.expect("on CUDA")).1, 1.0, "a norm under max_norm: factor 1");

    let ((b1, b2, eps), step, bc2) = ((0.9, 0.999, 1e-8), 0.01f32, 0.3f32);
    let decay = |i: usize| if i.is_multiple_of(3) { 1.0 } else { 0.99 };
    let parts: Vec<AdamWPart> = (0..sizes.len())
        .map(|i| AdamWPart { p: &pd[i], m: &md[i], v: &vd[i], g: &gd[i], decay: decay(i) })
        .collect();
    assert!(adamw_fused(&parts, &clip, (b1, b2, eps), step as f64, bc2 as f64)?);
    let gscale = factor as f32;
    for i in 0..sizes.len() {
        let (mut pw, mut mw, mut vw) = (f32s(&p[i]), f32s(&m[i]), f32s(&v[i]));
        for (j, gj) in f32s(&g[i]).into_iter().enumerate() {
            let gj = gj * gscale;
            mw[j] = b1 as f32 * mw[j] + (1.0 - b1) as f32 * gj;
            vw[j] = b2 as f32 * vw[j] + (1.0 - b2) as f32 * (gj * gj);
            let denom = vw[j].sqrt() / bc2 + eps as f32;
            pw[j] = pw[j] * decay(i) as f32 - (mw[j] / denom) * step;
        }
        if sizes[i] == 0 {
            continue;
        }
        // Exact under the emulation; a GPU contracts `a * b + c` into one rounding (FMA): 7e-8
        // on an H200.
        for (got, want, what) in [(&pd[i], pw, "p"), (&md[i], mw, "m"), (&vd[i], vw, "v")] {
            assert_close(got, &Tensor::new(want, &CPU)?, 1e-6, &format!("adamw {what} of part {i}"));
        }
    }

    // An infinite gradient element: the norm is inf, the factor NaN, and nothing moves.
    let mut bad = f32s(&g[4]);
    bad[17] = f32::INFINITY;
    let mut gbad = gd.clone();
    gbad[4] = Tensor::new(bad, &CPU)?.to_device(&dev)?;
    let clip = clip_fused(&gbad, max_norm)?.expect("on CUDA");
    let (norm, factor) = read(&clip);
    assert!(norm == f64::INFINITY && factor.is_nan(), "norm {norm}, factor {factor}");
    let before: Vec<Vec<f32>> = pd.iter().chain(&md).chain(&vd).map(f32s).collect();
    let parts: Vec<AdamWPart> = (0..sizes.len())
        .map(|i| AdamWPart { p: &pd[i], m: &md[i], v: &vd[i], g: &gbad[i], decay: decay(i) })
        .collect();
    assert!(adamw_fused(&parts, &clip, (b1, b2, eps), step as f64, bc2 as f64)?);
    let after: Vec<Vec<f32>> = pd.iter().chain(&md).chain(&vd).map(f32s).collect();
    assert!(before == after, "a NaN factor wrote to the optimizer's tensors");

    // The update is in place: moments that share a buffer (or a view into the parameter's) are
    // refused, not mixed.
    let shared = [AdamWPart { p: &pd[0], m: &md[0], v: &md[0], g: &gd[0], decay: 1.0 }];
    let err = adamw_fused(&shared, &clip, (b1, b2, eps), step as f64, bc2 as f64).unwrap_err().to_string();
    assert!(err.contains("m and v of a parameter share device memory"), "{err}");
    let n = sizes[0] - 1;
    let (head, tail) = (pd[0].narrow(0, 0, n)?, pd[0].narrow(0, 1, n)?);
    let (v0, g0) = (vd[0].narrow(0, 0, n)?, gd[0].narrow(0, 0, n)?);
    let overlapping = [AdamWPart { p: &head, m: &tail, v: &v0, g: &g0, decay: 1.0 }];
    let err =
        adamw_fused(&overlapping, &clip, (b1, b2, eps), step as f64, bc2 as f64).unwrap_err().to_string();
    assert!(err.contains("p and m of a parameter share device memory"), "{err}");
    Ok(())
}

/// A launch with a tensor per `blockIdx.y` runs at most 1,024 blocks a tensor (grid-stride: the
/// kernels' loops go round, as the emulated kernel tests check with fewer blocks than a pass
/// needs), not a grid sized to the longest tensor for every one.
#[test]
fn parts_launches_are_capped() {
    assert_eq!(super::cuda::parts_cfg(3000, 2).grid_dim, (2, 2, 1));
    assert_eq!(super::cuda::parts_cfg(2048 * 1024, 16).grid_dim, (1024, 16, 1));
    assert_eq!(super::cuda::parts_cfg(136_134_656, 16).grid_dim, (1024, 16, 1));
}

/// `crate::matmul_bf16_f32` by cuBLAS against the CPU's (operands cast to f32), in the layouts
/// the LM head uses: `h W^T` (a transposed weight slice), `dz W`, `dz^T h`; each operand starting
/// inside its buffer. Products of bf16 values are exact in f32: only the order of the sums differs.
#[test]
fn gemm_bf16_f32_layouts() -> Result<()> {
    let dev = gpu();
    let (m, k, n) = (9, 7, 5);
    let bf = |shape: &[usize], seed| randn(shape, seed, 1.0, DType::BF16);
    let (h, w, dz) = (bf(&[m, k], 1), bf(&[n + 2, k], 2), bf(&[m, n], 3));
    let w_rows = w.narrow(0, 1, n)?; // a slice of the vocabulary's rows
    let (hd, wd, dzd) = (up(&h, &dev), up(&w, &dev).narrow(0, 1, n)?, up(&dz, &dev));
    let cases = [
        ("h W^T", crate::matmul_bf16_f32(&hd, &wd.t()?)?, crate::matmul_bf16_f32(&h, &w_rows.t()?)?),
        ("dz W", crate::matmul_bf16_f32(&dzd, &wd)?, crate::matmul_bf16_f32(&dz, &w_rows)?),
        ("dz^T h", crate::matmul_bf16_f32(&dzd.t()?, &hd)?, crate::matmul_bf16_f32(&dz.t()?, &h)?),
    ];
    for (what, got, want) in cases {
        assert_eq!(got.dtype(), DType::F32, "{what}");
        assert_close(&got, &want, 1e-5, what);
    }
    Ok(())
}

/// The profile's clock on a CUDA device: each mark an event recorded into the stream, read when
/// the step is booked (the emulated driver stamps an event with the host's time as it is
/// recorded, after the launches before it have run).
#[test]
fn profile_marks_are_events_of_the_stream() -> Result<()> {
    use crate::profile::{self, Level};
    let dev = gpu();
    let x = up(&randn(&[64, 512], 1, 1.0, DType::F32), &dev);
    let w = randn(&[512], 2, 1.0, DType::F32).to_device(&dev)?;
    profile::set_level(Level::Ops);
    profile::start(&dev)?;
    assert!(profile::on_events(), "the device's clock");
    for _ in 0..3 {
        rms_norm(&x, &w, 1e-6)?;
    }
    profile::phase(&dev, "forward")?;
    rms_norm(&x, &w, 1e-6)?;
    profile::phase(&dev, "again")?;
    let phases = profile::take()?;
    // Events of the booked step are recorded again by the next one; its report has a line of
    // the host's time per phase.
    profile::start(&dev)?;
    profile::phase(&dev, "empty")?;
    let report = profile::report(1)?.expect("profiling");
    profile::set_level(Level::Off);
    let lines: Vec<_> = report.lines().collect();
    assert!(lines.len() == 2 && lines[1].starts_with("profile step 1 host: empty="), "{report}");
    let names: Vec<_> = phases.iter().map(|p| p.name).collect();
    assert_eq!(names, ["forward", "again"]);
    for (p, n) in phases.iter().zip([3, 1]) {
        let norm = p.ops.iter().find(|o| o.name == "rms_norm").expect("rms_norm booked");
        assert!(norm.count == n && norm.seconds > 0.0, "{p:?}");
        let sum: f64 = p.ops.iter().map(|o| o.seconds).sum();
        assert!((sum - p.seconds).abs() < 1e-6 && p.seconds >= norm.seconds, "{p:?}");
        assert!(p.host_seconds > 0.0, "{p:?}");
    }
    Ok(())
}
