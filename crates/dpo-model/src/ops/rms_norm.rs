//! RMSNorm as transformers computes it: `y = T(T(x * r) * T(w))`, `r = 1 / sqrt(mean(x^2) + eps)`
//! in f32 (f64 for f64). Backward with `n = x * r`, `g = dy * w`:
//! `dx = r * (g - n * mean(g * n))`, `dw = sum_rows dy * T(n)` (f32 accumulation, in row blocks).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use num_traits::Float as _;
use rayon::prelude::*;

use super::{Elem, check_float, cpu_dispatch, cpu_slice, on_device};
use crate::accum_dtype;

/// `w * (x / sqrt(mean(x^2) + eps))` over the last axis of `x` `[..., hidden]`, `w` `[hidden]`
/// (cast to x's dtype, as transformers does). Differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let _timed = crate::profile::op(x.device(), "rms_norm");
    check_float(x, "rms_norm")?;
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} does not fit input {:?}", w.shape(), x.shape());
    }
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2(&w, RmsNorm { eps, out: None })
}

/// `T(rms_norm(x, w, eps))` for `T = dtype`: the norm that feeds a matmul. For an f32 `x` and a
/// bf16/f16 result (the residual stream and the matmul dtype of mixed precision) one pass that
/// writes the result in `dtype` directly; otherwise [`rms_norm`] then a cast. Same values either
/// way; differentiable in `x` and `w` (their gradients in f32).
pub fn rms_norm_to(x: &Tensor, w: &Tensor, eps: f64, dtype: DType) -> Result<Tensor> {
    if !(x.dtype() == DType::F32 && matches!(dtype, DType::BF16 | DType::F16)) {
        return rms_norm(x, w, eps)?.to_dtype(dtype);
    }
    let _timed = crate::profile::op(x.device(), "rms_norm");
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} does not fit input {:?}", w.shape(), x.shape());
    }
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    x.contiguous()?.apply_op2(&w, RmsNorm { eps, out: Some(dtype) })
}

/// `(h + y, T(rms_norm(h + y, w, eps)))` for `T = dtype`, without a graph: the residual add that
/// leaves a branch ([`super::add_cast`]) and the norm that feeds the next matmul
/// ([`rms_norm_to`]), for a forward that keeps no graph (the reference's, the manual
/// backward's). On CUDA, for an f32 `h` and a `y` in `dtype` (bf16/f16), one pass that writes
/// the sum and normalizes it without reading it back from memory; otherwise those two ops. The
/// same values either way.
pub fn add_rms_norm_to(
    h: &Tensor,
    y: &Tensor,
    w: &Tensor,
    eps: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if h.device().is_cuda()
        && h.dtype() == DType::F32
        && y.dtype() == dtype
        && matches!(dtype, DType::BF16 | DType::F16)
        && h.shape() == y.shape()
        && w.dims() == [h.dim(D::Minus1)?]
    {
        let _timed = crate::profile::op(h.device(), "add_rms_norm");
        let (h, y, w) = (h.contiguous()?, y.contiguous()?, w.to_dtype(DType::F32)?.contiguous()?);
        let (sum, normed) = {
            let (hs, ys, ws) = (h.storage_and_layout(), y.storage_and_layout(), w.storage_and_layout());
            let (hs, hl) = on_device::<candle_core::CudaStorage>(&hs, "add_rms_norm")?;
            let (ys, yl) = on_device(&ys, "add_rms_norm branch")?;
            let (ws, wl) = on_device(&ws, "add_rms_norm weight")?;
            super::cuda::add_rms_norm_fwd(hs, hl, ys, yl, ws, wl, eps)?
        };
        // Both outputs as tensors of h's device, without a copy.
        let stash = super::Stash::default();
        stash.put(sum, h.shape().clone());
        let sum = stash.take(&h)?;
        stash.put(normed, h.shape().clone());
        return Ok((sum, stash.take(&h)?));
    }
    let sum = super::add_cast(&h.detach(), &y.detach())?;
    let normed = rms_norm_to(&sum, &w.detach(), eps, dtype)?;
    Ok((sum, normed))
}

