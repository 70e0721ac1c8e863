//! The SiLU gate of the MLP, `y = silu(g) * u` with `silu(g) = g * sigmoid(g)`.
//! Backward: `dg = dy * u * sig * (1 + g * (1 - sig))`, `du = dy * silu(g)`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float as _;
use rayon::prelude::*;

use super::{CPU_CHUNK, Elem, check_float, cpu_dispatch, cpu_slice};

/// `silu(gate) * up` (same shape and dtype), computed in f32 (f64 for f64). Differentiable in both.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _timed = crate::profile::op(gate.device(), "silu_mul");
    check_float(gate, "silu_mul")?;
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "silu_mul: gate {:?} {:?} vs up {:?} {:?}",
            gate.shape(),
            gate.dtype(),
            up.shape(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// The reference: `gate.silu() * up` with candle ops.
pub fn silu_mul_slow(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// The backward of [`silu_mul`]: `(d gate, d up)` for the upstream `dy` (no graph).
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let packed = backward_packed(gate, up, dy, false)?;
    Ok((packed.get(0)?.reshape(gate.shape())?, packed.get(1)?.reshape(up.shape())?))
}

/// [`silu_mul_backward`] and the forward's value `silu(gate) * up` (as [`silu_mul`] computes it,
/// bit for bit), from one pass over `gate` and `up`: `(d gate, d up, y)`.
pub fn silu_mul_backward_and_value(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let packed = backward_packed(gate, up, dy, true)?;
    let part = |i| packed.get(i)?.reshape(gate.shape());
    Ok((part(0)?, part(1)?, part(2)?))
}

/// [`silu_mul_backward_and_value`] for `gate`, `up` `[r, c]`: `d gate` stacked on `d up` as one
/// `[2r, c]` tensor (the layout of the stacked projection's transposed output), and `y` `[r, c]`.
pub fn silu_mul_backward_stacked_and_value(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (r, c) = gate.dims2()?;
    let packed = backward_packed(gate, up, dy, true)?;
    Ok((packed.narrow(0, 0, 2)?.reshape((2 * r, c))?, packed.get(2)?.reshape((r, c))?))
}

/// `[d gate, d up]` (`with_y`: `[d gate, d up, y]`) as one `[2 or 3, n]` tensor.
fn backward_packed(gate: &Tensor, up: &Tensor, dy: &Tensor, with_y: bool) -> Result<Tensor> {
    let _timed = crate::profile::op(gate.device(), "silu_mul_bwd");
    let (g, u) = (gate.contiguous()?, up.contiguous()?);
    g.apply_op3_no_bwd(&u, &dy.to_dtype(g.dtype())?.contiguous()?, &SiluMulBwd { with_y })
}

struct SiluMul;

/// `(g, u, dy) -> [dg, du]` (`with_y`: `[dg, du, y]`) packed in one `[2 or 3, n]` tensor.
struct SiluMulBwd {
    with_y: bool,
}

fn fwd_cpu<T: Elem>(g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout) -> Result<CpuStorage> {
    let g = cpu_slice::<T>(g, gl, "silu_mul")?;
    let u = cpu_slice::<T>(u, ul, "silu_mul")?;
    let mut out = vec![T::from_acc(T::cst(0.0)); g.len()];
    fwd_into(g, u, &mut out);
    Ok(T::to_cpu_storage_owned(out))
}

/// `y = silu(g) * u`.
fn fwd_into<T: Elem>(g: &[T], u: &[T], y: &mut [T]) {
    let one = T::cst(1.0);
    y.par_chunks_mut(CPU_CHUNK).zip(g.par_chunks(CPU_CHUNK).zip(u.par_chunks(CPU_CHUNK))).for_each(
        |(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                let g = g.acc();
                *y = T::from_acc(g / (one + (-g).exp()) * u.acc());
            }
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn bwd_cpu<T: Elem>(
    g: &CpuStorage,
    gl: &Layout,
    u: &CpuStorage,
    ul: &Layout,
    dy: &CpuStorage,
    dyl: &Layout,
    with_y: bool,
) -> Result<CpuStorage> {
    let g = cpu_slice::<T>(g, gl, "silu_mul backward")?;
    let u = cpu_slice::<T>(u, ul, "silu_mul backward")?;
    let dy = cpu_slice::<T>(dy, dyl, "silu_mul backward")?;
    let n = g.len();
    let one = T::cst(1.0);
    let mut out = vec![T::from_acc(T::cst(0.0)); if with_y { 3 * n } else { 2 * n }];
    let (dg, rest) = out.split_at_mut(n);
    let (du, y) = rest.split_at_mut(n);
    dg.par_chunks_mut(CPU_CHUNK)
        .zip(du.par_chunks_mut(CPU_CHUNK))
        .zip(g.par_chunks(CPU_CHUNK).zip(u.par_chunks(CPU_CHUNK)).zip(dy.par_chunks(CPU_CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let (g, u, d) = (g[i].acc(), u[i].acc(), dy[i].acc());
                let sig = one / (one + (-g).exp());
                dg[i] = T::from_acc(d * u * sig * (one + g * (one - sig)));
                du[i] = T::from_acc(d * g * sig);
            }
        });
    if with_y {
        fwd_into(g, u, y); // the forward's own loop: its value bit for bit
    }
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "dpo-silu-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(g, fwd_cpu(g, gl, u, ul))?;
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::silu_mul_fwd(g, gl, u, ul)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = silu_mul_backward(g, u, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "dpo-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != dyl.shape() {
            candle_core::bail!("silu_mul backward: {:?} vs {:?}", gl.shape(), dyl.shape());
        }
        let out = cpu_dispatch!(g, bwd_cpu(g, gl, u, ul, dy, dyl, self.with_y))?;
        Ok((out, Shape::from((if self.with_y { 3 } else { 2 }, gl.shape().elem_count()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if gl.shape() != dyl.shape() {
            candle_core::bail!("silu_mul backward: {:?} vs {:?}", gl.shape(), dyl.shape());
        }
        let out = super::cuda::silu_mul_bwd(g, gl, u, ul, dy, dyl, self.with_y)?;
        Ok((out, Shape::from((if self.with_y { 3 } else { 2 }, gl.shape().elem_count()))))
    }
}
