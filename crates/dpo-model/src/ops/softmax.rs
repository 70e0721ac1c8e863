//! `probs = softmax(scores * scale + bias)` over the last axis, with
//! `dscores = scale * P * (dP - sum_k dP * P)` from the saved output `P`.
//!
//! Masked keys are not read: where the bias is at or below [`BIAS_MASKS`] the scaled score is
//! the bias itself (what adding any score of a sane size to it rounds to: the ulp of 5e29 is
//! 4e22), and where `P` is 0 the backward reads no `dP` (`dscores` is 0 there). On the GPU most
//! of an attention row's scores are then never fetched (causal order, the other completion of a
//! shared prompt, padding); the CPU kernels follow the same rule, so that both give the same
//! numbers.

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use num_traits::Float as _;
use rayon::prelude::*;

use super::{Elem, check_float, cpu_dispatch, cpu_slice};
use crate::accum_dtype;

/// `softmax(scores * scale + bias)` over the last axis, for `scores` `[rows, heads, q, k]`
/// (bf16, f16, f32 or f64) and an additive bias `[rows or 1, 1, q, k]` (converted to f32; 0 or a
/// large finite negative such as [`crate::AttentionMask`]'s; at or below -5e29 it masks the key,
/// whose score is then not read). Computed in f32 (f64 for f64 scores), returned in the scores'
/// dtype. A fully masked row gives a uniform distribution.
/// Differentiable in `scores`; the bias takes no gradient.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let _timed = crate::profile::op(scores.device(), "softmax");
    check_float(scores, "masked_softmax")?;
    let (r, _, q, k) = scores.dims4()?;
    let (rb, one, qb, kb) = bias.dims4()?;
    if !((rb == r || rb == 1) && one == 1 && qb == q && kb == k) {
        candle_core::bail!(
            "masked_softmax: bias {:?} does not fit scores {:?}",
            bias.shape(),
            scores.shape()
        );
    }
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    scores.contiguous()?.apply_op2(&bias, MaskedSoftmax { scale })
}

/// The reference: the same softmax as a composition of differentiable candle ops.
pub fn masked_softmax_slow(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dt = scores.dtype();
    let acc = accum_dtype(dt);
    let x = scores.to_dtype(acc)?.affine(scale, 0.0)?.broadcast_add(&bias.to_dtype(acc)?)?;
    candle_nn::ops::softmax(&x, D::Minus1)?.to_dtype(dt)
}

/// A bias at or below this masks its key (`kernels/dpo_ops.cu`'s `BIAS_MASKS`;
/// [`crate::AttentionMask`] writes -1e30).
pub(crate) const BIAS_MASKS: f32 = -5e29;

pub(super) struct MaskedSoftmax {
    pub(super) scale: f64,
}

/// `(P, dP) -> dS`, the backward of [`MaskedSoftmax`].
pub(super) struct MaskedSoftmaxBwd {
    pub(super) scale: f64,
}

fn bias_row(row: usize, heads_q: usize, q: usize, bias_bcast: bool) -> usize {
    (if bias_bcast { 0 } else { row / heads_q }) * q + row % q
}

fn fwd_cpu<T: Elem>(
    s: &CpuStorage,
    sl: &Layout,
    b: &CpuStorage,
    bl: &Layout,
    scale: f64,
) -> Result<CpuStorage> {
    let x = cpu_slice::<T>(s, sl, "masked_softmax")?;
    let bias = cpu_slice::<f32>(b, bl, "masked_softmax bias")?;
    let (r, h, q, k) = sl.shape().dims4()?;
    let bias_bcast = bl.shape().dims()[0] == 1 && r != 1;
    let scale = T::cst(scale);
    let mut out = vec![T::from_acc(T::cst(0.0)); x.len()];
    if k > 0 {
        out.par_chunks_mut(k).zip(x.par_chunks(k)).enumerate().for_each_init(
            Vec::new,
            |buf: &mut Vec<T::A>, (row, (y, x))| {
                let br = bias_row(row, h * q, q, bias_bcast);
                let b = &bias[br * k..(br + 1) * k];
                buf.clear();
                buf.extend(x.iter().zip(b).map(|(&v, &b)| match b <= BIAS_MASKS {
                    true => T::cst(b as f64),
                    false => v.acc() * scale + T::cst(b as f64),
                }));
                let mut m = T::A::neg_infinity();
                for &v in buf.iter() {
                    if v > m {
                        m = v;
                    }
                }
                let mut sum = T::cst(0.0);
                for v in buf.iter_mut() {
                    *v = (*v - m).exp();
                    sum += *v;
                }
                for (y, &e) in y.iter_mut().zip(buf.iter()) {
                    *y = T::from_acc(e / sum);
                }
            },
        );
    }
    Ok(T::to_cpu_storage_owned(out))
}

fn bwd_cpu<T: Elem>(
    p: &CpuStorage,
    pl: &Layout,
    dp: &CpuStorage,
    dpl: &Layout,
    scale: f64,
) -> Result<CpuStorage> {
    let p = cpu_slice::<T>(p, pl, "masked_softmax backward")?;
    let dp = cpu_slice::<T>(dp, dpl, "masked_softmax backward")?;
    let k = pl.shape().dims().last().copied().unwrap_or(1).max(1);
    let scale = T::cst(scale);
    let mut out = vec![T::from_acc(T::cst(0.0)); p.len()];
    out.par_chunks_mut(k).zip(p.par_chunks(k).zip(dp.par_chunks(k))).for_each(|(ds, (p, dp))| {
        let zero = T::cst(0.0);
        let dot: T::A =
            p.iter().zip(dp).filter(|(p, _)| p.acc() != zero).map(|(&p, &d)| p.acc() * d.acc()).sum();
        for ((ds, &p), &d) in ds.iter_mut().zip(p).zip(dp) {
            *ds = T::from_acc(if p.acc() == zero { zero } else { scale * p.acc() * (d.acc() - dot) });
        }
    });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "dpo-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(s, fwd_cpu(s, sl, b, bl, self.scale))?;
        Ok((out, sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::softmax_fwd(s, sl, b, bl, self.scale)?, sl.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::op(grad.device(), "softmax_bwd");
        let ds = res
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &MaskedSoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

impl CustomOp2 for MaskedSoftmaxBwd {
    fn name(&self) -> &'static str {
        "dpo-masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        dp: &CpuStorage,
        dpl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if pl.shape() != dpl.shape() {
            candle_core::bail!("masked_softmax backward: {:?} vs {:?}", pl.shape(), dpl.shape());
        }
        let out = cpu_dispatch!(p, bwd_cpu(p, pl, dp, dpl, self.scale))?;
        Ok((out, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        dp: &candle_core::CudaStorage,
        dpl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if pl.shape() != dpl.shape() {
            candle_core::bail!("masked_softmax backward: {:?} vs {:?}", pl.shape(), dpl.shape());
        }
        Ok((super::cuda::softmax_bwd(p, pl, dp, dpl, self.scale)?, pl.shape().clone()))
    }
}
