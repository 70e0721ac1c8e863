//! Log-probabilities of target tokens under the softmax of logit rows, and their gradient, each
//! in one pass over the logits (the LM head's, rows of a 151,936-token vocabulary):
//!
//! ```text
//! lse_i  = log sum_v exp(z_iv)
//! logp_i = z_{i,t_i} - lse_i
//! dz_iv  = g_i [v = t_i] - g_i exp(z_iv - lse_i)     (the gradient of sum_i g_i logp_i)
//! ```
//!
//! The compositions of candle ops they replace (`*_slow`) pass over `[rows, vocab]` five times
//! in the forward and six times in the backward, each pass a new tensor of that size (f32).
//! Neither op records a graph: the trainer's chunked LM head calls the backward itself.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float as _;
use rayon::prelude::*;

use super::{Elem, check_float, cpu_dispatch, cpu_slice};
use crate::accum_dtype;

/// `(logp, lse)` of `targets` (`[rows]`, u32) under `softmax(logits)` (`[rows, vocab]`, bf16,
/// f16, f32 or f64), each `[rows]` in f32 (f64 for f64 logits). A target outside the vocabulary
/// is an error on the CPU and gives a NaN log-prob on CUDA. No gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let z = Tensor::new(&[[0f32, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[1u32, 0], &Device::Cpu)?;
/// let (logp, lse) = dpo_model::ops::target_logprobs(&z, &t)?;
/// let lse2 = (2f32.exp() + 3.0).ln();
/// assert_eq!(lse.to_vec1::<f32>()?, vec![4f32.ln(), lse2]);
/// assert_eq!(logp.to_vec1::<f32>()?, vec![-(4f32.ln()), 2.0 - lse2]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let _timed = crate::profile::op(logits.device(), "target_logprobs");
    check(logits, targets, "target_logprobs")?;
    let out = logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &TargetLogProbs)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// The reference for [`target_logprobs`]: the same values from candle ops.
pub fn target_logprobs_slow(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let z = logits.to_dtype(accum_dtype(logits.dtype()))?;
    let max = z.max_keepdim(D::Minus1)?;
    let lse = z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?.add(&max)?.squeeze(D::Minus1)?;
    let picked = z.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(((picked - &lse)?, lse))
}

/// The gradient of `sum_i g_i logp_i` with respect to `logits`, in their dtype, from the `lse`
/// that [`target_logprobs`] returned for the whole rows and `g` `[rows]` (any float dtype).
/// `logits` are the vocabulary's columns `first..first + cols` (0 and the whole vocabulary, or
/// a slice: the LM head's backward runs by slices); a target outside them adds no one-hot.
/// Targets are checked against the vocabulary by the forward, not here.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let (z, t) = (Tensor::new(&[[0f32, 1.0, 2.0, 3.0]], &Device::Cpu)?, Tensor::new(&[2u32], &Device::Cpu)?);
/// let (_, lse) = dpo_model::ops::target_logprobs(&z, &t)?;
/// let g = Tensor::new(&[1f32], &Device::Cpu)?;
/// let whole = dpo_model::ops::target_logprobs_backward(&z, &lse, &t, &g, 0)?;
/// let right = dpo_model::ops::target_logprobs_backward(&z.narrow(1, 2, 2)?, &lse, &t, &g, 2)?;
/// assert_eq!(right.to_vec2::<f32>()?, whole.narrow(1, 2, 2)?.to_vec2::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn target_logprobs_backward(
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    first: usize,
) -> Result<Tensor> {
    target_logprobs_backward_to(logits, lse, targets, g, first, logits.dtype())
}

/// [`target_logprobs_backward`] rounded to `out`: the logits' dtype, or bf16/f16 from f32 logits
/// (the LM head's gradient as a bf16 matmul takes it: no f32 `[rows, cols]` tensor and no cast
/// pass).
pub fn target_logprobs_backward_to(
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    first: usize,
    out: DType,
) -> Result<Tensor> {
    let _timed = crate::profile::op(logits.device(), "target_logprobs_bwd");
    check(logits, targets, "target_logprobs_backward")?;
    let acc = accum_dtype(logits.dtype());
    let lse_g = Tensor::stack(&[lse.to_dtype(acc)?, g.to_dtype(acc)?], 0)?;
    if lse_g.dims() != [2, logits.dim(0)?] {
        candle_core::bail!("target_logprobs_backward: lse and g must be [{}]", logits.dim(0)?);
    }
    logits.contiguous()?.apply_op3_no_bwd(&lse_g, &targets.contiguous()?, &TargetLogProbsBwd { first, out })
}

/// The reference for [`target_logprobs_backward`]: the same values from candle ops.
pub fn target_logprobs_backward_slow(
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    first: usize,
) -> Result<Tensor> {
    let acc = accum_dtype(logits.dtype());
    let z = logits.to_dtype(acc)?;
    let g = g.to_dtype(acc)?.unsqueeze(1)?;
    let probs = z.broadcast_sub(&lse.to_dtype(acc)?.unsqueeze(1)?)?.exp()?;
    let cols = Tensor::arange(first as u32, (first + z.dim(1)?) as u32, z.device())?;
    let onehot = cols.unsqueeze(0)?.broadcast_eq(&targets.unsqueeze(1)?)?.to_dtype(acc)?;
    (onehot.broadcast_mul(&g)? - probs.broadcast_mul(&g)?)?.to_dtype(logits.dtype())
}