/// The backward of [`rms_norm`]: `(dx, dw)` for the upstream `dy` (no graph). `w` is cast to
/// `x`'s dtype, as in the forward, and so is `dw`.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let _timed = crate::profile::op(x.device(), "rms_norm_bwd");
    backward(x, w, &dy.to_dtype(x.dtype())?, &RmsNormBwd::new(eps, None))
}

/// `(res + dx, dw)`: [`rms_norm_backward`] with `res`, the gradient that reaches `x` through the
/// residual connection (`x`'s shape and dtype), added in the same pass, and `dy` read in its own
/// dtype where it is the bf16/f16 output of a matmul for an f32 `x`. The manual backward's
/// `dh = dout + RMSNorm'(f32(dy))` in one op instead of a cast, the backward and an add.
pub fn rms_norm_backward_add(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
    res: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (dx, dw, _) = backward_add(x, w, eps, dy, res, None)?;
    Ok((dx, dw))
}

/// `(res + dx, dw, T(res + dx))`: [`rms_norm_backward_add`] with its first output also in `lo`
/// (bf16/f16, for an f32 `x`), the gradient the matmul before the norm reads. On CUDA, with `dy`
/// in `lo` (a matmul's output gradient), the same pass writes both, where a cast would read the
/// f32 gradient again; elsewhere that cast. The same values either way.
pub fn rms_norm_backward_add_lo(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
    res: &Tensor,
    lo: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dx, dw, dx_lo) = backward_add(x, w, eps, dy, res, Some(lo))?;
    Ok((dx, dw, dx_lo.expect("asked for")))
}

/// [`rms_norm_backward_add`], and with `lo` its first output in that dtype too.
fn backward_add(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
    res: &Tensor,
    lo: Option<DType>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let _timed = crate::profile::op(x.device(), "rms_norm_bwd");
    if res.dims() != x.dims() {
        candle_core::bail!("rms_norm backward: residual gradient {:?} for x {:?}", res.shape(), x.shape());
    }
    let mixed = x.dtype() == DType::F32 && matches!(dy.dtype(), DType::BF16 | DType::F16);
    let dy = if mixed { dy.clone() } else { dy.to_dtype(x.dtype())? };
    let res = res.to_dtype(x.dtype())?.contiguous()?.detach();
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && mixed && lo == Some(dy.dtype()) {
        let op = RmsNormBwd { eps, res: Some(res), lo: Some(super::Stash::default()) };
        let (dx, dw) = backward(x, w, &dy, &op)?;
        let dx_lo = op.lo.as_ref().expect("asked for").take(&dx)?;
        return Ok((dx, dw, Some(dx_lo)));
    }
    let (dx, dw) = backward(x, w, &dy, &RmsNormBwd::new(eps, Some(res)))?;
    let dx_lo = lo.map(|lo| dx.to_dtype(lo)).transpose()?;
    Ok((dx, dw, dx_lo))
}

/// Runs `op` on `x`, `w` (cast to x's dtype) and `dy`, and unpacks `(dx, dw)`.
fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, op: &RmsNormBwd) -> Result<(Tensor, Tensor)> {
    let (x, w) = (x.contiguous()?, w.to_dtype(x.dtype())?.contiguous()?);
    let (n, d) = (x.elem_count(), w.elem_count());
    let packed = x.apply_op3_no_bwd(&w, &dy.contiguous()?, op)?;
    // `dw` in a buffer of its own: a view would keep the whole packed buffer (`[rows + 1, hidden]`
    // in f32) alive for as long as the weight's gradient, to the end of the step, and across
    // micro-batches with gradient accumulation (one a norm: 1 GiB on the GPU benchmark).
    let dw = packed.narrow(0, n, d)?.force_contiguous()?;
    Ok((packed.narrow(0, 0, n)?.reshape(x.shape())?, dw.reshape(w.shape())?))
}

/// The reference: `w * (x / sqrt(mean(x^2) + eps))` from differentiable candle ops.
pub fn rms_norm_slow(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(accum_dtype(dtype))?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

struct RmsNorm {
    eps: f64,
    /// The output dtype when it is not the input's: bf16 or f16, for f32 inputs.
    out: Option<DType>,
}

/// `(x, w, dy) -> [dx (flattened), dw]` packed in one `[rows * hidden + hidden]` tensor; with
/// `res` (contiguous, x's shape and dtype), `res + dx` in place of `dx`.
struct RmsNormBwd {
    eps: f64,
    res: Option<Tensor>,
    /// Where the CUDA forward leaves `res + dx` in dy's dtype, when asked for.
    #[cfg(feature = "cuda")]
    lo: Option<super::Stash>,
}

impl RmsNormBwd {
    fn new(eps: f64, res: Option<Tensor>) -> Self {
        RmsNormBwd {
            eps,
            res,
            #[cfg(feature = "cuda")]
            lo: None,
        }
    }
}

/// Rows per partial sum of `dw` on the CPU.
const DW_ROWS: usize = 32;

fn inv_rms<T: Elem>(x: &[T], eps: T::A) -> T::A {
    let ss: T::A = x.iter().map(|&v| v.acc() * v.acc()).sum();
    let one = T::cst(1.0);
    one / (ss * (one / T::cst(x.len() as f64)) + eps).sqrt()
}

fn fwd_cpu<T: Elem>(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CpuStorage> {
    fwd_cpu_to::<T, T>(x, xl, w, wl, eps)
}

/// The forward with the output rounded to `O` (computed as for `T`).
fn fwd_cpu_to<T: Elem, O: Elem<A = T::A>>(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CpuStorage> {
    let x = cpu_slice::<T>(x, xl, "rms_norm")?;
    let w = cpu_slice::<T>(w, wl, "rms_norm weight")?;
    let d = w.len().max(1);
    let eps = T::cst(eps);
    let mut out = vec![O::from_acc(T::cst(0.0)); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let r = inv_rms(x, eps);
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = O::from_acc(T::round(x.acc() * r) * w.acc());
        }
    });
    Ok(O::to_cpu_storage_owned(out))
}

/// The backward for `x` in `T` and `dy` in `U` (`T`, or bf16/f16 for f32 `x`), plus `res`.
#[allow(clippy::too_many_arguments)]
fn bwd_cpu<T: Elem, U: Elem<A = T::A>>(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    dy: &CpuStorage,
    dyl: &Layout,
    res: Option<(&CpuStorage, &Layout)>,
    eps: f64,
) -> Result<CpuStorage> {
    let x = cpu_slice::<T>(x, xl, "rms_norm backward")?;
    let w = cpu_slice::<T>(w, wl, "rms_norm backward")?;
    let dy = cpu_slice::<U>(dy, dyl, "rms_norm backward")?;
    let res = res.map(|(r, rl)| cpu_slice::<T>(r, rl, "rms_norm backward residual")).transpose()?;
    let d = w.len().max(1);
    let n = x.len();
    let eps = T::cst(eps);
    let zero = T::cst(0.0);
    let mut out = vec![T::from_acc(zero); n + w.len()];
    let (dx, dw) = out.split_at_mut(n);
    let rs: Vec<T::A> = dx
        .par_chunks_mut(d)
        .enumerate()
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .map(|((i, dx), (x, dy))| {
            let r = inv_rms(x, eps);
            let gx: T::A = x.iter().zip(dy).zip(w).map(|((&x, &g), &w)| g.acc() * w.acc() * x.acc()).sum();
            let c = r * gx / T::cst(d as f64);
            for (j, (((dx, &x), &g), &w)) in dx.iter_mut().zip(x).zip(dy).zip(w).enumerate() {
                let v = r * (g.acc() * w.acc() - x.acc() * r * c);
                *dx = T::from_acc(match res {
                    Some(res) => v + res[i * d + j].acc(),
                    None => v,
                });
            }
            r
        })
        .collect();
    // dw: partial sums over blocks of DW_ROWS rows, then a sum of the partials.
    let partials: Vec<Vec<T::A>> = x
        .par_chunks(DW_ROWS * d)
        .zip(dy.par_chunks(DW_ROWS * d))
        .zip(rs.par_chunks(DW_ROWS))
        .map(|((x, dy), rs)| {
            let mut acc = vec![zero; d];
            for ((x, dy), &r) in x.chunks(d).zip(dy.chunks(d)).zip(rs) {
                for ((a, &x), &g) in acc.iter_mut().zip(x).zip(dy) {
                    *a += g.acc() * T::round(x.acc() * r);
                }
            }
            acc
        })
        .collect();
    for (j, dw) in dw.iter_mut().enumerate() {
        *dw = T::from_acc(partials.iter().map(|p| p[j]).sum());
    }
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "dpo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match self.out {
            None => cpu_dispatch!(x, fwd_cpu(x, xl, w, wl, self.eps)),
            Some(DType::BF16) => fwd_cpu_to::<f32, half::bf16>(x, xl, w, wl, self.eps),
            Some(DType::F16) => fwd_cpu_to::<f32, half::f16>(x, xl, w, wl, self.eps),
            Some(dt) => candle_core::bail!("rms_norm: no fused path to {dt:?}"),
        }?;
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::rms_norm_fwd(x, xl, w, wl, self.eps, self.out)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, self.eps, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "dpo-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != dyl.shape() {
            candle_core::bail!("rms_norm backward: {:?} vs {:?}", xl.shape(), dyl.shape());
        }
        let res = self.res.as_ref().map(|r| r.storage_and_layout());
        let res = res.as_ref().map(|r| on_device::<CpuStorage>(r, "the residual gradient")).transpose()?;
        use candle_core::backend::BackendStorage;
        let (eps, dt) = (self.eps, (x.dtype(), dy.dtype()));
        let out = match dt {
            (DType::F32, DType::BF16) => bwd_cpu::<f32, half::bf16>(x, xl, w, wl, dy, dyl, res, eps),
            (DType::F32, DType::F16) => bwd_cpu::<f32, half::f16>(x, xl, w, wl, dy, dyl, res, eps),
            (DType::F32, DType::F32) => bwd_cpu::<f32, f32>(x, xl, w, wl, dy, dyl, res, eps),
            (DType::F64, DType::F64) => bwd_cpu::<f64, f64>(x, xl, w, wl, dy, dyl, res, eps),
            (DType::BF16, DType::BF16) => bwd_cpu::<half::bf16, half::bf16>(x, xl, w, wl, dy, dyl, res, eps),
            (DType::F16, DType::F16) => bwd_cpu::<half::f16, half::f16>(x, xl, w, wl, dy, dyl, res, eps),
            (a, b) => candle_core::bail!("rms_norm backward: x {a:?} with dy {b:?}"),
        }?;
        Ok((out, Shape::from(xl.shape().elem_count() + wl.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if xl.shape() != dyl.shape() {
            candle_core::bail!("rms_norm backward: {:?} vs {:?}", xl.shape(), dyl.shape());
        }
        let res = self.res.as_ref().map(|r| r.storage_and_layout());
        let res = res.as_ref().map(|r| on_device(r, "the residual gradient")).transpose()?;
        let (out, lo) = super::cuda::rms_norm_bwd(x, xl, w, wl, dy, dyl, res, self.eps, self.lo.is_some())?;
        if let (Some(stash), Some(lo)) = (&self.lo, lo) {
            stash.put(lo, xl.shape().clone());
        }
        Ok((out, Shape::from(xl.shape().elem_count() + wl.shape().elem_count())))
    }
}