fn check(logits: &Tensor, targets: &Tensor, what: &str) -> Result<()> {
    check_float(logits, what)?;
    let (rows, vocab) = logits.dims2()?;
    if targets.dtype() != DType::U32 || targets.dims() != [rows] || vocab == 0 {
        candle_core::bail!(
            "{what}: targets must be u32 [{rows}] and the vocabulary not empty (got {:?} {:?}, vocab {vocab})",
            targets.dtype(),
            targets.dims()
        );
    }
    Ok(())
}

struct TargetLogProbs;

/// `(lse_g, targets) -> dlogits` for logits `[rows, cols]`, the vocabulary's columns `first..`,
/// and `lse_g` `[2, rows]` (lse, then g), in `out` (the logits' dtype, or bf16/f16 from f32).
pub(super) struct TargetLogProbsBwd {
    pub(super) first: usize,
    pub(super) out: DType,
}

/// The targets, each checked against the vocabulary.
fn cpu_targets<'a>(t: &'a CpuStorage, tl: &Layout, vocab: usize, what: &str) -> Result<&'a [u32]> {
    let t = cpu_slice::<u32>(t, tl, what)?;
    if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("{what}: target token {bad} outside the vocabulary of {vocab}");
    }
    Ok(t)
}

fn fwd_cpu<T: Elem>(z: &CpuStorage, zl: &Layout, t: &CpuStorage, tl: &Layout) -> Result<CpuStorage> {
    let z = cpu_slice::<T>(z, zl, "target_logprobs")?;
    let (rows, vocab) = zl.shape().dims2()?;
    let t = cpu_targets(t, tl, vocab, "target_logprobs")?;
    let mut out = vec![T::cst(0.0); 2 * rows];
    let (logp, lse) = out.split_at_mut(rows);
    logp.par_iter_mut().zip(lse).zip(z.par_chunks(vocab).zip(t)).for_each(|((logp, lse), (z, &t))| {
        // NaN never wins the max; it reaches the sum.
        let m = z.iter().fold(T::A::neg_infinity(), |m, &x| if x.acc() > m { x.acc() } else { m });
        // Summed in f64: 151,936 f32 terms one after the other lose 3e-4 of the sum.
        let s: f64 = z.iter().map(|&x| WithDType::to_f64((x.acc() - m).exp())).sum();
        *lse = <T::A as WithDType>::from_f64(s.ln()) + m;
        *logp = z[t as usize].acc() - *lse;
    });
    Ok(T::A::to_cpu_storage_owned(out))
}

/// `(logits, lse_g, targets)` with their layouts, and the slice's first column.
type BwdArgs<'a> =
    (&'a CpuStorage, &'a Layout, &'a CpuStorage, &'a Layout, &'a CpuStorage, &'a Layout, usize);

fn bwd_cpu<T: Elem>(args: BwdArgs) -> Result<CpuStorage> {
    bwd_cpu_to::<T, T>(args)
}

/// [`bwd_cpu`] rounded to `O` (of the same accumulator: bf16/f16 from f32 logits).
fn bwd_cpu_to<T: Elem, O: Elem<A = T::A>>((z, zl, lg, lgl, t, tl, first): BwdArgs) -> Result<CpuStorage> {
    let z = cpu_slice::<T>(z, zl, "target_logprobs_backward")?;
    let (rows, vocab) = zl.shape().dims2()?;
    let t = cpu_slice::<u32>(t, tl, "target_logprobs_backward")?;
    let (lse, g) = cpu_slice::<T::A>(lg, lgl, "target_logprobs_backward lse and g")?.split_at(rows);
    let zero = T::cst(0.0);
    let mut out = vec![O::from_acc(zero); z.len()];
    out.par_chunks_mut(vocab).zip(z.par_chunks(vocab)).enumerate().for_each(|(i, (dz, z))| {
        let (lse, g, t) = (lse[i], g[i], t[i] as usize);
        for (v, (dz, &x)) in dz.iter_mut().zip(z).enumerate() {
            let hot = if v + first == t { g } else { zero };
            *dz = O::from_acc(hot - (x.acc() - lse).exp() * g);
        }
    });
    Ok(O::to_cpu_storage_owned(out))
}

impl CustomOp2 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "dpo-target-logprobs"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        zl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(z, fwd_cpu(z, zl, t, tl))?;
        Ok((out, Shape::from((2, zl.dims()[0]))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        zl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::target_logprobs(z, zl, t, tl)?, Shape::from((2, zl.dims()[0]))))
    }
}

impl CustomOp3 for TargetLogProbsBwd {
    fn name(&self) -> &'static str {
        "dpo-target-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        zl: &Layout,
        lg: &CpuStorage,
        lgl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = (z, zl, lg, lgl, t, tl, self.first);
        let out = match (candle_core::backend::BackendStorage::dtype(z), self.out) {
            (dt, out) if dt == out => cpu_dispatch!(z, bwd_cpu(args))?,
            (DType::F32, DType::BF16) => bwd_cpu_to::<f32, half::bf16>(args)?,
            (DType::F32, DType::F16) => bwd_cpu_to::<f32, half::f16>(args)?,
            (dt, out) => candle_core::bail!("target_logprobs_backward: {dt:?} logits into {out:?}"),
        };
        Ok((out, zl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        zl: &Layout,
        lg: &candle_core::CudaStorage,
        lgl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::target_logprobs_bwd(z, zl, lg, lgl, t, tl, self.first, self.out)?,
            zl.shape().clone(),
        ))
    }
}
